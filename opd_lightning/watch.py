"""Watched limits on a run's diagnostics: the rules `RolloutGuard` applies as a run goes and `opd report` and the
benchmarks apply to logged series afterwards, kept apart from both so that either can import them.

A `Watch` judges one diagnostic against a limit, absolute or relative to the run's own first observations; `Drift`
joins two of them, the student's top-k overlap with the teacher falling and the size of its per-token log-ratio
rising, which `benchmarks/guard_check.py` found to act before most of the reproduced falls and on none of the
warm-start runs that went on to gain. Pure Python: no Lightning, no tensors.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Drift", "DriftWatch", "GoldRise", "StepSize", "Watch", "crossing", "past_limit"]

Series = Iterable[tuple[int, float]]  # (step, value), in step order


def past_limit(value: float, limit: float, bound: str) -> bool:
    """Whether `value` is on the wrong side of `limit` (`bound` "max": above it; "min": below it); NaN is not."""
    return not math.isnan(value) and (value > limit if bound == "max" else value < limit)


class Watch:
    """One watched limit, fed a diagnostic's observations in order: acts when `patience` of them in a row are past
    `limit` (`bound` "max": above; "min": below). With `baseline` > 0 the first `baseline` observations only set a
    reference (their mean), and each later one is judged by its difference from it: a limit on how far the
    diagnostic moved from where the run began, whatever that level was; with `scaled` as well, that difference is in
    units of the reference observations' standard deviation (a limit of 4: four of the run's own early spreads). With
    `window` > 1 what is judged is the mean of the last `window` judged observations (none is judged before `window`
    of them). With `until`, only the first `until` observations are judged: the watch never acts after them. NaN is
    no observation."""

    def __init__(self, limit: float, bound: str, patience: int, baseline: int = 0, scaled: bool = False,
                 window: int = 1, until: int | None = None) -> None:
        if scaled and baseline < 2:
            raise ValueError(f"a scaled limit needs a baseline of at least 2 observations, got {baseline}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if until is not None and until < baseline + window + patience - 1:
            raise ValueError(f"until ({until}) ends before its first moving mean can act: it leaves no observation to "
                             f"judge after a baseline of {baseline}, a window of {window} and a patience of "
                             f"{patience}; raise it, or use null to judge the whole run")
        self.limit, self.bound, self.patience, self.baseline = limit, bound, patience, baseline
        self.scaled, self.window, self.until = scaled, window, until
        self.strikes, self.start, self.recent, self.seen = 0, [], [], 0

    def observe(self, value: float) -> bool:
        """Take one observation; True when the guard acts on it (the `patience`-th in a row past the limit)."""
        if math.isnan(value):
            return False
        self.seen += 1
        if self.until is not None and self.seen > self.until:
            return False
        if len(self.start) < self.baseline:
            self.start.append(value)
            return False
        self.recent = [*self.recent[-(self.window - 1):], value] if self.window > 1 else [value]
        if len(self.recent) < self.window:
            return False
        value = sum(self.recent) / self.window
        judged = value - sum(self.start) / len(self.start) if self.baseline else value
        if self.scaled:
            judged /= max(statistics.stdev(self.start), 1e-12)
        self.strikes = self.strikes + 1 if past_limit(judged, self.limit, self.bound) else 0
        return self.strikes == self.patience

    def acts_at(self, series: Series) -> int | None:
        """Feed a logged series `[(step, value)]` in order: the step of the observation the watch acts on, or None."""
        return next((step for step, value in series if self.observe(value)), None)


def crossing(series: Iterable[tuple[int, float]], limit: float, bound: str, patience: int,
             baseline: int = 0, scaled: bool = False, window: int = 1) -> int | None:
    """The step at which a logged series `[(step, value)]` has been past `limit` for `patience` observations in a row
    (the step the guard acts at), or None: `Watch`'s rule (with `baseline`, relative to the mean of the first
    `baseline` observations; `scaled` and `window` as there). Steps without an observation, and NaN values (a metric
    undefined on that step), do not count either way."""
    return Watch(limit, bound, patience, baseline, scaled, window).acts_at(series)


@dataclass(frozen=True)
class Drift:
    """The joint drift rule: the mass both models put on their shared top-k tokens (`diag/topk_overlap`) falls
    `overlap_fall_sd` of its baseline standard deviations below its start, and the mean size of the sampled tokens'
    log-ratio (`diag/logratio_abs`, |log p_T - log p_S|) rises `logratio_rise_sd` of its own above its start, each
    judged on a moving mean of `window` observations after the first `baseline` and for `patience` in a row; the rule
    acts once both have (in either order). Either alone also marks a student that is changing fast, as often one that
    gains; together they mark a student leaving the teacher's menu while the teacher disagrees more with what it
    writes. Observed on on-policy steps only: on a step that distils gold completions the log-ratio is the teacher's
    on text the student did not write.

    Attributes:
        overlap_fall_sd: baseline standard deviations `diag/topk_overlap` must fall below its baseline mean.
        logratio_rise_sd: baseline standard deviations `diag/logratio_abs` must rise above its baseline mean.
        baseline: on-policy observations that set each reference (mean and standard deviation); at least 2.
        window: observations per moving mean judged.
        patience: judged moving means in a row past the limit before a diagnostic counts as crossed.
    """

    overlap_fall_sd: float = 3.0
    logratio_rise_sd: float = 4.0
    baseline: int = 10
    window: int = 5
    patience: int = 2

    metrics = ("diag/topk_overlap", "diag/logratio_abs")  # what the rule reads, in `watches`' order

    def watches(self) -> tuple[Watch, Watch]:
        """Fresh watches for the two diagnostics, in `metrics`' order."""
        return (Watch(-self.overlap_fall_sd, "min", self.patience, self.baseline, True, self.window),
                Watch(self.logratio_rise_sd, "max", self.patience, self.baseline, True, self.window))

    def series(self, logged: Mapping[str, Series], off_policy: Collection[int]) -> list[list[tuple[int, float]]]:
        """The rule's two diagnostics, in `metrics`' order, from a run's logs (`{metric: [(step, value)]}`), without
        the steps in `off_policy` (those that distilled gold completions)."""
        return [[(s, v) for s, v in logged.get(name, []) if s not in off_policy] for name in self.metrics]

    def judges(self, series: list[list[tuple[int, float]]]) -> bool:
        """Whether both series (`series`' result) hold enough observations to be judged: a baseline and one moving
        mean past it."""
        return min(map(len, series)) >= self.baseline + self.window

    def crossing(self, overlap: Series, logratio_abs: Series) -> int | None:
        """The step the rule acts at on two logged series (on-policy steps only), or None: the later of the steps at
        which each diagnostic crossed."""
        steps = [watch.acts_at(series) for watch, series in zip(self.watches(), (overlap, logratio_abs), strict=True)]
        return None if None in steps else max(steps)


class DriftWatch:
    """`Drift` fed as a run goes: `observe` takes one on-policy step's two diagnostics, and is True on the step the
    rule acts (once per run)."""

    def __init__(self, rule: Drift) -> None:
        self.rule, self.watches, self.crossed = rule, rule.watches(), [False, False]

    def observe(self, overlap: float, logratio_abs: float) -> bool:
        if all(self.crossed):
            return False
        for i, value in enumerate((overlap, logratio_abs)):
            self.crossed[i] |= self.watches[i].observe(value)
        return all(self.crossed)


@dataclass(frozen=True)
class GoldRise:
    """The gold-likelihood rule: the student's mean negative log-likelihood of the dataset's gold completions
    (`diag/gold_nll`, measured on the steps that read them) rises more than `limit` nats above its mean over the
    run's first `baseline` observations, `patience` observations in a row. A student losing the gold answers loses
    likelihood on them before its greedy answers change, and this is read at every gold step rather than at each
    evaluation. But it also rises as on-policy training begins from a student trained on gold, in most runs that go
    on to gain (the mode-seeking and sampled losses': `benchmarks/RESULTS.md`, block `guard_check_gold`), though
    most of those runs, scored every 10 steps, fall below their start before they gain (block `early_dips`): a
    warning to read, not a rule to stop runs on. At a third of that leaderboard's rate it acts on far fewer gaining runs
    (block `guard_check_lr`): its early rise mostly marks a rate too high for a warm student. Answered with a lower
    learning rate (`RolloutGuard(lr_factor=...)`) it helps the sampled-token losses and costs some dense ones (block
    `guard_response`).

    Attributes:
        limit: nats above the baseline mean.
        baseline: gold observations that set the reference (their mean); at least 1.
        patience: observations in a row past the limit before the rule acts.
    """

    limit: float = 0.2
    baseline: int = 4
    patience: int = 2

    metric = "diag/gold_nll"

    def __post_init__(self) -> None:
        if self.baseline < 1 or self.patience < 1:
            raise ValueError(f"GoldRise needs baseline and patience of at least 1, got {self.baseline} and "
                             f"{self.patience}")

    def watch(self) -> Watch:
        """A fresh watch for `diag/gold_nll`."""
        return Watch(self.limit, "max", self.patience, self.baseline)

    def crossing(self, series: Series) -> int | None:
        """The step the rule acts at on a logged `diag/gold_nll` series, or None."""
        return self.watch().acts_at(series)


@dataclass(frozen=True)
class StepSize:
    """The step-size rule: `diag/policy_shift` (KL(before ‖ after) of the student's next-token distributions on the
    step's own rollout, measured every `diagnostics.policy_shift_every` steps) above `limit` nats on a moving mean of
    `window` observations, `patience` of them in a row, judged over the first `until` observations of the fit. It
    marks a learning rate too high for the student where it starts (`benchmarks/RESULTS.md`, blocks `step_size`,
    `step_size_heldout` and `step_size_fresh`): within the first 40 steps it acted on every reproduced failure-mode
    run at the recipe's rate (0.003), before each of their 34 falls (39 runs, seeds 0-8, all four modes), and on every
    warm-leaderboard run at that rate, all of which first fell below their start. At a third of the rate it acted
    within those steps on 1 of 22 failure-mode runs (before its fall) and on 7 of the 85 warm-leaderboard runs that
    gain. Later in a run the shift grows on runs that gain: judged over whole runs at a third of the rate, the same
    limit marked 18 of 19 runs, 16 of which gain, all but one after step 40 (block `step_size_whole`), hence
    `until`.

    A rate too high for a warm student costs an early dip even where the run gains later: answer it with a lower
    rate (`RolloutGuard(lr_factor=...)`) where the dip matters. A cut to a third spared every fall of the
    cancellation, overlap and depth modes and every repetition collapse, and on the warm leaderboard raised the
    sampled-token losses' final scores but lowered the dense ones' (block `shift_response`); on a gaining run at a
    suitable rate a cut costs about 0.25 (block `shift_response_lr0.001`). `limit=0.05` marks 1 of those 85 runs
    but was a step late for the fastest of the 34 falls, and its cut spares the falls as well (`shift05_response`).

    Attributes:
        limit: nats per step (the moving mean's).
        window: observations per moving mean; none is judged before `window` of them.
        patience: judged moving means in a row past the limit before the rule acts.
        until: observations judged, from the first the watch sees (a resumed fit's guard starts again); None: every
            one, the whole run.
    """

    limit: float = 0.03
    window: int = 5
    patience: int = 1
    until: int | None = 40

    metric = "diag/policy_shift"

    def __post_init__(self) -> None:
        if self.window < 1 or self.patience < 1 or not self.limit > 0:
            raise ValueError(f"StepSize needs a positive limit and a window and patience of at least 1, got "
                             f"{self.limit}, {self.window} and {self.patience}")
        self.watch()  # its horizon checked where it is set

    def watch(self) -> Watch:
        """A fresh watch for `diag/policy_shift`."""
        return Watch(self.limit, "max", self.patience, window=self.window, until=self.until)

    def crossing(self, series: Series) -> int | None:
        """The step the rule acts at on a logged `diag/policy_shift` series, or None."""
        return self.watch().acts_at(series)
