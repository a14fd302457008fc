"""The aligner contract: how the teacher sees a student rollout, and how its outputs come back.

An aligner is configured in YAML, then bound once to the (student tokenizer, teacher tokenizer) pair with
`bind`, which is where a pair it cannot serve is refused. Per batch it turns a student rollout into teacher
inputs and projects the teacher's logits back to the student's completion positions, in whatever form the loss
asks for (a distribution in the student's vocabulary, the teacher's own logits at aligned positions, the teacher's
likelihood of each student token). It also reports coverage: the share of student completion tokens that received
an exact target. Aligners are pure tensor/tokenizer code: no Lightning, no losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from opd_lightning.registry import Registry

if TYPE_CHECKING:
    from opd_lightning.losses import TeacherSequence

    from opd_lightning.rollout import Rollout

__all__ = ["ALIGNERS", "AlignedTarget", "Aligner", "TeacherHidden", "TeacherInputs"]

ALIGNERS: Registry = Registry("aligner")


@dataclass
class TeacherInputs:
    """What the teacher's forward pass receives, and what the aligner needs again to project its outputs."""

    input_ids: Tensor  # [B, T_teacher]
    attention_mask: Tensor  # [B, T_teacher]
    position_ids: Tensor  # [B, T_teacher]
    completion_length: int  # M: number of trailing positions whose predictions the aligner needs
    alignment: Any = None  # aligner-specific state for `project` (e.g. the byte-span alignment)


@dataclass
class TeacherHidden:
    """What `Aligner.project_hidden` reads: the teacher's outputs on its completion positions, both embedding tables."""

    hidden: Tensor  # [B, M, H_teacher] the input of the teacher's output layer (last hidden state, final norm applied)
    logits: Tensor  # [B, M, V_teacher] the teacher's logits there
    student_embeddings: Tensor  # [V, H_student] the student's input embedding table, detached
    teacher_embeddings: Tensor  # [V_teacher, H_teacher] the teacher's


@dataclass
class AlignedTarget:
    """Teacher outputs at the student's completion positions `[B, N]`; each field is filled when asked for.

    Positions where `mask` is False have no exact target; losses leave them out (they still count in the step's
    token normaliser, so an uncovered token contributes zero rather than re-weighting the others).
    """

    coverage: float  # share of valid student completion tokens with an exact target
    teacher_logits: Tensor | None = None  # [B, N, V] in the student's vocabulary (or the shared space below)
    mask: Tensor | None = None  # [B, N] bool; None: every position has a target
    teacher_token_logprobs: Tensor | None = None  # [B, N] log p_T of each student token (or span, see token_spans)
    token_spans: Tensor | None = None  # [B, N] span id; the span's log-prob sits on its last token
    teacher_native_logits: Tensor | None = None  # [B, N, V_teacher] teacher logits at the aligned position
    vocab_pairs: tuple[Tensor, Tensor] | None = None  # (student ids [K], teacher ids [K]) with the same text
    mass_coverage: float | None = None  # mean teacher probability mass the projection kept
    student_projection: Callable[[Tensor], Tensor] | None = None  # maps student logits into `teacher_logits`' space
    teacher_hidden: Tensor | None = None  # [B, N, H_teacher] teacher hidden state at (or attended from) each position
    teacher_sequence: TeacherSequence | None = None  # teacher logits at its own positions and the way there


class Aligner:
    """Base class. Subclasses implement `bind`, `teacher_inputs` and `project`, and list what they provide.

    `provides` names the loss inputs (capabilities from `opd_lightning.losses`) the aligner can fill; the module
    refuses a loss that requires anything else, naming the aligners that do provide it.
    """

    registry_name = ""
    provides: frozenset[str] = frozenset()
    #: True when the teacher reads the student's token ids unchanged (its completions can be reused as is).
    same_tokenizer = False

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        """Check that this aligner can serve the pair, and precompute what it needs; raise if it cannot."""
        raise NotImplementedError

    def teacher_inputs(self, rollout: Rollout) -> TeacherInputs:
        """Teacher inputs for a student rollout (prompt ids, then `N` completion columns)."""
        raise NotImplementedError

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> AlignedTarget:
        """Bring teacher logits for the completion (`[B, M, V_teacher]`) to the student's positions; fill `needs`."""
        raise NotImplementedError

    def setup(self, student_hidden: int, teacher_hidden: int) -> None:
        """Create parameters whose shapes depend on the models' hidden sizes; called once, before the optimizer is
        built. Default: none (an aligner with parameters is also an `nn.Module`, so they train and are saved)."""

    def project_hidden(self, target: AlignedTarget, states: TeacherHidden, inputs: TeacherInputs,
                       rollout: Rollout) -> None:
        """Fill `target.teacher_hidden` and `target.teacher_sequence` (aligners that provide HIDDEN_STATES).

        Called after `project`, only when a loss requires hidden states, with gradients enabled in training so
        that an aligner's own parameters learn; the teacher's tensors in `states` carry no gradient.
        """
        raise NotImplementedError(f"aligner {self.registry_name!r} does not provide hidden states")

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
