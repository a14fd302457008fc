"""A fused output layer for the dense losses: the student's `[n, V]` logits are never held whole.

`fused_dense_sum` takes the student's final hidden states `[n, H]` and its output layer (`weight` `[V, H]`, optional
`bias` `[V]`) instead of its logits. Chunk by chunk of positions it projects the hidden states, computes the loss
term on that chunk exactly as `dense_sum` does (`_chunk_sum`: the same log-softmax, temperature, top-k buckets and
support rules), a few positions at a time (`SUB_ELEMENTS`), and takes the gradient with respect to those logits at
once, written over them; from the chunk's gradient the gradients of the hidden states (`g @ W`) and of the output
layer (`gᵀ h`, `Σ g`) are accumulated. The backward pass only scales the stored gradients by the incoming one, so
the output layer's three matrix products (forward, two in backward) are done once each, as in the unfused path, and
the memory held beyond the inputs is one chunk's logits (student and teacher), a few positions' softmax
intermediates, and gradients of the hidden states' and the output layer's own sizes (the approach of Liger-Kernel's
chunked losses, written here in plain PyTorch so that it runs on CPU and GPU alike).

Because the gradients are taken in the forward pass, the loss must enter the objective linearly (it is scaled and
summed, as every objective here does), and it has no second derivative. A tied output layer (the embedding matrix)
and a LoRA-adapted one are served by passing the effective weight: autograd carries `∂L/∂W` on to whatever the
weight was computed from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from opd_lightning.target import TopK, upcast

from .base import PerToken, _chunk_sum, check_teacher, dense_sum, normalise, teacher_distribution

__all__ = ["HiddenRows", "default_chunk", "dense_parts", "fused_dense_divergence", "fused_dense_sum"]

# Logits computed at a time when no chunk size is given: 2**23 values (32 MB in fp32; 32 positions of a 262k
# vocabulary, 256 of a 32k one). A chunk holds a handful of `[c, V]` intermediates (logits, log-probs, the teacher's,
# the gradient), so this bounds the path's own memory to a few hundred MB whatever the vocabulary; larger chunks were
# measured no faster (`benchmarks/fused_output.py --fused-chunks`, in benchmarks/RESULTS.md).
CHUNK_ELEMENTS = 2**23
# Logits whose loss and gradient are taken at a time inside a chunk (2**19: 2 MB in fp32, two positions of a 262k
# vocabulary): the softmax intermediates stay a small fraction of a chunk while the matrix products run per chunk
# (smaller steps were measured no slower and leaner: benchmarks/RESULTS.md, "the fused path's chunk size").
SUB_ELEMENTS = 2**19


def default_chunk(vocab: int) -> int:
    """Positions per chunk for a `vocab`-wide output layer: `CHUNK_ELEMENTS` logits, at least one position."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


@dataclass(frozen=True)
class HiddenRows:
    """Logits given as hidden states `[..., H]` through an output layer `weight` `[V, H]` (and `bias` `[V]`).

    As a teacher: its logits are computed a slice of rows at a time and without gradient, so that they are never held
    whole either. As the student (in place of its logits, for a `DenseDivergence`): the loss runs the fused path, a
    `chunk_size` of positions at a time (None: `default_chunk(V)`), and the gradient reaches `hidden`, `weight` and
    `bias`. Indexing (`rows[i]`, `rows[r, c]`) returns those positions' logits without gradient (what diagnostics
    read); `select(mask)` the masked rows.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    chunk_size: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.hidden.shape[:-1], self.weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def gather(self, batch: Tensor, pos: Tensor, out: Tensor | None = None) -> Tensor:
        """The logits `[n, V]` at positions `(batch[i], pos[i])` of `[B, M, H]` hidden states, without gradient,
        written into `out[:n]` when given (in `out`'s dtype)."""
        with torch.no_grad():
            h = self.hidden[batch, pos]  # [n, H]
            if out is None:
                return torch.nn.functional.linear(h, self.weight, self.bias)
            if out.dtype != h.dtype:
                return out[: len(h)].copy_(torch.nn.functional.linear(h, self.weight, self.bias))
            return _project(h, self.weight, self.bias, out)

    def __getitem__(self, rows) -> Tensor:
        with torch.no_grad():
            return torch.nn.functional.linear(self.hidden[rows], self.weight, self.bias)

    def detach(self) -> HiddenRows:
        return HiddenRows(self.hidden.detach(), self.weight.detach(), None if self.bias is None else self.bias.detach(),
                          self.chunk_size)

    def select(self, mask: Tensor) -> HiddenRows:
        return replace(self.detach(), hidden=self.hidden[mask].detach())


def _project(h: Tensor, w: Tensor, b: Tensor | None, buffer: Tensor) -> Tensor:
    """`h @ wᵀ + b` for one chunk, written into the first rows of `buffer` (returned as a fresh leaf)."""
    out = buffer[: h.shape[0]]
    if b is None:
        torch.mm(h, w.t(), out=out)
    else:
        torch.addmm(b, h, w.t(), out=out)
    return out.detach()


class _FusedLinearSum(torch.autograd.Function):
    """Σ per_token over rows, from hidden states through the output layer; gradients taken chunk by chunk in the
    forward pass (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, per_token: PerToken, temperature: float,
                chunk_size: int, teacher_rows: Tensor, topk_ids: Tensor | None, part_weights: Tensor | None,
                *extras: Tensor) -> tuple[Tensor, Tensor]:
        want_h, want_w = hidden.requires_grad, weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=upcast(weight).dtype) if want_w else None  # fp32 accumulator
        grad_b = torch.zeros_like(bias, dtype=upcast(bias).dtype) if want_b else None
        total = parts = None
        w, b = weight.detach(), None if bias is None else bias.detach()
        # One work buffer per side for the chunks' logits, written in place: a fresh [c, V] tensor per chunk would be
        # paged in anew each time (on CPU that costs more than the matrix product that fills it).
        width = min(chunk_size, hidden.shape[0])
        buffer = hidden.new_empty(width, w.shape[0], dtype=torch.result_type(hidden, w))
        t_buffer = None
        if isinstance(teacher_rows, HiddenRows):
            t_buffer = teacher_rows.hidden.new_empty(width, teacher_rows.weight.shape[0],
                                                     dtype=torch.result_type(teacher_rows.hidden, teacher_rows.weight))
        # The loss and its logits' gradient are taken `step` rows at a time inside each chunk, and each sub-chunk's
        # gradient (in the logits' dtype) is written over its logits in the work buffer: the chunk's matrix products
        # stream the output layer once per `chunk_size` rows, while the softmax intermediates (a handful of
        # [step, V] tensors) stay a fraction of a chunk. Measured in benchmarks/RESULTS.md.
        step = max(1, min(width, SUB_ELEMENTS // max(w.shape[0], 1)))
        grads_wanted = want_h or want_w or want_b
        for lo in range(0, max(hidden.shape[0], 1), chunk_size):
            rows = slice(lo, lo + chunk_size)
            h = hidden[rows].detach()
            logits = _project(h, w, b, buffer)
            if t_buffer is not None:
                t_rows = _project(teacher_rows.hidden[rows].detach(), teacher_rows.weight.detach(),
                                  None if teacher_rows.bias is None else teacher_rows.bias.detach(), t_buffer)
            else:
                t_rows = teacher_rows[rows]
            for a in range(0, max(logits.shape[0], 1), step):
                end = min(a + step, logits.shape[0])
                local, at = slice(a, end), slice(lo + a, lo + end)  # within the chunk, within all rows
                sub = logits[local].requires_grad_(grads_wanted)
                if t_buffer is not None:
                    check_teacher(t_rows[local])  # a sub-chunk at a time: its [step, V] masks are small
                with torch.enable_grad():
                    part = _chunk_sum(per_token, temperature, sub, t_rows[local],
                                      None if topk_ids is None else topk_ids[at], *(e[at] for e in extras))
                    if (part.dim() != 0) != (part_weights is not None):
                        raise ValueError("a per-token value of several parts needs part_weights (one per part), and "
                                         "one of a single part none")
                    value = part if part_weights is None else (part * part_weights.to(part.dtype)).sum()
                    if grads_wanted:
                        (g,) = torch.autograd.grad(value, sub)
                        logits[local].copy_(g)  # over the sub-chunk's logits (a view of the buffer), no longer read
                        del g
                value, part = value.detach(), part.detach()
                total = value if total is None else total + value
                parts = part if parts is None else parts + part
                del sub
            if grads_wanted:
                g = logits  # now the chunk's gradient
                if want_h and g.dtype == grad_h.dtype == w.dtype:
                    torch.mm(g, w, out=grad_h[rows])
                elif want_h:
                    grad_h[rows] = (g @ w).to(grad_h.dtype)
                if want_w:
                    grad_w.addmm_(upcast(g).t(), upcast(h))
                if want_b:
                    grad_b.add_(upcast(g).sum(0))
                del g
            del logits
        # Held as attributes, not saved tensors, so that backward can drop its references: the output layer's gradient
        # then reaches `.grad` without a copy of its own size.
        ctx.grads = [grad_h, grad_w, grad_b]
        ctx.wanted = (want_h, want_w, want_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_parts: Tensor):
        if getattr(ctx, "used", False):  # the stored gradients were scaled in place the first time
            raise RuntimeError("the fused output layer's loss supports one backward pass (retain_graph is not served)")
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        want_h, want_w, want_b = ctx.wanted
        scale = lambda g, dtype=None: g.mul_(grad_out.to(g.dtype)).to(dtype or g.dtype)  # in place: no second copy
        grads = (scale(grad_h) if want_h else None, scale(grad_w, ctx.dtypes[0]) if want_w else None,
                 scale(grad_b, ctx.dtypes[1]) if want_b else None)
        del grad_h, grad_w, grad_b
        return (*grads, None, None, None, None, None, None, *([None] * (len(ctx.needs_input_grad) - 9)))


def fused_dense_sum(per_token: PerToken, hidden_rows: Tensor, weight: Tensor, teacher_rows: Tensor | HiddenRows,
                    *row_extras: Tensor, bias: Tensor | None = None, temperature: float = 1.0,
                    chunk_size: int | None = None, topk_ids: Tensor | None = None) -> Tensor:
    """`dense_sum` with the student's logits given as `hidden_rows @ weightᵀ + bias` and never materialised whole.

    Args:
        per_token: the divergence per row of log-probs (a `DenseDivergence`'s `per_token` or `per_bucket`); it must
            return `[n]` (one part).
        hidden_rows: `[n, H]` the final hidden states at the valid positions.
        weight: `[V, H]` the output layer (the effective one for a tied or adapted layer).
        teacher_rows: `[n, V_t]` teacher logits (a tensor, or `HiddenRows` to project them a chunk at a time), or
            `[n, k + 1]` bucket log-probs with `topk_ids` `[n, k]`.
        row_extras: per-row tensors passed on to `per_token`, split like the rows.
        bias: `[V]` or None.
        chunk_size: positions per chunk (default `default_chunk(V)`).

    Returns:
        The sum over rows, a scalar (fp32, or fp64 for fp64 inputs), equal in value and gradient to
        `dense_sum(per_token, hidden_rows @ weight.T + bias, ...)`.
    """
    return upcast(_fused_sum(per_token, hidden_rows, weight, teacher_rows, row_extras, bias, temperature, chunk_size,
                             topk_ids, None)[0])


def _fused_sum(per_token: PerToken, hidden_rows: Tensor, weight: Tensor, teacher_rows: Tensor | HiddenRows,
               row_extras: tuple[Tensor, ...], bias: Tensor | None, temperature: float, chunk_size: int | None,
               topk_ids: Tensor | None, part_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """`_FusedLinearSum` after the checks: (the weighted sum with its gradient, the parts' sums detached)."""
    chunk = default_chunk(weight.shape[0]) if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"logits chunk size must be at least 1, got {chunk}")
    if hidden_rows.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden states of width {hidden_rows.shape[-1]} do not fit an output layer of "
                         f"{tuple(weight.shape)}")
    teacher_rows = teacher_rows if isinstance(teacher_rows, HiddenRows) else teacher_rows.detach()
    return _FusedLinearSum.apply(hidden_rows, weight, bias, per_token, temperature, chunk, teacher_rows, topk_ids,
                                 part_weights, *row_extras)


def dense_parts(per_token: PerToken, student: Tensor | HiddenRows, teacher_rows: Tensor, mask: Tensor,
                *row_extras: Tensor, weights: Tensor, temperature: float = 1.0,
                chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """A loss of several parts over the valid rows, the student given as logits or fused (`HiddenRows`).

    `per_token` returns `[n, k]` parts per row (as for `dense_sum`); `teacher_rows` `[n, V_t]` are the teacher's valid
    rows and `row_extras` per-row tensors, already selected with `mask` `[B, N]`. Returns (Σ_rows Σ_k weights_k ·
    part_k, a scalar with the gradient; the parts' sums `[k]`, detached, for metrics): equal to `dense_sum` on the
    logits, weighted, in value and gradient. A loss whose parts enter it linearly (`uld`, `gold`) runs fused this
    way.
    """
    if isinstance(student, HiddenRows):
        total, parts = _fused_sum(per_token, student.hidden[mask], student.weight, teacher_rows, row_extras,
                                  student.bias, temperature, student.chunk_size, None, weights)
        return upcast(total), upcast(parts)
    parts = dense_sum(per_token, student[mask], teacher_rows, *row_extras, temperature=temperature,
                      chunk_size=chunk_size)
    return (parts * weights.to(parts.dtype)).sum(), parts.detach()


def fused_dense_divergence(per_token: PerToken, hidden: Tensor, weight: Tensor, teacher: Tensor | TopK | HiddenRows,
                           mask: Tensor, *, bias: Tensor | None = None, temperature: float = 1.0,
                           num_items: Tensor | float | None = None, chunk_size: int | None = None,
                           loss: str = "dense divergence") -> Tensor:
    """`dense_divergence` from hidden states `[B, N, H]` and the output layer: the mean over valid positions. The
    teacher is dense logits `[B, N, V]`, a `TopK` form, or `HiddenRows` (its hidden states `[B, N, H_t]` and output
    layer), projected a chunk at a time and checked for NaN/inf chunk by chunk."""
    shape = teacher.ids.shape[:-1] if isinstance(teacher, TopK) else teacher.shape[:-1]
    if tuple(hidden.shape[:-1]) != tuple(shape):
        raise ValueError(f"student hidden states {tuple(hidden.shape)} and teacher {tuple(shape)} differ in positions")
    mask = mask.bool()
    if isinstance(teacher, HiddenRows):
        t_rows, ids = teacher.select(mask), None
    else:
        t_rows, ids = teacher_distribution(teacher, mask, temperature, loss)
    total = fused_dense_sum(per_token, hidden[mask], weight, t_rows, bias=bias, temperature=temperature,
                            chunk_size=chunk_size, topk_ids=ids)
    return normalise(total, mask, num_items)
