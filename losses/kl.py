"""Forward KL, reverse KL and total variation between full next-token distributions.

These are the three plain divergences of distillation; each is one per-token formula on log-probs handed to the
shared chunked path in `base.dense_divergence`, so chunking, masking, temperature, the student's support and the
top-k form are written once. The per-token functions are public because other losses (top-k, mixtures) reuse them;
the tensor functions (`forward_kl`, ...) build the module, whose `__init__` declares and checks each hyperparameter.
"""

from __future__ import annotations

from torch import Tensor

from .base import LOSSES, DenseDivergence

__all__ = [
    "ForwardKL",
    "ReverseKL",
    "TotalVariation",
    "forward_kl",
    "forward_kl_per_token",
    "reverse_kl",
    "reverse_kl_per_token",
    "tvd",
    "tvd_per_token",
]


def forward_kl_per_token(s_logp: Tensor, t_logp: Tensor) -> Tensor:
    """KL(p_T ‖ p_S) per row from log-probs `[n, V]`; returns `[n]`."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def reverse_kl_per_token(s_logp: Tensor, t_logp: Tensor) -> Tensor:
    """KL(p_S ‖ p_T) per row from log-probs `[n, V]`; returns `[n]`."""
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


def tvd_per_token(s_logp: Tensor, t_logp: Tensor) -> Tensor:
    """½ Σ_v |p_T(v) − p_S(v)| per row from log-probs `[n, V]`; returns `[n]`."""
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)





@LOSSES.register("forward_kl")
class ForwardKL(DenseDivergence):
    """Forward KL, KL(p_T ‖ p_S) = Σ_v p_T(v) (log p_T(v) − log p_S(v)): mode-covering; the word-level KD
    objective of Hinton et al. (2015), "Distilling the Knowledge in a Neural Network", and of SeqKD-style
    off-policy distillation. With the teacher's top-k form the sum runs over the k tokens and one tail bucket
    holding the rest of each model's mass: a lower bound of the full KL, equal to it at k = V."""

    def per_token(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return forward_kl_per_token(s_logp, t_logp)


@LOSSES.register("reverse_kl")
class ReverseKL(DenseDivergence):
    """Reverse KL, KL(p_S ‖ p_T) = Σ_v p_S(v) (log p_S(v) − log p_T(v)): mode-seeking; the exact per-step
    objective of on-policy distillation (Gu et al. 2024, "MiniLLM"; Agarwal et al. 2024, "On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes"). With the teacher's top-k form the sum
    runs over the k tokens and one tail bucket (the student's mass outside them against the teacher's): a lower
    bound of the full KL, equal to it at k = V."""

    def per_token(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return reverse_kl_per_token(s_logp, t_logp)


@LOSSES.register("tvd")
class TotalVariation(DenseDivergence):
    """Total variation distance, TV(p_T, p_S) = ½ Σ_v |p_T(v) − p_S(v)|: symmetric and bounded in [0, 1]
    (used for distillation by Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge
    Distillation"). With the teacher's top-k form: the k tokens and one tail bucket, a lower bound, exact at
    k = V."""

    def per_token(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return tvd_per_token(s_logp, t_logp)


forward_kl = ForwardKL.as_function()
reverse_kl = ReverseKL.as_function()
tvd = TotalVariation.as_function()
