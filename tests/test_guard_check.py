"""benchmarks/guard_check.py: a rule's verdicts are counted against the right runs and the right steps."""

from __future__ import annotations

from benchmarks import guard_check as gc


def _logs(abs_values: list[float], on_policy_every: int = 1) -> tuple[dict, set[int]]:
    """A run's logs with `diag/logratio_abs` at steps 0.. and every `on_policy_every`-th step on-policy."""
    series = list(enumerate(abs_values))
    return {"diag/logratio_abs": series}, {s for s, _ in series if s % on_policy_every == 0}


def test_rules_count_early_acts_alarms_and_runs_without_the_metric():
    rule = next(r for r in gc.RULES if r.metric == "diag/logratio_abs")
    quiet = [1.0, 1.1, 0.9] * 10  # baseline mean 1.0; never more than a fraction of a deviation off it
    rising = [1.0, 1.1, 0.9] * 4 + [3.0] * 10
    # Steps 0-9 set the reference (mean 1.0, sd 0.08); the first moving mean judged is steps 10-14's, 14 sd above.
    assert gc.BASELINE == 10 and gc.WINDOW == 5 and rule.acts_at(*_logs(rising)) == 14
    # Off-policy steps are not observations: with every other step off-policy the same rise is seen at twice the step.
    doubled = [v for v in rising for _ in range(2)]
    assert rule.acts_at(*_logs(doubled, on_policy_every=2)) == 28
    failing = [{"run": "a", "fall": 30, "logs": _logs(rising)},  # acts at 14, before the fall is seen at 30
               {"run": "b", "fall": 10, "logs": _logs(rising)},  # acts after it
               {"run": "c", "fall": None, "logs": _logs(quiet)}]  # never falls, no alarm
    board = [{"run": "d", "moved": "up", "logs": _logs(rising)}, {"run": "e", "moved": "up", "logs": _logs(quiet)},
             {"run": "f", "moved": "down", "logs": ({}, set())}]  # no log-ratio logged: not judged by this rule
    row = next(line for line in gc.table(failing, board).splitlines() if line.startswith(f"| {rule.label} |"))
    assert row.split(" | ")[1:] == ["1/2", "0/1", "1/2", "0/0", "0/0 |"]
