"""benchmarks/failure_modes.py: a run survives the CSV it is stored in, and its verdicts read the right steps."""

from __future__ import annotations

import csv
import io
import math

from benchmarks import failure_modes as fm


def _run() -> dict:
    windows = {name: [0.5 - 0.1 * i for i in range(4)] for name in fm.SERIES}
    windows["diag/grad_coherence"] = [math.nan, 0.2, math.nan, 0.1]
    return {"mode": "overlap", "variant": "char_teacher", "seed": 1, "steps": 40, "start_score": 0.196,
            "wall_s": 12.5, "date": "2026-12-05", "teacher_score": 0.97,
            "crossing": {"diag/topk_overlap<0.7": None, "diag/topk_overlap<0.9": 30}, "windows": windows,
            "history": [(0, 0.196), (20, 0.18), (40, 0.1)], "score": 0.1}


def test_a_run_round_trips_through_its_csv_rows():
    run = _run()
    handle = io.StringIO()
    writer = csv.DictWriter(handle, ["mode", "variant", "seed", "steps", "start_score", "wall_s", "date",
                                     "teacher_score", "crossing", "kind", "step", "score", *fm.SERIES],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(fm.to_rows(run))
    back = fm.from_rows(list(csv.DictReader(io.StringIO(handle.getvalue()))))
    assert len(back) == 1
    got = back[0]
    assert {k: got[k] for k in ("mode", "variant", "seed", "steps", "crossing", "history", "score", "teacher_score")} == \
        {k: run[k] for k in ("mode", "variant", "seed", "steps", "crossing", "history", "score", "teacher_score")}
    for name in fm.SERIES:
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(got["windows"][name],
                                                                               run["windows"][name], strict=True))


def test_the_score_falls_at_the_first_evaluation_below_the_start_by_more_than_the_margin():
    run = _run()
    assert fm.falls(run) == 40  # 0.18 is within DROP of 0.196, 0.1 is not
    run["history"] = [(0, 0.2), (20, 0.19), (40, 0.3)]
    assert fm.falls(run) is None


def test_each_mode_runs_the_config_task_and_metric_of_its_warm_start():
    """The warm start is built from its pair alone (`leaderboard.warm_student`): a mode's own runs must agree."""
    from benchmarks.leaderboard import PAIRS

    for mode, spec in fm.MODES.items():
        pair = PAIRS[spec["start"]]
        assert (spec["config"], spec["task"], spec.get("metric", "exact_match")) == \
            (pair["config"], pair["task"], pair["metric"]), mode


def test_each_step_size_guarded_variant_is_its_run_with_the_guard_set_as_named():
    """Every `_shift` variant has a `_shift05` and a `_shift40` counterpart: the same options but the guard's, whose
    `step_size` settings are those of `SHIFT_RULES` in full (a run's options say which limit and span it watched)."""
    import json

    from opd_lightning.guards import RolloutGuard
    from opd_lightning.watch import StepSize

    assert fm.SHIFT_RULES == {"shift": {"limit": 0.03, "until": None}, "shift05": {"limit": 0.05, "until": None},
                              "shift40": {"limit": 0.03, "until": 40}}
    shifted = [(mode, v) for mode, spec in fm.MODES.items() for v in spec["variants"] if v.endswith("_shift")]
    assert {mode for mode, _ in shifted} == set(fm.MODES)  # every mode's falling run
    for mode, variant in shifted:
        base = fm.MODES[mode]["variants"][variant][1]
        for key, rule in fm.SHIFT_RULES.items():
            label, options = fm.MODES[mode]["variants"][variant.removesuffix("_shift") + f"_{key}"]
            assert options[: -len(fm.SHIFT_LR)] == base[: -len(fm.SHIFT_LR)]
            assert options[-3:-1] == ["--model.diagnostics.policy_shift_every", "1"]
            init = json.loads(options[-1].removeprefix("--trainer.callbacks+="))["init_args"]
            assert init["step_size"] == rule and init["lr_factor"] == fm.GUARD_LR_FACTOR
            assert fm.shift_label(rule) in label
            RolloutGuard(**{**init, "step_size": StepSize(**init["step_size"])})  # options a guard accepts
    assert {options[-1] for spec in fm.MODES.values() for v, (_, options) in spec["variants"].items()
            if "_shift" in v} == {g[-1] for g in fm.SHIFT_GUARDS.values()} <= set(fm.GUARDED)
