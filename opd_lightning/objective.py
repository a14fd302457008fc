"""The training objective: weighted loss terms, each against a reference model on a set of completions.

OPD recipes mix terms: the distillation loss against the teacher on the student's rollouts, plus, e.g.,
λ·SFT on gold completions and β·KL to the initial student (Stable-OPD). A `LossTerm` names one such term; the
module computes each reference's logits once per micro-batch however many terms read them.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from opd_lightning.aligners import ALIGNERS, AlignedTarget, Aligner, IdentityAligner
from opd_lightning.losses import HIDDEN_STATES, LOSSES, DistillationLoss, LossInputs

__all__ = ["LossTerm", "check_pairing", "fill_inputs", "resolve_aligner", "resolve_loss"]

Reference = Literal["teacher", "initial_student"]
Completions = Literal["rollout", "gold"]


def resolve_loss(loss: DistillationLoss | str) -> DistillationLoss:
    """A loss instance, built with default arguments when given by registry name."""
    return LOSSES.build(loss) if isinstance(loss, str) else loss


def resolve_aligner(aligner: Aligner | str) -> Aligner:
    """An aligner instance, built with default arguments when given by registry name."""
    return ALIGNERS.build(aligner) if isinstance(aligner, str) else aligner


class LossTerm(nn.Module):
    """One weighted term of the objective."""

    def __init__(self, loss: DistillationLoss | str, weight: float = 1.0, reference: Reference = "teacher",
                 completions: Completions = "rollout") -> None:
        """
        Args:
            loss: a registered loss name (built with defaults) or a loss instance (`class_path`/`init_args`).
            weight: multiplier of this term in the total loss.
            reference: whose distribution the loss compares the student with: the teacher, or a frozen copy of
                the student as it was before training (with LoRA: the base model with the adapter disabled).
            completions: the student's rollouts, or the dataset's gold completions (for SFT-style terms).
        """
        super().__init__()
        self.loss = resolve_loss(loss)
        self.weight = weight
        self.reference = reference
        self.completions = completions

    @property
    def name(self) -> str:
        suffix = "" if self.reference == "teacher" else f"@{self.reference}"
        suffix += "" if self.completions == "rollout" else f"@{self.completions}"
        return f"{self.loss.registry_name}{suffix}"

    @property
    def needs_reference(self) -> bool:
        return bool(self.loss.requires)


def check_pairing(terms: list[LossTerm], aligner: Aligner) -> dict[tuple[str, str], frozenset[str]]:
    """What each (reference, completions) pair must provide, checked against what can provide it.

    The teacher's outputs come through `aligner`; the initial student shares the student's tokenizer, so its
    outputs come as the identity aligner's would, hidden states excepted (the teacher's output layer is what a
    hidden-state loss projects into). Raises, naming the aligners that would serve, when a loss needs an input its
    reference cannot give.
    """
    needs: dict[tuple[str, str], frozenset[str]] = {}
    for term in terms:
        if not term.needs_reference:
            continue
        key = (term.reference, term.completions)
        needs[key] = needs.get(key, frozenset()) | term.loss.requires
        provides = aligner.provides if term.reference == "teacher" else IdentityAligner.provides - {HIDDEN_STATES}
        missing = term.loss.requires - provides
        if missing:
            serving = sorted(name for name, cls in ALIGNERS.items() if term.loss.requires <= cls.provides)
            where = (f"aligner {aligner.registry_name!r}" if term.reference == "teacher"
                     else "the initial student (same tokenizer)")
            raise ValueError(f"loss {term.loss.registry_name!r} needs {sorted(missing)}, which {where} does not "
                             f"provide. Aligners that provide everything it needs: {serving or 'none'}.")
    return needs


def fill_inputs(inputs: LossInputs, target: AlignedTarget) -> None:
    """Copy an aligned target into a loss's inputs; positions without a target leave the loss mask."""
    if target.student_projection is not None:
        inputs.student_logits = target.student_projection(inputs.student_logits)
    inputs.teacher_logits = target.teacher_logits
    inputs.teacher_token_logprobs = target.teacher_token_logprobs
    inputs.token_spans = target.token_spans
    inputs.teacher_native_logits = target.teacher_native_logits
    inputs.vocab_pairs = target.vocab_pairs
    inputs.teacher_hidden = target.teacher_hidden
    inputs.teacher_sequence = target.teacher_sequence
    if target.mask is not None:
        inputs.mask = inputs.mask & target.mask
