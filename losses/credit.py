"""Temporal credit assignment for the sampled-token (policy-gradient) distillation losses.

On-policy distillation rewards each sampled token with the log-ratio a_t = log p_T(y_t) − log p_S(y_t). How
much of the future's reward a token is credited with is a modelling choice with a bias-variance trade-off, so
it is a named, separately tested pure function rather than a branch buried in a loss. Masked positions carry
no reward, never receive credit, and (being outside the loss) have zero advantage.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_lightning.target import upcast

__all__ = ["CREDITS", "assign_credit", "check_credit", "discounted_returns"]

CREDITS = ("immediate", "return_to_go", "discounted", "baseline")


def check_credit(credit: str, gamma: float) -> None:
    """Raise a clear error for an unknown credit scheme or a discount outside (0, 1]."""
    if credit not in CREDITS:
        raise ValueError(f"unknown credit {credit!r}; valid ones: {', '.join(CREDITS)}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}")


@torch.no_grad()
def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """R_t = Σ_{s ≥ t} γ^(s − t) · mask_s · r_s along the last axis; `[B, N]` -> `[B, N]`.

    The exponent counts positions, masked ones included (they only ever trail or separate completion tokens,
    so this matters only for masks with holes). γ = 1 is a reversed cumulative sum; γ < 1 is a backward scan
    of N steps on `[B]` vectors, cheap next to the forward pass that produced the rewards.
    """
    r = torch.where(mask.bool(), rewards, 0.0)  # [B, N] masked rewards are exactly zero
    if gamma == 1:
        return r.flip(-1).cumsum(-1).flip(-1)
    out = torch.empty_like(r)
    running = torch.zeros_like(r[..., 0])  # [B]
    for t in range(r.shape[-1] - 1, -1, -1):
        running = r[..., t] + gamma * running
        out[..., t] = running
    return out


@torch.no_grad()
def assign_credit(log_ratio: Tensor, mask: Tensor, credit: str = "immediate", *, gamma: float = 1.0,
                  reverse_kl: Tensor | None = None) -> Tensor:
    """Advantages A_t from per-token log-ratios a_t (`[B, N]`), zero at masked positions; no gradient flows.

    Args:
        log_ratio: a_t = log p_T(y_t) − log p_S(y_t) at each position, `[B, N]`.
        mask: `[B, N]`, True on valid completion tokens.
        credit: "immediate": A_t = a_t. "return_to_go": A_t = Σ_{s≥t} a_s. "discounted":
            A_t = Σ_{s≥t} γ^(s−t) a_s. "baseline": A_t = a_t + KL_t(p_S ‖ p_T), which subtracts the exact
            expectation E_{y~p_S}[a_t] = −KL_t(p_S ‖ p_T), so the advantage has zero mean under the student.
        gamma: discount of "discounted", in (0, 1].
        reverse_kl: per-step KL(p_S ‖ p_T) `[B, N]`, needed by "baseline" only.

    Returns:
        `[B, N]` advantages, fp32 (fp64 for fp64 log-ratios).
    """
    check_credit(credit, gamma)
    mask = mask.bool()
    a = upcast(log_ratio.detach())
    if credit == "immediate":
        advantages = a
    elif credit == "return_to_go":
        advantages = discounted_returns(a, mask, 1.0)
    elif credit == "discounted":
        advantages = discounted_returns(a, mask, gamma)
    else:
        if reverse_kl is None:
            raise ValueError("credit 'baseline' needs the per-step reverse KL from dense teacher logits")
        advantages = a + upcast(reverse_kl.detach()).to(a.dtype)
    return torch.where(mask, advantages, 0.0)
