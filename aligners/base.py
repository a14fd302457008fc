"""The aligner contract: how the teacher sees a student rollout, and how its outputs come back.

An aligner is configured in YAML, then bound once to the (student tokenizer, teacher tokenizer) pair with
`bind`, which is where a pair it cannot serve is refused. Per batch it turns a student rollout into teacher
inputs and projects the teacher's logits back to the student's completion positions, in the student's
vocabulary. It also reports coverage: the share of student completion tokens that received an exact target.
Aligners are pure tensor/tokenizer code: no Lightning, no losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opd_lightning.registry import Registry

__all__ = ["ALIGNERS", "AlignedTarget", "Aligner", "TeacherInputs"]

ALIGNERS: Registry = Registry("aligner")


@dataclass
class TeacherInputs:
    """What the teacher's forward pass receives."""

    input_ids: Tensor  # [B, T_teacher]
    attention_mask: Tensor  # [B, T_teacher]
    position_ids: Tensor  # [B, T_teacher]
    completion_length: int  # number of trailing positions whose predictions the aligner needs


@dataclass
class AlignedTarget:
    """Teacher outputs at the student's completion positions."""

    teacher_logits: Tensor  # [B, N, V_student]
    coverage: float  # share of valid student completion tokens with an exact target


class Aligner:
    """Base class. Subclasses implement `bind`, `teacher_inputs` and `project`."""

    registry_name = ""
    #: True when the teacher reads the student's token ids unchanged (its completions can be reused as is).
    same_tokenizer = False

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        """Check that this aligner can serve the pair, and precompute what it needs; raise if it cannot."""
        raise NotImplementedError

    def teacher_inputs(self, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> TeacherInputs:
        """Teacher inputs for a student rollout (`sequences` `[B, P + N]`, completion from column `prompt_length`)."""
        raise NotImplementedError

    def project(self, teacher_logits: Tensor, completion_mask: Tensor) -> AlignedTarget:
        """Bring teacher logits for the completion (`[B, N, V_teacher]`) to the student's vocabulary."""
        raise NotImplementedError

    @staticmethod
    def _known() -> str:
        return ", ".join(sorted(ALIGNERS))


def fit_vocab(teacher_logits: Tensor, student_vocab_size: int) -> Tensor:
    """Resize the vocabulary axis of teacher logits to the student's padded size.

    Rows past the shared tokenizer are padding (models round their embedding tables up). Extra teacher rows are
    dropped; missing ones are filled 30 nats below each position's smallest logit, so the teacher puts
    negligible mass on ids no tokenizer produces.
    """
    v_t = teacher_logits.shape[-1]
    if v_t >= student_vocab_size:
        return teacher_logits[..., :student_vocab_size]
    fill = teacher_logits.amin(-1, keepdim=True) - 30.0
    return torch.cat([teacher_logits, fill.expand(*teacher_logits.shape[:-1], student_vocab_size - v_t)], dim=-1)
