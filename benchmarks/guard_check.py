"""Guard rules judged on runs already logged: do they act before a run's score falls, and stay quiet otherwise?

    .venv/bin/python -m benchmarks.guard_check [--search] [--no-record]

`benchmarks/failure_modes.py` chose its watched limits on its own runs. This script applies each rule of `RULES`
(`guards.crossing`, the rule `RolloutGuard` applies as a run goes) to the per-step diagnostics of two sets of runs
already in `runs/` (it trains nothing):
- the failure-mode runs (`runs/failure_modes/<mode>/<variant>/seed_<n>`), scored every 10-50 steps: for a run whose
  score falls (an evaluation more than `failure_modes.DROP` below its start), whether the rule acts before the first
  evaluation that shows the fall; for the others, whether it acts at all. These are the runs the rules were found
  on (in-sample);
- the warm-start leaderboards' runs (`runs/leaderboard_warm/<pair>/<loss>/seed_<n>`: every loss of the zoo, three
  seeds, from a student warmed by SFT), scored at their start and end only: whether the rule acts on runs that end
  above their start by more than `DROP` (an alarm there stops a run that was going to gain), on runs that end within
  `DROP` of it, and on runs that end below it by more than `DROP`. None of these runs was looked at to choose a
  rule (out-of-sample).
A "rise" or "fall" rule judges a diagnostic against the mean of its first `BASELINE` observations, in units of
their standard deviation, over a moving mean of `WINDOW` observations; diagnostics of the rollouts' log-ratio and
entropy are read on on-policy steps only (on the other steps the teacher scores gold completions). Writes one block
into benchmarks/RESULTS.md unless `--no-record`. `--search` also judges every setting of the joint drift rule in
`SEARCH` (baseline, moving mean, patience and both limits) the same way, and writes the best of them as a second block.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.failure_modes import BASELINE, DROP, PATIENCE, falls, series
from benchmarks.failure_modes import ROOT as FAILURE_ROOT
from benchmarks.leaderboard import PAIRS, WARM_ROOT, scored_run
from benchmarks.quickstart import machine, record
from opd_lightning.guards import Drift, GoldRise, crossing

WINDOW = 5  # observations per moving mean of a scaled rule
NEW_SEEDS = 3  # seeds from this one on were run after every rule here was fixed (held out)
ON_POLICY = "train/rollout/on_policy"  # 1.0 on the steps that distil the student's own rollouts


@dataclass(frozen=True)
class Rule:
    """One guard rule: `limit` on `metric` (`bound` "max" a ceiling, "min" a floor), past it `patience` times in a row;
    `kind` "level" judges the value itself, "drop" its difference from the run's first `BASELINE` observations' mean,
    "scaled" that difference in their standard deviations over a moving mean of `WINDOW` observations."""

    label: str
    metric: str
    bound: str
    limit: float
    kind: str = "level"
    patience: int = PATIENCE
    on_policy: bool = False  # observed on on-policy steps only

    def observed(self, logged: dict[str, list[tuple[int, float]]], off_policy: set[int]) -> list[tuple[int, float]]:
        """The observations the rule reads from a run's logs."""
        return [(s, v) for s, v in logged.get(self.metric, []) if not self.on_policy or s not in off_policy]

    def judges(self, logged: dict[str, list[tuple[int, float]]], off_policy: set[int]) -> bool:
        """Whether a run logged enough of the rule's metric for the rule to judge it (beyond its baseline)."""
        return len(self.observed(logged, off_policy)) >= (0 if self.kind == "level" else BASELINE) + WINDOW

    def acts_at(self, logged: dict[str, list[tuple[int, float]]], off_policy: set[int]) -> int | None:
        values = self.observed(logged, off_policy)
        if self.kind == "level":
            return crossing(values, self.limit, self.bound, self.patience)
        return crossing(values, self.limit, self.bound, self.patience, baseline=BASELINE,
                        scaled=self.kind == "scaled", window=WINDOW if self.kind == "scaled" else 1)


@dataclass(frozen=True)
class JointRule:
    """`RolloutGuard`'s `drift` rule (`watch.Drift`, at its defaults): two diagnostics, on-policy steps only."""

    label: str
    rule: Drift = field(default_factory=Drift)

    def judges(self, logged: dict[str, list[tuple[int, float]]], off_policy: set[int]) -> bool:
        return self.rule.judges(self.rule.series(logged, off_policy))

    def acts_at(self, logged: dict[str, list[tuple[int, float]]], off_policy: set[int]) -> int | None:
        return self.rule.crossing(*self.rule.series(logged, off_policy))


@dataclass(frozen=True)
class GoldRule:
    """`RolloutGuard`'s `gold_rise` rule (`watch.GoldRise`, at its defaults): `diag/gold_nll`, logged on the steps
    that read gold completions only."""

    label: str
    rule: GoldRise = field(default_factory=GoldRise)

    @property
    def metric(self) -> str:
        return self.rule.metric

    def judges(self, logged: dict[str, list[tuple[int, float]]], off_policy: set[int]) -> bool:
        return len(logged.get(self.metric, [])) > self.rule.baseline

    def acts_at(self, logged: dict[str, list[tuple[int, float]]], off_policy: set[int]) -> int | None:
        return self.rule.crossing(logged.get(self.metric, []))


RULES = (
    Rule("`topk_overlap` below 0.9", "diag/topk_overlap", "min", 0.9),
    Rule("`topk_overlap` more than 0.02 below its start (`opd report`'s drop threshold)", "diag/topk_overlap", "min",
         -0.02, "drop"),
    Rule("`topk_overlap` more than 0.05 below its start, 10 in a row", "diag/topk_overlap", "min", -0.05, "drop", 10),
    Rule("`repetition_rate` above 0.2", "diag/repetition_rate", "max", 0.2),
    Rule("`repeat_advantage_gap` above 1 nat", "diag/repeat_advantage_gap", "max", 1.0),
    Rule("`logratio_abs` 4 sd above its start", "diag/logratio_abs", "max", 4.0, "scaled", 1, True),
    Rule("`logratio_mean` 4 sd below its start", "diag/logratio_mean", "min", -4.0, "scaled", 1, True),
    Rule("`entropy_student` 4 sd above its start", "diag/entropy_student", "max", 4.0, "scaled", 1, True),
    JointRule("drift: `topk_overlap` 3 sd below its start and `logratio_abs` 4 sd above, 2 in a row each "
              "(`RolloutGuard(drift=...)`)"),
    GoldRule(f"gold likelihood: `gold_nll` more than {GoldRise.limit:g} nats above its first {GoldRise.baseline} "
             f"observations, {GoldRise.patience} in a row (`RolloutGuard(gold_rise=...)`)"),
)
METRICS = {name for rule in RULES for name in (rule.rule.metrics if isinstance(rule, JointRule) else (rule.metric,))}


def logged(version: Path) -> tuple[dict[str, list[tuple[int, float]]], set[int]]:
    """Every rule's metric as `[(step, value)]` in step order (finite values only), and the off-policy steps (those
    that distilled gold completions), from a run's metrics.csv."""
    logs = series(version, {*METRICS, ON_POLICY})
    off_policy = {step for step, value in logs.pop(ON_POLICY) if value != 1.0}
    return {name: [(s, v) for s, v in values if math.isfinite(v)] for name, values in logs.items()}, off_policy


def failure_mode_runs(held_out: int = NEW_SEEDS) -> list[dict]:
    """Each logged failure-mode run: its label, the step its fall is first seen (None: never), whether its seed is
    `held_out` or later, and its logs."""
    from benchmarks.failure_modes import GUARDED, MODES

    runs = []
    for mode, spec in MODES.items():
        for variant, (_, options) in spec["variants"].items():
            if any(guard in options for guard in GUARDED):  # a guard answered: after it acted, not the run judged
                continue
            for version in sorted((FAILURE_ROOT / mode / variant).glob("seed_*/logs/version_0")):
                if not (version / "eval_history.jsonl").exists():
                    continue
                run = scored_run(version.parents[1], {}, spec["task"], spec.get("metric", "exact_match"), history=True)
                runs.append({"run": f"{mode}/{variant}/{version.parents[1].name}", "fall": falls(run),
                             "new": int(version.parents[1].name.removeprefix("seed_")) >= held_out,
                             "logs": logged(version)})
    return runs


def leaderboard_runs(held_out: int = NEW_SEEDS, root: Path = WARM_ROOT) -> list[dict]:
    """Each logged warm-leaderboard run under `root` with its start and end scores, classed by how its score moved."""
    runs = []
    for entry in json.loads((root / "results.json").read_text()):
        version = root / entry["pair"] / entry["loss"] / f"seed_{entry['seed']}" / "logs" / "version_0"
        if "score" not in entry or not (version / "metrics.csv").exists():
            continue
        moved = entry["score"] - entry["start_score"]
        runs.append({"run": f"{entry['pair']}/{entry['loss']}/seed_{entry['seed']}", "pair": entry["pair"],
                     "new": entry["seed"] >= held_out, "moved": "up" if moved > DROP else "down" if moved < -DROP
                     else "level", "logs": logged(version)})
    return runs


def table(failing: list[dict], leaderboard: list[dict], held_out: int = NEW_SEEDS) -> str:
    """Per rule, how many runs of each group it acts on (before the fall, for the failure-mode runs that fall), over
    the runs of the group that logged what it reads."""
    groups = [[r for r in failing if r["fall"] is not None and r["new"] == new] for new in (False, True)]
    groups += [[r for r in failing if r["fall"] is None]]
    groups += [[r for r in leaderboard if r["moved"] == "up" and r["new"] == new] for new in (False, True)]
    groups += [[r for r in leaderboard if r["moved"] == kind] for kind in ("level", "down")]
    header = (f"| rule | failure modes, seeds below {held_out}: acts before the fall is seen | seeds {held_out} and up "
              f"(held out): acts before the fall | failure-mode runs that never fall: acts | leaderboard runs ending "
              f"up, seeds below {held_out}: acts | ending up, seeds {held_out} and up (held out): acts | ending "
              "level: acts | ending down: acts |")
    lines = [header, "|---" * (len(groups) + 1) + "|"]
    for rule in RULES:
        steps = {r["run"]: rule.acts_at(*r["logs"]) for r in failing + leaderboard if rule.judges(*r["logs"])}
        acts = lambda r, steps=steps: (steps.get(r["run"]) is not None
                                       and (r.get("fall") is None or steps[r["run"]] < r["fall"]))
        cells = (f"{sum(acts(r) for r in runs)}/{sum(r['run'] in steps for r in runs)}" for runs in groups)
        lines.append(f"| {rule.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The joint rule's settings searched by `--search`: every combination (384 rules).
SEARCH = {"baseline": (3, 5, 10), "window": (1, 2, 3, 5), "patience": (1, 2), "overlap_fall_sd": (2.0, 3.0, 4.0, 6.0),
          "logratio_rise_sd": (2.0, 3.0, 4.0, 6.0)}
MODES = ("cancellation", "overlap", "depth", "repetition")


def joint_steps(runs: list[dict], rule: Drift, memo: dict) -> dict[str, int | None]:
    """`rule.crossing` of each run that logged enough to be judged, by run: the later of its two diagnostics'
    crossings, each found once per (run, diagnostic, its settings) and kept in `memo` across the rules searched."""
    steps = {}
    for r in runs:
        series = rule.series(*r["logs"])
        if not rule.judges(series):
            continue
        crossed = []
        for watch, name, values in zip(rule.watches(), rule.metrics, series, strict=True):
            key = (r["run"], name, watch.limit, rule.baseline, rule.window, rule.patience)
            if key not in memo:
                memo[key] = watch.acts_at(values)
            crossed.append(memo[key])
        steps[r["run"]] = None if None in crossed else max(crossed)
    return steps


def search(failing: list[dict], leaderboard: list[dict]) -> str:
    """Every joint rule of `SEARCH` over the same runs: the rules that act on none of the gaining warm-leaderboard
    runs of seeds below `NEW_SEEDS` (the best 8 by the falls they act on early there), and the one acting early on
    the most of those falls while acting on at most a tenth of the gaining runs; with the falls each acts on early,
    by failure mode (all seeds)."""
    import itertools

    memo: dict = {}
    rows = []
    for values in itertools.product(*SEARCH.values()):
        rule = Drift(**dict(zip(SEARCH, values, strict=True)))
        steps = joint_steps(failing + leaderboard, rule, memo)
        early = lambda r, steps=steps: steps.get(r["run"]) is not None and steps[r["run"]] < r["fall"]
        falls = [[r for r in failing if r["fall"] is not None and r["run"] in steps and r["new"] == new]
                 for new in (False, True)]
        gains = [[r for r in leaderboard if r["moved"] == "up" and r["run"] in steps and r["new"] == new]
                 for new in (False, True)]
        rows.append({"rule": rule, "early": [sum(map(early, runs)) for runs in falls], "falls": list(map(len, falls)),
                     "alarms": [sum(steps[r["run"]] is not None for r in runs) for runs in gains],
                     "gains": list(map(len, gains)),
                     "modes": [sum(early(r) for r in falls[0] + falls[1] if r["run"].startswith(f"{mode}/"))
                               for mode in MODES],
                     "mode_falls": [sum(r["run"].startswith(f"{mode}/") for r in falls[0] + falls[1])
                                    for mode in MODES]})
    quiet = sorted((r for r in rows if r["alarms"][0] == 0), key=lambda r: -r["early"][0])[:8]
    loud = max((r for r in rows if r["alarms"][0] <= r["gains"][0] / 10), key=lambda r: r["early"][0])
    header = (f"| baseline | moving mean | in a row | overlap fall (sd) | log-ratio rise (sd) | falls acted on early, "
              f"seeds below {NEW_SEEDS} | held out | gaining runs acted on, seeds below {NEW_SEEDS} | held out | "
              f"early, by mode: {' / '.join(MODES)} |")
    lines = [header, "|---" * 10 + "|"]
    for r in [*quiet, loud]:
        d = r["rule"]
        lines.append(f"| {d.baseline} | {d.window} | {d.patience} | {d.overlap_fall_sd:g} | {d.logratio_rise_sd:g} | "
                     f"{r['early'][0]}/{r['falls'][0]} | {r['early'][1]}/{r['falls'][1]} | "
                     f"{r['alarms'][0]}/{r['gains'][0]} | {r['alarms'][1]}/{r['gains'][1]} | "
                     + " / ".join(f"{a}/{n}" for a, n in zip(r["modes"], r["mode_falls"], strict=True)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-record", action="store_true", help="print the table without writing RESULTS.md")
    parser.add_argument("--search", action="store_true", help="also search the joint rule's settings (`SEARCH`)")
    parser.add_argument("--block", default="guard_check",
                        help="the RESULTS.md block the table goes into (another keeps a table of other runs)")
    parser.add_argument("--held-out-from", type=int, default=NEW_SEEDS, metavar="SEED",
                        help="seeds from this one on count as held out (run after the rules judged were fixed)")
    parser.add_argument("--warm-root", type=Path, default=WARM_ROOT,
                        help="the warm leaderboard's runs to judge (e.g. one run at another learning rate)")
    args = parser.parse_args(argv)
    held_out = args.held_out_from
    failing, leaderboard = failure_mode_runs(held_out), leaderboard_runs(held_out, args.warm_root)
    if not failing or not leaderboard:
        raise SystemExit(f"no logged runs to judge: run benchmarks.failure_modes ({FAILURE_ROOT}) and "
                         f"benchmarks.leaderboard --warm ({args.warm_root}) first")
    pairs = sorted({r["pair"] for r in leaderboard}, key=list(PAIRS).index)
    flag = ("" if args.block == "guard_check" else f" --block {args.block}") + (
        "" if held_out == NEW_SEEDS else f" --held-out-from {held_out}") + (
        "" if args.warm_root == WARM_ROOT else f" --warm-root {args.warm_root}")
    title = "" if args.block == "guard_check" else f" (block `{args.block}`)"
    section = (f"### Guard rules judged on logged runs{title}\n\nCommand: `.venv/bin/python -m benchmarks.guard_check{flag}`. "
               f"Date: {datetime.date.today()}. Machine: {machine()}.\n"
               f"Runs judged: {len(failing)} failure-mode runs ({sum(r['fall'] is not None for r in failing)} whose "
               f"score falls), {len(leaderboard)} warm-leaderboard runs (pairs {', '.join(pairs)}, "
               f"`{args.warm_root}`); a score \"falls\", ends \"up\" or \"down\" by more than {DROP}. Scaled rules: baseline {BASELINE} "
               f"observations, moving mean of {WINDOW}, on-policy steps only.\n\n{table(failing, leaderboard, held_out)}")
    print(section)
    if not args.no_record:
        record(section, args.block)
    if args.search:
        found = (f"### The joint rule's settings searched\n\nCommand: `.venv/bin/python -m benchmarks.guard_check "
                 f"--search`. Date: {datetime.date.today()}. The same runs as above. Every combination of "
                 + "; ".join(f"{k} {', '.join(f'{v:g}' for v in vs)}" for k, vs in SEARCH.items())
                 + f" ({math.prod(map(len, SEARCH.values()))} rules): the 8 acting on none of the gaining runs of seeds"
                 f" below {NEW_SEEDS} with the most falls acted on early there, then the one acting early on the most"
                 f" of those falls while acting on at most a tenth of those gaining runs (last row).\n\n"
                 f"{search(failing, leaderboard)}")
        print(found)
        if not args.no_record:
            record(found, "guard_search")


if __name__ == "__main__":
    main()
