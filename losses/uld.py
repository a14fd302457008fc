"""Universal Logit Distillation: compare the two models' sorted probabilities, so vocabularies need not match.

When student and teacher tokenize differently, no token of one vocabulary has a known partner in the other, and
KL-type divergences are undefined. ULD compares the two distributions as sorted vectors instead: the closed form
of the Wasserstein-1 distance when moving mass between any two different tokens costs the same. The teacher's
logits stay in its own vocabulary (`teacher_native_logits`, at the teacher position an aligner paired with each
student position). The sorted-probability distance is public because GOLD applies it to its unmatched tokens.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from opd_lightning.target import TEACHER_NATIVE_LOGITS

from .base import LOSSES, DistillationLoss, LossInputs, LossOutput, check_teacher, normalise
from .fused import HiddenRows, dense_parts

__all__ = ["ULD", "sorted_l1_per_token", "uld", "uld_per_token", "valid_cross_rows", "valid_teacher_rows"]


def _descending(logp: Tensor, k: int | None) -> Tensor:
    """Row values sorted from largest to smallest, only the k largest when `k` is set; `[n, V]` -> `[n, min(k, V)]`."""
    if k is None or k >= logp.shape[-1]:
        return logp.sort(dim=-1, descending=True).values
    return logp.topk(k, dim=-1).values  # sorted, largest first


def sorted_l1_per_token(s_logp: Tensor, t_logp: Tensor, topk: int | None = None) -> Tensor:
    """Σ_i |sort↓(p_S)_i − sort↓(p_T)_i| per row, the shorter sorted vector zero-padded; `[n, V_s]`, `[n, V_t]` -> `[n]`.

    Inputs are log-probabilities of any non-negative measures (rows need not sum to 1: GOLD passes sub-vectors).
    With `topk`, each side keeps only its own k largest entries before the comparison. The padding is never
    materialised: against zeros the tail of the longer vector contributes its plain sum.
    """
    s = _descending(s_logp, topk).exp()  # [n, k_s]
    t = _descending(t_logp, topk).exp()  # [n, k_t]
    width = min(s.shape[-1], t.shape[-1])
    head = (s[..., :width] - t[..., :width]).abs().sum(-1)  # [n]
    return head + s[..., width:].sum(-1) + t[..., width:].sum(-1)


def uld_per_token(s_logp: Tensor, t_logp: Tensor, target_ids: Tensor, topk: int | None = None) -> Tensor:
    """Sorted-probability L1 and −log p_S(target) per row: `[n, V_s]`, `[n, V_t]`, `[n]` -> `[n, 2]`."""
    ce = -s_logp.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)  # [n]
    return torch.stack([sorted_l1_per_token(s_logp, t_logp, topk), ce], dim=-1)


def valid_teacher_rows(student_logits: Tensor | HiddenRows, teacher_native_logits: Tensor, mask: Tensor) -> Tensor:
    """The teacher's valid rows `[n, V_t]` (detached and checked for NaN/inf), after checking that both models'
    logits (or the student's `HiddenRows`) and the mask share `[B, N]`."""
    if tuple(student_logits.shape[:-1]) != tuple(teacher_native_logits.shape[:-1]) or \
            tuple(student_logits.shape[:-1]) != tuple(mask.shape):
        raise ValueError(f"student logits {tuple(student_logits.shape)}, teacher native logits "
                         f"{tuple(teacher_native_logits.shape)} and mask {tuple(mask.shape)} must share [B, N]: the "
                         "aligner gives one teacher position per student position.")
    teacher_rows = teacher_native_logits[mask].detach()  # [n, V_t]
    check_teacher(teacher_rows, "teacher native logits")
    return teacher_rows


def valid_cross_rows(student_logits: Tensor, teacher_native_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Valid rows of both models' logits, `[n, V_s]` and `[n, V_t]` (teacher detached and checked for NaN/inf)."""
    teacher_rows = valid_teacher_rows(student_logits, teacher_native_logits, mask)
    return student_logits[mask], teacher_rows


def uld(student_logits: Tensor, teacher_native_logits: Tensor, mask: Tensor, target_ids: Tensor, *,
        num_items: Tensor | float | None = None, **hyperparameters) -> LossOutput:
    """ULD loss over the valid positions, normalised once; see `ULD` for the formula and its `__init__` for
    `hyperparameters`.

    Shapes: student logits `[B, N, V_s]`, teacher native logits `[B, N, V_t]`, mask and target ids `[B, N]`.
    Metrics "sorted_l1" and "ce" are the two parts unweighted and normalised like the loss, so that
    loss = distill_weight · sorted_l1 + ce_weight · ce.
    """
    return ULD(**hyperparameters).compute(student_logits, teacher_native_logits, mask, target_ids, num_items)


@LOSSES.register("uld")
class ULD(DistillationLoss):
    """Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal
    Logit Distillation Loss for LLMs", arXiv:2402.12030). With p = softmax(z / τ) for each model in its own
    vocabulary, σ(p) the probabilities sorted in descending order and the shorter vector zero-padded to
    max(V_s, V_T) entries,

        ℓ_t = λ · Σ_i |σ(p_S,t)_i − σ(p_T,t)_i| − μ · log p_S,t(y_t),   L = Σ_t valid ℓ_t / num_items,

    with λ = `distill_weight` and μ = `ce_weight`. The first term is the Wasserstein-1 distance under a uniform
    transport cost, which needs no token correspondence: it is zero exactly when the two sorted vectors agree,
    whatever the vocabularies' sizes and orders. The second is the paper's cross-entropy on the given tokens y_t.
    With `topk`, only each side's k largest probabilities are compared and the rest of the mass is ignored.
    """

    requires = frozenset({TEACHER_NATIVE_LOGITS})
    fuses = True  # both parts are sums over positions: the student may come fused (`dense_parts`)

    def __init__(self, distill_weight: float = 1.5, ce_weight: float = 1.0, temperature: float = 1.0,
                 topk: int | None = None, chunk_size: int | None = None) -> None:
        """
        Args:
            distill_weight: weight λ ≥ 0 of the sorted-probability L1 term. The default 1.5 with `ce_weight` 1 is
                the paper's L = L_CE + λ·L_ULD as its authors' released recipe runs it (`distil_factor=1.5`,
                `cross_entropy_factor=1`), so the defaults reproduce the published setting.
            ce_weight: weight μ ≥ 0 of the cross-entropy on `target_ids`. The paper trains on teacher-written
                answers, where this is sequence-level KD; on the student's own rollouts it only reinforces what the
                student sampled, so set 0 there (TRL's GOLD trainer defaults to 0 for that reason).
            temperature: softmax temperature τ > 0 applied to both models' logits, in both terms.
            topk: compare only the k largest probabilities of each side (the sorted tail carries little mass, and
                the sort shrinks from V to k entries); the mass outside each side's top k is ignored entirely, so
                the loss no longer sees it. None = full vocabularies.
            chunk_size: valid positions computed at a time (memory bound for large vocabularies); None = all at once.
        """
        super().__init__()
        if distill_weight < 0 or ce_weight < 0 or temperature <= 0:
            raise ValueError(f"need distill_weight ≥ 0, ce_weight ≥ 0 and temperature > 0; got {distill_weight}, "
                             f"{ce_weight}, {temperature}")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"topk must be None or a positive integer, got {topk!r}")
        self.distill_weight, self.ce_weight, self.temperature = distill_weight, ce_weight, temperature
        self.topk, self.chunk_size = topk, chunk_size

    def compute(self, student_logits: Tensor, teacher_native_logits: Tensor, mask: Tensor, target_ids: Tensor,
                num_items: Tensor | float | None) -> LossOutput:
        """The loss on tensors; arguments as `uld`."""
        mask = mask.bool()
        t_rows = valid_teacher_rows(student_logits, teacher_native_logits, mask)
        weights = torch.tensor([self.distill_weight, self.ce_weight], device=t_rows.device)
        total, sums = dense_parts(partial(uld_per_token, topk=self.topk), student_logits, t_rows, mask,
                                  target_ids[mask], weights=weights, temperature=self.temperature,
                                  chunk_size=self.chunk_size)  # the weighted sum, and the two parts' sums [2]
        l1, ce = normalise(sums, mask, num_items).unbind()
        return LossOutput(normalise(total, mask, num_items), {"sorted_l1": l1, "ce": ce})

    def forward(self, inputs: LossInputs) -> LossOutput:
        target = inputs.require(self.registry_name, TEACHER_NATIVE_LOGITS)
        return self.compute(inputs.student, target.native_logits, inputs.valid, inputs.target_ids, inputs.num_items)
