"""The identity aligner: teacher and student share one tokenizer, so the teacher reads the student's ids.

It is the only aligner that needs no alignment, and so the one that must refuse loudly when the tokenizers
differ: a silent mismatch would train the student towards the wrong tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_lightning.rollout import Rollout
from opd_lightning.target import (
    HIDDEN_STATES,
    TEACHER_LOGITS,
    TEACHER_NATIVE_LOGITS,
    TEACHER_TOKEN_LOGPROBS,
    VOCAB_PAIRS,
    TeacherSequence,
    TeacherTarget,
)

from .base import ALIGNERS, Aligner, BoundaryPairs, TeacherHidden, TeacherInputs, dense_token_logprobs, fit_vocab

__all__ = ["IdentityAligner"]


def _vocab_difference(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> str:
    only_student = sorted(set(student_vocab) - set(teacher_vocab))
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab))
    moved = sorted(t for t in set(student_vocab) & set(teacher_vocab) if student_vocab[t] != teacher_vocab[t])
    parts = [f"{len(student_vocab)} student vs {len(teacher_vocab)} teacher tokens"]
    for label, items in (("only in student", only_student), ("only in teacher", only_teacher),
                         ("different ids", moved)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {items[:3]!r})")
    return "; ".join(parts)


@ALIGNERS.register("identity")
class IdentityAligner(Aligner):
    """Same tokenizer on both sides: teacher inputs are the student's ids; logits are taken as they are."""

    same_tokenizer = True
    provides = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TEACHER_NATIVE_LOGITS, VOCAB_PAIRS, HIDDEN_STATES})

    def __init__(self) -> None:
        self.student_vocab_size = 0
        self.tokenizer_size = 0

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_vocab != teacher_vocab:
            raise ValueError(
                "the identity aligner needs the teacher to use the student's tokenizer, but the vocabularies differ ("
                f"{_vocab_difference(student_vocab, teacher_vocab)}). Use the same tokenizer for both models, or a "
                f"cross-tokenizer aligner from opd_lightning.aligners.ALIGNERS (registered: {self._known()}).")
        size = len(student_tokenizer)
        if min(student_vocab_size, teacher_vocab_size) < size:
            raise ValueError(f"a model's output layer ({student_vocab_size} student / {teacher_vocab_size} teacher "
                             f"logits) is smaller than the shared tokenizer ({size} tokens): resize its embeddings "
                             "with model.resize_token_embeddings(len(tokenizer))")
        self.student_vocab_size, self.tokenizer_size = student_vocab_size, size

    def teacher_inputs(self, rollout: Rollout) -> TeacherInputs:
        return TeacherInputs(rollout.sequences, rollout.attention_mask, rollout.position_ids,
                             rollout.completion_mask.shape[1])

    def boundary_pairs(self, inputs: TeacherInputs, rollout: Rollout) -> BoundaryPairs:
        """Every token of the sequence, at the same column on both sides."""
        batch, column = rollout.attention_mask.bool().nonzero(as_tuple=True)
        return BoundaryPairs(batch, column, column, column < rollout.prompt_length)

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        logits = fit_vocab(teacher_logits, self.student_vocab_size)  # [B, N, V]
        ids = torch.arange(self.tokenizer_size, device=logits.device)
        tokens = dense_token_logprobs(logits, rollout) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=1.0, logits=logits, native_logits=logits, vocab_pairs=(ids, ids),
                             token_logprobs=tokens, mass_coverage=1.0)

    def project_hidden(self, target: TeacherTarget, states: TeacherHidden, inputs: TeacherInputs,
                       rollout: Rollout) -> None:
        # The teacher reads the student's tokens: its positions are the student's, and its logits stay native.
        target.hidden = states.hidden  # [B, N, H_teacher]
        target.sequence = TeacherSequence(states.logits)
