"""X-Token's two losses: the student's distribution carried into the teacher's vocabulary by a sparse W (P-KL), and
GOLD's hybrid split with each student token matched to its top-ranked teacher token under W (H-KL).

Turuvekere Sreenivas et al., "X-Token: Projection-Guided Cross-Tokenizer Knowledge Distillation" (arXiv 2605.21699,
2026). GOLD leaves a student token with no same-text partner to a rank-sorted L1, which ignores what the token is
(the paper's "uncommon-token failure": Llama's multi-digit numbers against Qwen's digits). P-KL drops the partition
and compares whole distributions through W; H-KL keeps the partition but lets near-equivalent tokens match. W comes
from the aligner (`aligners/xtoken.py`, capability `vocab_projection`) and is not trained here. The paper's body was
not readable from here; the formulas follow its abstract and the authors' NeMo-RL release (`loss_functions.py`,
`x_token/loss_utils.py`), with the choices named in each class docstring.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from opd_lightning.target import TEACHER_NATIVE_LOGITS, VOCAB_PROJECTION

from .base import LOSSES, DistillationLoss, LossInputs, LossOutput, dense_sum, normalise, on_student_support
from .gold import GOLD
from .mixture import generalized_jsd_per_token
from .uld import valid_cross_rows

__all__ = ["XTokenHKL", "XTokenPKL", "pkl_per_token", "project_logprobs", "top_ranked_pairs", "xtoken_hkl",
           "xtoken_pkl"]

Projection = tuple[Tensor, Tensor, Tensor]  # (student ids [E], teacher ids [E], weights [E]) of W [V_s, V_t]


def project_logprobs(s_logp: Tensor, projection: Projection, width: int) -> Tensor:
    """log q with q = p_S W, in log space: `[n, V_s]` log-probs -> `[n, width]`, −inf on columns q does not reach.

    q(t) = Σ_s p_S(s) W[s, t] is a log-sum-exp over W's entries in column t, so a student probability too small
    for fp32 still counts; no gradient flows through the shift, and none into an unreachable column.
    """
    rows, cols, weights = (x.to(s_logp.device) for x in projection)
    vals = s_logp[:, rows] + weights.to(s_logp.dtype).log()  # [n, E] log p_S(s) + log W[s, t]
    index = cols.expand_as(vals)
    peak = vals.new_full((vals.shape[0], width), float("-inf")).scatter_reduce(-1, index, vals.detach(), "amax")
    shift = peak.masked_fill(torch.isneginf(peak), 0.0)  # [n, width]
    total = vals.new_zeros(vals.shape[0], width).scatter_add(-1, index, (vals - shift.gather(-1, index)).exp())
    reached = total > 0
    return torch.where(reached, shift + total.clamp_min(torch.finfo(total.dtype).tiny).log(), float("-inf"))


def pkl_per_token(s_logp: Tensor, t_logp: Tensor, projection: Projection, beta: float) -> Tensor:
    """P-KL's divergence, the mass W carries and the teacher's reachable mass per row: `[n, V_s]`, `[n, V_t]` ->
    `[n, 3]`."""
    log_q = project_logprobs(s_logp, projection, t_logp.shape[-1])  # [n, V_t]
    carried = log_q.logsumexp(-1, keepdim=True)  # [n, 1] log Σ_t q(t)
    q_logp = log_q - carried  # q renormalised; −inf stays −inf
    divergence = generalized_jsd_per_token(*on_student_support(q_logp, t_logp), beta)  # teacher renormalised on q's
    reachable = t_logp.masked_fill(torch.isneginf(log_q), float("-inf")).logsumexp(-1).exp()  # [n], no gradient
    return torch.stack([divergence, carried.squeeze(-1).exp(), reachable], dim=-1)


def _first_per_group(group: Tensor, weight: Tensor, tie: Tensor) -> Tensor:
    """Indices of the entry with the largest `weight` (ties: smallest `tie`) in each `group`, groups ascending."""
    order = torch.argsort(tie, stable=True)
    order = order[torch.argsort(-weight[order], stable=True)]
    order = order[torch.argsort(group[order], stable=True)]
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = group[order[1:]] != group[order[:-1]]
    return order[first]


def top_ranked_pairs(projection: Projection, threshold: float) -> tuple[Tensor, Tensor]:
    """H-KL's matched pairs: each student token s with its top-ranked teacher token t*(s) = argmax_t W[s, t] (ties:
    lower t), kept when W[s, t*] ≥ `threshold`; a teacher token claimed by several goes to the largest W[s, t*]
    (ties: lower s). Returns (student ids `[K]` ascending, teacher ids `[K]`), each id at most once."""
    rows, cols, weights = projection
    best = _first_per_group(rows, weights, cols)
    best = best[weights[best] >= threshold]
    rows, cols, weights = rows[best], cols[best], weights[best]
    won = _first_per_group(cols, weights, rows)
    order = torch.argsort(rows[won])
    return rows[won][order], cols[won][order]


def xtoken_pkl(student_logits: Tensor, teacher_native_logits: Tensor, mask: Tensor, projection: Projection, *,
               num_items: Tensor | float | None = None, **hyperparameters) -> LossOutput:
    """P-KL over the valid positions, normalised once; see `XTokenPKL` for the formula and its `__init__` for
    `hyperparameters`. Shapes: student logits `[B, N, V_s]`, teacher native logits `[B, N, V_t]`, mask `[B, N]`,
    `projection` W's (student ids, teacher ids, weights), `[E]` each. Metrics: "projected_mass", the mean share of
    the student's mass W carries (1 when every row with mass has entries), and "teacher_reachable_mass", the mean
    teacher mass on the tokens W reaches."""
    return XTokenPKL(**hyperparameters).compute(student_logits, teacher_native_logits, mask, projection, num_items)


@LOSSES.register("xtoken_pkl")
class XTokenPKL(DistillationLoss):
    """P-KL, X-Token's partition-free loss. With p = softmax(z / τ) in each model's own vocabulary, the student's
    distribution is carried into the teacher's vocabulary, q = p_S W (q(t) = Σ_s p_S(s) W[s, t]), and compared
    with the teacher's there:

        q̃ = q / Σ_t q(t),   R = {t : q(t) > 0},   p̃_T = p_T restricted to R and renormalised,
        ℓ_t = JSD_β(p̃_T,t, q̃_t),   L = Σ_t valid ℓ_t / num_items,

    with JSD_β the generalized JSD of `GeneralizedJSD`: β = 0 (default) is the release's forward KL(p̃_T ‖ q̃), β = 1
    its `reverse_kl` option KL(q̃ ‖ p̃_T). Zero exactly when q̃ = p̃_T (with W the identity: p_S = p_T). Choices where
    the release does otherwise: it renormalises q as well, but puts a 1e-10 floor under log q where the teacher
    has mass W cannot reach; such a term is a constant, so here the teacher is renormalised on R instead (as
    `on_student_support` does for padding), which keeps ℓ a divergence and rescales the gradient by 1 / p_T(R)
    ("teacher_reachable_mass" reports p_T(R)). The release also restricts both sides to one top-k teacher vocabulary
    per micro-batch and scales the loss by τ²; here the full vocabulary is used (a row's loss does not depend on the
    rows it is batched with) and, as for every loss here, no τ². Its next-token cross-entropy term is a separate
    `cross_entropy` term of the objective.
    """

    requires = frozenset({TEACHER_NATIVE_LOGITS, VOCAB_PROJECTION})

    def __init__(self, beta: float = 0.0, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        """
        Args:
            beta: mixture weight of the teacher in the generalized JSD between p̃_T and the projected student, in
                [0, 1]; 0 = forward KL(teacher ‖ projected student), the release's default; 1 = reverse KL.
            temperature: softmax temperature τ > 0 applied to both models' logits before the projection.
            chunk_size: valid positions computed at a time (memory bound for large vocabularies); None = all at once.
        """
        super().__init__()
        if not 0 <= beta <= 1 or temperature <= 0:
            raise ValueError(f"need beta in [0, 1] and temperature > 0; got {beta}, {temperature}")
        self.beta, self.temperature, self.chunk_size = beta, temperature, chunk_size

    def compute(self, student_logits: Tensor, teacher_native_logits: Tensor, mask: Tensor, projection: Projection,
                num_items: Tensor | float | None) -> LossOutput:
        """The loss on tensors; arguments as `xtoken_pkl`."""
        if projection[0].numel() == 0:
            raise ValueError("the vocabulary projection W has no entries: no student token reaches a teacher token")
        mask = mask.bool()
        s_rows, t_rows = valid_cross_rows(student_logits, teacher_native_logits, mask)
        per_token = partial(pkl_per_token, projection=projection, beta=self.beta)
        divergence, carried, reachable = dense_sum(per_token, s_rows, t_rows, temperature=self.temperature,
                                                   chunk_size=self.chunk_size).unbind()
        count = mask.sum().clamp_min(1)
        metrics = {"projected_mass": carried / count, "teacher_reachable_mass": reachable / count}
        return LossOutput(normalise(divergence, mask, num_items), {k: v.detach() for k, v in metrics.items()})

    def forward(self, inputs: LossInputs) -> LossOutput:
        target = inputs.require(self.registry_name, TEACHER_NATIVE_LOGITS, VOCAB_PROJECTION)
        return self.compute(inputs.student, target.native_logits, inputs.valid, target.vocab_projection,
                            inputs.num_items)


def xtoken_hkl(student_logits: Tensor, teacher_native_logits: Tensor, mask: Tensor, projection: Projection, *,
               num_items: Tensor | float | None = None, **hyperparameters) -> LossOutput:
    """H-KL over the valid positions, normalised once; see `XTokenHKL` for the formula and its `__init__` for
    `hyperparameters`. Shapes as `xtoken_pkl`; metrics those of `gold`, plus "pairs", the number K of matched pairs."""
    return XTokenHKL(**hyperparameters).compute_projected(student_logits, teacher_native_logits, mask, projection,
                                                          num_items)


@LOSSES.register("xtoken_hkl")
class XTokenHKL(GOLD):
    """H-KL, X-Token's hybrid loss: GOLD (`GOLD`'s formula, unchanged) with the matched pairs M read from W
    instead of exact text matches. Each student token s is paired with its top-ranked teacher token,

        t*(s) = argmax_t W[s, t],   M = {(s, t*(s)) : W[s, t*(s)] ≥ θ},

    and a teacher token claimed by several student tokens keeps the one with the largest W[s, t*] (ties: the lower
    student id), as the release's collision rule does; θ = `threshold`, the release's 0.6. With exact matches pinned
    in W (`xtoken` aligner's default) every exact pair is in M, and θ = 1 keeps only those. Defaults follow
    the release's H-KL, not TRL's GOLD: forward KL on the matched tokens (β = 0) and weights 1 and 1; the matched
    part keeps GOLD's renormalisation on the matched tokens (the release compares the unrenormalised sub-vectors).
    """

    requires = frozenset({TEACHER_NATIVE_LOGITS, VOCAB_PROJECTION})

    def __init__(self, threshold: float = 0.6, beta: float = 0.0, matched_weight: float | None = 1.0,
                 unmatched_weight: float | None = 1.0, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        """
        Args:
            threshold: smallest W[s, t*(s)] that matches student token s with its top-ranked teacher token, in
                (0, 1]; 1 keeps exact matches only (one-hot rows).
            beta: as `GOLD`'s; default 0, forward KL on the matched tokens, as the release.
            matched_weight: as `GOLD`'s; default 1, the release's sum of the two parts.
            unmatched_weight: as `GOLD`'s; default 1.
            temperature: as `GOLD`'s.
            chunk_size: as `GOLD`'s.
        """
        super().__init__(beta=beta, matched_weight=matched_weight, unmatched_weight=unmatched_weight,
                         temperature=temperature, chunk_size=chunk_size)
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
        self.threshold = threshold

    def compute_projected(self, student_logits: Tensor, teacher_native_logits: Tensor, mask: Tensor,
                          projection: Projection, num_items: Tensor | float | None) -> LossOutput:
        """The loss on tensors; arguments as `xtoken_hkl`."""
        pairs = top_ranked_pairs(tuple(x.to(student_logits.device) for x in projection), self.threshold)
        if pairs[0].numel() == 0:
            raise ValueError(f"no student token has a top-ranked teacher mapping of weight ≥ {self.threshold} in W: "
                             "lower `threshold`")
        out = self.compute(student_logits, teacher_native_logits, mask, pairs, num_items)
        out.metrics["pairs"] = torch.tensor(float(pairs[0].numel()), device=student_logits.device)
        return out

    def forward(self, inputs: LossInputs) -> LossOutput:
        target = inputs.require(self.registry_name, TEACHER_NATIVE_LOGITS, VOCAB_PROJECTION)
        return self.compute_projected(inputs.student, target.native_logits, inputs.valid, target.vocab_projection,
                                      inputs.num_items)
