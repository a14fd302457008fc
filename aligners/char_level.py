"""Character level: both models' next-token distributions turned into next-byte distributions, compared in byte space.

Where both tokenizations start a token on the same byte, each model's probability that the text continues with
byte b is the mass of its tokens spelled starting with b (Phan et al., "Exact Byte-Level Probabilities from
Tokenized Language Models", ICLR 2025, for the token-boundary case): p(b) = Σ_{v : bytes(v)[0] = b} p(v), plus one
class for EOS. Any two tokenizers meet in this 257-way space, so every dense same-vocabulary loss applies to it
unchanged: the aligner hands the loss the teacher's byte distribution as `teacher_logits` and a
`student_projection` that maps the student's logits the same way (differentiably). Tokens spelling no bytes (PAD,
UNK, BOS) carry no class, nor do bytes only one of the two vocabularies can start a token with (the other model
could never put mass there); each side is renormalised over the remaining classes.

The byte space is coarser than either vocabulary (it says which byte comes next, not which token), and says
nothing at positions inside a teacher token; pair it with `byte_spans`' span likelihoods when those matter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_lightning.buffers import scratch
from opd_lightning.rollout import Rollout
from opd_lightning.target import TEACHER_LOGITS, TeacherTarget, upcast

from .base import ALIGNERS, TeacherInputs
from .bytes import TokenBytes
from .columns import ColumnSums, column_blocks
from .rows import LOG_FLOOR
from .text import TextAligner, project_chunks

__all__ = ["BYTE_CLASSES", "CharLevelAligner", "byte_class_ids", "to_byte_logprobs"]

BYTE_CLASSES = 257  # 256 first bytes, then EOS


def byte_class_ids(table: TokenBytes) -> Tensor:
    """Class of every token id `[V]`: its first byte, 256 for EOS, -1 for tokens spelling nothing."""
    classes = [b[0] if b else -1 for b in table.table]
    if table.eos_id >= 0:
        classes[table.eos_id] = BYTE_CLASSES - 1
    return torch.tensor(classes, dtype=torch.long)


def to_byte_logprobs(logits: Tensor, classes: Tensor | ColumnSums) -> Tensor:
    """Next-byte log-probs `[..., 257]` from next-token logits `[..., V]` (differentiable), floored at `LOG_FLOOR`;
    `classes`: each token's class `[V]` (`byte_class_ids`), or their `ColumnSums` made once."""
    sums = classes if isinstance(classes, ColumnSums) else ColumnSums(classes[: logits.shape[-1]], BYTE_CLASSES)
    return _mass_logprobs(sums(torch.softmax(upcast(logits), -1)))  # [..., 257]


def _mass_logprobs(mass: Tensor) -> Tensor:
    """Byte-class masses `[..., 257]` renormalised to log-probs, floored at `LOG_FLOOR`."""
    mass = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    return torch.log(mass.clamp_min(torch.finfo(mass.dtype).tiny)).clamp_min(LOG_FLOOR)


@ALIGNERS.register("char_level")
class CharLevelAligner(TextAligner):
    """Both models compared as next-byte distributions at shared token starts."""

    provides = frozenset({TEACHER_LOGITS})
    reads_rows = True  # through `gather_rows` and `token_logprobs_chunked` only
    projects_student = True

    def __init__(self) -> None:
        """Takes no options: byte classes are read from the tokenizers when the aligner is bound."""
        super().__init__()
        self.student_classes = self.teacher_classes = torch.zeros(0, dtype=torch.long)
        self.student_sums = self.teacher_sums = ColumnSums(self.teacher_classes, BYTE_CLASSES)

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        super().bind(student_tokenizer, teacher_tokenizer, student_vocab_size, teacher_vocab_size)
        student, teacher = byte_class_ids(self.student_bytes), byte_class_ids(self.teacher_bytes)
        shared = torch.zeros(BYTE_CLASSES + 1, dtype=torch.bool)  # last slot absorbs the -1 of spelled-nothing tokens
        shared[student] = True
        reached = torch.zeros_like(shared)
        reached[teacher] = True
        shared &= reached
        shared[-1] = False
        # A byte only one model can start a token with carries no comparable mass: both sides drop it.
        self.student_classes = student.masked_fill(~shared[student], -1)
        self.teacher_classes = teacher.masked_fill(~shared[teacher], -1)
        self.student_sums = ColumnSums(self.student_classes[:student_vocab_size], BYTE_CLASSES)
        self.teacher_sums = ColumnSums(self.teacher_classes[:teacher_vocab_size], BYTE_CLASSES)

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        at = inputs.alignment.teacher_at_start.masked_fill(~rollout.completion_mask, -1)

        def to_bytes(logits: Tensor, b: Tensor, _i: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            """A chunk's byte-class log-probs, its rows exponentiated a block at a time (`columns.column_blocks`:
            straight from the logits, or computed from the teacher's hidden states and output layer, `HiddenRows`)
            and summed into classes while in cache."""
            mass = scratch(len(b), BYTE_CLASSES + 1, logits.device, slot="mass")
            for lo, hi, full, _, _ in column_blocks(logits, b, t, self.teacher_sums):  # unnormalised exps,
                mass[lo:hi] = full  # soft-maxed where unsafe: byte classes are normalised by their own sum
            return _mass_logprobs(mass[:, :BYTE_CLASSES]), mass.new_ones(len(b))

        target, valid, _, _ = project_chunks(teacher_logits, at, BYTE_CLASSES, to_bytes, copy=False)  # [B, N, 257]
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=target,
                             student_projection=lambda logits: to_byte_logprobs(logits, self.student_sums))
