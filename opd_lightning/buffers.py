"""Memory the projections keep between calls, so that a training step does not page in fresh memory each time.

On the CPU, PyTorch hands every large tensor to the C allocator, which maps it afresh from the operating system and
unmaps it when freed: each call that writes a new `[B, N, V_s]` target (805 MB on the SmolLM2/Gemma-3 batch of
`benchmarks/alignment.py`) or a 128 MB chunk of teacher rows pays a page fault per page while first writing it. Two
kinds of kept memory avoid that:

- `scratch`: work buffers that never leave a projection (a chunk of teacher rows, its column sums). One per slot.
- `target_buffer`: the tensor a projection returns as its target. The caller (a loss, autograd's saved tensors, a
  cache) may hold it for any time, so the kept tensor is reused only when nothing but this module holds its memory
  (its storage's reference count, which every tensor viewing it raises, those saved for backward included);
  otherwise the call gets fresh memory. A target is never written over while anything can read it: two projections
  in one step (a term on gold completions beside one on rollouts) get two tensors.

On other devices both allocate as usual (their caching allocators keep memory already). Each kept tensor costs its
size for the life of the process; `release` frees them.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

__all__ = ["release", "scratch", "target_buffer"]

_SCRATCH: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
_TARGETS: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
_LOCK = threading.Lock()
_USES = getattr(torch._C, "_storage_Use_Count", None)  # a private binding: without it, targets are never reused


def _storage_uses(tensor: Tensor) -> int:
    return _USES(tensor.untyped_storage()._cdata)


_ALONE = _storage_uses(torch.empty(1)) if _USES is not None else 0  # a tensor nothing else holds (with this call's ref)


def scratch(rows: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32,
            slot: str = "rows") -> Tensor:
    """A reused `[rows, width]` work buffer (contents undefined), one per slot, device and dtype, kept between calls.

    The projections copy each chunk of teacher rows into a buffer of up to `rows.CHUNK_ELEMENTS` values before
    soft-maxing it in place: 128 MB at most for the chunk slots, and for `byte_spans`' "deep" slot the rows its walks
    go below (a third of a batch's positions on the SmolLM2/Gemma-3 pair, `[n, V_s]`). On the synthetic benchmark
    batch, allocating it afresh per call cost eight times the copy itself in page faults.
    Not re-entrant: a caller must be done with a slot's buffer before the next call on the same slot and device.
    """
    key, need = (slot, torch.device(device), dtype), rows * width
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < need:
        buffer = _SCRATCH[key] = torch.empty(max(need, 1), dtype=dtype, device=device)
    return buffer[:need].view(rows, width)


def target_buffer(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32,
                  slot: str = "target") -> Tensor:
    """A `shape` tensor (contents undefined) for a projection to return: on the CPU the memory kept for `slot` when
    nothing else holds it (an earlier call's target that was dropped, its backward done), else fresh memory.

    The kept tensor grows to the largest shape asked for; a call that finds it held elsewhere gets a new tensor and
    leaves the kept one as it is.
    """
    device, need = torch.device(device), math.prod(shape)
    if device.type != "cpu" or _USES is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (slot, device, dtype)
    with _LOCK:  # the check, and the view that makes the memory held, in one step
        kept = _TARGETS.get(key)
        if kept is not None and _storage_uses(kept) > _ALONE:
            return torch.empty(shape, dtype=dtype, device=device)
        if kept is None or kept.numel() < need:
            kept = _TARGETS[key] = None  # the smaller one freed before the larger is made
            kept = _TARGETS[key] = torch.empty(max(need, 1), dtype=dtype, device=device)
        return kept[:need].view(shape)


def release() -> None:
    """Free every kept buffer (later calls allocate again)."""
    with _LOCK:
        _SCRATCH.clear()
        _TARGETS.clear()
