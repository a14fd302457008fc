"""Entropy-aware on-policy distillation: reverse-KL policy gradient, plus forward KL where the teacher is unsure.

Reverse KL is mode-seeking: where the teacher spreads its mass over several plausible tokens, it pushes the
student onto one of them and its sampled-token signal is noisy. This loss keeps the sampled-token reverse-KL
policy gradient everywhere and adds a mode-covering forward KL on the teacher's top-k at the positions where
the teacher's entropy is high. The gate is computed from the teacher alone (no gradient flows through it).
With the teacher's top-k form, the forward KL is exact (it only reads the teacher's top-k) and the gate reads the
entropy of the k + 1 bucket distribution, a lower bound of the full entropy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_lightning.target import TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TopK, token_logprobs, upcast

from .base import (
    LOSSES,
    DistillationLoss,
    LossInputs,
    LossOutput,
    dense_sum,
    normalise,
    teacher_distribution,
)
from .kl import forward_kl_per_token
from .sampled_token import clipped_policy_loss, teacher_logprobs_at
from .topk import check_k, restrict_to_teacher_topk

__all__ = ["EntropyAware", "entropy_aware", "teacher_entropy", "topk_forward_kl_per_token"]


def topk_forward_kl_per_token(s_logp: Tensor, t_logp: Tensor, k: int) -> Tensor:
    """KL(p̃_T ‖ p̃_S) over the teacher's top-k ids, both renormalised there; `[n, V]` -> `[n]`."""
    return forward_kl_per_token(*restrict_to_teacher_topk(s_logp, t_logp, k))


@torch.no_grad()
def teacher_entropy(teacher_rows: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """H(p_T) in nats per row of `[n, V]` logits, computed `chunk_size` rows at a time; returns `[n]`."""
    out = []
    for rows in teacher_rows.split(chunk_size or max(teacher_rows.shape[0], 1)):
        logp = torch.log_softmax(upcast(rows) / temperature, -1)  # [c, V]
        out.append(-(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1))
    return torch.cat(out) if out else upcast(teacher_rows.new_zeros(0))


def entropy_aware(student_logits: Tensor, target_ids: Tensor, teacher: Tensor | TopK, mask: Tensor, *,
                  teacher_token_logprobs: Tensor | None = None, old_logprobs: Tensor | None = None,
                  num_items: Tensor | float | None = None, **hyperparameters) -> LossOutput:
    """Entropy-gated mix of sampled-token reverse KL and top-k forward KL; see `EntropyAware` for the maths and its
    `__init__` for `hyperparameters`.

    Args:
        student_logits: `[B, N, V]`, carries the gradient.
        target_ids: `[B, N]` the student's sampled tokens.
        teacher: `[B, N, V]` teacher logits in the student's vocabulary, or the top-k form (`TopK`).
        mask: `[B, N]` True on valid completion tokens.
        teacher_token_logprobs: `[B, N]` log p_T(y_t) at temperature 1; if None, gathered from dense `teacher`.
        old_logprobs: `[B, N]` log-probs of the student that sampled the rollout; None = this student.
        num_items: normaliser of the optimizer step; None = `mask.sum()`.

    Returns:
        `LossOutput` with metrics "pg" and "forward_kl" (each term's share of the loss), "gated_frac" (share of
        valid positions above the threshold), "teacher_entropy" (mean H_T) and "clip_frac".
    """
    return EntropyAware(**hyperparameters).compute(student_logits, target_ids, teacher, mask, teacher_token_logprobs,
                                                   old_logprobs, num_items)


@LOSSES.register("entropy_aware")
class EntropyAware(DistillationLoss):
    """Entropy-aware on-policy distillation (Jin et al. 2026, "Entropy-Aware On-Policy Distillation of Language
    Models", arXiv:2603.07079). On the student's sampled tokens y_t, with a_t = log p_T(y_t) − log p_S(y_t)
    (detached), r_t the importance ratio to the sampling student, H_T,t = −Σ_v p_T(v) log p_T(v) the teacher's
    entropy in nats, S_k,t the teacher's top-k ids and p̃ = p / p(S_k) both models renormalised on S_k:

        ℓ_t = −min(r_t a_t, clip(r_t, 1 − ε, 1 + ε) a_t)
              + λ · 1[H_T,t > τ] · Σ_{v∈S_k,t} p̃_T(v) (log p̃_T(v) − log p̃_S(v)),
        L = Σ_t valid ℓ_t / num_items,

    with τ = `entropy_threshold`, k = `k`, λ = `forward_weight`. The first term is the sampled-token estimate of
    the reverse-KL gradient (`sampled_token` with immediate credit); the second is the mode-covering forward KL
    the paper adds where the teacher is uncertain. Temperature divides both models' logits, the gate included.
    With the teacher's top-k form (k' ≥ k tokens) the second term is exact and H_T is the entropy of the k' tokens
    and one tail bucket.
    """

    requires = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS})
    accepts_topk = True

    def __init__(self, entropy_threshold: float = 1.0, k: int = 16, forward_weight: float = 1.0,
                 clip_eps: float = 0.2, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        """
        Args:
            entropy_threshold: teacher entropy in nats above which the forward-KL term is switched on (a
                uniform distribution over m tokens has entropy ln m; 1.0 ≈ mass spread over ~3 tokens).
            k: number of the teacher's most likely tokens the forward KL is restricted to (≥ 1).
            forward_weight: weight λ ≥ 0 of the forward-KL term relative to the policy-gradient term.
            clip_eps: PPO clip range of the importance ratio between this student and the one that sampled.
            temperature: softmax temperature applied to both models' logits (entropy gate included).
            chunk_size: gated positions computed at a time by the forward-KL term; None = all at once.
        """
        super().__init__()
        check_k(k)
        if entropy_threshold < 0 or forward_weight < 0 or clip_eps <= 0 or temperature <= 0:
            raise ValueError(f"need entropy_threshold ≥ 0, forward_weight ≥ 0, clip_eps > 0 and temperature > 0; got "
                             f"{entropy_threshold}, {forward_weight}, {clip_eps}, {temperature}")
        self.entropy_threshold, self.k, self.forward_weight = entropy_threshold, k, forward_weight
        self.clip_eps, self.temperature, self.chunk_size = clip_eps, temperature, chunk_size

    def _forward_kl(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return topk_forward_kl_per_token(s_logp, t_logp, self.k)

    def _forward_kl_buckets(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        # the teacher's tokens only (no tail), renormalised before the top k of them are taken
        return topk_forward_kl_per_token(s_logp[:, :-1].log_softmax(-1), t_logp[:, :-1].log_softmax(-1), self.k)

    def compute(self, student_logits: Tensor, target_ids: Tensor, teacher: Tensor | TopK, mask: Tensor,
                teacher_token_logprobs: Tensor | None, old_logprobs: Tensor | None,
                num_items: Tensor | float | None) -> LossOutput:
        """The loss on tensors; arguments as `entropy_aware`."""
        if isinstance(teacher, TopK) and teacher.k < self.k:
            raise ValueError(f"entropy_aware with k={self.k} needs at least {self.k} of the teacher's tokens, but its "
                             f"top-k form keeps {teacher.k}: keep more, or lower the loss's k")
        mask = mask.bool()
        rows, ids = student_logits[mask], target_ids[mask]  # [n, V], [n]
        t_rows, topk_ids = teacher_distribution(teacher, mask, self.temperature, self.registry_name)
        logp = token_logprobs(rows, ids, self.temperature)  # [n] carries the gradient
        dense = t_rows if topk_ids is None else None
        t_tok = teacher_logprobs_at(ids, mask, teacher_token_logprobs, dense, self.temperature)
        pg, was_clipped = clipped_policy_loss(logp, t_tok.to(logp.dtype) - logp.detach(),
                                              None if old_logprobs is None else old_logprobs[mask], self.clip_eps)
        if topk_ids is None:
            entropy = teacher_entropy(t_rows, self.temperature, self.chunk_size)  # [n]
        else:  # bucket log-probs, already at the temperature
            entropy = -(t_rows.exp() * t_rows.clamp_min(torch.finfo(t_rows.dtype).min)).sum(-1)
        gate = entropy > self.entropy_threshold  # [n]
        fkl = dense_sum(self._forward_kl if topk_ids is None else self._forward_kl_buckets, rows[gate], t_rows[gate],
                        temperature=self.temperature, chunk_size=self.chunk_size,
                        topk_ids=None if topk_ids is None else topk_ids[gate])
        pg_loss = normalise(pg.sum(), mask, num_items)
        fkl_loss = normalise(self.forward_weight * fkl, mask, num_items)
        n = max(int(mask.sum()), 1)
        metrics = {"pg": pg_loss, "forward_kl": fkl_loss, "gated_frac": gate.float().sum() / n,
                   "teacher_entropy": entropy.sum() / n, "clip_frac": was_clipped.float().sum() / n}
        return LossOutput(pg_loss + fkl_loss, {key: v.detach() for key, v in metrics.items()})

    def forward(self, inputs: LossInputs) -> LossOutput:
        target = inputs.require(self.registry_name)
        teacher = target.distribution
        if teacher is None:
            inputs.require(self.registry_name, TEACHER_LOGITS)
        return self.compute(inputs.student, inputs.target_ids, teacher, inputs.valid, target.token_logprobs,
                            inputs.old_logprobs, inputs.num_items)
