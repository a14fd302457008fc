"""benchmarks/guard_check.py: a rule's verdicts are counted against the right runs and the right steps."""

from __future__ import annotations

from benchmarks import guard_check as gc


def _logs(abs_values: list[float], on_policy_every: int = 1) -> tuple[dict, set[int]]:
    """A run's logs with `diag/logratio_abs` at steps 0.. and every `on_policy_every`-th step on-policy, with the
    other (off-policy) steps."""
    series = list(enumerate(abs_values))
    return {"diag/logratio_abs": series}, {s for s, _ in series if s % on_policy_every}


def test_rules_count_early_acts_alarms_and_runs_without_the_metric():
    rule = next(r for r in gc.RULES if getattr(r, "metric", None) == "diag/logratio_abs")
    quiet = [1.0, 1.1, 0.9] * 10  # baseline mean 1.0; never more than a fraction of a deviation off it
    rising = [1.0, 1.1, 0.9] * 4 + [3.0] * 10
    # Steps 0-9 set the reference (mean 1.0, sd 0.08); the first moving mean judged is steps 10-14's, 14 sd above.
    assert gc.BASELINE == 10 and gc.WINDOW == 5 and rule.acts_at(*_logs(rising)) == 14
    # Off-policy steps are not observations: with every other step off-policy the same rise is seen at twice the step.
    doubled = [v for v in rising for _ in range(2)]
    assert rule.acts_at(*_logs(doubled, on_policy_every=2)) == 28
    failing = [{"run": "a", "fall": 30, "new": False, "logs": _logs(rising)},  # acts at 14, before the fall at 30
               {"run": "b", "fall": 10, "new": False, "logs": _logs(rising)},  # acts after it
               {"run": "g", "fall": 20, "new": True, "logs": _logs(rising)},  # held out: acts before the fall
               {"run": "c", "fall": None, "new": False, "logs": _logs(quiet)}]  # never falls, no alarm
    board = [{"run": "d", "moved": "up", "new": False, "logs": _logs(rising)},
             {"run": "e", "moved": "up", "new": False, "logs": _logs(quiet)},
             {"run": "h", "moved": "up", "new": True, "logs": _logs(quiet)},
             {"run": "f", "moved": "down", "new": False, "logs": ({}, set())}]  # no log-ratio: not judged by this rule
    row = next(line for line in gc.table(failing, board).splitlines() if line.startswith(f"| {rule.label} |"))
    assert row.split(" | ")[1:] == ["1/2", "1/1", "0/1", "1/2", "0/1", "0/0", "0/0 |"]


def test_the_drift_row_needs_both_diagnostics_to_cross():
    """The joint rule acts on a run only where the top-k overlap falls as well, at the later of the two crossings."""
    drift = next(r for r in gc.RULES if isinstance(r, gc.JointRule))
    rising = [1.0, 1.1, 0.9] * 4 + [3.0] * 10  # |log-ratio|: crosses at 15 (2 in a row from the first judged, 14)
    falling = [0.95, 0.97] * 5 + [0.95] * 6 + [0.5] * 6  # overlap: mean 0.96, sd 0.011; moving mean -9.5 sd at 16, 17
    steady = [0.95, 0.97] * 11
    logs = lambda overlap: ({"diag/logratio_abs": list(enumerate(rising)), "diag/topk_overlap": list(enumerate(overlap))},
                            set())  # every step on-policy
    assert drift.acts_at(*logs(falling)) == 17 and drift.acts_at(*logs(steady)) is None
    board = [{"run": "d", "moved": "up", "new": False, "logs": logs(steady)},
             {"run": "e", "moved": "down", "new": False, "logs": logs(falling)}]
    row = next(line for line in gc.table([], board).splitlines() if line.startswith(f"| {drift.label} |"))
    assert row.split(" | ")[1:] == ["0/0", "0/0", "0/0", "0/1", "0/0", "0/0", "1/1 |"]


def test_the_search_finds_each_rules_crossing_as_the_rule_does():
    """`joint_steps`, which remembers each diagnostic's crossing across the rules searched, gives every rule the step
    `Drift.crossing` gives on its own, and leaves out runs too short to judge."""
    from opd_lightning.watch import Drift

    rising = [1.0, 1.1, 0.9] * 4 + [3.0] * 10
    runs = [{"run": name, "logs": ({"diag/logratio_abs": list(enumerate(rising)),
                                    "diag/topk_overlap": list(enumerate(overlap))}, set())}
            for name, overlap in (("falls", [0.95, 0.97] * 5 + [0.95] * 6 + [0.5] * 6),
                                  ("steady", [0.95, 0.97] * 11), ("short", [0.95, 0.97] * 3))]
    memo: dict = {}
    rules = (Drift(), Drift(3.0, 30.0), Drift(baseline=3, window=1, patience=1), Drift(2.0, 6.0, baseline=5, window=2))
    for rule in rules:  # the second differs from the first in its limits only: the memo must tell them apart
        steps = gc.joint_steps(runs, rule, memo)
        want = {r["run"]: rule.crossing(*rule.series(*r["logs"])) for r in runs
                if rule.judges(rule.series(*r["logs"]))}
        assert steps == want
    defaults = gc.joint_steps(runs, Drift(), memo)  # 6 observations: fewer than a baseline of 10 and a mean of 5
    assert defaults == {"falls": 17, "steady": None}  # as in the drift row's test above


def test_the_gold_row_reads_gold_nll_on_whichever_steps_logged_it():
    """The gold-likelihood rule judges `diag/gold_nll` where it was logged (the gold steps), at `GoldRise`'s
    defaults, and leaves out runs that did not log it."""
    gold = next(r for r in gc.RULES if isinstance(r, gc.GoldRule))
    assert (gold.rule.limit, gold.rule.baseline, gold.rule.patience) == (0.2, 4, 2)
    rising = [(s, v) for s, v in zip(range(0, 40, 2), [0.6, 0.7, 0.8, 0.7] + [0.7, 0.95, 0.8, 0.96, 0.97] + [1.0] * 11,
                                     strict=True)]
    steady = [(s, 0.7 + 0.01 * (s % 3)) for s in range(0, 40, 2)]
    logs = lambda series: ({"diag/gold_nll": series}, {s for s, _ in series})  # every gold step off-policy
    assert gold.acts_at(*logs(rising)) == 16 and gold.acts_at(*logs(steady)) is None  # 0.96, 0.97: 2 in a row
    failing = [{"run": "a", "fall": 20, "new": False, "logs": logs(rising)},  # acts at 16, before the fall at 20
               {"run": "b", "fall": 10, "new": False, "logs": logs(rising)}]  # acts after it
    board = [{"run": "d", "moved": "up", "new": False, "logs": logs(steady)},
             {"run": "e", "moved": "up", "new": False, "logs": ({}, set())}]  # no gold steps: not judged
    row = next(line for line in gc.table(failing, board).splitlines() if line.startswith(f"| {gold.label} |"))
    assert row.split(" | ")[1:] == ["1/2", "0/0", "0/0", "0/1", "0/0", "0/0", "0/0 |"]
