"""Divergences against a mixture of the two distributions: generalized JSD (GKD) and skew KL (DistiLLM).

Comparing with a mixture M keeps the divergence finite where one model puts almost no mass, which is why GKD
and DistiLLM use it. With the teacher's top-k form each is computed over the k tokens and one tail bucket. The mixture's log is formed in log space with `logaddexp`, never as `log(β p_T + ...)`, so
tiny probabilities do not underflow to log(0). Endpoints where the formula degenerates are special-cased so
they are exactly the plain KL they equal in the limit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import LOSSES, DenseDivergence
from .kl import forward_kl_per_token, reverse_kl_per_token

__all__ = [
    "GeneralizedJSD",
    "SkewKL",
    "SkewReverseKL",
    "generalized_jsd",
    "generalized_jsd_per_token",
    "mixture_logp",
    "skew_kl",
    "skew_kl_per_token",
    "skew_reverse_kl",
    "skew_reverse_kl_per_token",
]


def _check_weight(name: str, value: float, *, include_one: bool) -> None:
    upper_ok = value <= 1 if include_one else value < 1
    if not (value >= 0 and upper_ok):
        interval = "[0, 1]" if include_one else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value}")


def mixture_logp(a_logp: Tensor, b_logp: Tensor, weight: float) -> Tensor:
    """log(w·p_a + (1 − w)·p_b) from log-probs, for 0 < w < 1; shapes broadcast (`[n, V]`)."""
    return torch.logaddexp(a_logp + math.log(weight), b_logp + math.log1p(-weight))


def generalized_jsd_per_token(s_logp: Tensor, t_logp: Tensor, beta: float) -> Tensor:
    """β·KL(p_T ‖ M) + (1 − β)·KL(p_S ‖ M) with M = β p_T + (1 − β) p_S; β = 0 / 1 give forward / reverse KL."""
    if beta == 0:
        return forward_kl_per_token(s_logp, t_logp)
    if beta == 1:
        return reverse_kl_per_token(s_logp, t_logp)
    log_m = mixture_logp(t_logp, s_logp, beta)  # [n, V]
    kl_teacher_m = forward_kl_per_token(s_logp=log_m, t_logp=t_logp)  # KL(p_T ‖ M), [n]
    kl_student_m = forward_kl_per_token(s_logp=log_m, t_logp=s_logp)  # KL(p_S ‖ M), [n]
    return beta * kl_teacher_m + (1 - beta) * kl_student_m


def skew_kl_per_token(s_logp: Tensor, t_logp: Tensor, alpha: float) -> Tensor:
    """KL(p_T ‖ α p_T + (1 − α) p_S) per row; α = 0 is forward KL."""
    if alpha == 0:
        return forward_kl_per_token(s_logp, t_logp)
    return forward_kl_per_token(s_logp=mixture_logp(t_logp, s_logp, alpha), t_logp=t_logp)


def skew_reverse_kl_per_token(s_logp: Tensor, t_logp: Tensor, alpha: float) -> Tensor:
    """KL(p_S ‖ α p_S + (1 − α) p_T) per row; α = 0 is reverse KL."""
    if alpha == 0:
        return reverse_kl_per_token(s_logp, t_logp)
    return reverse_kl_per_token(s_logp=s_logp, t_logp=mixture_logp(s_logp, t_logp, alpha))





@LOSSES.register("generalized_jsd")
class GeneralizedJSD(DenseDivergence):
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of Language
    Models: Learning from Self-Generated Mistakes"):

        M = β p_T + (1 − β) p_S,   JSD_β = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M).

    The unscaled mixture vanishes at both ends (M becomes p_S at β = 0 and p_T at β = 1); its scaled limits are
    the plain KLs, JSD_β/β → KL(p_T ‖ p_S) as β → 0 and JSD_β/(1 − β) → KL(p_S ‖ p_T) as β → 1. This loss
    therefore defines the endpoints as those limits: β = 0 is exactly forward KL, β = 1 exactly reverse KL.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        """
        Args:
            beta: mixture weight of the teacher in [0, 1]; 0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD.
            temperature: softmax temperature applied to both models' logits before the divergence.
            chunk_size: valid positions computed at a time (memory bound for large vocabularies); None = all at once.
        """
        super().__init__(temperature, chunk_size)
        _check_weight("beta", beta, include_one=True)
        self.beta = beta

    def per_token(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return generalized_jsd_per_token(s_logp, t_logp, self.beta)


@LOSSES.register("skew_kl")
class SkewKL(DenseDivergence):
    """Skew forward KL of DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large
    Language Models"): KL(p_T ‖ α p_T + (1 − α) p_S). Mixing a share α of the teacher into the student keeps
    the divergence and its gradient bounded where the student puts almost no mass; α = 0 is forward KL."""

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        """
        Args:
            alpha: share of the teacher mixed into the student in [0, 1); 0 = forward KL.
            temperature: softmax temperature applied to both models' logits before the divergence.
            chunk_size: valid positions computed at a time (memory bound for large vocabularies); None = all at once.
        """
        super().__init__(temperature, chunk_size)
        _check_weight("alpha", alpha, include_one=False)
        self.alpha = alpha

    def per_token(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return skew_kl_per_token(s_logp, t_logp, self.alpha)


@LOSSES.register("skew_reverse_kl")
class SkewReverseKL(DenseDivergence):
    """Skew reverse KL of DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large
    Language Models"): KL(p_S ‖ α p_S + (1 − α) p_T). Mixing a share α of the student into the teacher keeps
    the divergence bounded where the teacher puts almost no mass; α = 0 is reverse KL."""

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        """
        Args:
            alpha: share of the student mixed into the teacher in [0, 1); 0 = reverse KL.
            temperature: softmax temperature applied to both models' logits before the divergence.
            chunk_size: valid positions computed at a time (memory bound for large vocabularies); None = all at once.
        """
        super().__init__(temperature, chunk_size)
        _check_weight("alpha", alpha, include_one=False)
        self.alpha = alpha

    def per_token(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return skew_reverse_kl_per_token(s_logp, t_logp, self.alpha)


generalized_jsd = GeneralizedJSD.as_function()
skew_kl = SkewKL.as_function()
skew_reverse_kl = SkewReverseKL.as_function()
