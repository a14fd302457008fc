"""benchmarks/early_dips.py: which scored step counts as a dip, and how alarms are set against the dips."""

from __future__ import annotations

from benchmarks import early_dips as ed


def test_a_dip_is_the_first_scored_step_past_its_margin_below_the_start():
    history = [(0, 0.2), (10, 0.16), (20, 0.125), (30, 0.09), (40, 0.3)]
    assert ed.dip(history) == 20  # 0.075 below the start: more than DROP (0.05); 0.04 below is not
    assert ed.halved(history) == 30
    assert ed.dip([(0, 0.08), (10, 0.04)]) is None and ed.halved([(0, 0.08), (10, 0.04)]) == 10
    assert ed.dip([(0, 0.5), (10, 0.5)]) is None


def test_alarms_are_counted_before_the_dips_of_the_runs_that_end_up():
    results = [{"loss": "a", "seed": 0, "history": [(0, 0.2), (10, 0.1), (20, 0.3)]},  # dips at 10
               {"loss": "b", "seed": 0, "history": [(0, 0.2), (10, 0.19), (20, 0.12)]},  # dips at 20
               {"loss": "c", "seed": 0, "history": [(0, 0.2), (10, 0.25), (20, 0.3)]},  # no dip
               {"loss": "d", "seed": 0, "history": [(0, 0.2), (10, 0.0)]}]  # ends down: not counted
    judged = {"a/seed_0": {"moved": "up", "gold": 5}, "b/seed_0": {"moved": "up", "gold": 25},
              "c/seed_0": {"moved": "up", "gold": 12}, "d/seed_0": {"moved": "down", "gold": 1}}
    text = ed.summary(results, judged, 20)
    first = text.splitlines()[0]
    assert "2 of the 3 runs that end up" in first
    # acts within 20 steps on a (5) and c (12); before the dip on a only; on c, which does not dip
    assert "acts within those steps on 2 of them, before the dip on 1, and on 1 of the 1 that do not dip" in first
    assert text.splitlines()[2].endswith("median -0.080, range -0.100 to +0.050.")
