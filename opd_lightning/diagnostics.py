"""Training diagnostics: the numbers that tell a healthy distillation run from a degenerating one.

The loss alone hides how on-policy distillation fails: student and teacher drifting apart, distributions
collapsing, rollouts degenerating into repetition or running into the length limit, a poor cross-tokenizer
alignment, gradients that cancel out. `Diagnostics` tracks one number for each (formulas in its docstring).

Choices: every metric is kept as sums and counts in one float64 vector, a torchmetrics state reduced by sum, so
values sync across data-parallel ranks in one collective and ratios are formed once at `compute()`; the state is
non-persistent (never in a checkpoint). Token statistics read only the valid positions, in chunks of positions,
in fp32 under no_grad: masked positions are inert (even holding inf or NaN) and memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from opd_lightning.losses import HiddenRows

__all__ = ["Diagnostics", "DiagnosticsConfig", "ShiftProbe", "noncanonical_rows", "output_layer_grad_coherence", "policy_shift",
           "repeated_token_mask"]

# The sums and counts accumulated; each metric is a ratio of two of them, name: (numerator, denominator).
_SLOTS = ("tokens", "entropy_student", "repeated", "teacher_tokens", "entropy_teacher", "topk_overlap", "logratio",
          "logratio_pos", "adv_repeated", "adv_repeated_n", "rows", "completion_len", "truncated", "coverage",
          "coverage_n", "grad_coherence", "grad_coherence_n", "sampled", "teacher_sampled", "noncanonical",
          "noncanonical_n", "logratio_early", "early_n", "logratio_late", "late_n", "logratio_abs", "gold_nll",
          "gold_top1", "gold_n", "policy_shift", "policy_shift_n", "step_gain",
          "step_gain_n")
_INDEX = {name: i for i, name in enumerate(_SLOTS)}
_MEANS = {"entropy_student": ("entropy_student", "sampled"), "repetition_rate": ("repeated", "tokens"),
          "topk_overlap": ("topk_overlap", "teacher_sampled"), "logratio_mean": ("logratio", "teacher_tokens"),
          "logratio_pos_frac": ("logratio_pos", "teacher_tokens"), "logratio_abs": ("logratio_abs", "teacher_tokens"),
          "entropy_teacher": ("entropy_teacher", "teacher_sampled"),
          "completion_len": ("completion_len", "rows"), "truncation_rate": ("truncated", "rows"),
          "align_coverage": ("coverage", "coverage_n"), "grad_coherence": ("grad_coherence", "grad_coherence_n"),
          "noncanonical_rate": ("noncanonical", "noncanonical_n"),
          "logratio_early": ("logratio_early", "early_n"), "logratio_late": ("logratio_late", "late_n"),
          "gold_nll": ("gold_nll", "gold_n"), "gold_top1": ("gold_top1", "gold_n"),
          "policy_shift": ("policy_shift", "policy_shift_n"), "step_gain": ("step_gain", "step_gain_n")}
_CHUNK_ELEMENTS = 2**24  # elements per chunk of logits or gradient blocks (64 MiB in fp32)


@dataclass
class DiagnosticsConfig:
    """Which `diag/*` health metrics a run computes, and what they may cost.

    Args:
        enabled: compute and log the `diag/*` metrics every training step (and `val/diag/*` per validation).
        topk: k of `diag/topk_overlap` (mass on tokens in both models' top-k).
        ngram: n of `diag/repetition_rate` (tokens that repeat an earlier n-gram of their completion).
        max_positions: positions per micro-batch whose full distributions feed the entropy and top-k statistics
            (evenly spaced; bounds their cost at large vocabularies); None: all.
        grad_coherence_every: measure `diag/grad_coherence` every this many optimizer steps (0: never).
        gold_every: on training steps that read no gold completions (on-policy steps with no term on gold), score
            the batch's gold completions with the student every this many optimizer steps (one forward pass
            without gradient) for `diag/gold_nll` and `diag/gold_top1`, so that `RolloutGuard(gold_rise=...)` can
            watch a run with λ = 1 as well; 0: only on the steps that read them anyway. Needs a `completion` field.
        policy_shift_every: measure `diag/policy_shift` every this many optimizer steps (0: never): after the
            optimizer step, the student scores the step's own rollout again (one forward pass without gradient over
            its first micro-batch) and the shift is KL(before ‖ after) at up to `max_positions` of its positions.
    """

    enabled: bool = True
    topk: int = 8
    ngram: int = 3
    max_positions: int | None = 64
    grad_coherence_every: int = 20
    gold_every: int = 0
    policy_shift_every: int = 0

    def __post_init__(self) -> None:
        if min(self.topk, self.ngram) < 1 or min(self.grad_coherence_every, self.gold_every,
                                                  self.policy_shift_every) < 0:
            raise ValueError(f"diagnostics: need topk ≥ 1, ngram ≥ 1, and grad_coherence_every, gold_every and "
                             f"policy_shift_every ≥ 0, got {self.topk}, {self.ngram}, {self.grad_coherence_every}, "
                             f"{self.gold_every}, {self.policy_shift_every}")


def noncanonical_rows(tokenizer, completion_ids: Tensor, mask: Tensor) -> Tensor:
    """`[B]` bool: completions (`[B, N]` ids, valid where `mask`; a trailing EOS aside) whose tokens are not the
    tokenizer's encoding of their own text."""
    eos = tokenizer.eos_token_id
    rows = [ids[m].tolist() for ids, m in zip(completion_ids.cpu(), mask.bool().cpu(), strict=True)]
    rows = [r[:-1] if r and r[-1] == eos else r for r in rows]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    canonical = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([r != c for r, c in zip(rows, canonical, strict=True)], dtype=torch.bool)


def repeated_token_mask(completion_ids: Tensor, mask: Tensor, n: int) -> Tensor:
    """Tokens whose n-gram (the n tokens ending at them) already occurred earlier in the same completion.

    An n-gram counts only if all of its n positions are valid, so padding and masked tokens never repeat nor are
    repeated; rows with fewer than n valid consecutive tokens have no repeats. Exact comparison (no hashing):
    memory is `B * N**2` booleans, fine for completions of a few hundred tokens.

    Args:
        completion_ids: `[B, N]` token ids.
        mask: `[B, N]` valid completion positions.
        n: n-gram length (1: a token repeats any earlier token).

    Returns:
        `[B, N]` bool, true on repeated tokens.
    """
    batch, length = completion_ids.shape
    out = torch.zeros(batch, length, dtype=torch.bool, device=completion_ids.device)
    if length < n:
        return out
    ids, valid = completion_ids.unfold(1, n, 1), mask.bool().unfold(1, n, 1)  # [B, M, n], M = N - n + 1
    ends = valid.all(-1)  # [B, M] n-grams fully inside the valid tokens
    same = ends[:, :, None] & ends[:, None, :]  # [B, M, M]
    for k in range(n):
        same &= ids[:, :, None, k] == ids[:, None, :, k]
    earlier = torch.ones(length - n + 1, length - n + 1, dtype=torch.bool, device=out.device).tril(-1)  # j < i
    out[:, n - 1 :] = (same & earlier).any(-1)
    return out


def output_layer_grad_coherence(dlogits: Tensor, hidden: Tensor) -> Tensor:
    """Coherence `||sum_t g_t|| / sum_t ||g_t||` of the per-position gradients on the output layer's weight.

    With `logits = h W^T`, position t contributes `g_t = delta_t h_t^T` (Frobenius norms), so the numerator is
    `||D^T H||_F` and the denominator `sum_t ||delta_t|| ||h_t||`: exact, with no per-position backward. The
    numerator takes the cheaper of two exact forms: the Gram form `sum((D D^T) * (H H^T))`, `n^2 (V + H)` flops,
    when `n < V H / (V + H)` (few positions), else `D^T H` in chunks of the vocabulary, `n V H` flops and bounded
    memory. 1 when all positions push the same way, about `1/sqrt(n)` for random directions; NaN (0/0) when every
    g_t is zero.

    Args:
        dlogits: `[n, V]` gradient of the loss with respect to the logits at each valid position.
        hidden: `[n, H]` input of the output layer at the same positions.

    Returns:
        Scalar fp32 tensor in [0, 1].
    """
    d, h = dlogits.detach().float(), hidden.detach().float()  # [n, V], [n, H]
    (n, v), width = d.shape, h.shape[1]
    if n * (v + width) < v * width:
        squared = ((d @ d.T) * (h @ h.T)).sum()  # [n, n] Gram matrices
    else:
        step = max(1, _CHUNK_ELEMENTS // width)
        squared = sum((part.T @ h).square().sum() for part in d.split(step, dim=1))  # [v_chunk, H] blocks
    return squared.clamp_min(0).sqrt() / (d.norm(dim=-1) * h.norm(dim=-1)).sum()


class CoherenceSums:
    """`output_layer_grad_coherence` over positions given a chunk at a time (the fused output layer's batches,
    whose `[n, V]` gradient is never held whole): `D^T H` `[V, H]` and `sum_t ||delta_t|| ||h_t||` accumulate, the
    same two sums the one-piece function takes."""

    def __init__(self) -> None:
        self.product: Tensor | None = None  # [V, H] fp32
        self.norms: Tensor | None = None

    def add(self, dlogits: Tensor, hidden: Tensor) -> None:
        d, h = dlogits.detach().float(), hidden.detach().float()  # [c, V], [c, H]
        product, norms = d.T @ h, (d.norm(dim=-1) * h.norm(dim=-1)).sum()
        self.product = product if self.product is None else self.product.add_(product)
        self.norms = norms if self.norms is None else self.norms + norms

    def value(self) -> Tensor:
        """The coherence, as `output_layer_grad_coherence` of all the chunks together (NaN with none)."""
        if self.product is None:
            return torch.tensor(float("nan"))
        return self.product.norm() / self.norms


def _entropy(logp: Tensor) -> Tensor:
    # Clamping -inf makes 0 log 0 = 0 while NaN stays NaN. A product in place and a sum: on [64, 32768] rows, 1.3 ms
    # and within 1e-6 of float64, where a batched dot (`einsum`) took 3.2 ms and was 1.4e-4 off.
    return -logp.exp().mul_(logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)  # [c]


def _distribution_stats(student: Tensor, teacher: Tensor | None, rows: Tensor, cols: Tensor,
                        k: int) -> dict[str, Tensor]:
    """Entropies and top-k overlap `[n]` at positions `(rows, cols)`, chunked over positions."""
    parts: dict[str, list[Tensor]] = {}
    size = max(1, _CHUNK_ELEMENTS // student.shape[-1])
    for start in range(0, rows.numel(), size):
        r, c = rows[start : start + size], cols[start : start + size]
        ls = torch.log_softmax(student[r, c].float(), -1)  # [c, V]
        stats = {"entropy_student": _entropy(ls)}
        if teacher is not None:
            lt = torch.log_softmax(teacher[r, c].float(), -1)  # [c, V]
            ks, kt = ls.topk(k, -1).indices, lt.topk(k, -1).indices  # [c, k]
            shared = (ks[:, :, None] == kt[:, None, :]).any(-1)  # [c, k] student top-k ids also in teacher's
            mass = ls.gather(-1, ks).exp() + lt.gather(-1, ks).exp()  # [c, k]
            stats |= {"entropy_teacher": _entropy(lt), "topk_overlap": 0.5 * (mass * shared).sum(-1)}
        for key, value in stats.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def _token_logprob(logits: Tensor | HiddenRows, ids: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """log p(ids) `[n]` at positions `(rows, cols)`: one logsumexp pass, no `[n, V]` log-softmax kept."""
    return _token_stats(logits, ids, rows, cols, top1=False)[0]


def _token_stats(logits: Tensor | HiddenRows, ids: Tensor, rows: Tensor, cols: Tensor,
                 top1: bool = True) -> tuple[Tensor, Tensor | None]:
    """log p(ids) `[n]` at positions `(rows, cols)`, a chunk of rows at a time, and with `top1` whether each id is the
    top-1 there `[n]` (bool; a tie with another id counts as top-1; None without `top1`: one pass fewer).

    Without `top1`, logits given as a tensor are read where they lie, each row's normaliser in one exp pass
    (`aligners.rows.log_totals`): no copy of the rows and no max pass first."""
    if not top1 and isinstance(logits, Tensor):
        from opd_lightning.aligners.rows import log_totals  # the aligners import the losses, as this module does

        picked = logits[rows, cols, ids[rows, cols]].float()
        return picked - log_totals(logits, rows, cols), None
    size = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    logp, top = [torch.zeros(0, device=ids.device)], [torch.zeros(0, dtype=torch.bool, device=ids.device)]
    for start in range(0, rows.numel(), size):
        r, c = rows[start : start + size], cols[start : start + size]
        chunk = logits[r, c].float()  # [c, V]
        picked = chunk.gather(-1, ids[r, c, None]).squeeze(-1)
        logp.append(picked - chunk.logsumexp(-1))
        if top1:
            top.append(picked >= chunk.amax(-1))
    return torch.cat(logp), torch.cat(top) if top1 else None


@torch.no_grad()
def policy_shift(before: Tensor, after: Tensor) -> Tensor:
    """KL(p_before ‖ p_after) `[n]` of the softmax of two sets of logits `[n, V]` at the same positions: how far an
    optimizer step moved the student's next-token distributions (`_kl` of their log-softmax)."""
    return _kl(torch.log_softmax(before.float(), -1), torch.log_softmax(after.float(), -1))


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) `[n]` of two sets of log-probabilities `[n, V]`. Tokens p gives no mass add nothing (0 log 0 = 0); a
    token q rules out that p gives mass makes it inf."""
    p = log_p.exp()
    return (p * (log_p - log_q)).where(p > 0, 0.0).sum(-1)


class ShiftProbe:
    """The student's log-probabilities at up to `limit` evenly spaced valid positions of a step's rollout, read before
    the optimizer step, for `diag/policy_shift` after it (`shift`); with the teacher's dense target in the student's
    vocabulary (`teacher [B, N, V]`, valid where `teacher_mask`), also for `diag/step_gain`."""

    def __init__(self, rollout, logits: Tensor | HiddenRows, limit: int | None, fused: bool,
                 teacher: Tensor | None = None, teacher_mask: Tensor | None = None) -> None:
        mask = rollout.completion_mask.bool()
        if teacher is not None and teacher_mask is not None:
            mask = mask & teacher_mask.bool()
        rows, cols = mask.nonzero(as_tuple=True)
        pick = _spread(rows.numel(), limit, rows.device)
        self.rollout, self.fused, self.rows, self.cols = rollout, fused, rows[pick], cols[pick]
        with torch.no_grad():
            self.before = torch.log_softmax(logits[self.rows, self.cols].detach().float(), -1)  # [n, V]
            self.teacher = None if teacher is None else torch.log_softmax(
                teacher[self.rows, self.cols].detach().float(), -1)

    @torch.no_grad()
    def shift(self, after: Tensor | HiddenRows) -> tuple[Tensor, Tensor | None]:
        """`policy_shift` `[n]` against the student's logits for the same rollout after the step, and `step_gain`
        `[n]` (None without the teacher's target): KL(before ‖ teacher) - KL(after ‖ teacher), positive where the step
        brought the student closer to the teacher on its own rollout."""
        after = torch.log_softmax(after[self.rows, self.cols].float(), -1)
        moved = _kl(self.before, after)
        if self.teacher is None:
            return moved, None
        return moved, _kl(self.before, self.teacher) - _kl(after, self.teacher)


def _spread(count: int, limit: int | None, device: torch.device) -> Tensor:
    """Indices of at most `limit` evenly spaced items out of `count` (all of them when `limit` is None)."""
    if limit is None or count <= limit:
        return torch.arange(count, device=device)
    return torch.linspace(0, count - 1, limit, device=device).round().long()


class _Totals(Metric):
    """A float64 vector of sums and counts, summed across ranks."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.add_state("totals", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum",
                       persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = "") -> nn.Module:
        # Move with the parent, but stay float64: `.to(dtype)` (Lightning's "bf16-true") would round the counts.
        return super()._apply(lambda t: fn(t).to(torch.float64) if t.is_floating_point() else fn(t), exclude_state)

    def update(self, delta: Tensor) -> None:
        self.totals = self.totals + delta.to(self.totals)

    def compute(self) -> Tensor:
        return self.totals


class Diagnostics(nn.Module):
    """Accumulators for the `diag/*` metrics, each a mean over valid completion positions unless stated.

    - `topk_overlap`: `(p_S(K) + p_T(K)) / 2` with `K = K_S & K_T`, each model's top-k ids: the mass both put on
      tokens in both sets (Li et al. 2026: 97-99% and rising in healthy runs).
    - `logratio_mean`, `logratio_pos_frac`, `logratio_abs`: `a_t = log p_T(y_t) - log p_S(y_t)` at temperature 1;
      share `a_t > 0`; mean `|a_t|`, the size of the per-token advantages a sampled-token loss follows (large
      advantages with a small `grad_coherence`: gradients that cancel).
    - `logratio_early`, `logratio_late`, `logratio_drift`: mean `a_t` over the first half of each completion's valid
      tokens, over the second half, and late minus early: how the teacher's judgement of the student's tokens
      changes deeper into the student's own prefix (falling drift: the teacher's advice gets worse, or the student
      strays, as its prefix grows).
    - `entropy_student`, `entropy_teacher`: entropy in nats.
    - `completion_len`: valid tokens per row; `truncation_rate`: share of rows stopped by the length limit.
    - `repetition_rate`: share of valid tokens whose n-gram occurred earlier in the row (`repeated_token_mask`).
    - `repeat_advantage_ratio`: mean `a_t` on repeated tokens over mean `a_t` on the others (Luo et al. 2026:
      4-9x), from the sums of the whole accumulation; NaN when either group is empty or the second mean is 0. A
      ratio reads backwards when the mean advantage of the other tokens is negative (on-policy, the teacher usually
      finds the student's tokens less likely than the student does): repeats penalised less than the rest then
      give a ratio below 1.
    - `repeat_advantage_gap`: mean `a_t` on repeated tokens minus mean `a_t` on the others, in nats: how much more
      the teacher favours (relative to the student) a repeated token than another, whatever the signs; NaN when
      either group is empty.
    - `align_coverage`, `grad_coherence`: means of the values given (see `output_layer_grad_coherence`).
    - `gold_nll`: on steps that read the dataset's gold completions (`update_gold`), the student's mean
      negative log-likelihood of their tokens, in nats: a held-out likelihood, free on those steps, that rises as
      the student drifts away from the gold answers; and `gold_top1`, the share of those tokens that are the
      student's most likely token (its greedy choice given the gold prefix: a greedy score read on the training
      batch, at every such step).
    - `policy_shift`: on the steps that measure it (`DiagnosticsConfig.policy_shift_every`), the mean over sampled
      positions of the step's rollout of KL(before ‖ after) between the student's next-token distributions before
      and after the optimizer step (`policy_shift`): the size of the step in the policy's own terms, which the
      learning rate, the loss's gradient and the optimizer's state all set.
    - `noncanonical_rate`: share of on-policy completions whose tokens differ from the student tokenizer's own
      encoding of their text (`noncanonical_rows`): the student wrote the text by another path, e.g. "4", "6" for
      "46", which a teacher with another tokenizer reads as the same text.

    `compute()` syncs across ranks, so every rank must call it (log its values without `sync_dist`); it returns
    only the metrics whose count is positive since the last `reset()`.
    """

    def __init__(self, topk: int = 8, ngram: int = 3, max_positions: int | None = None) -> None:
        """
        Args:
            topk: size of each model's top-k set for `diag/topk_overlap` (clipped to the vocabulary).
            ngram: n-gram length for `diag/repetition_rate` and `diag/repeat_advantage_ratio`/`_gap`.
            max_positions: compute the full-distribution statistics (entropies, top-k overlap) on at most this
                many evenly spaced valid positions per update, to bound their cost at large vocabularies; the
                log-ratio, repetition and advantage statistics always use every valid position. None: all.
        """
        super().__init__()
        if topk < 1 or ngram < 1:
            raise ValueError(f"topk and ngram must be at least 1, got topk={topk}, ngram={ngram}")
        self.topk, self.ngram, self.max_positions = topk, ngram, max_positions
        self._totals = _Totals(len(_SLOTS))

    def _add(self, **values: Tensor | float) -> None:
        device = self._totals.totals.device
        delta = torch.zeros(len(_SLOTS), dtype=torch.float64, device=device)
        delta[[_INDEX[k] for k in values]] = torch.stack(
            [torch.as_tensor(v, device=device).detach().to(torch.float64).reshape(()) for v in values.values()])
        self._totals.update(delta)

    @torch.no_grad()
    def update_tokens(self, student_logits: Tensor | HiddenRows, teacher_logits: Tensor | None, completion_ids: Tensor,
                      mask: Tensor, teacher_mask: Tensor | None = None) -> None:
        """Token statistics of one (micro-)batch; without teacher logits only the student-side metrics.

        Args:
            student_logits: `[B, N, V]` student logits predicting the completion tokens, or `HiddenRows` (the fused
                output layer: only the positions read are projected, a chunk at a time).
            teacher_logits: `[B, N, V]` teacher logits in the student's vocabulary, or None.
            completion_ids: `[B, N]` the completion tokens.
            mask: `[B, N]` valid completion positions.
            teacher_mask: `[B, N]` positions where `teacher_logits` hold a target (an aligner may leave some
                without one); None: all of `mask`.
        """
        if completion_ids.shape != mask.shape or student_logits.shape[:2] != mask.shape:
            raise ValueError(f"shapes disagree: logits {tuple(student_logits.shape)}, ids {tuple(completion_ids.shape)}"
                             f", mask {tuple(mask.shape)}")
        if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} differ from the student's "
                             f"{tuple(student_logits.shape)}: project them to the student's vocabulary first")
        mask = mask.bool()
        rows, cols = mask.nonzero(as_tuple=True)  # [n]
        student, teacher = student_logits.detach(), None if teacher_logits is None else teacher_logits.detach()
        k = min(self.topk, student.shape[-1])
        repeated_all = repeated_token_mask(completion_ids, mask, self.ngram)  # [B, N]
        values = {"tokens": rows.numel(), "repeated": repeated_all[rows, cols].sum()}
        pick = _spread(rows.numel(), self.max_positions, rows.device)
        split = teacher is not None and teacher_mask is not None  # teacher-side statistics on their own positions
        stats = _distribution_stats(student, None if split else teacher, rows[pick], cols[pick], k)
        if rows.numel():
            values |= {"sampled": pick.numel(), "entropy_student": stats["entropy_student"].sum()}
        if split:
            rows, cols = (mask & teacher_mask.bool()).nonzero(as_tuple=True)
            pick = _spread(rows.numel(), self.max_positions, rows.device)
            stats = _distribution_stats(student, teacher, rows[pick], cols[pick], k)
        if teacher is not None and rows.numel():
            repeated = repeated_all[rows, cols]  # [n]
            a = _token_logprob(teacher, completion_ids, rows, cols) - _token_logprob(student, completion_ids, rows, cols)
            late = 2 * cols >= mask.sum(-1)[rows]  # [n] in the second half of its row's valid tokens
            values |= {"logratio_early": (a * ~late).sum(), "early_n": (~late).sum(), "logratio_late": (a * late).sum(),
                       "late_n": late.sum()}
            values |= {"teacher_tokens": rows.numel(), "teacher_sampled": pick.numel(),
                       "entropy_teacher": stats["entropy_teacher"].sum(), "topk_overlap": stats["topk_overlap"].sum(),
                       "logratio": a.sum(), "logratio_pos": (a > 0).sum(), "logratio_abs": a.abs().sum(),
                       "adv_repeated": (a * repeated).sum(),
                       "adv_repeated_n": repeated.sum()}
        self._add(**values)

    @torch.no_grad()
    def update_gold(self, student_logits: Tensor | HiddenRows, completion_ids: Tensor, mask: Tensor) -> None:
        """`diag/gold_nll` and `diag/gold_top1` of one (micro-)batch of the dataset's gold completions: `student_logits [B, N, V]` (or
        `HiddenRows`) predicting `completion_ids [B, N]` at the valid positions `mask [B, N]`."""
        rows, cols = mask.bool().nonzero(as_tuple=True)
        if rows.numel():
            logp, top = _token_stats(student_logits.detach(), completion_ids, rows, cols)
            self._add(gold_nll=-logp.sum(), gold_top1=top.sum(), gold_n=rows.numel())

    @torch.no_grad()
    def update_rollout(self, completion_mask: Tensor, truncated: Tensor) -> None:
        """Length and truncation of a rollout: `completion_mask [B, N]`, `truncated [B]` bool."""
        self._add(rows=truncated.numel(), completion_len=completion_mask.bool().sum(), truncated=truncated.bool().sum())

    def update_noncanonical(self, rows: Tensor) -> None:
        """Which on-policy completions `[B]` (bool) the student's tokenizer would spell differently."""
        self._add(noncanonical=rows.sum(), noncanonical_n=rows.numel())

    def update_coverage(self, value: float | Tensor) -> None:
        """One alignment coverage value (share of completion tokens with an exact teacher target)."""
        self._add(coverage=value, coverage_n=1)

    def update_policy_shift(self, shifts: Tensor, gains: Tensor | None = None) -> None:
        """Per-position `policy_shift` values `[n]` of one optimizer step, and its `step_gain` values `[n]` if
        measured."""
        self._add(policy_shift=shifts.sum(), policy_shift_n=shifts.numel())
        if gains is not None:
            self._add(step_gain=gains.sum(), step_gain_n=gains.numel())

    def update_grad_coherence(self, value: float | Tensor) -> None:
        """One gradient coherence value, e.g. from `output_layer_grad_coherence`."""
        self._add(grad_coherence=value, grad_coherence_n=1)

    def compute(self) -> dict[str, Tensor]:
        """The `diag/*` metrics with data since the last reset, as fp32 scalars, synced across ranks."""
        if not self._totals.update_called:
            self._totals.update(torch.zeros(len(_SLOTS)))  # a no-op that keeps every rank in the sync, unwarned
        totals = self._totals.compute()  # [S] on the module's device
        t, host = dict(zip(_SLOTS, totals, strict=True)), dict(zip(_SLOTS, totals.tolist(), strict=True))
        out = {f"diag/{name}": t[num] / t[den] for name, (num, den) in _MEANS.items() if host[den] > 0}
        if host["teacher_tokens"] > 0:
            n, n_rep = t["teacher_tokens"], t["adv_repeated_n"]
            ratio = torch.full_like(n, torch.nan)
            if 0 < host["adv_repeated_n"] < host["teacher_tokens"]:
                other = (t["logratio"] - t["adv_repeated"]) / (n - n_rep)
                ratio = torch.where(other != 0, t["adv_repeated"] / n_rep / other, ratio)
                out["diag/repeat_advantage_gap"] = t["adv_repeated"] / n_rep - other
            out["diag/repeat_advantage_ratio"] = ratio
            out.setdefault("diag/repeat_advantage_gap", torch.full_like(n, torch.nan))
        if host["early_n"] > 0 and host["late_n"] > 0:
            out["diag/logratio_drift"] = t["logratio_late"] / t["late_n"] - t["logratio_early"] / t["early_n"]
        return {key: value.float() for key, value in out.items()}

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._totals.reset()
