"""The loss contract: what a loss consumes, what it returns, and the one chunked path for dense divergences.

Every loss is a pure tensor function plus a thin `nn.Module` holding typed hyperparameters for the CLI. Losses
see only tensors aligned to the student's completion positions and the teacher's `TeacherTarget`
(`opd_lightning.target`, shared with the aligners); they never see models or tokenizers. Each loss declares what it
needs in `requires` (capability names from `opd_lightning.target`), and the training module computes only that (no
class-name sniffing). `LOSSES` is the name -> class registry every loss module files itself into.

Conventions shared by every loss:
- position t of `student_logits` predicts completion token `target_ids[:, t]`;
- logits are upcast to fp32 here (fp16 and bf16; fp64 stays fp64), and divided by `temperature` before any softmax;
- per-token values are summed over the valid positions and divided once by `num_items` (the count of valid
  completion tokens of the whole optimizer step, clamped to at least 1); without `num_items` the call's own count;
- a student logit of −inf marks a column outside the student's vocabulary (padding): dense divergences compare the
  two distributions on the student's finite columns only (the teacher renormalised there), so the loss stays finite
  and those columns get zero gradient (`on_student_support`);
- dense divergences also take the teacher's top-k form (`TopK`): both models become distributions over k + 1 buckets,
  the teacher's k tokens and one bucket for the rest of the vocabulary (`topk_buckets`), and the same per-token
  divergence is applied there; with k = V it is exactly the dense loss.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from opd_lightning.registry import Registry
from opd_lightning.target import TEACHER_LOGITS, TeacherTarget, TopK, upcast

__all__ = [
    "LOG_ZERO",
    "LOSSES",
    "DenseDivergence",
    "DistillationLoss",
    "LayerStates",
    "LossInputs",
    "LossOutput",
    "check_teacher",
    "dense_divergence",
    "dense_sum",
    "log_probs",
    "normalise",
    "on_student_support",
    "teacher_distribution",
    "topk_buckets",
]

LOSSES: Registry = Registry("loss")
LOG_ZERO = -1.0e4  # log-probability written where a distribution has no support: exp() is exactly 0, arithmetic stays finite


@dataclass
class LayerStates:
    """Both models' hidden states, layer by layer, at the positions of whole sequences (prompt and completion) where
    the two tokenizations end a token on the same byte (`aligners.BoundaryPairs`; every token with one tokenizer).
    Filled by the training module for losses that set `reads_layers` (`hidden_match`)."""

    student: dict[int, Tensor]  # hidden-state index -> [K, H_student] at the pairs, with the graph
    teacher: dict[int, Tensor]  # hidden-state index -> [K, H_teacher] at the pairs, no gradient
    in_prompt: Tensor  # [K] bool: the pair lies in the prompt
    rows: Tensor  # [K] the batch row of each pair


@dataclass
class LossInputs:
    """Tensors at the student's completion positions, and the teacher's target there; shapes in the comments."""

    student_logits: Tensor  # [B, N, V] carries the gradient
    target_ids: Tensor  # [B, N] the completion tokens (sampled by the student, or given)
    mask: Tensor  # [B, N] bool, True on valid completion tokens
    teacher: TeacherTarget | None = None  # what the teacher (through an aligner) gives at these positions
    student_hidden: Tensor | None = None  # [B, N, H_student] hidden state that predicts each token (HIDDEN_STATES)
    student_head: Tensor | None = None  # [V, H_student] the student's output layer weight (HIDDEN_STATES)
    old_logprobs: Tensor | None = None  # [B, N] student log-probs when the rollout was sampled
    layers: LayerStates | None = None  # both models' hidden states along the whole sequence (`reads_layers`)
    num_items: Tensor | float | None = None  # normaliser for the optimizer step; None -> mask.sum()

    @property
    def valid(self) -> Tensor:
        """`[B, N]` bool: valid completion tokens that have a teacher target."""
        mask = self.mask.bool()
        if self.teacher is not None and self.teacher.mask is not None:
            mask = mask & self.teacher.mask.bool()
        return mask

    @cached_property
    def student(self) -> Tensor:
        """The student's logits in the space of the teacher's target (`TeacherTarget.student_projection`)."""
        projection = None if self.teacher is None else self.teacher.student_projection
        return self.student_logits if projection is None else projection(self.student_logits)

    def require(self, loss: str, *capabilities: str) -> TeacherTarget:
        """The teacher's target, after checking that it carries every capability named; errors name `loss`."""
        if self.teacher is None:
            raise ValueError(f"loss {loss!r} needs a teacher target, but the inputs carry none; the training module "
                             "fills `teacher` when the loss lists capabilities in `requires`.")
        filled = self.teacher.filled()
        for capability in capabilities:
            if capability not in filled:
                raise ValueError(f"loss {loss!r} needs {capability!r}, but the teacher's target has none; the training "
                                 f"module fills it when the loss lists {capability!r} in `requires`.")
        return self.teacher

    def require_student(self, name: str, loss: str) -> Tensor:
        """Field `name` of the student side (`student_hidden`, `student_head`), or an error naming the loss."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"loss {loss!r} needs {name!r}, but the inputs carry none")
        return value


@dataclass
class LossOutput:
    """A scalar to minimise and detached scalar metrics to log (the loss itself is logged by the caller)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def normalise(total: Tensor, mask: Tensor, num_items: Tensor | float | None) -> Tensor:
    """Divide a summed loss by the step's valid-token count (or the mask's own count), clamped to at least 1."""
    count = mask.sum() if num_items is None else torch.as_tensor(num_items, device=total.device)
    return total / count.to(total.dtype).clamp_min(1)


class DistillationLoss(nn.Module, metaclass=abc.ABCMeta):
    """Base of every registered loss. Subclasses set `requires` and implement `forward(inputs) -> LossOutput`.

    `requires` is a class attribute, or an instance attribute set in `__init__` when it depends on a
    hyperparameter (e.g. `SampledToken(credit="baseline")` also reads the teacher's distribution); read it from the
    instance. `accepts_topk` says that the loss takes the teacher's top-k form (`TEACHER_TOPK`) in place of the
    dense logits (`TEACHER_LOGITS`) it requires.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    accepts_topk: ClassVar[bool] = False
    registry_name: ClassVar[str] = ""
    #: True when the loss reads the student's own hidden states (`LossInputs.student_hidden`) without the teacher's
    #: (e.g. a value head); HIDDEN_STATES in `requires` asks for both sides.
    reads_student_hidden: bool = False
    #: True when the loss compares the two models' hidden states layer by layer along whole sequences
    #: (`LossInputs.layers`, e.g. `hidden_match`); such a loss also implements `setup_layers`.
    reads_layers: bool = False
    #: True when the loss takes the student as `fused.HiddenRows` (hidden states and output layer) in place of its
    #: logits, a chunk of positions at a time (the fused output layer): the dense divergences, `uld`, `gold`.
    fuses: bool = False

    def setup(self, student_hidden: int, teacher_hidden: int) -> None:
        """Create parameters whose shapes depend on the two models' hidden sizes (e.g. DSKD's projectors).

        The training module calls this once, after loading both models and before the optimizer is built, so the
        parameters exist for the optimizer and for checkpoint loading. Default: nothing to create.
        """

    @abc.abstractmethod
    def forward(self, inputs: LossInputs) -> LossOutput:
        """The loss of one (micro-)batch, normalised by `inputs.num_items`."""


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


def on_student_support(s_logp: Tensor, t_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Both distributions restricted to the columns where the student's log-prob is finite: `[n, V]` each.

    `s_logp` are the student's log-probs; `t_scores` the teacher's logits or log-probs over the same columns. The
    teacher is renormalised on the student's support; both sides then hold `LOG_ZERO` off it, so every per-token
    divergence stays finite there and those columns get no gradient. Where the student has no −inf column this is
    the plain teacher log-softmax.
    """
    off = torch.isneginf(s_logp)  # [n, V]
    if not off.any():  # the common case: nothing to restrict, and three [n, V] copies fewer
        return s_logp, torch.log_softmax(t_scores, dim=-1)
    t_logp = torch.log_softmax(t_scores.masked_fill(off, float("-inf")), dim=-1)
    return s_logp.masked_fill(off, LOG_ZERO), t_logp.masked_fill(off, LOG_ZERO)


def topk_buckets(s_logp: Tensor, ids: Tensor) -> Tensor:
    """The student's distribution over the teacher's k tokens and one tail bucket: `[n, V]`, ids `[n, k]` ->
    `[n, k + 1]` log-probs (the tail is the log-sum-exp of the other columns, never 1 − Σ, so nothing cancels)."""
    tail = s_logp.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # [n, 1]
    return torch.cat([s_logp.gather(-1, ids), tail], dim=-1)


def log_probs(s_logits: Tensor, t_rows: Tensor, temperature: float,
              topk_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Both models' log-probs at `temperature`, at least fp32, as every dense divergence compares them.

    `t_rows` are the teacher's logits, or with `topk_ids` `[n, k]` its `[n, k + 1]` bucket log-probs (already at the
    temperature), when the student's rows become buckets too (`topk_buckets`). Equal widths are compared on the
    student's support (`on_student_support`); different widths are two vocabularies (cross-tokenizer losses).
    """
    scale = (lambda x: x) if temperature == 1 else (lambda x: x / temperature)  # no [n, V] copy at T = 1
    s_logp = torch.log_softmax(scale(upcast(s_logits)), dim=-1)  # [n, V_s]
    if topk_ids is not None:
        s_logp, t_scores = topk_buckets(s_logp, topk_ids), upcast(t_rows)
    else:
        t_scores = scale(upcast(t_rows))  # [n, V_t]
    if s_logp.shape[-1] == t_scores.shape[-1]:
        return on_student_support(s_logp, t_scores)
    return s_logp, torch.log_softmax(t_scores, dim=-1)


def _chunk_sum(fn: PerToken, temperature: float, s_logits: Tensor, t_rows: Tensor, topk_ids: Tensor | None,
               *extras: Tensor) -> Tensor:
    return fn(*log_probs(s_logits, t_rows, temperature, topk_ids), *extras).sum(0)


def dense_sum(per_token: PerToken, student_rows: Tensor, teacher_rows: Tensor, *row_extras: Tensor,
              temperature: float = 1.0, chunk_size: int | None = None, topk_ids: Tensor | None = None) -> Tensor:
    """Sum `per_token` over rows already selected as valid: the chunked core of every dense loss.

    `student_rows` `[n, V_s]` and `teacher_rows` `[n, V_t]` (logits) may differ in width (cross-tokenizer losses);
    equal widths are compared on the student's support (`on_student_support`). With `topk_ids` `[n, k]`,
    `teacher_rows` are the teacher's `[n, k + 1]` bucket log-probs (`TopK.buckets`) and the student's rows become
    buckets too (`topk_buckets`). `row_extras` (e.g. target ids `[n]`) are split into the same chunks and passed to
    `per_token` after the two log-prob rows. `per_token` returns `[n]`, or `[n, k]` for k parts summed separately.
    Losses that apply a divergence to a subset of positions (e.g. entropy-gated ones) call this directly and
    normalise themselves. Returns an fp32 (or fp64) scalar (or `[k]`); with no rows it is an exact zero that still
    carries a graph.
    """
    rows = (student_rows, teacher_rows.detach(), topk_ids, *row_extras)
    if chunk_size is None or student_rows.shape[0] <= chunk_size:
        total = _chunk_sum(per_token, temperature, *rows)
    else:
        split = [r.split(chunk_size) if r is not None else [None] * -(-student_rows.shape[0] // chunk_size)
                 for r in rows]
        total = sum(checkpoint(_chunk_sum, per_token, temperature, *chunk, use_reentrant=False)
                    for chunk in zip(*split, strict=True))
    return upcast(total)


def teacher_distribution(teacher: Tensor | TopK, mask: Tensor, temperature: float,
                         loss: str) -> tuple[Tensor, Tensor | None]:
    """The teacher's valid rows for `dense_sum`: dense logits `[n, V]` and no ids, or top-k buckets `[n, k + 1]` and
    their ids `[n, k]`; checked for NaN/inf. A top-k form taken at another temperature is refused (its tail cannot be
    re-tempered)."""
    if isinstance(teacher, TopK):
        if teacher.temperature != temperature:
            raise ValueError(f"loss {loss!r} runs at temperature {temperature}, but the teacher's top-k were taken at "
                             f"{teacher.temperature}: take them at the loss's temperature")
        rows, ids = teacher.logprobs[mask].detach(), teacher.ids[mask]  # [n, k]
        check_teacher(rows, "teacher top-k log-probs")
        tail = teacher.tail[mask].detach()  # [n]; -inf when the k tokens hold all the mass
        if (torch.isnan(tail) | torch.isposinf(tail)).any():
            raise ValueError("the teacher's top-k tail mass holds NaN or +inf: check how the top-k were computed")
        return torch.cat([rows, tail.unsqueeze(-1)], -1), ids
    rows = teacher[mask].detach()  # [n, V]
    check_teacher(rows)
    return rows, None


def dense_divergence(
    per_token: PerToken,
    student_logits: Tensor,
    teacher: Tensor | TopK,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    num_items: Tensor | float | None = None,
    chunk_size: int | None = None,
    loss: str = "dense divergence",
) -> Tensor:
    """Sum `per_token` over the valid positions and normalise once: the only chunked path for dense losses.

    `teacher` is dense logits `[B, N, V]` or the top-k form (`TopK`, ids `[B, N, k]`). Only rows under `mask` are
    computed. With `chunk_size`, valid rows are processed `chunk_size` at a time under activation checkpointing, so
    the `[n, V]` intermediates of one chunk are alive at a time, in the forward and in the backward pass; values and
    gradients equal the unchunked result.
    """
    topk = isinstance(teacher, TopK)
    expected, got = (teacher.ids.shape[:-1], student_logits.shape[:-1]) if topk else (teacher.shape, student_logits.shape)
    if tuple(got) != tuple(expected):
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher {tuple(expected)} differ: project "
                         "the teacher into the student's vocabulary with an aligner first.")
    mask = mask.bool()
    t_rows, ids = teacher_distribution(teacher, mask, temperature, loss)
    total = dense_sum(per_token, student_logits[mask], t_rows, temperature=temperature, chunk_size=chunk_size,
                      topk_ids=ids)
    return normalise(total, mask, num_items)


class DenseDivergence(DistillationLoss):
    """A divergence between full next-token distributions; subclasses supply `per_token` only.

    With the teacher's top-k form, `per_bucket` is applied to the k + 1 bucket distributions; by default it is
    `per_token` itself (one tail bucket), and a loss that treats the tail otherwise overrides it.
    """

    requires: ClassVar[frozenset[str]] = frozenset({TEACHER_LOGITS})
    accepts_topk: ClassVar[bool] = True
    fuses: ClassVar[bool] = True

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

    @abc.abstractmethod
    def per_token(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        """The divergence per row of log-probs `[n, V]` -> `[n]`."""

    def per_bucket(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        """The divergence per row of `[n, k + 1]` top-k bucket log-probs (the tail last); default `per_token`."""
        return self.per_token(s_logp, t_logp)

    @classmethod
    def as_function(cls) -> Callable[..., Tensor]:
        """The loss as a tensor function `fn(student_logits, teacher, mask, *, num_items=None, **hyperparameters)`:
        logits `[B, N, V]`, the teacher's dense logits or its `TopK` form, mask `[B, N]`; the hyperparameters are
        those of `cls.__init__`, declared and checked there once."""

        def function(student_logits: Tensor, teacher: Tensor | TopK, mask: Tensor, *,
                     num_items: Tensor | float | None = None, **hyperparameters) -> Tensor:
            return cls(**hyperparameters).divergence(student_logits, teacher, mask, num_items)

        function.__name__ = function.__qualname__ = cls.registry_name
        function.__doc__ = (f"Mean over valid positions of `{cls.__name__}` (its docstring gives the formula); logits "
                            f"`[B, N, V]`, teacher logits or `TopK`, mask `[B, N]`; hyperparameters as `{cls.__name__}`.")
        return function

    def divergence(self, student_logits: Tensor, teacher: Tensor | TopK, mask: Tensor,
                   num_items: Tensor | float | None = None) -> Tensor:
        """The normalised loss for dense teacher logits `[B, N, V]` or a top-k form, as the pure functions compute.
        The student's logits may be given as `fused.HiddenRows` (its hidden states and output layer): the fused path,
        equal in value and gradient, without the `[B, N, V]` logits."""
        fn = self.per_bucket if isinstance(teacher, TopK) else self.per_token
        if not isinstance(student_logits, Tensor):
            from .fused import fused_dense_divergence  # fused builds on this module

            rows = student_logits
            return fused_dense_divergence(fn, rows.hidden, rows.weight, teacher, mask, bias=rows.bias,
                                          temperature=self.temperature, num_items=num_items, chunk_size=rows.chunk_size,
                                          loss=self.registry_name)
        return dense_divergence(fn, student_logits, teacher, mask, temperature=self.temperature, num_items=num_items,
                                chunk_size=self.chunk_size, loss=self.registry_name)

    def forward(self, inputs: LossInputs) -> LossOutput:
        teacher = inputs.require(self.registry_name).distribution
        if teacher is None:
            inputs.require(self.registry_name, TEACHER_LOGITS)  # neither form: raises, naming the loss
        return LossOutput(self.divergence(inputs.student, teacher, inputs.valid, inputs.num_items))
