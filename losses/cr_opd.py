"""Counterfactual-routed on-policy distillation (CR-OPD): where a sampled token is penalised, the probability taken
from it goes to the alternatives the teacher would have written, not to the whole vocabulary.

The survey arXiv 2606.22793 proposes the idea without a formula; this is the update implemented here. In the
sampled-token policy gradient, a token y with advantage A < 0 contributes the loss −r·A·log p_S(y) (r the
importance ratio, 1 for fresh rollouts), whose gradient on the student's logits z is

    ∂/∂z = |A|·r·(e_y − p_S):

descending it lowers z_y and raises every other logit in proportion to the student's own probabilities, so the
mass taken from y is spread over whatever the student already likes, including tokens the teacher rules out. CR-OPD
adds, at those positions only, the cross-entropy to a routing distribution w, weighted by |A|·r (r detached):

    |A|·r·(−Σ_v w_v log p_S(v)),   with gradient |A|·r·(p_S − w),

so that the two together give

    ∂/∂z = |A|·r·(e_y − w):

z_y goes down by the same amount as before, and exactly the routed alternatives go up, in proportion to w; the
student's other logits do not move. w is the teacher's distribution renormalised on the route set R: the teacher's
k most likely tokens, less y itself, that the student can reach (p_S(v) above `floor`). Where R is empty, or the
PPO clip has switched the token's gradient off, the update is the plain sampled-token one. Positive advantages are
untouched. The route set needs the teacher's distribution in the student's vocabulary (dense logits or their top-k
form), so across tokenizers it takes an aligner that provides `teacher_logits`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from opd_lightning.target import TEACHER_LOGITS, TopK

from .base import LOSSES, check_teacher
from .sampled_token import Credit, PolicyStep, SampledToken

__all__ = ["CounterfactualRouted", "route_targets"]


@torch.no_grad()
def route_targets(student_logp: Tensor, teacher_ids: Tensor, teacher_logp: Tensor, sampled: Tensor,
                  floor: float) -> Tensor:
    """The routing distribution w `[m, k]` over the teacher's candidates `teacher_ids` `[m, k]`.

    A candidate is routed to when it is not the sampled token (`sampled` `[m]`) and the student gives it a
    probability above `floor` (`student_logp` `[m, V]`); w is the teacher's probability (`teacher_logp` `[m, k]`)
    renormalised over those candidates, and a row with none is all zeros.
    """
    reach = student_logp.gather(-1, teacher_ids) > math.log(floor)
    allowed = reach & (teacher_ids != sampled.unsqueeze(-1))
    scores = teacher_logp.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(scores, -1)
    return torch.where(allowed.any(-1, keepdim=True), w, 0.0)


@LOSSES.register("cr_opd")
class CounterfactualRouted(SampledToken):
    """The sampled-token loss with counterfactual routing of negative advantages (module docstring for the update).

    Every option of `sampled_token` applies (credit, clipping, temperature); `route_k` bounds the teacher candidates
    and `floor` is the student probability a candidate needs to be routed to.
    """

    accepts_topk = True

    def __init__(self, credit: Credit = "immediate", gamma: float = 0.99, clip_eps: float = 0.2,
                 temperature: float = 1.0, lam: float = 0.95, iw_gamma: float = 0.5,
                 value: Literal["reverse_kl", "head"] = "reverse_kl", value_coef: float = 0.5, route_k: int = 8,
                 floor: float = 1e-3) -> None:
        """
        Args:
            credit, gamma, clip_eps, temperature, lam, iw_gamma, value, value_coef: as `SampledToken`.
            route_k: the teacher's most likely tokens considered as routes (a top-k target gives at most its k).
            floor: the student probability, in (0, 1), above which a teacher candidate is reachable.
        """
        super().__init__(credit, gamma, clip_eps, temperature, lam, iw_gamma, value, value_coef)
        if route_k < 1:
            raise ValueError(f"route_k must be at least 1, got {route_k}")
        if not 0 < floor < 1:
            raise ValueError(f"floor must lie in (0, 1), got {floor}")
        self.route_k, self.floor = route_k, floor
        self.requires = self.requires | {TEACHER_LOGITS}

    def adjust(self, per_token: Tensor, was_clipped: Tensor, step: PolicyStep, teacher: Tensor | TopK | None,
               mask: Tensor, old_logprobs: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        if teacher is None:
            raise ValueError("loss 'cr_opd' needs the teacher's distribution in the student's vocabulary (dense "
                             "teacher_logits or their top-k form) to route to: use an aligner that provides "
                             "teacher_logits")
        n = max(int(mask.sum()), 1)
        pick = ((step.advantages < 0) & ~was_clipped).nonzero().squeeze(-1)  # [m] among the valid positions
        at = tuple(i[pick] for i in mask.nonzero(as_tuple=True))  # their (row, column) in `[B, N]`
        if isinstance(teacher, TopK):
            if teacher.temperature != self.temperature:
                raise ValueError(f"loss 'cr_opd' runs at temperature {self.temperature}, but the teacher's top-k were "
                                 f"taken at {teacher.temperature}: take them at the loss's temperature")
            t_ids, t_logp = teacher.ids[at][:, : self.route_k], teacher.logprobs[at][:, : self.route_k]
        else:
            rows = teacher[at].detach() / self.temperature  # [m, V]
            top = rows.topk(min(self.route_k, rows.shape[-1]), -1)
            t_ids, t_logp = top.indices, top.values  # unnormalised: w renormalises them anyway
        check_teacher(t_logp.detach(), "teacher log-probs to route to")
        s_logp = torch.log_softmax(step.rows[pick] / self.temperature, -1)  # [m, V] with the gradient
        w = route_targets(s_logp.detach(), t_ids, t_logp.detach().to(s_logp.dtype), step.ids[pick], self.floor)
        old = step.logp.detach() if old_logprobs is None else old_logprobs.to(step.logp.dtype)
        ratio = torch.exp(step.logp.detach() - old)[pick]  # [m]
        routed = -(w * s_logp.gather(-1, t_ids)).sum(-1)  # [m] cross-entropy to w, zero where w is empty
        extra = (step.advantages[pick].abs().to(routed.dtype) * ratio.to(routed.dtype)) * routed
        per_token = per_token.index_add(0, pick, extra.to(per_token.dtype))
        return per_token, {"routed_frac": (w.sum(-1) > 0).float().sum() / n}
