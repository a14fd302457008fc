"""The loss contract: what a loss consumes, what it returns, and the one chunked path for dense divergences.

Every loss is a pure tensor function plus a thin `nn.Module` holding typed hyperparameters for the CLI. Losses
see only tensors aligned to the student's completion positions; they never see models or tokenizers. Each loss
declares what it needs in `requires`, and the training module computes only that (no class-name sniffing).
`LOSSES` is the name -> class registry every loss module files itself into.

Conventions shared by every loss:
- position t of `student_logits` predicts completion token `target_ids[:, t]`;
- logits are upcast to fp32 here, and divided by `temperature` before any softmax;
- per-token values are summed over `mask` and divided once by `num_items` (the count of valid completion tokens
  of the whole optimizer step, clamped to at least 1); without `num_items` the call's own count is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from opd_lightning.registry import Registry

__all__ = [
    "HIDDEN_STATES",
    "LOSSES",
    "TEACHER_LOGITS",
    "TEACHER_NATIVE_LOGITS",
    "TEACHER_TOKEN_LOGPROBS",
    "VOCAB_PAIRS",
    "DenseDivergence",
    "DistillationLoss",
    "LossInputs",
    "LossOutput",
    "TeacherSequence",
    "check_teacher",
    "dense_divergence",
    "dense_sum",
    "normalise",
]

LOSSES: Registry = Registry("loss")

# Capabilities a loss may require. The module fills the matching `LossInputs` field only when asked.
TEACHER_LOGITS = "teacher_logits"  # dense teacher logits in the student's vocabulary, [B, N, V]
TEACHER_TOKEN_LOGPROBS = "teacher_token_logprobs"  # teacher log-prob of each target token, [B, N]
TEACHER_NATIVE_LOGITS = "teacher_native_logits"  # teacher logits in its own vocabulary, [B, N, V_teacher]
VOCAB_PAIRS = "vocab_pairs"  # (student ids [K], teacher ids [K]): tokens with the same text in both vocabularies
HIDDEN_STATES = "hidden_states"  # last hidden states of both models at the completion positions, and both output layers


@dataclass
class TeacherSequence:
    """The teacher's outputs at its own completion positions, for losses that score in the teacher's space there."""

    logits: Tensor  # [B, M, V_teacher] the teacher's logits at its M completion positions
    mask: Tensor | None = None  # [B, M] bool; None: the teacher's positions are the student's (M = N, the loss mask)
    from_student: Callable[[Tensor], Tensor] | None = None  # [B, N, H] at student positions -> [B, M, H]; None: same


@dataclass
class LossInputs:
    """Tensors at the student's completion positions; shapes in the comments."""

    student_logits: Tensor  # [B, N, V] carries the gradient
    target_ids: Tensor  # [B, N] the completion tokens (sampled by the student, or given)
    mask: Tensor  # [B, N] bool, True on valid completion tokens
    teacher_logits: Tensor | None = None  # [B, N, V] in the student's vocabulary
    teacher_token_logprobs: Tensor | None = None  # [B, N] log p_T(target token), or of its span (`token_spans`)
    token_spans: Tensor | None = None  # [B, N] span id of each token when the teacher scores multi-token spans
    teacher_native_logits: Tensor | None = None  # [B, N, V_teacher] at the teacher position aligned with each token
    vocab_pairs: tuple[Tensor, Tensor] | None = None  # (student ids [K], teacher ids [K]) with the same text
    student_hidden: Tensor | None = None  # [B, N, H_student] hidden state that predicts each completion token
    teacher_hidden: Tensor | None = None  # [B, N, H_teacher] the teacher's, at (or attended from) the aligned position
    teacher_sequence: TeacherSequence | None = None  # the teacher's logits at its own positions (HIDDEN_STATES)
    student_head: Tensor | None = None  # [V, H_student] the student's output layer weight (HIDDEN_STATES)
    teacher_head: Tensor | None = None  # [V_teacher, H_teacher] the frozen teacher's output layer weight
    old_logprobs: Tensor | None = None  # [B, N] student log-probs when the rollout was sampled
    num_items: Tensor | float | None = None  # normaliser for the optimizer step; None -> mask.sum()

    def require(self, name: str, loss: str) -> Tensor:
        """Return field `name`, or raise an error naming the loss that needed it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"loss {loss!r} needs {name!r}, but the inputs carry none; the training module fills it "
                             f"when the loss lists {name!r} in `requires`.")
        return value


@dataclass
class LossOutput:
    """A scalar to minimise and detached scalar metrics to log."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def normalise(total: Tensor, mask: Tensor, num_items: Tensor | float | None) -> Tensor:
    """Divide a summed loss by the step's valid-token count (or the mask's own count), clamped to at least 1."""
    count = mask.sum() if num_items is None else torch.as_tensor(num_items, device=total.device)
    return total / count.to(total.dtype).clamp_min(1)


class DistillationLoss(nn.Module):
    """Base of every registered loss. Subclasses set `requires` and implement `forward(inputs) -> LossOutput`.

    `requires` is a class attribute, or an instance attribute set in `__init__` when it depends on a
    hyperparameter (e.g. `SampledToken(credit="baseline")` also reads dense teacher logits); read it from the
    instance.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    registry_name: ClassVar[str] = ""

    def setup(self, student_hidden: int, teacher_hidden: int) -> None:
        """Create parameters whose shapes depend on the two models' hidden sizes (e.g. DSKD's projectors).

        The training module calls this once, after loading both models and before the optimizer is built, so the
        parameters exist for the optimizer and for checkpoint loading. Default: nothing to create.
        """

    def forward(self, inputs: LossInputs) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


# (student log-probs [n, V_s], teacher log-probs [n, V_t], *per-row extras) -> [n], or [n, k] for k parts
PerToken = Callable[..., Tensor]


def check_teacher(values: Tensor, what: str = "teacher logits") -> None:
    """Raise if a teacher tensor holds NaN or inf; `values` are its valid rows only (`[n, V]` or `[n]`).

    Every loss that reads a teacher tensor calls this once, after selecting the valid positions: a broken teacher
    would otherwise turn into a NaN loss (or a silently zero gradient) several steps later. It costs one
    host-device synchronisation per call.
    """
    bad = ~torch.isfinite(values.detach())
    if bad.ndim > 1:
        bad = bad.flatten(1).any(-1)  # [n]: a position is bad if any vocabulary entry is
    count = int(bad.sum())
    if count:
        raise ValueError(f"{what} contain NaN or inf at {count} valid positions; check the teacher's dtype/quantization "
                         "(fp16 overflow, a broken low-bit checkpoint) and the aligner's projection.")


def _chunk_sum(fn: PerToken, temperature: float, s_logits: Tensor, t_logits: Tensor, *extras: Tensor) -> Tensor:
    s_logp = torch.log_softmax(s_logits.float() / temperature, dim=-1)  # [n, V_s] fp32
    t_logp = torch.log_softmax(t_logits.float() / temperature, dim=-1)  # [n, V_t] fp32
    return fn(s_logp, t_logp, *extras).sum(0)


def dense_sum(per_token: PerToken, student_rows: Tensor, teacher_rows: Tensor, *row_extras: Tensor,
              temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Sum `per_token` over rows already selected as valid: the chunked core of every dense loss.

    `student_rows` `[n, V_s]` and `teacher_rows` `[n, V_t]` may differ in width (cross-tokenizer losses); equal
    widths are checked by `dense_divergence`, not here. `row_extras` (e.g. target ids `[n]`) are split into the
    same chunks and passed to `per_token` after the two log-prob rows. `per_token` returns `[n]`, or `[n, k]` for
    k parts summed separately. Losses that apply a divergence to a subset of positions (e.g. entropy-gated ones)
    call this directly and normalise themselves. Returns an fp32 scalar (or `[k]`); with no rows it is an exact
    zero that still carries a graph.
    """
    rows = (student_rows, teacher_rows.detach(), *row_extras)
    if chunk_size is None or student_rows.shape[0] <= chunk_size:
        total = _chunk_sum(per_token, temperature, *rows)
    else:
        total = sum(checkpoint(_chunk_sum, per_token, temperature, *chunk, use_reentrant=False)
                    for chunk in zip(*(r.split(chunk_size) for r in rows), strict=True))
    return total.float()


def dense_divergence(
    per_token: PerToken,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    num_items: Tensor | float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Sum `per_token` over the valid positions and normalise once: the only chunked path for dense losses.

    Only rows under `mask` are computed. With `chunk_size`, valid rows are processed `chunk_size` at a time under
    activation checkpointing, so the fp32 `[n, V]` intermediates of one chunk are alive at a time, in the forward
    and in the backward pass; values and gradients equal the unchunked result.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: project the teacher into the student's vocabulary "
                         "with an aligner first.")
    mask = mask.bool()
    s = student_logits[mask]  # [n, V]
    t = teacher_logits[mask].detach()  # [n, V]
    check_teacher(t)
    total = dense_sum(per_token, s, t, temperature=temperature, chunk_size=chunk_size)
    return normalise(total, mask, num_items)


class DenseDivergence(DistillationLoss):
    """A divergence between full next-token distributions; subclasses supply `per_token` only."""

    requires: ClassVar[frozenset[str]] = frozenset({TEACHER_LOGITS})

    def __init__(self, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        """
        Args:
            temperature: softmax temperature applied to both models' logits before the divergence.
            chunk_size: valid positions computed at a time (memory bound for large vocabularies); None = all at once.
        """
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.chunk_size = chunk_size

    def per_token(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, inputs: LossInputs) -> LossOutput:
        teacher = inputs.require(TEACHER_LOGITS, self.registry_name)
        loss = dense_divergence(self.per_token, inputs.student_logits, teacher, inputs.mask,
                                temperature=self.temperature, num_items=inputs.num_items, chunk_size=self.chunk_size)
        return LossOutput(loss, {self.registry_name: loss.detach()})
