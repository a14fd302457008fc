"""`opd report RUN_DIR`: plots and a health check for a distillation run, read from its CSV logs.

Why: the logs already hold everything needed to judge a run (loss curves, the on-policy diagnostics that warn
of collapse before the eval score moves, the lm-eval history), but as sparse CSVLogger rows nobody reads. This
turns them into a few PNGs and a `report.md` that says, check by check, whether the run looks healthy.

Choices: stdlib `csv` (no pandas); matplotlib's Agg canvas on a bare `Figure` (headless, and the caller's
pyplot state and backend are never touched); one module-level `DEFAULT_THRESHOLDS` dict, overridable with
`--threshold NAME=VALUE`. A resumed run writes a new `logs/version_N` (or re-logs steps after its checkpoint in
the same one), so a run dir is read as every version joined by step, the later version or row winning a step
both hold. Start and end of a metric are window means (first/last 10% of its finite values, `metric_ends`), the same
numbers in the summary table and the health checks, so one noisy step does not flip a verdict and sparse NaN
steps do not hide a metric. Eval scores are taken as higher-is-better. The file runs past the ~200-line
budget: reading, checking, plotting and writing are one short pipeline; if it grows, the plotting (`_panels`,
`_draw`) is the part to move into its own module.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from opd_lightning.watch import Drift, StepSize

__all__ = ["CHECKS", "CROSSED", "DEFAULT_THRESHOLDS", "HEALTHY", "SKIPPED", "Check", "health", "main", "metric_ends",
           "read_evals",
           "read_metrics", "read_run", "resolve_metrics", "resolve_versions"]

Series = list[tuple[int, float]]  # (step, value), ordered by step
EvalKey = tuple[str, str, int, str]  # (model, stage, step, "task/metric") of one eval score
# Metrics that are NaN by definition on some steps (no repeated token, nothing to divide by): not a fault.
UNDEFINED_OK = ("diag/repeat_advantage_ratio", "diag/repeat_advantage_gap")

DEFAULT_THRESHOLDS: dict[str, float] = {
    "topk_overlap": 0.7,  # end-of-run floor; Li et al. 2026: successful runs rise from ~0.72 to >0.91
    "topk_overlap_drop": 0.02,  # largest tolerated fall of topk_overlap from the first to the last window
    "repetition_rate": 0.2,  # ceiling: share of tokens that repeat an earlier n-gram of their completion
    "truncation_rate": 0.2,  # ceiling: share of rollouts cut at max_new_tokens
    "repeat_advantage_ratio": 2.0,  # ceiling; Luo et al. 2026: repeated tokens get 4-9x the advantage before collapse
    "repeat_advantage_gap": 1.0,  # ceiling, nats: repeated tokens favoured by the teacher by more than the others
    "align_coverage": 0.9,  # floor: share of student tokens the aligner maps onto teacher tokens
    "grad_coherence": 0.05,  # floor: ||sum g_t|| / sum ||g_t|| on the output layer (~1/sqrt(n) when random)
    "logratio_drift": -0.5,  # floor: mean log-ratio of a completion's second half minus its first half, in nats
    "drift_overlap_sd": Drift.overlap_fall_sd,  # the joint drift rule (`watch.Drift`): topk_overlap's fall and
    "drift_logratio_sd": Drift.logratio_rise_sd,  # logratio_abs's rise, in their first on-policy steps' sds
    "policy_shift": StepSize.limit,  # ceiling, nats per step, on a moving mean (`watch.StepSize`): a rate too high
    "loss_ratio": 1.0,  # ceiling of train/loss last-window mean / first-window mean ("not decreasing")
    "eval_gain": 0.0,  # floor of (last - first) student eval score
}


def _diag(name: str, *more: str) -> tuple[str, ...]:
    """Where a diagnostic may be logged, in order of preference: per training step, then validation aggregate."""
    return (f"diag/{name}", f"train/diag/{name}", f"val/diag/{name}", *more)


# Level checks: name -> (metrics tried in order, "min" or "max" bound on the last-window mean, what it means).
CHECKS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "topk_overlap": (_diag("topk_overlap"), "min", "student and teacher top-k agree"),
    "repetition_rate": (_diag("repetition_rate"), "max", "tokens repeating an earlier n-gram"),
    "truncation_rate": (_diag("truncation_rate", "train/rollout/truncation_rate"), "max", "rollouts hit the cap"),
    "repeat_advantage_ratio": (_diag("repeat_advantage_ratio"), "max", "advantage of repeated tokens over others"),
    "repeat_advantage_gap": (_diag("repeat_advantage_gap"), "max", "repeated tokens' advantage minus the others'"),
    "align_coverage": (_diag("align_coverage", "train/align/coverage"), "min", "tokenizer alignment coverage"),
    "grad_coherence": (_diag("grad_coherence"), "min", "per-position gradients pull together"),
    "logratio_drift": (_diag("logratio_drift"), "min", "the teacher's judgement holds deeper into the completion"),
}
HEALTHY, CROSSED, SKIPPED = "✅", "⚠️", "➖"
_KEY_METRICS = re.compile(r"(train|val)/loss|((train|val)/)?diag/.*|train/rollout/(completion_len|truncation_rate)")


@dataclass
class Check:
    """One health verdict: `ok` is None when the metric was not logged or has no finite value."""

    name: str
    ok: bool | None
    detail: str

    def line(self) -> str:
        mark = SKIPPED if self.ok is None else HEALTHY if self.ok else CROSSED
        return f"- {mark} **{self.name}**: {self.detail}"


@dataclass
class Panel:
    """One small plot: lines (label, series) against step, and dashed horizontal lines (label, y)."""

    title: str
    lines: list[tuple[str, Series]] = field(default_factory=list)
    hlines: list[tuple[str, float]] = field(default_factory=list)


def resolve_versions(path: str | os.PathLike, version: int | None = None) -> list[Path]:
    """The `metrics.csv` files to read, oldest version first, given a run dir, its `logs` dir, a version dir or a file.

    Args:
        path: where to look; a version dir or a metrics.csv gives just that file.
        version: N of the one `logs/version_N` to read from a run dir; None takes every version that has a
            metrics.csv, in order of N.

    Raises:
        FileNotFoundError: naming the expected layout, when nothing matches.
    """
    path, layout = Path(path), "RUN_DIR/logs/version_N/metrics.csv (RUN_DIR: the run's trainer.default_root_dir)"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {layout}, a version dir or a metrics.csv")
    if path.is_file() or (path / "metrics.csv").is_file():
        return [path if path.is_file() else path / "metrics.csv"]
    logs = path if path.name == "logs" else path / "logs"
    versions = {int(m[1]): p for p in logs.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))}
    if version is not None and versions and version not in versions:
        raise FileNotFoundError(f"no {logs / f'version_{version}'}; found versions {sorted(versions)}")
    if not versions and not path.name.startswith("version_"):
        raise FileNotFoundError(f"no logs/version_* under {path}; expected {layout}")
    dirs = [versions[n] for n in sorted(versions) if version in (None, n)] or [path]
    if not (files := [d / "metrics.csv" for d in dirs if (d / "metrics.csv").is_file()]):
        where = dirs[0] if len(dirs) == 1 else f"any of {logs}/version_*"
        raise FileNotFoundError(f"no metrics.csv in {where}: runs write it through Lightning's CSVLogger, the "
                                "default logger of `opd fit` unless the config sets trainer.logger")
    return files


def resolve_metrics(path: str | os.PathLike, version: int | None = None) -> Path:
    """The one `metrics.csv` of `resolve_versions` to read alone: the newest version's, or version `version`'s."""
    return resolve_versions(path, version)[-1]


def _join(parts: list[dict[str, Series]]) -> dict[str, Series]:
    """Union of per-metric series, ordered by step; at a step held twice, the later part (or later point) wins."""
    by_step: dict[str, dict[int, float]] = {}
    for part in parts:
        for name, series in part.items():
            by_step.setdefault(name, {}).update(series)
    return {name: sorted(points.items()) for name, points in by_step.items()}


def read_metrics(csv_path: Path) -> dict[str, Series]:
    """Per-metric series from a CSVLogger file; blank cells are skipped, `nan` is kept.

    A step logged twice keeps its later row: a run resumed into the same version logs the steps after its
    checkpoint again.
    """
    metrics: dict[str, Series] = {}
    with csv_path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for name, cell in row.items():
                if name not in ("epoch", "step", None) and cell not in ("", None):
                    metrics.setdefault(name, []).append((step, float(cell)))
    return _join([metrics])


def _eval_entries(version_dir: Path, metrics: dict[str, Series]) -> dict[EvalKey, float]:
    """One version's eval scores from its eval_history.jsonl, else from its eval* columns (stage "")."""
    entries: dict[EvalKey, float] = {}
    history = version_dir / "eval_history.jsonl"
    if history.is_file():
        for entry in (json.loads(line) for line in history.read_text(encoding="utf-8").splitlines() if line.strip()):
            head = (entry["model"], entry.get("stage", ""), int(entry["step"]))
            for task, scores in entry["results"].items():
                entries |= {(*head, f"{task}/{name}"): float(value) for name, value in scores.items()}
        return entries
    for name, series in metrics.items():
        prefix, _, key = name.partition("/")
        if prefix in ("eval", "eval_teacher"):
            entries |= {("student" if prefix == "eval" else "teacher", "", step, key): v for step, v in series}
    return entries


def _nest(entries: dict[EvalKey, float]) -> dict[str, dict[str, Series]]:
    """`{"task/metric": {"student": series, "teacher": series}}`, each series ordered by step."""
    evals: dict[str, dict[str, Series]] = {}
    for (model, _, step, key), value in sorted(entries.items(), key=lambda item: item[0][2]):
        evals.setdefault(key, {}).setdefault(model, []).append((step, value))
    return evals


def read_evals(version_dir: Path, metrics: dict[str, Series]) -> dict[str, dict[str, Series]]:
    """One version's evals: from `version_dir`'s eval_history.jsonl, else from the eval* columns of `metrics`."""
    return _nest(_eval_entries(version_dir, metrics))


def read_run(csv_paths: list[Path]) -> tuple[dict[str, Series], dict[str, dict[str, Series]]]:
    """Metrics and evals of every file (oldest first) joined by step; a later file wins a step (and eval) both hold.

    Eval entries are keyed by (model, stage, step, task/metric); each version's come from the eval_history.jsonl
    next to its metrics.csv, else from its eval* columns.
    """
    parts, entries = [read_metrics(p) for p in csv_paths], {}
    for path, part in zip(csv_paths, parts):
        entries |= _eval_entries(path.parent, part)
    return _join(parts), _nest(entries)


def metric_ends(series: Series, frac: float = 0.1) -> tuple[float, float]:
    """(start, end): means of the first and the last `frac` of the finite values, at least one each; NaN if none.

    The one definition of a metric's start and end, shared by the summary table and the health checks.
    """
    values = [v for _, v in series if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    n = max(1, math.ceil(len(values) * frac))
    return sum(values[:n]) / n, sum(values[-n:]) / n


def _pick(metrics: dict[str, Series], names: tuple[str, ...]) -> tuple[str, Series] | None:
    return next(((n, metrics[n]) for n in names if any(math.isfinite(v) for _, v in metrics.get(n, []))), None)


def _not_judged(name: str, metrics: dict[str, Series], candidates: tuple[str, ...]) -> Check:
    """The skipped verdict of a level check none of whose metrics has a finite value."""
    if logged := [n for n in candidates if n in metrics]:  # e.g. no repeated token in any step: nothing to judge
        return Check(name, None, f"`{logged[0]}` has no finite value (all NaN): not judged")
    return Check(name, None, f"not logged ({', '.join(candidates)})")


def health(metrics: dict[str, Series], evals: dict[str, dict[str, Series]],
           thresholds: dict[str, float]) -> list[Check]:
    """Every check of `CHECKS`, plus topk_overlap trend, train-loss decrease, eval improvement and NaNs."""
    out = []
    for name, (candidates, bound, meaning) in CHECKS.items():
        found, limit = _pick(metrics, candidates), thresholds[name]
        if found is None:
            out.append(_not_judged(name, metrics, candidates))
            continue
        metric, series = found
        end, finite = metric_ends(series)[1], [v for _, v in series if math.isfinite(v)]
        ok = end >= limit if bound == "min" else end <= limit
        worst = min(finite) if bound == "min" else max(finite)
        cmp = (">=" if ok else "<") if bound == "min" else ("<=" if ok else ">")
        out.append(Check(name, ok, f"{meaning}: `{metric}` ends at {end:.4g} {cmp} {limit:g} "
                                   f"({'lowest' if bound == 'min' else 'highest'} {worst:.4g})"))
    if found := _pick(metrics, CHECKS["topk_overlap"][0]):
        (start, end), limit = metric_ends(found[1]), thresholds["topk_overlap_drop"]
        out.append(Check("topk_overlap_drop", start - end <= limit,
                         f"`{found[0]}` {start:.4g} -> {end:.4g} (tolerated fall {limit:g})"))
    out.append(drift_check(metrics, thresholds))
    out.append(step_size_check(metrics, thresholds))
    if (found := _pick(metrics, ("train/loss",))) and len(found[1]) > 1:
        (start, end), limit = metric_ends(found[1]), thresholds["loss_ratio"]
        ratio = end / start if start else math.inf
        out.append(Check("loss_ratio", ratio < limit, f"train/loss first-10% mean {start:.4g} -> last-10% mean "
                                                      f"{end:.4g}, ratio {ratio:.3g} (must be < {limit:g})"))
    for key, models in evals.items():
        if len(student := models.get("student", [])) >= 2:
            (s0, first), (s1, last) = student[0], student[-1]
            gain, limit = last - first, thresholds["eval_gain"]
            out.append(Check("eval_gain", gain > limit, f"`{key}` {first:.4g} (step {s0}) -> {last:.4g} (step {s1}), "
                                                        f"gain {gain:+.4g} (must be > {limit:g})"))
    bad = {n: sum(not math.isfinite(v) for _, v in s) for n, s in metrics.items() if not n.endswith(UNDEFINED_OK)}
    bad = {n: c for n, c in bad.items() if c}
    out.append(Check("nan", not bad, ", ".join(f"`{n}` has {c} NaN/inf" for n, c in bad.items()) or "all finite"))
    return out


def drift_check(metrics: dict[str, Series], thresholds: dict[str, float]) -> Check:
    """The joint drift rule (`watch.Drift`, at the thresholds' limits) over the run's on-policy training steps: where
    `RolloutGuard(drift=...)` would have acted."""
    rule = Drift(thresholds["drift_overlap_sd"], thresholds["drift_logratio_sd"])
    if missing := [name for name in rule.metrics if name not in metrics]:
        return Check("drift", None, f"not logged ({', '.join(missing)})")
    series = rule.series(metrics, {step for step, value in metrics.get("train/rollout/on_policy", []) if value != 1.0})
    if not rule.judges(series):
        return Check("drift", None, f"fewer than {rule.baseline + rule.window} on-policy steps logged: not judged")
    step = rule.crossing(*series)
    told = (f"`diag/topk_overlap` {rule.overlap_fall_sd:g} sd below and `diag/logratio_abs` {rule.logratio_rise_sd:g} "
            f"sd above their first {rule.baseline} on-policy steps (moving mean of {rule.window}, {rule.patience} in "
            "a row)")
    return Check("drift", step is None, f"{told}: {'never' if step is None else f'crossed at step {step}'}")


def step_size_check(metrics: dict[str, Series], thresholds: dict[str, float]) -> Check:
    """The step-size rule (`watch.StepSize`, at the threshold's limit) over the steps that measured
    `diag/policy_shift`: where `RolloutGuard(step_size=...)` would have acted."""
    rule = StepSize(thresholds["policy_shift"])
    if not (series := metrics.get(rule.metric)):
        return Check("policy_shift", None, f"not logged (`{rule.metric}`: set diagnostics.policy_shift_every)")
    step = rule.crossing(series)
    told = (f"the step's KL on its own rollout, a moving mean of {rule.window}, above {rule.limit:g} nats"
            + ("" if rule.until is None else f" within the first {rule.until} observations"))
    return Check("policy_shift", step is None, f"{told}: {'never' if step is None else f'crossed at step {step}'}")


def _panels(metrics: dict[str, Series], evals: dict[str, dict[str, Series]],
            thresholds: dict[str, float]) -> dict[str, list[Panel]]:
    """Group metrics into the panels of each PNG; train and val of one metric share a panel."""
    groups = {"loss": r"(train|val)/loss(/.*)?", "diagnostics": r"((train|val)/)?diag/.*",
              "rollout": r"train/lr|(train|val)/rollout/.*"}
    limit_of = {m: thresholds[c] for c, (names, _, _) in CHECKS.items() for m in names}
    panels: dict[str, dict[str, Panel]] = {g: {} for g in groups}
    for name in sorted(metrics):
        for group, pattern in groups.items():
            if re.fullmatch(pattern, name):
                base = name.removeprefix("val/").removeprefix("train/")
                panel = panels[group].setdefault(base, Panel(base))
                panel.lines.append(("val" if name.startswith("val/") else "train", metrics[name]))
                if name in limit_of and not panel.hlines:
                    panel.hlines.append(("threshold", limit_of[name]))
    evals_panels = {key: Panel(key, [("student", m["student"])] if m.get("student") else [],
                               [("teacher", m["teacher"][-1][1])] if m.get("teacher") else [])
                    for key, m in evals.items()}
    return {g: list(p.values()) for g, p in {**panels, "eval": evals_panels}.items() if p}


def _draw(panels: list[Panel], path: Path, title: str) -> None:
    """A grid of up to three columns of panels, saved as PNG with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, series in panel.lines:
            ys = [v if math.isfinite(v) else math.nan for _, v in series]
            ax.plot([s for s, _ in series], ys, label=label, marker="o" if len(series) <= 20 else None, ms=3)
        for label, y in panel.hlines:
            ax.axhline(y, linestyle="--", color="tab:red", linewidth=1, label=f"{label} {y:g}")
        ax.set(title=panel.title, xlabel="step")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


def _run_dir(csv_path: Path) -> Path:
    """RUN_DIR of RUN_DIR/logs/version_N/metrics.csv, else the file's own dir."""
    return csv_path.parent.parent.parent if csv_path.parent.parent.name == "logs" else csv_path.parent


def _cell(value: float, spec: str = ".4g") -> str:
    return format(value, spec) if math.isfinite(value) else "-"


def _summary(metrics: dict[str, Series]) -> list[str]:
    """The summary table of the key metrics, with the start and end the health checks judge."""
    lines = ["| metric | start: mean of first 10% of finite values | end: mean of last 10% of finite values | change |",
             "|---|---|---|---|"]
    for name in sorted(n for n in metrics if _KEY_METRICS.fullmatch(n)):
        start, end = metric_ends(metrics[name])
        lines.append(f"| `{name}` | {_cell(start)} | {_cell(end)} | {_cell(end - start, '+.4g')} |")
    return lines


def _markdown(csv_paths: list[Path], out_dir: Path, metrics: dict[str, Series], evals: dict[str, dict[str, Series]],
              checks: list[Check], pngs: list[Path], thresholds: dict[str, float]) -> str:
    """The text of report.md: summary, evaluation table, health, plots."""
    steps = [s for series in metrics.values() for s, _ in series]
    run_dir = _run_dir(csv_paths[-1])
    lines = [f"# Run report: {run_dir.name}", "", f"- Run: `{run_dir}`",
             f"- Metrics: {', '.join(f'`{p}`' for p in csv_paths)}",
             f"- Steps covered: {min(steps, default=0)} to {max(steps, default=0)}"]
    if (config := csv_paths[-1].parent / "config.yaml").is_file():
        lines.append(f"- Config: [config.yaml]({Path(os.path.relpath(config, out_dir)).as_posix()})")
    lines += ["", "## Summary", "", "The start and end values the health checks judge; `-` where a metric has no finite value.", "", *_summary(metrics)]
    if evals:
        lines += ["", "## Evaluation", "", "| task/metric | before | after | teacher |", "|---|---|---|---|"]
        for key, models in evals.items():
            student, teacher = models.get("student", []), models.get("teacher", [])
            cells = [student[0] if student else None, student[-1] if len(student) > 1 else None,
                     teacher[-1] if teacher else None]
            lines.append(f"| {key} | " + " | ".join(f"{p[1]:.4g} (step {p[0]})" if p else "-" for p in cells) + " |")
    limits = ", ".join(f"`{k}={v:g}`" for k, v in thresholds.items())
    lines += ["", "## Health", "", *(c.line() for c in checks), "",
              f"Thresholds: {limits} (override with `opd report --threshold NAME=VALUE`)."]
    if pngs:
        lines += ["", "## Plots", "", *(f"![{p.stem}]({p.name})" for p in pngs)]
    return "\n".join(lines) + "\n"


def _parse_thresholds(pairs: list[str]) -> dict[str, float]:
    """`DEFAULT_THRESHOLDS` updated with `NAME=VALUE` pairs; unknown names raise SystemExit with the known ones."""
    thresholds = dict(DEFAULT_THRESHOLDS)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in thresholds:
            close = difflib.get_close_matches(name, thresholds, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SystemExit(f"opd report: unknown threshold {name!r}{hint}; known: {', '.join(thresholds)}")
        try:
            thresholds[name] = float(value)  # "" (no "=") fails too
        except ValueError:
            raise SystemExit(f"opd report: --threshold wants NAME=NUMBER, got {pair!r}") from None
    return thresholds


def main(argv: list[str] | None = None) -> list[Path]:
    """Entry point of `opd report`; returns the paths written (PNGs, then report.md)."""
    parser = argparse.ArgumentParser(prog="opd report", description="Plot a run's metrics.csv and check its health.")
    parser.add_argument("run_dir", help="run dir (holding logs/version_N/), a version dir, or a metrics.csv")
    parser.add_argument("--out", type=Path, help="output dir (default: <newest version dir read>/report)")
    parser.add_argument("--version", type=int, help="read only logs/version_N (default: every version, joined)")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="override a health threshold (repeatable); defaults: "
                        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_THRESHOLDS.items()))
    args = parser.parse_args(argv)
    thresholds = _parse_thresholds(args.threshold)
    try:
        csv_paths = resolve_versions(args.run_dir, args.version)
    except FileNotFoundError as e:
        raise SystemExit(f"opd report: {e}") from None
    metrics, evals = read_run(csv_paths)
    out_dir = args.out or csv_paths[-1].parent / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group, panels in _panels(metrics, evals, thresholds).items():
        _draw(panels, out_dir / f"{group}.png", f"{group}: {_run_dir(csv_paths[-1])}")
        written.append(out_dir / f"{group}.png")
    report = out_dir / "report.md"
    report.write_text(_markdown(csv_paths, out_dir, metrics, evals, health(metrics, evals, thresholds), written,
                                thresholds), encoding="utf-8")
    written.append(report)
    print(f"opd report: wrote {len(written)} files to {out_dir}:", *(f"  {p}" for p in written), sep="\n")
    return written
