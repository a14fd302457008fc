"""Temporal credit assignment for the sampled-token (policy-gradient) distillation losses.

On-policy distillation rewards each sampled token with the log-ratio a_t = log p_T(y_t) − log p_S(y_t). How
much of the future's reward a token is credited with is a modelling choice with a bias-variance trade-off, so
it is a named, separately tested pure function rather than a branch buried in a loss. Masked positions carry
no reward, never receive credit, and (being outside the loss) have zero advantage.

Beyond the sums of rewards: GAE-OPD (generalised advantage estimation, Schulman et al. 2016, with the log-ratio as
reward, as proposed for OPD by the survey arXiv 2606.22793), whose value of a prefix is here the closed form
V(c_t) = −Σ_{s ≥ t} γ^(s − t) KL_s(p_S ‖ p_T) read along the sampled path, or any values a caller supplies;
MiniLLM's length-normalised return (Gu et al. 2024); and IW-OPD's prefix importance weights (arXiv 2606.22600, as
TRL's `iw_opd_gamma`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_lightning.target import upcast

__all__ = ["CREDITS", "assign_credit", "check_credit", "discounted_returns", "gae_advantages", "iw_opd_weights",
           "length_normalised_returns", "reverse_kl_values"]

CREDITS = ("immediate", "return_to_go", "discounted", "baseline", "gae", "length_normalised", "iw_opd")
NEEDS_REVERSE_KL = frozenset({"baseline", "gae"})  # schemes that read the per-step KL(p_S ‖ p_T)


def check_credit(credit: str, gamma: float, lam: float = 0.95, iw_gamma: float = 0.5) -> None:
    """Raise a clear error for an unknown credit scheme, a discount outside (0, 1], a GAE λ outside [0, 1] or a
    negative IW-OPD amplification."""
    if credit not in CREDITS:
        raise ValueError(f"unknown credit {credit!r}; valid ones: {', '.join(CREDITS)}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
    if not 0 <= lam <= 1:
        raise ValueError(f"lam (GAE's λ) must lie in [0, 1], got {lam}")
    if iw_gamma < 0:
        raise ValueError(f"iw_gamma (IW-OPD's amplification) must be non-negative, got {iw_gamma}")


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
def reverse_kl_values(reverse_kl: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """V(c_t) = −Σ_{s ≥ t} γ^(s − t) KL_s(p_S ‖ p_T): the value of the prefix before token t, `[B, N]`, from the
    dense per-step reverse KLs along the sampled path.

    The expected log-ratio of step s under the student is exactly −KL_s, so this is the student's expected return
    from c_t with the later steps' KLs read at the prefixes it actually sampled (one path, not an expectation over
    them): no parameters, no regression. With it GAE at λ = 0 is the "baseline" credit, a_t + KL_t.
    """
    return -discounted_returns(reverse_kl, mask, gamma)


@torch.no_grad()
def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> Tensor:
    """Generalised advantage estimates `[B, N]`: δ_t = r_t + γ V(c_{t+1}) − V(c_t), A_t = Σ_l (γλ)^l δ_{t+l}.

    `values[..., t]` is V(c_t), the value of the prefix before token t; the value after the last position, and at
    masked positions, is 0 (the completion has ended). Masked positions have δ = 0 and A = 0; as in
    `discounted_returns`, the exponent counts positions. λ = 1 gives the discounted return minus V(c_t); λ = 0
    gives δ_t alone.
    """
    mask = mask.bool()
    r = torch.where(mask, rewards, 0.0)
    v = torch.where(mask, values.to(r.dtype), 0.0)
    following = torch.nn.functional.pad(v[..., 1:], (0, 1))  # V(c_{t+1}), 0 past the end
    delta = torch.where(mask, r + gamma * following - v, 0.0)
    return torch.where(mask, discounted_returns(delta, mask, gamma * lam), 0.0)


@torch.no_grad()
def length_normalised_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """MiniLLM's credit with its length-normalised long-term return: A_t = r_t + (1 / n_t) Σ_{s > t} r_s over the
    n_t valid positions after t (0 when there is none), `[B, N]`. The current token keeps its own reward; the future's
    is averaged rather than summed, so long completions do not dominate the gradient."""
    mask = mask.bool()
    r = torch.where(mask, rewards, 0.0)
    later = discounted_returns(r, mask, 1.0) - r  # Σ_{s > t} r_s
    count = mask.flip(-1).cumsum(-1).flip(-1) - mask.long()  # n_t
    return torch.where(mask, r + later / count.clamp_min(1), 0.0)


@torch.no_grad()
def iw_opd_weights(log_ratio: Tensor, mask: Tensor, iw_gamma: float = 0.5, eps: float = 1e-8) -> Tensor:
    """IW-OPD's prefix importance weights `[B, N]`: w_t = 1 + γ_iw (1 − P_t / T), where P_t = Σ_{s < t} |a_s| is the
    teacher-student discrepancy accumulated before t and T = max(Σ_s |a_s|, ε) the row's total. Early tokens weigh up
    to 1 + γ_iw, tokens after most of the drift close to 1; zero at masked positions."""
    mask = mask.bool()
    size = torch.where(mask, log_ratio.abs(), 0.0)
    before = size.cumsum(-1) - size
    total = size.sum(-1, keepdim=True).clamp_min(eps)
    return torch.where(mask, 1 + iw_gamma * (1 - before / total), 0.0)


@torch.no_grad()
def assign_credit(log_ratio: Tensor, mask: Tensor, credit: str = "immediate", *, gamma: float = 1.0,
                  lam: float = 0.95, iw_gamma: float = 0.5, reverse_kl: Tensor | None = None,
                  values: Tensor | None = None) -> Tensor:
    """Advantages A_t from per-token log-ratios a_t (`[B, N]`), zero at masked positions; no gradient flows.

    Args:
        log_ratio: a_t = log p_T(y_t) − log p_S(y_t) at each position, `[B, N]`.
        mask: `[B, N]`, True on valid completion tokens.
        credit: "immediate": A_t = a_t. "return_to_go": A_t = Σ_{s≥t} a_s. "discounted":
            A_t = Σ_{s≥t} γ^(s−t) a_s. "baseline": A_t = a_t + KL_t(p_S ‖ p_T), which subtracts the exact
            expectation E_{y~p_S}[a_t] = −KL_t(p_S ‖ p_T), so the advantage has zero mean under the student.
            "gae": `gae_advantages` with rewards a_t and the values given, or else `reverse_kl_values`.
            "length_normalised": `length_normalised_returns` (MiniLLM). "iw_opd": A_t = w_t a_t with
            `iw_opd_weights` (IW-OPD).
        gamma: discount of "discounted" and "gae", in (0, 1].
        lam: GAE's λ, in [0, 1].
        iw_gamma: IW-OPD's amplification of early tokens, ≥ 0.
        reverse_kl: per-step KL(p_S ‖ p_T) `[B, N]`, needed by "baseline", and by "gae" without `values`.
        values: V(c_t) `[B, N]` for "gae" (e.g. a learned value head's), overriding the closed form.

    Returns:
        `[B, N]` advantages, fp32 (fp64 for fp64 log-ratios).
    """
    check_credit(credit, gamma, lam, iw_gamma)
    mask = mask.bool()
    a = upcast(log_ratio.detach())
    if credit == "immediate":
        advantages = a
    elif credit == "return_to_go":
        advantages = discounted_returns(a, mask, 1.0)
    elif credit == "discounted":
        advantages = discounted_returns(a, mask, gamma)
    elif credit == "length_normalised":
        advantages = length_normalised_returns(a, mask)
    elif credit == "iw_opd":
        advantages = iw_opd_weights(a, mask, iw_gamma) * a
    elif credit == "gae" and values is not None:
        advantages = gae_advantages(a, upcast(values.detach()).to(a.dtype), mask, gamma, lam)
    else:
        if reverse_kl is None:
            raise ValueError(f"credit {credit!r} needs the per-step reverse KL from the teacher's distribution"
                             + (" (or values)" if credit == "gae" else ""))
        kl = upcast(reverse_kl.detach()).to(a.dtype)
        advantages = a + kl if credit == "baseline" else gae_advantages(a, reverse_kl_values(kl, mask, gamma), mask,
                                                                        gamma, lam)
    return torch.where(mask, advantages, 0.0)
