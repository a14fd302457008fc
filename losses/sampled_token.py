"""Sampled-token distillation: the teacher-student log-ratio on the student's own tokens, as a policy gradient.

On-policy distillation can skip the dense divergence: the log-ratio a_t = log p_T(y_t) − log p_S(y_t) on the
token the student sampled is a one-sample estimate of −KL(p_S ‖ p_T), and, used as a detached advantage in a
policy gradient, it needs only the teacher's log-prob of each sampled token (one number per position, which an
aligner can compute exactly across tokenizers). Credit assignment is `credit.assign_credit`; the PPO-clipped
importance ratio makes stale rollouts (sampled by an older student) usable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from opd_lightning.target import TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TopK, token_logprobs, upcast

from .base import (
    LOSSES,
    DistillationLoss,
    LossInputs,
    LossOutput,
    check_teacher,
    log_probs,
    normalise,
    teacher_distribution,
)
from .credit import NEEDS_REVERSE_KL, assign_credit, check_credit, discounted_returns
from .kl import reverse_kl_per_token

__all__ = ["PolicyStep", "SampledToken", "clipped_policy_loss", "sampled_token", "span_log_ratio", "teacher_logprobs_at"]

Credit = Literal["immediate", "return_to_go", "discounted", "baseline", "gae", "length_normalised", "iw_opd"]


def teacher_logprobs_at(ids: Tensor, mask: Tensor, teacher_token_logprobs: Tensor | None,
                        teacher_rows: Tensor | None, temperature: float) -> Tensor:
    """Teacher log-probs of the valid target tokens `ids` (`[n]`), detached.

    At temperature 1, supplied `teacher_token_logprobs` (`[B, N]`, at temperature 1 by the target contract) are
    preferred: they may come from exact cross-tokenizer scoring. At another temperature they are gathered from
    `teacher_rows / temperature` (the valid rows `[n, V]` of the dense teacher logits, already checked by the caller),
    and supplied token log-probs without dense rows are refused: they cannot be re-tempered.
    """
    if teacher_token_logprobs is not None and (temperature == 1 or teacher_rows is None):
        if temperature != 1:
            raise ValueError(f"the teacher's token log-probs are at temperature 1 and cannot be re-tempered to "
                             f"{temperature}: use temperature 1, or a target with dense teacher logits")
        t_tok = upcast(teacher_token_logprobs[mask].detach())  # [n]
        check_teacher(t_tok, "teacher token log-probs")
        return t_tok
    if teacher_rows is None:
        raise ValueError("the sampled-token loss needs teacher_token_logprobs [B, N] or teacher_logits [B, N, V]")
    return token_logprobs(teacher_rows.detach(), ids, temperature)


def span_log_ratio(logp: Tensor, teacher_span_logprobs: Tensor, spans: Tensor, mask: Tensor) -> Tensor:
    """Per-token log-ratio `[n]` when the teacher scores spans of tokens rather than single tokens.

    A span's log-ratio is log p_T(span text) − Σ log p_S(tokens of the span), shared evenly by its tokens, so the
    sum over a completion is unchanged. `teacher_span_logprobs` `[B, N]` holds each span's teacher log-prob on one
    of its tokens (zero on the others); `spans` `[B, N]` the span id of every valid token; `logp` `[n]` the
    student's log-probs of the valid tokens (detached here).
    """
    rows = mask.nonzero(as_tuple=True)[0]  # [n]
    width = int(spans.max().clamp_min(0)) + 1
    gid = rows * width + spans[mask]  # [n] span id unique across the batch
    size = mask.shape[0] * width
    student = logp.new_zeros(size).index_add_(0, gid, logp.detach())
    teacher = logp.new_zeros(size).index_add_(0, gid, upcast(teacher_span_logprobs[mask].detach()).to(logp.dtype))
    count = logp.new_zeros(size).index_add_(0, gid, torch.ones_like(logp))
    return ((teacher - student) / count.clamp_min(1))[gid]


def clipped_policy_loss(logp: Tensor, advantages: Tensor, old_logp: Tensor | None,
                        clip_eps: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token: −min(r·A, clip(r, 1 − ε, 1 + ε)·A) with r = exp(log p − log p_old).

    Without `old_logp` the ratio is exp(log p − stopgrad(log p)) = 1, whose gradient is REINFORCE's A·∇log p.
    Returns the per-token loss `[n]` and where the clipped branch is taken (`[n]` bool).
    """
    old = logp.detach() if old_logp is None else upcast(old_logp.detach()).to(logp.dtype)
    ratio = torch.exp(logp - old)  # [n]
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    was_clipped = ((ratio < 1 - clip_eps) & (advantages < 0)) | ((ratio > 1 + clip_eps) & (advantages > 0))
    return -torch.minimum(unclipped, clipped), was_clipped


@dataclass
class PolicyStep:
    """What the policy gradient reads at the n valid positions."""

    rows: Tensor  # [n, V] the student's logits, with the gradient
    ids: Tensor  # [n] the completion tokens
    logp: Tensor  # [n] their log-probs at the loss's temperature, with the gradient
    log_ratio: Tensor  # [n] a_t, detached
    advantages: Tensor  # [n] A_t, detached
    values: Tensor | None = None  # [n] the value head's V(c_t), with the head's gradient ("gae" with value "head")
    returns: Tensor | None = None  # [n] their regression targets, the discounted returns of the log-ratios


def _scatter(values: Tensor, mask: Tensor) -> Tensor:
    """Valid-row values `[n]` back to `[B, N]`, zeros elsewhere."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


@torch.no_grad()
def _step_reverse_kl(rows: Tensor, teacher: Tensor | TopK | None, mask: Tensor, temperature: float) -> Tensor:
    """KL(p_S ‖ p_T) at each valid position, `[B, N]`, detached: the baseline of "baseline" credit. With the top-k
    form it is the k + 1 bucket KL (a lower bound, exact at k = V)."""
    if teacher is None:
        raise ValueError("credits 'baseline' and 'gae' need the teacher's distribution (dense teacher_logits [B, N, V] or its "
                         "top-k form) for the per-step KL")
    t_rows, ids = teacher_distribution(teacher, mask, temperature, "sampled_token")
    return _scatter(reverse_kl_per_token(*log_probs(rows, t_rows, temperature, ids)), mask)


def sampled_token(student_logits: Tensor, target_ids: Tensor, mask: Tensor, *,
                  teacher_token_logprobs: Tensor | None = None, teacher_logits: Tensor | TopK | None = None,
                  token_spans: Tensor | None = None, old_logprobs: Tensor | None = None,
                  num_items: Tensor | float | None = None, **hyperparameters) -> LossOutput:
    """Clipped policy gradient with the teacher-student log-ratio as reward; see `SampledToken` for the maths and
    its `__init__` for `hyperparameters`.

    Args:
        student_logits: `[B, N, V]`, carries the gradient; divided by the temperature.
        target_ids: `[B, N]` the sampled completion tokens y_t.
        mask: `[B, N]` True on valid completion tokens.
        teacher_token_logprobs: `[B, N]` log p_T(y_t) at temperature 1; if None, gathered from `teacher_logits`.
        teacher_logits: `[B, N, V]`, or the top-k form (`TopK`, for "baseline" credit only); needed for credit
            "baseline", at a temperature other than 1, or when token log-probs are absent.
        token_spans: `[B, N]` span ids when `teacher_token_logprobs` scores spans of tokens (a cross-tokenizer
            aligner's span log-likelihoods); each span's log-ratio is shared evenly by its tokens (`span_log_ratio`).
        old_logprobs: `[B, N]` log p_S(y_t) under the student that sampled the rollout; None = this student.
        num_items: normaliser of the optimizer step; None = `mask.sum()`.

    Returns:
        `LossOutput` with metrics "advantage" (mean A_t), "log_ratio" (mean a_t) and "clip_frac".
    """
    return SampledToken(**hyperparameters).compute(student_logits, target_ids, mask, teacher_token_logprobs,
                                                   teacher_logits, token_spans, old_logprobs, num_items)


@LOSSES.register("sampled_token")
class SampledToken(DistillationLoss):
    """On-policy distillation by sampled-token log-ratio (Thinking Machines, "On-Policy Distillation", 2025;
    the per-token reward of Gu et al. 2024, "MiniLLM"), with PPO clipping (Schulman et al. 2017).

    With y_t ~ p_S the student's own tokens, a_t = log p_T(y_t) − log p_S(y_t) (detached), A_t = credit(a)_t,
    r_t = exp(log p_S(y_t) − log p_old(y_t)):

        L = Σ_t valid −min(r_t A_t, clip(r_t, 1 − ε, 1 + ε) A_t) / num_items.

    With immediate credit and fresh rollouts its gradient is an unbiased estimate of ∇ Σ_t KL_t(p_S ‖ p_T) at
    fixed prefixes. The loss value is a surrogate, not a divergence: its sign follows the advantages. "baseline"
    credit reads the teacher's distribution; with its top-k form the per-step KL is over k + 1 buckets.
    """

    accepts_topk = True  # for "baseline" credit's per-step KL; the log-ratio itself reads token log-probs
    # `requires` is set per instance in __init__: "baseline" credit also reads the teacher's distribution.

    def __init__(self, credit: Credit = "immediate", gamma: float = 0.99, clip_eps: float = 0.2,
                 temperature: float = 1.0, lam: float = 0.95, iw_gamma: float = 0.5,
                 value: Literal["reverse_kl", "head"] = "reverse_kl", value_coef: float = 0.5) -> None:
        """
        Args:
            credit: temporal credit of each token: "immediate" (its own log-ratio), "return_to_go" (the sum of
                this and later log-ratios), "discounted" (that sum discounted by `gamma` per position), or
                "baseline" (its log-ratio plus the exact per-step reverse KL, a zero-mean advantage; reads the
                teacher's distribution), "gae" (generalised advantage estimates with the closed-form value of each
                prefix, minus the discounted sum of the later per-step reverse KLs; reads the teacher's
                distribution), "length_normalised" (MiniLLM: its log-ratio plus the mean of the later ones) or
                "iw_opd" (its log-ratio weighted by IW-OPD's prefix importance weight). See `credit.assign_credit`.
            gamma: discount per position of "discounted" and "gae" credit, in (0, 1]; unused by the other schemes.
            clip_eps: PPO clip range of the importance ratio between this student and the one that sampled.
            temperature: softmax temperature of the student's logits and of dense teacher logits; token log-probs
                supplied without dense logits are at temperature 1 and refused at any other.
            lam: GAE's λ in [0, 1] ("gae" only): 0 is the "baseline" credit, 1 the discounted return minus the value.
            iw_gamma: IW-OPD's amplification of early tokens, ≥ 0 ("iw_opd" only; TRL's `iw_opd_gamma`).
            value: how "gae" values a prefix: "reverse_kl", the closed form −Σ_{s≥t} γ^(s−t) KL_s(p_S ‖ p_T) along the
                sampled path (reads the teacher's distribution); or "head", a linear value head on the student's final
                hidden states (detached, so only the head learns from it), trained with this loss by regression on
                the discounted returns of the log-ratios and saved with the loss like DSKD's projectors.
            value_coef: weight of the value head's squared error in this loss ("head" only).
        """
        super().__init__()
        check_credit(credit, gamma, lam, iw_gamma)
        if clip_eps <= 0:
            raise ValueError(f"clip_eps must be positive, got {clip_eps}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.credit, self.gamma, self.clip_eps, self.temperature = credit, gamma, clip_eps, temperature
        if value not in ("reverse_kl", "head"):
            raise ValueError(f"value must be 'reverse_kl' or 'head', got {value!r}")
        if value == "head" and credit != "gae":
            raise ValueError(f"value 'head' values prefixes for credit 'gae' only, not {credit!r}")
        if value_coef < 0:
            raise ValueError(f"value_coef must be non-negative, got {value_coef}")
        self.lam, self.iw_gamma, self.value, self.value_coef = lam, iw_gamma, value, value_coef
        self.value_head: torch.nn.Linear | None = None
        self.reads_student_hidden = value == "head"
        self.reads_kl = credit in NEEDS_REVERSE_KL and value != "head"  # the per-step KL from the teacher
        self.requires = frozenset({TEACHER_TOKEN_LOGPROBS} | ({TEACHER_LOGITS} if self.reads_kl else set()))

    def setup(self, student_hidden: int, teacher_hidden: int) -> None:
        """Create the value head (value "head"), once the student's hidden size is known."""
        if self.value == "head" and (self.value_head is None or self.value_head.in_features != student_hidden):
            self.value_head = torch.nn.Linear(student_hidden, 1)

    def compute(self, student_logits: Tensor, target_ids: Tensor, mask: Tensor, teacher_token_logprobs: Tensor | None,
                teacher: Tensor | TopK | None, token_spans: Tensor | None, old_logprobs: Tensor | None,
                num_items: Tensor | float | None, student_hidden: Tensor | None = None) -> LossOutput:
        """The loss on tensors; arguments as `sampled_token`, and the student's hidden states `[B, N, H]` that
        predict each token (value "head" only)."""
        mask = mask.bool()
        step = self.advantages(student_logits, target_ids, mask, teacher_token_logprobs, teacher, token_spans,
                               student_hidden)
        old = None if old_logprobs is None else old_logprobs[mask]
        per_token, was_clipped = clipped_policy_loss(step.logp, step.advantages.to(step.logp.dtype), old,
                                                     self.clip_eps)
        per_token, extra = self.adjust(per_token, was_clipped, step, teacher, mask, old)
        loss = normalise(per_token.sum(), mask, num_items)
        n = max(int(mask.sum()), 1)
        if step.values is not None:
            squared = (step.values - step.returns.to(step.values.dtype)) ** 2  # [n]
            loss = loss + self.value_coef * normalise(squared.sum(), mask, num_items).to(loss.dtype)
            extra = {**extra, "value_loss": squared.sum() / n}
        metrics = {"advantage": step.advantages.sum() / n, "log_ratio": step.log_ratio.sum() / n,
                   "clip_frac": was_clipped.float().sum() / n, **extra}
        return LossOutput(loss, {k: v.detach() for k, v in metrics.items()})

    def advantages(self, student_logits: Tensor, target_ids: Tensor, mask: Tensor,
                   teacher_token_logprobs: Tensor | None, teacher: Tensor | TopK | None,
                   token_spans: Tensor | None, student_hidden: Tensor | None = None) -> PolicyStep:
        """The valid rows, their log-probs (with the gradient), log-ratios and advantages (`PolicyStep`)."""
        if token_spans is not None and self.reads_kl:
            raise ValueError(f"credit {self.credit!r} needs an exact per-token teacher distribution, but the teacher scores "
                             "spans here: use aligner 'bpe_subset' where the pair qualifies, or another credit scheme")
        rows, ids = student_logits[mask], target_ids[mask]  # [n, V], [n]
        dense = teacher if isinstance(teacher, Tensor) else None
        t_rows = None  # [n, V] valid dense teacher rows, selected only when read
        if dense is not None and (teacher_token_logprobs is None or self.temperature != 1):
            t_rows = dense[mask].detach()
            check_teacher(t_rows)
        logp = token_logprobs(rows, ids, self.temperature)  # [n] carries the gradient
        if token_spans is not None:
            if teacher_token_logprobs is None:
                raise ValueError("token_spans come with the spans' teacher log-probs in teacher_token_logprobs")
            if self.temperature != 1:
                raise ValueError("span log-likelihoods are at temperature 1: use the sampled-token loss at temperature 1")
            check_teacher(teacher_token_logprobs[mask].detach(), "teacher span log-probs")
            log_ratio = span_log_ratio(logp, teacher_token_logprobs, token_spans, mask)
        else:
            t_tok = teacher_logprobs_at(ids, mask, teacher_token_logprobs, t_rows, self.temperature)
            log_ratio = t_tok.to(logp.dtype) - logp.detach()
        ratios = _scatter(log_ratio, mask)  # [B, N]
        values = returns = None
        if self.value == "head":
            values = self._values(student_hidden, mask)  # [B, N] with the head's gradient
            returns = discounted_returns(ratios, mask, self.gamma)[mask]
        rkl = _step_reverse_kl(rows.detach(), teacher, mask, self.temperature) if self.reads_kl else None
        advantages = assign_credit(ratios, mask, self.credit, gamma=self.gamma, lam=self.lam, iw_gamma=self.iw_gamma,
                                   reverse_kl=rkl, values=None if values is None else values.detach())[mask]  # [n]
        return PolicyStep(rows, ids, logp, log_ratio, advantages, None if values is None else values[mask], returns)

    def _values(self, student_hidden: Tensor | None, mask: Tensor) -> Tensor:
        """The value head's V(c_t) `[B, N]` on the detached hidden states, zero at masked positions."""
        if self.value_head is None:
            raise ValueError("the value head does not exist yet: call setup(student_hidden, teacher_hidden) first "
                             "(the training module does)")
        if student_hidden is None:
            raise ValueError("value 'head' needs the student's hidden states (`student_hidden`), which the training "
                             "module passes to a loss with `reads_student_hidden`")
        head = self.value_head
        values = head(student_hidden.detach().to(head.weight.dtype)).squeeze(-1)
        return values.masked_fill(~mask, 0.0)

    def adjust(self, per_token: Tensor, was_clipped: Tensor, step: PolicyStep, teacher: Tensor | TopK | None,
               mask: Tensor, old_logprobs: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """A subclass's change to the per-token losses `[n]` and its extra metrics; none here."""
        return per_token, {}

    def forward(self, inputs: LossInputs) -> LossOutput:
        target = inputs.require(self.registry_name)
        if target.token_logprobs is None and target.logits is None:
            inputs.require(self.registry_name, TEACHER_TOKEN_LOGPROBS)
        teacher = target.distribution
        if self.reads_kl and teacher is None:
            inputs.require(self.registry_name, TEACHER_LOGITS)
        hidden = inputs.require_student("student_hidden", self.registry_name) if self.reads_student_hidden else None
        return self.compute(inputs.student, inputs.target_ids, inputs.valid, target.token_logprobs, teacher,
                            target.token_spans, inputs.old_logprobs, inputs.num_items, hidden)
