"""benchmarks/step_size.py: its reruns repeat the logged runs' options, and its windows read the right steps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from benchmarks import failure_modes as fm
from benchmarks import leaderboard as lb
from benchmarks import step_size as ss


def test_a_rerun_takes_the_options_its_logged_run_was_trained_with(monkeypatch, tmp_path):
    """The failure-mode and leaderboard runs pass `fit_and_score` their overlay right after their config and then
    `run_args`' options, as written out here by hand; the reruns take the same options without the overlay."""
    seen = []
    monkeypatch.setattr(fm, "fit_and_score", lambda args, *rest, **kw: seen.append(args) or {})
    monkeypatch.setattr(lb, "fit_and_score", lambda args, *rest, **kw: seen.append(args) or {})
    fm_start, lb_start = fm.ROOT / "same" / "start" / "hf", lb.WARM_ROOT / "same" / "start" / "hf"
    fm.run("cancellation", "sampled_token", 2, 10, 5, (fm_start, 0.2), reuse=False)
    lb.run("same", "reverse_kl", 1, 10, tmp_path, (lb_start, 0.08))
    seeds = lambda s: ["--seed_everything", s, "--model.seed", s, "--model.student.seed", s, "--data.seed", s]
    assert seen[0] == ["--config", fm.MODES["cancellation"]["config"], "--config",
                       str(fm.ROOT / "cancellation" / "overlay.yaml"), *seeds("2"), "--model.student.path", str(fm_start),
                       "--model.student.config", "null", "--model.student.tokenizer", "null",
                       "--model.diagnostics.grad_coherence_every", "5", "--model.loss", "sampled_token"]
    assert seen[1] == ["--config", lb.PAIRS["same"]["config"], "--config", str(lb.overlay_path(tmp_path, "same")),
                       "--model.loss", "reverse_kl", "--model.teacher_topk", "null", *seeds("1"), *lb.RECIPE,
                       "--model.student.path", str(lb_start), "--model.student.config", "null", "--model.student.tokenizer",
                       "null"]
    for lr in ss.RATES:  # the leaderboards' runs, as their results list them
        root = tmp_path / f"logged{ss.early_dips.suffix(lr)}"
        root.mkdir()
        (root / "results.json").write_text(json.dumps([{"pair": "same", "loss": "reverse_kl", "seed": 1}]))
    monkeypatch.setattr(ss.early_dips, "logged_root", lambda lr: tmp_path / f"logged{ss.early_dips.suffix(lr)}")
    jobs = {job["run"]: job for job in ss.jobs([2, 1])}
    assert jobs["cancellation/sampled_token/seed_2"]["args"] == [*seen[0][:2], *seen[0][4:]]
    assert jobs["same/reverse_kl/seed_1"]["args"] == [*seen[1][:2], *seen[1][4:]]
    assert jobs["same_lr0.001/reverse_kl/seed_1"]["args"] == [*seen[1][:2], *seen[1][4:],
                                                               "--model.optimizer.init_args.lr", "0.001"]
    assert {job["group"] for job in jobs.values()} == {"falls at 0.003", "a third of the rate",
                                                       "warm leaderboard at 0.003", "warm leaderboard at 0.001"}


def _metrics(folder: Path, rows: list[dict]) -> None:
    (folder / "logs" / "version_0").mkdir(parents=True)
    with (folder / "logs" / "version_0" / "metrics.csv").open("w") as handle:
        writer = csv.DictWriter(handle, ["step", "train/loss", "diag/policy_shift", "diag/step_gain"])
        writer.writeheader()
        writer.writerows(rows)


def test_windows_average_the_shift_and_divide_the_summed_gain_by_the_summed_shift(monkeypatch, tmp_path):
    monkeypatch.setattr(ss, "ROOT", tmp_path / "reruns")
    shift = [0.1, 0.3, 0.2, 0.0]
    gain = [0.1, -0.2, 0.4, 0.3]
    _metrics(tmp_path / "reruns" / "a", [{"step": t, "train/loss": 1.0 + t, "diag/policy_shift": shift[t],
                                          "diag/step_gain": gain[t]} for t in range(4)])
    _metrics(tmp_path / "logged", [{"step": t, "train/loss": 1.0 + t + (0.5 if t == 3 else 0.0)} for t in range(4)])
    monkeypatch.setattr(ss, "WINDOW", 2)
    got = ss.summary({"run": "a", "logged": tmp_path / "logged"}, 4)
    assert got["agree"] == 3 and got["steps"] == 4  # step 3's loss differs from the logged run's
    (s0, e0), (s1, e1) = got["windows"]
    assert math.isclose(s0, 0.2) and math.isclose(e0, (0.1 - 0.2) / 0.4)
    assert math.isclose(s1, 0.1) and math.isclose(e1, 0.7 / 0.2)


def test_the_shift_rule_counts_acts_before_each_runs_first_fall():
    """A moving mean of `SHIFT_WINDOW` shifts above the limit acts; an act at or after the fall is not early (b's,
    at the limit of 0.03)."""
    rise = [(t, 0.001 if t < 6 else 0.05) for t in range(20)]  # the mean of 5 passes 0.01 at step 6, 0.03 at step 8
    flat = [(t, 0.001) for t in range(20)]
    results = [{"group": "g", "run": "a", "shift": rise, "fall": 10}, {"group": "g", "run": "b", "shift": rise,
                                                                       "fall": 7},
               {"group": "g", "run": "c", "shift": flat, "fall": None}, {"group": "h", "run": "d", "shift": rise,
                                                                         "fall": None}]
    rows = {line.split(" | ")[0].strip("| "): line for line in ss.rule_table(results).splitlines()[2:]}
    assert rows["0.01"].endswith("| 2/3 (steps 6-6) | 2/2 | 1/1 (steps 6-6) | 0/0 |")  # 6 is before b's fall at 7
    assert rows["0.03"].endswith("| 2/3 (steps 8-8) | 1/2 | 1/1 (steps 8-8) | 0/0 |")
    assert rows["0.05"].endswith("| 0/3 | 0/2 | 0/1 | 0/0 |")  # a mean of 0.05 at most: never above it
    only = ss.rule_table(results, (0.02,)).splitlines()[2:]  # the limits asked for
    assert len(only) == 1 and only[0].startswith("| 0.02 | 2/3 (steps 7-7) |")
