"""The training objective: weighted loss terms, each against a reference model on a set of completions.

OPD recipes mix terms: the distillation loss against the teacher on the student's rollouts, plus, e.g.,
λ·SFT on gold completions and β·KL to the initial student (Stable-OPD). A `LossTerm` names one such term; the
module computes each reference's logits once per micro-batch however many terms read them.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from opd_lightning.aligners import ALIGNERS, Aligner
from opd_lightning.losses import LOSSES, DistillationLoss

__all__ = ["LossTerm", "resolve_aligner", "resolve_loss"]

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
