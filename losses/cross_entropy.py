"""Cross-entropy on given completions: supervised fine-tuning as a loss term.

OPD recipes often add an SFT term on gold or teacher-written completions (off-policy sequence-level KD, or a
regulariser beside the on-policy loss). It reads nothing from a teacher, so its `requires` is empty and the
training module runs no reference model for it.
"""

from __future__ import annotations

from torch import Tensor

from opd_lightning.target import token_logprobs

from .base import LOSSES, DistillationLoss, LossInputs, LossOutput, normalise

__all__ = ["CrossEntropy", "cross_entropy"]


def cross_entropy(student_logits: Tensor, target_ids: Tensor, mask: Tensor, *,
                  num_items: Tensor | float | None = None) -> Tensor:
    """Σ_valid −log p_S(target) / num_items; logits `[B, N, V]`, targets and mask `[B, N]`."""
    mask = mask.bool()
    logp = token_logprobs(student_logits[mask], target_ids[mask])  # [n], at least fp32
    return normalise(-logp.sum(), mask, num_items)


@LOSSES.register("cross_entropy")
class CrossEntropy(DistillationLoss):
    """Token-level negative log-likelihood, L = −Σ_t valid log p_S(y_t) / num_items, on gold or teacher-written
    completions: supervised fine-tuning, or word-level sequence KD when the completions are the teacher's
    (Kim & Rush 2016, "Sequence-Level Knowledge Distillation")."""

    def forward(self, inputs: LossInputs) -> LossOutput:
        return LossOutput(cross_entropy(inputs.student_logits, inputs.target_ids, inputs.mask, num_items=inputs.num_items))
