"""`opd report`: synthetic CSVLogger runs give valid PNGs and a report.md whose health lines say the right thing."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import pytest

from opd_lightning import cli, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEVEL_CHECKS = list(report.CHECKS)
ALL_CHECKS = [*LEVEL_CHECKS, "topk_overlap_drop", "drift", "policy_shift", "loss_ratio", "eval_gain", "nan"]
STEPS = [4 + 5 * i for i in range(20)]


def write_metrics(version_dir: Path, rows: list[dict[str, float]]) -> None:
    """Sparse rows as CSVLogger writes them: one header of every key (sorted), blank cells where unlogged."""
    version_dir.mkdir(parents=True, exist_ok=True)
    header = sorted({k for row in rows for k in row})
    with (version_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def train_row(i: int, healthy: bool) -> dict[str, float]:
    f = i / (len(STEPS) - 1)  # 0 -> 1 over the run
    diag = {"topk_overlap": 0.72 + 0.2 * f, "repetition_rate": 0.05, "truncation_rate": 0.01,
            "repeat_advantage_ratio": 1.1, "repeat_advantage_gap": 0.1, "align_coverage": 0.97,
            "grad_coherence": 0.3, "logratio_drift": -0.05} if healthy else \
           {"topk_overlap": 0.8 - 0.3 * f, "repetition_rate": 0.1 + 0.4 * f, "truncation_rate": 0.5,
            "repeat_advantage_ratio": 1 + 5 * f, "repeat_advantage_gap": 3 * f, "align_coverage": 0.6,
            "grad_coherence": 0.01,
            "logratio_drift": -0.2 - f}
    # |log-ratio|: steady with a little noise, or (unhealthy) jumping after the first half (the drift check's baseline)
    diag["logratio_abs"] = 0.5 + 0.02 * (i % 2) + (1.5 if not healthy and i >= 10 else 0.0)
    # the step's KL on its own rollout: small, or (unhealthy) jumping from the 9th step on
    diag["policy_shift"] = 0.06 if not healthy and i >= 8 else 0.01
    diag |= {"logratio_mean": -0.5 + 0.4 * f, "logratio_pos_frac": 0.4, "entropy_student": 1.5,
             "entropy_teacher": 1.2, "completion_len": 30.0}
    loss = 3.0 * 0.9**i if healthy else 1.0 + f
    row = {"epoch": 0, "step": STEPS[i], "train/loss": loss, "train/loss/forward_kl": loss, "train/lr": 1e-3,
           "train/rollout/completion_len": 30.0, "train/rollout/truncation_rate": 0.01}
    if not healthy and i == 7:
        diag["logratio_mean"] = math.nan
    return row | {f"diag/{k}": v for k, v in diag.items()}


def synthetic_run(root: Path, healthy: bool) -> Path:
    """A run dir with logs/version_0: metrics.csv (train, val and eval rows), eval_history.jsonl, config.yaml."""
    version_dir = root / "logs" / "version_0"
    scores = (0.1, 0.6) if healthy else (0.5, 0.3)
    rows = [{"step": 0, "eval/arithmetic/exact_match": scores[0]},
            {"step": 0, "eval_teacher/arithmetic/exact_match": 0.9}]
    for i, step in enumerate(STEPS):
        rows.append(train_row(i, healthy))
        if step in (49, 99):
            rows.append({"epoch": 0, "step": step, "val/loss": rows[-1]["train/loss"], "val/diag/topk_overlap": 0.8})
    rows.append({"epoch": 0, "step": 99, "eval/arithmetic/exact_match": scores[1]})
    write_metrics(version_dir, rows)
    write_history(version_dir, [("fit_start", "student", 0, scores[0]), ("fit_start", "teacher", 0, 0.9),
                                ("validation", "student", 99, scores[1])])
    (version_dir / "config.yaml").write_text("seed_everything: 0\n")
    return root


def write_history(version_dir: Path, history: list[tuple[str, str, int, float]]) -> None:
    """eval_history.jsonl lines from (stage, model, step, arithmetic exact_match) tuples."""
    (version_dir / "eval_history.jsonl").write_text("".join(
        json.dumps({"stage": s, "model": m, "step": st, "results": {"arithmetic": {"exact_match": v}}}) + "\n"
        for s, m, st, v in history))


def loss_only_run(version_dir: Path, last_step: int) -> None:
    """Only train/loss, every 5 steps from 0 to `last_step`."""
    write_metrics(version_dir, [{"epoch": 0, "step": s, "train/loss": 1 / (s + 1)} for s in range(0, last_step + 1, 5)])


def summary_row(md: str, metric: str) -> list[str]:
    """The start, end and change cells of `metric` in the summary table."""
    row = next(ln for ln in md.splitlines() if ln.startswith(f"| `{metric}` |"))
    return [cell.strip() for cell in row.split("|")[2:-1]]


def health_line(md: str, check: str) -> str:
    return next(ln for ln in md.split("## Health", 1)[1].splitlines() if f"**{check}**" in ln)


def health_marks(md: str) -> dict[str, str]:
    """Check name -> its mark; `eval_gain` may repeat (one per eval metric): the last wins."""
    lines = md.split("## Health", 1)[1].splitlines()
    return {ln.split("**")[1]: ln.split()[1] for ln in lines if ln.startswith("- ")}


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000, path
    width, height = struct.unpack(">II", data[16:24])  # IHDR follows the signature
    assert width > 200 and height > 200, (path, width, height)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> tuple[Path, list[Path]]:
    run_dir = synthetic_run(tmp_path_factory.mktemp("healthy") / "run", healthy=True)
    return run_dir, report.main([str(run_dir)])


@pytest.fixture(scope="module")
def unhealthy(tmp_path_factory) -> tuple[Path, list[Path]]:
    run_dir = synthetic_run(tmp_path_factory.mktemp("unhealthy") / "run", healthy=False)
    return run_dir, report.main([str(run_dir)])


def test_healthy_run_writes_every_plot_and_passes_every_check(healthy):
    run_dir, written = healthy
    out = run_dir / "logs" / "version_0" / "report"
    names = ["loss.png", "diagnostics.png", "rollout.png", "eval.png", "report.md"]
    assert sorted(written) == sorted(out / n for n in names)
    for path in written[:-1]:
        assert_valid_png(path)
    md = (out / "report.md").read_text()
    assert health_marks(md) == dict.fromkeys(ALL_CHECKS, report.HEALTHY)
    assert "| arithmetic/exact_match | 0.1 (step 0) | 0.6 (step 99) | 0.9 (step 0) |" in md
    assert "](diagnostics.png)" in md and "[config.yaml](../config.yaml)" in md
    assert "Steps covered: 0 to 99" in md


def test_unhealthy_run_flags_every_crossed_check(unhealthy):
    run_dir, written = unhealthy
    md = written[-1].read_text()
    assert health_marks(md) == dict.fromkeys(ALL_CHECKS, report.CROSSED)
    nan_line = next(ln for ln in md.splitlines() if "**nan**" in ln)
    assert "`diag/logratio_mean` has 1 NaN/inf" in nan_line
    assert "`diag/repeat_advantage_ratio` ends at 5.868 > 2 (highest 6)" in md  # mean of the last 10%: 2 points
    # drift: |log-ratio| crosses at the 6th step past its baseline; the overlap's linear fall (baseline sd 3.03 steps'
    # worth) reaches -3 sd in a moving mean centred 9.5 steps past the baseline's: at the 17th and 18th steps
    assert health_line(md, "drift").endswith(f"crossed at step {STEPS[17]}")
    # the step-size rule: the mean of the last 5 shifts passes 0.03 once 3 of them are 0.06, at the 11th step
    assert health_line(md, "policy_shift").endswith(f"crossed at step {STEPS[10]}")
    assert_valid_png(run_dir / "logs" / "version_0" / "report" / "diagnostics.png")


def test_thresholds_override_from_the_command_line(unhealthy, tmp_path):
    run_dir, _ = unhealthy
    written = report.main([str(run_dir), "--out", str(tmp_path), "--threshold", "repetition_rate=0.6",
                           "--threshold", "grad_coherence=0.001"])
    marks = health_marks((tmp_path / "report.md").read_text())
    assert marks["repetition_rate"] == marks["grad_coherence"] == report.HEALTHY
    assert marks["truncation_rate"] == report.CROSSED
    assert written[-1] == tmp_path / "report.md"
    with pytest.raises(SystemExit, match="did you mean 'repetition_rate'"):
        report.main([str(run_dir), "--threshold", "repetiton_rate=0.5"])
    with pytest.raises(SystemExit, match="NAME=NUMBER"):
        report.main([str(run_dir), "--threshold", "loss_ratio=high"])


def test_version_selection_and_accepted_paths(tmp_path):
    run_dir = tmp_path / "run"
    for version, last in ((0, 10), (2, 20), (10, 100)):  # 10 > 2 numerically, not as text
        loss_only_run(run_dir / "logs" / f"version_{version}", last)

    def steps_covered(args: list[str]) -> str:
        md = report.main(args)[-1].read_text()
        return next(ln for ln in md.splitlines() if ln.startswith("- Steps covered"))

    assert steps_covered([str(run_dir)]).endswith("to 100")
    metrics_line = next(ln for ln in (run_dir / "logs" / "version_10" / "report" / "report.md").read_text().splitlines()
                        if ln.startswith("- Metrics:"))
    assert metrics_line == "- Metrics: " + ", ".join(f"`{run_dir / 'logs' / f'version_{v}' / 'metrics.csv'}`"
                                                    for v in (0, 2, 10))
    assert report.resolve_metrics(run_dir) == run_dir / "logs" / "version_10" / "metrics.csv"
    assert steps_covered([str(run_dir), "--version", "2"]).endswith("to 20")
    assert steps_covered([str(run_dir / "logs" / "version_0")]).endswith("to 10")
    assert steps_covered([str(run_dir / "logs" / "version_0" / "metrics.csv"), "--out", str(tmp_path / "o")]).endswith(
        "to 10")
    assert (tmp_path / "o" / "report.md").is_file()
    assert (run_dir / "logs" / "version_2" / "report" / "loss.png").is_file()


def test_groups_without_data_are_skipped(tmp_path):
    loss_only_run(tmp_path / "logs" / "version_0", 50)
    written = report.main([str(tmp_path)])
    assert [p.name for p in written] == ["loss.png", "report.md"]
    marks = health_marks(written[-1].read_text())
    assert all(marks[name] == report.SKIPPED for name in LEVEL_CHECKS)
    assert marks["loss_ratio"] == marks["nan"] == report.HEALTHY and "eval_gain" not in marks


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"does not exist; expected RUN_DIR/logs/version_N/metrics\.csv"):
        report.main([str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="no logs/version_"):
        report.main([str(tmp_path)])
    (tmp_path / "logs" / "version_0").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no metrics.csv in .*CSVLogger"):
        report.main([str(tmp_path)])
    with pytest.raises(SystemExit, match=r"found versions \[0\]"):
        report.main([str(tmp_path), "--version", "3"])


def test_opd_report_subcommand_dispatches_before_lightning_cli(tmp_path, capsys):
    loss_only_run(tmp_path / "logs" / "version_0", 20)
    assert cli.main(["report", str(tmp_path)]) is None
    assert "opd report: wrote 2 files" in capsys.readouterr().out
    assert_valid_png(tmp_path / "logs" / "version_0" / "report" / "loss.png")


def test_a_resumed_run_is_read_across_every_version(tmp_path):
    """Catches reading only the newest logs/version_N: version_0 (steps 0-9) and version_1 (resumed, steps 5-14,
    other values at 5-9) must be joined by step, version_1 winning, and so must their eval histories."""
    run_dir, logs = tmp_path / "run", tmp_path / "run" / "logs"
    write_metrics(logs / "version_0", [{"epoch": 0, "step": s, "train/loss": 1.0 + s} for s in range(10)])
    write_metrics(logs / "version_1", [{"epoch": 0, "step": s, "train/loss": 100.0 + s} for s in range(5, 15)])
    write_history(logs / "version_0", [("fit_start", "student", 0, 0.1), ("validation", "student", 5, 0.2)])
    write_history(logs / "version_1", [("validation", "student", 5, 0.25), ("validation", "student", 14, 0.5)])
    for version in (0, 1):
        (logs / f"version_{version}" / "config.yaml").write_text(f"seed_everything: {version}\n")

    files = report.resolve_versions(run_dir)
    assert files == [logs / "version_0" / "metrics.csv", logs / "version_1" / "metrics.csv"]
    assert report.resolve_versions(logs) == files
    metrics, evals = report.read_run(files)
    assert metrics["train/loss"] == [(s, 1.0 + s) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 15)]
    assert evals["arithmetic/exact_match"]["student"] == [(0, 0.1), (5, 0.25), (14, 0.5)]

    md = report.main([str(run_dir)])[-1].read_text()
    assert "Steps covered: 0 to 14" in md
    assert f"- Metrics: `{files[0]}`, `{files[1]}`" in md
    assert "[config.yaml](../config.yaml)" in md  # written to version_1/report: the newest version's config
    assert "| arithmetic/exact_match | 0.1 (step 0) | 0.5 (step 14) | - |" in md
    assert summary_row(md, "train/loss")[:2] == ["1.5", "113.5"]  # 15 points: windows of 2, (1+2)/2, (113+114)/2
    single = report.main([str(run_dir), "--version", "0", "--out", str(tmp_path / "v0")])[-1].read_text()
    assert "Steps covered: 0 to 9" in single and f"- Metrics: `{files[0]}`\n" in single


def test_a_step_logged_twice_in_one_file_keeps_the_later_row(tmp_path):
    """Catches keeping both rows of a step re-logged in one metrics.csv (a run resumed into the same version): the
    later row wins, so NaNs of the abandoned attempt no longer count."""
    rows = [{"epoch": 0, "step": s, "train/loss": math.nan if s >= 5 else 1.0} for s in range(10)]
    write_metrics(tmp_path / "logs" / "version_0", rows + [{"epoch": 0, "step": s, "train/loss": 0.5} for s in
                                                           range(5, 10)])
    metrics = report.read_metrics(report.resolve_metrics(tmp_path))
    assert metrics["train/loss"] == [(s, 1.0) for s in range(5)] + [(s, 0.5) for s in range(5, 10)]
    md = report.main([str(tmp_path)])[-1].read_text()
    assert health_marks(md)["nan"] == report.HEALTHY
    assert summary_row(md, "train/loss") == ["1", "0.5", "-0.5"]


def test_a_metric_nan_at_the_end_is_judged_on_its_finite_values(tmp_path):
    """Catches the health check calling a metric undefined when its raw tail is NaN while the table shows finite
    values: a sparsely defined diag/repeat_advantage_ratio is judged, quoting the table's end; only a metric with no
    finite value at all is not judged."""
    sparse = {3: 13.85, 17: 14.2, 30: 15.01}  # the last 10% of the 50 raw points are all NaN
    write_metrics(tmp_path / "logs" / "version_0", [
        {"epoch": 0, "step": s, "diag/repeat_advantage_ratio": sparse.get(s, math.nan), "diag/grad_coherence": math.nan}
        for s in range(50)])
    md = report.main([str(tmp_path)])[-1].read_text()
    assert summary_row(md, "diag/repeat_advantage_ratio") == ["13.85", "15.01", "+1.16"]
    line = health_line(md, "repeat_advantage_ratio")
    assert line.startswith(f"- {report.CROSSED} ") and "`diag/repeat_advantage_ratio` ends at 15.01 > 2" in line
    assert summary_row(md, "diag/grad_coherence") == ["-", "-", "-"]
    assert health_marks(md)["grad_coherence"] == report.SKIPPED
    assert "`diag/grad_coherence` has no finite value" in health_line(md, "grad_coherence")
    assert "`diag/grad_coherence` has 50 NaN/inf" in health_line(md, "nan")  # NaN counting is unchanged
    assert "repeat_advantage_ratio` has" not in health_line(md, "nan")


def test_table_and_health_agree_on_start_and_end(tmp_path):
    """Catches the table quoting the last logged point while the health check judges the last-10% mean: a
    truncation rate whose last point (0.25) is not its last-10% mean (0.125) shows 0.125 in both, and so do
    the train/loss start and end of the loss_ratio check."""
    truncation = [0.05] * 18 + [0.0, 0.25]
    write_metrics(tmp_path / "logs" / "version_0", [
        {"epoch": 0, "step": s, "diag/truncation_rate": t, "train/loss": 2.0 - 0.05 * s}
        for s, t in enumerate(truncation)])
    md = report.main([str(tmp_path)])[-1].read_text()
    start, end, _ = summary_row(md, "diag/truncation_rate")
    assert (start, end) == ("0.05", "0.125")
    line = health_line(md, "truncation_rate")
    assert line.startswith(f"- {report.HEALTHY} ") and f"`diag/truncation_rate` ends at {end} <= 0.2" in line
    start, end, _ = summary_row(md, "train/loss")
    assert f"first-10% mean {start} -> last-10% mean {end}," in health_line(md, "loss_ratio")
    assert "end: mean of last 10% of finite values" in md and "start: mean of first 10% of finite values" in md
