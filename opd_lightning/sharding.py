"""FSDP2 for the distillation module: the student sharded, everything else whole on every rank.

Lightning's `ModelParallelStrategy` gives each rank a device mesh; `shard_student` applies `fully_shard` to each
decoder layer and then to the student. `FSDP2Strategy`, registered as the strategy name `fsdp2`
(`--trainer.strategy fsdp2`), is that strategy set for data parallelism only (every device one data-parallel rank; its
own default "auto" would make them tensor-parallel ranks that all read the same data) and writing one full checkpoint
file, which resumes and rebuilds like a single-device one. The frozen teacher stays whole. Trainable parameters outside the student
(DSKD's projectors, the `dskd_cma` attention) stay whole too: FSDP2 reduces only the gradients of modules it wraps
and whose `forward` it sees, and those parts are called through other methods, so their gradients are averaged
here, and clipping takes one norm over both kinds of gradient.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

__all__ = ["FSDP2Strategy", "average_replicated_grads", "clip_by_global_norm", "shard_student"]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all devices: `ModelParallelStrategy` with tensor-parallel size 1."""

    def __init__(self, process_group_backend: str | None = None, timeout_minutes: float = 30.0) -> None:
        """
        Args:
            process_group_backend: "gloo" (CPU) or "nccl" (GPU); None picks by accelerator.
            timeout_minutes: how long a collective may wait for the other ranks before the run fails.
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, timeout=timedelta(minutes=timeout_minutes))

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every device is a data-parallel rank
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None):
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except IndexError as error:  # Lightning re-keys optimizer states by their first entry, which may not exist
            frames = traceback.extract_tb(error.__traceback__)
            if frames and frames[-1].name == "_rekey_optimizer_state_if_needed":
                raise ValueError(f"{checkpoint_path}: its optimizer keeps no state (e.g. SGD without momentum), which "
                                 "Lightning's FSDP2 checkpoint loader cannot restore; use an optimizer with state "
                                 "(AdamW, SGD with momentum) or resume under ddp") from error
            raise


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 data parallelism (opd-lightning)")


def shard_student(student: nn.Module, mesh) -> None:
    """`fully_shard` each decoder layer of a Hugging Face causal LM, then the whole model, over `mesh`."""
    from torch.distributed.fsdp import fully_shard

    for layer in [m for m in student.modules() if type(m).__name__.endswith("DecoderLayer")]:
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)


def average_replicated_grads(params: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of parameters kept whole on every rank, as FSDP2 averages the sharded ones: every
    rank then takes the same step. A parameter without a gradient joins with zeros (every rank must join)."""
    import torch.distributed as dist

    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad /= world_size


def clip_by_global_norm(params: Iterable[nn.Parameter], max_norm: float) -> None:
    """Scale all gradients so that their global 2-norm is at most `max_norm`, with sharded (DTensor) and whole
    gradients mixed; one norm call cannot take both kinds."""
    grads = [p.grad for p in params if p.grad is not None]
    groups = [[g for g in grads if hasattr(g, "full_tensor")], [g for g in grads if not hasattr(g, "full_tensor")]]
    norms = [torch.nn.utils.get_total_norm(group) for group in groups if group]
    total = float(torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]).norm())
    if total > max_norm:
        for group in filter(None, groups):
            torch._foreach_mul_(group, max_norm / (total + 1e-6))
