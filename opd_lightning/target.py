"""What a teacher hands a loss: the one contract that `opd_lightning.losses` and `opd_lightning.aligners` share.

An aligner (or a teacher cache, `opd_lightning.teacher_cache`) produces a `TeacherTarget` at the student's completion
positions; a loss consumes it. Both packages import this module and it imports neither, so the contract is written
once: the capability names a loss may require and an aligner may provide, the target dataclass with its forms, and
the helpers both sides need (`token_logprobs`, `upcast`).

Forms of a target (each filled only when a loss asks for the capability that names it, see `FIELDS`):
- dense: logits in the student's vocabulary (or in a shared space, with `student_projection`), `[B, N, V]`;
- top-k: the teacher's k most likely student-vocabulary ids, their log-probs and the log of the mass left outside
  them (`TopK`), `[B, N, k]`: what a cache or a server can afford to keep;
- token log-probs: the teacher's log-prob of each student token, or of the span it ends (`token_spans`), `[B, N]`;
- native: the teacher's logits in its own vocabulary at the aligned positions, with the pairs of same-text ids, or
  with a sparse projection between the two vocabularies (`vocab_projection`, X-Token's W);
- hidden states: the teacher's last hidden states at (or attended from) each student position, its logits at its own
  positions and its output layer.

Token log-probs, top-k log-probs and their tail are at the temperature they record (1 unless said): a loss at
another temperature reads the dense form, or refuses a form it cannot re-temper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from opd_lightning.buffers import target_buffer

__all__ = ["CAPABILITIES", "FIELDS", "HIDDEN_STATES", "TEACHER_LOGITS", "TEACHER_NATIVE_LOGITS", "TEACHER_TOKEN_LOGPROBS",
           "TEACHER_TOPK", "VOCAB_PAIRS", "VOCAB_PROJECTION", "PositionRows", "TeacherSequence", "TeacherTarget",
           "TopK", "row_view", "token_logprobs", "upcast"]

TEACHER_LOGITS = "teacher_logits"  # dense teacher logits in the student's vocabulary, [B, N, V]
TEACHER_TOPK = "teacher_topk"  # the teacher's top-k ids (student vocabulary), log-probs and tail mass, [B, N, k]
TEACHER_TOKEN_LOGPROBS = "teacher_token_logprobs"  # teacher log-prob of each target token (or span), [B, N]
TEACHER_NATIVE_LOGITS = "teacher_native_logits"  # teacher logits in its own vocabulary, [B, N, V_teacher]
VOCAB_PAIRS = "vocab_pairs"  # (student ids [K], teacher ids [K]): tokens with the same text in both vocabularies
# A sparse projection W [V_s, V_t] from student to teacher tokens, as its E nonzero entries (X-Token):
# (student ids [E], teacher ids [E], weights [E]); each student row sums to 1 or is empty.
VOCAB_PROJECTION = "vocab_projection"
HIDDEN_STATES = "hidden_states"  # the teacher's last hidden states, logits at its own positions and output layer
CAPABILITIES = (TEACHER_LOGITS, TEACHER_TOPK, TEACHER_TOKEN_LOGPROBS, TEACHER_NATIVE_LOGITS, VOCAB_PAIRS,
                VOCAB_PROJECTION, HIDDEN_STATES)


def upcast(x: Tensor) -> Tensor:
    """fp16 and bf16 to fp32; fp32 and fp64 stay as they are (a float64 reference stays exact)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) at `ids`: rows `[..., V]`, ids `[...]` -> `[...]`, at least fp32, no `[..., V]`
    log-softmax kept."""
    z = upcast(logits) / temperature  # [..., V]
    return z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)


@dataclass
class TopK:
    """The teacher's k most likely tokens at each position, in the student's vocabulary, and the mass outside them.

    `ids` are sorted by descending log-prob; `tail` is log(1 − Σ exp(logprobs)), −inf when the k tokens hold all the
    mass. Everything is at `temperature` (the teacher's softmax temperature when the top-k were taken).
    """

    ids: Tensor  # [B, N, k] long
    logprobs: Tensor  # [B, N, k]
    tail: Tensor  # [B, N]
    temperature: float = 1.0

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
        """Top-k of dense logits `[B, N, V]` (k is clipped to V), with the exact tail mass."""
        logp = torch.log_softmax(upcast(logits) / temperature, -1)  # [B, N, V]
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tail = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)  # [B, N] mass outside, no cancellation
        return cls(top.indices, top.values, tail, temperature)

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def buckets(self) -> Tensor:
        """The teacher's distribution over k + 1 buckets (the k tokens, then the tail): `[B, N, k + 1]` log-probs."""
        return torch.cat([self.logprobs, self.tail.unsqueeze(-1)], dim=-1)


def row_view(values: Tensor) -> tuple[Tensor, int] | None:
    """`[B, M, V]` values (often a slice of a model's `[B, T, V]` output, so not viewable as `[B * M, V]`) as a `[R, V]`
    view of the rows of the tensor they were sliced from, and the rows between two batch rows, `per`: position
    (b, m) is row `b * per + m`. One `index_select` over those rows is 2-3x faster than indexing two dimensions at
    once at a 262k vocabulary. None where the layout allows no such view."""
    if not isinstance(values, Tensor):  # e.g. hidden states through an output layer: no rows to view
        return None
    b, m, v = values.shape
    if b and m and values.stride(2) == 1 and values.stride(1) == v and values.stride(0) % v == 0:
        per = values.stride(0) // v
        return values.as_strided(((b - 1) * per + m, v), (v, 1)), per
    return None


@dataclass(frozen=True)
class PositionRows:
    """The rows of `values` `[B, M, V]` at one position per student position, `index` `[B, N]` (-1: none, a zero
    row), read only when indexed: the teacher's own logits at the student's positions (`native_logits`) without a
    `[B, N, V_teacher]` copy, which at a 262k vocabulary is gigabytes that a loss would copy again to pick its valid
    rows. Indexed like the `[B, N, V]` tensor it stands for (a `[B, N]` mask, `(rows, cols)`, integers), it returns
    those rows as a new fp32 tensor without gradient; `shape` is that tensor's. `values` may also be logits given as
    hidden states and an output layer (`losses.fused.HiddenRows`): only the rows read are then computed."""

    values: Tensor
    index: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.index.shape, self.values.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __getitem__(self, key) -> Tensor:
        pos = self.index[key]
        batch = torch.arange(self.index.shape[0], device=self.index.device)[:, None].expand_as(self.index)[key]
        with torch.no_grad():
            if not self.values.shape[1]:  # no position to read: every row is none
                return torch.zeros(*pos.shape, self.values.shape[-1], device=self.device)
            view = row_view(self.values)
            if view is None:
                rows = self.values[batch, pos.clamp_min(0)]
            else:  # into kept memory where nothing holds it (`buffers.target_buffer`): gigabytes at a 262k vocabulary
                flat = (batch * view[1] + pos.clamp_min(0)).reshape(-1)
                out = target_buffer((len(flat), view[0].shape[-1]), self.device, view[0].dtype, slot="position_rows")
                rows = torch.index_select(view[0], 0, flat, out=out).view(*pos.shape, self.values.shape[-1])
            return rows.float().masked_fill_((pos < 0)[..., None], 0.0)

    def detach(self) -> PositionRows:
        return self  # values read without gradient

    def dense(self) -> Tensor:
        """The whole `[B, N, V]` tensor (for a reader that needs it)."""
        return self[torch.ones_like(self.index, dtype=torch.bool)].view(self.shape)


@dataclass
class TeacherSequence:
    """The teacher's outputs at its own completion positions, for losses that score in the teacher's space there."""

    logits: Tensor  # [B, M, V_teacher] the teacher's logits at its M completion positions
    mask: Tensor | None = None  # [B, M] bool; None: the teacher's positions are the student's (M = N, the loss mask)
    from_student: Callable[[Tensor], Tensor] | None = None  # [B, N, H] at student positions -> [B, M, H]; None: same


@dataclass
class TeacherTarget:
    """The teacher's outputs at the student's completion positions `[B, N]`; each form is filled when asked for.

    Positions where `mask` is False have no target; losses leave them out (they still count in the step's token
    normaliser, so an uncovered token contributes zero rather than re-weighting the others).
    """

    coverage: float = 1.0  # share of valid student completion tokens with a target
    mask: Tensor | None = None  # [B, N] bool; None: every position has a target
    logits: Tensor | None = None  # [B, N, V] dense, in the student's vocabulary (or the space of student_projection)
    topk: TopK | None = None  # the top-k form, ids in the student's vocabulary
    token_logprobs: Tensor | None = None  # [B, N] log p_T of each student token (of its span with token_spans)
    token_spans: Tensor | None = None  # [B, N] span id; the span's log-prob sits on its last token
    # [B, N, V_teacher] the teacher's own logits at the aligned position (or `PositionRows` reading them when indexed)
    native_logits: Tensor | PositionRows | None = None
    vocab_pairs: tuple[Tensor, Tensor] | None = None  # (student ids [K], teacher ids [K]) with the same text
    vocab_projection: tuple[Tensor, Tensor, Tensor] | None = None  # W's (student ids, teacher ids, weights), [E] each
    hidden: Tensor | None = None  # [B, N, H_teacher] hidden state at (or attended from) each student position
    sequence: TeacherSequence | None = None  # the teacher's logits at its own positions and the way there
    head: Tensor | None = None  # [V_teacher, H_teacher] the frozen teacher's output layer weight
    mass_coverage: float | None = None  # mean teacher probability mass the projection kept
    student_projection: Callable[[Tensor], Tensor] | None = None  # maps student logits into `logits`' space

    @property
    def distribution(self) -> Tensor | TopK | None:
        """The teacher's distribution in the form this target carries it: dense logits, else the top-k form."""
        return self.logits if self.logits is not None else self.topk

    def filled(self) -> frozenset[str]:
        """The capabilities this target carries (every field `FIELDS` names for it is set)."""
        return frozenset(c for c, names in FIELDS.items() if all(getattr(self, n) is not None for n in names))

    def check(self, needs: frozenset[str], source: str) -> None:
        """Raise unless every capability in `needs` is filled, naming `source` (e.g. "aligner 'vocab_map'")."""
        missing = sorted(needs - self.filled())
        if missing:
            raise ValueError(f"{source} was asked for {missing} but its target leaves them empty: a capability it "
                             "declares must be filled (this is a bug in that aligner or teacher source)")

    def with_topk(self, k: int, temperature: float = 1.0) -> TeacherTarget:
        """This target with its dense form replaced by the top-k form (`TopK.from_logits`)."""
        if self.logits is None:
            raise ValueError("a top-k form is taken from dense teacher logits, and this target has none")
        return replace(self, logits=None, topk=TopK.from_logits(self.logits, k, temperature))


# Which fields carry each capability.
FIELDS: dict[str, tuple[str, ...]] = {
    TEACHER_LOGITS: ("logits",),
    TEACHER_TOPK: ("topk",),
    TEACHER_TOKEN_LOGPROBS: ("token_logprobs",),
    TEACHER_NATIVE_LOGITS: ("native_logits",),
    VOCAB_PAIRS: ("vocab_pairs",),
    VOCAB_PROJECTION: ("vocab_projection",),
    HIDDEN_STATES: ("hidden", "sequence"),
}
