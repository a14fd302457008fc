"""Entropy-aware on-policy distillation: reverse-KL policy gradient, plus forward KL where the teacher is unsure.

Reverse KL is mode-seeking: where the teacher spreads its mass over several plausible tokens, it pushes the
student onto one of them and its sampled-token signal is noisy. This loss keeps the sampled-token reverse-KL
policy gradient everywhere and adds a mode-covering forward KL on the teacher's top-k at the positions where
the teacher's entropy is high. The gate is computed from the teacher alone (no gradient flows through it).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .base import (
    LOSSES,
    TEACHER_LOGITS,
    TEACHER_TOKEN_LOGPROBS,
    DistillationLoss,
    LossInputs,
    LossOutput,
    check_teacher,
    dense_sum,
    normalise,
)
from .kl import forward_kl_per_token
from .sampled_token import clipped_policy_loss, teacher_logprobs_at, token_logprobs
from .topk import check_k, restrict_to_teacher_topk

__all__ = ["EntropyAware", "entropy_aware", "teacher_entropy", "topk_forward_kl_per_token"]


def topk_forward_kl_per_token(s_logp: Tensor, t_logp: Tensor, k: int) -> Tensor:
    """KL(p̃_T ‖ p̃_S) over the teacher's top-k ids, both renormalised there; `[n, V]` -> `[n]`."""
    return forward_kl_per_token(*restrict_to_teacher_topk(s_logp, t_logp, k))


@torch.no_grad()
def teacher_entropy(teacher_rows: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """H(p_T) in nats per row of `[n, V]` logits, computed `chunk_size` rows at a time; returns `[n]` fp32."""
    out = []
    for rows in teacher_rows.split(chunk_size or max(teacher_rows.shape[0], 1)):
        logp = torch.log_softmax(rows.float() / temperature, -1)  # [c, V]
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else teacher_rows.new_zeros(0, dtype=torch.float32)


def entropy_aware(student_logits: Tensor, target_ids: Tensor, teacher_logits: Tensor, mask: Tensor, *,
                  teacher_token_logprobs: Tensor | None = None, old_logprobs: Tensor | None = None,
                  entropy_threshold: float = 1.0, k: int = 16, forward_weight: float = 1.0, clip_eps: float = 0.2,
                  temperature: float = 1.0, num_items: Tensor | float | None = None,
                  chunk_size: int | None = None) -> LossOutput:
    """Entropy-gated mix of sampled-token reverse KL and top-k forward KL; see `EntropyAware` for the maths.

    Args:
        student_logits: `[B, N, V]`, carries the gradient.
        target_ids: `[B, N]` the student's sampled tokens.
        teacher_logits: `[B, N, V]` in the student's vocabulary.
        mask: `[B, N]` True on valid completion tokens.
        teacher_token_logprobs: `[B, N]` log p_T(y_t); if None, gathered from `teacher_logits`.
        old_logprobs: `[B, N]` log-probs of the student that sampled the rollout; None = this student.
        entropy_threshold, k, forward_weight, clip_eps, temperature: see `EntropyAware.__init__`.
        num_items: normaliser of the optimizer step; None = `mask.sum()`.
        chunk_size: gated positions computed at a time by the forward-KL term; None = all at once.

    Returns:
        `LossOutput` with metrics "pg" and "forward_kl" (each term's share of the loss), "gated_frac" (share of
        valid positions above the threshold), "teacher_entropy" (mean H_T) and "clip_frac".
    """
    check_k(k)
    mask = mask.bool()
    rows, ids = student_logits[mask], target_ids[mask]  # [n, V], [n]
    t_rows = teacher_logits[mask].detach()  # [n, V]
    check_teacher(t_rows)
    logp = token_logprobs(rows, ids, temperature)  # [n] carries the gradient
    log_ratio = teacher_logprobs_at(ids, mask, teacher_token_logprobs, t_rows, temperature) - logp.detach()
    pg, was_clipped = clipped_policy_loss(logp, log_ratio, None if old_logprobs is None else old_logprobs[mask],
                                          clip_eps)  # [n] each
    entropy = teacher_entropy(t_rows, temperature, chunk_size)  # [n]
    gate = entropy > entropy_threshold  # [n]
    fkl = dense_sum(partial(topk_forward_kl_per_token, k=k), rows[gate], t_rows[gate], temperature=temperature,
                    chunk_size=chunk_size)
    pg_loss, fkl_loss = normalise(pg.sum(), mask, num_items), normalise(forward_weight * fkl, mask, num_items)
    n = max(int(mask.sum()), 1)
    metrics = {"pg": pg_loss, "forward_kl": fkl_loss, "gated_frac": gate.float().sum() / n,
               "teacher_entropy": entropy.sum() / n, "clip_frac": was_clipped.float().sum() / n}
    return LossOutput(pg_loss + fkl_loss, {key: v.detach() for key, v in metrics.items()})


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
    """

    requires = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS})

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

    def forward(self, inputs: LossInputs) -> LossOutput:
        teacher = inputs.require(TEACHER_LOGITS, self.registry_name)
        out = entropy_aware(inputs.student_logits, inputs.target_ids, teacher, inputs.mask,
                            teacher_token_logprobs=inputs.teacher_token_logprobs, old_logprobs=inputs.old_logprobs,
                            entropy_threshold=self.entropy_threshold, k=self.k, forward_weight=self.forward_weight,
                            clip_eps=self.clip_eps, temperature=self.temperature, num_items=inputs.num_items,
                            chunk_size=self.chunk_size)
        out.metrics[self.registry_name] = out.loss.detach()
        return out
