"""OPD's failure modes reproduced at CPU scale, each run beside a named stabiliser, with the diagnostic that should
warn before the score falls.

    .venv/bin/python -m benchmarks.failure_modes [--modes cancellation overlap] [--seeds 0] [--steps 600]
        [--start-steps 600] [--eval-every 50] [--parallel 2] [--rerun] [--no-run]

Every run goes on from a warm student of the quickstart (`configs/quickstart/distill.yaml` or `distill_cross.yaml`,
the fresh student after `--start-steps` steps of SFT on gold, seed 0, `runs/failure_modes/<pair>/start`): from
scratch the failing losses never leave 0.000, so nothing can fall. lm-eval scores the student every `--eval-every`
steps (its start included), and `diag/grad_coherence` is measured every 5 steps. Modes:

- `cancellation` (Li et al., arXiv 2604.13016, their hypothesis for why sampled-token OPD stalls): `sampled_token`
  (one sample's log-ratio as the advantage of its token) against the stabiliser `topk_reverse_kl` (the reverse KL
  over the student's top-k tokens, a dense gradient), one tokenizer. If per-token advantages cancel, the sampled-token
  run has large `diag/logratio_abs` (mean |log p_T - log p_S| of the sampled tokens) with a small
  `diag/grad_coherence` (norm of the summed output-layer gradient over the sum of its per-position norms), and the
  dense run does not.
- `overlap` (Li et al., arXiv 2604.13016: a teacher whose next-token menu does not overlap the student's does not
  help, however strong): reverse KL on the student's rollouts from teachers of the same strength, the character
  teacher (0.956) across tokenizers through `exact_spans` (the student's tokens are whole numbers, the teacher's
  characters), and the same-tokenizer oracle (0.958, `benchmarks/teachers.py`) through `identity`; the stabiliser
  is SFT on gold mixed in (`extra_terms`, weight 0.5) with the character teacher. Watched: `diag/topk_overlap`.

For each run the table gives the score's path (start, lowest, end), the first evaluation below the start by more
than `DROP` (the score falls), and when the watched diagnostic first stayed past `opd report`'s threshold for
`PATIENCE` observations (`guards.crossing`: the step `RolloutGuard` with that limit acts at, and stops the run with
`stop: true`), and `opd report`'s verdict at the end. Runs are stored in `runs/failure_modes/results.json` and
`benchmarks/failure_modes_runs.csv` (each run's diagnostics as means over windows of `WINDOW` steps, and its scores);
the table and `benchmarks/failure_modes.png` are regenerated from the CSV with `--no-run`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.leaderboard import PAIRS, fit_and_score, prepare, seed_args, warm_student
from benchmarks.quickstart import machine, record
from benchmarks.teachers import teacher_dir, trained_teacher
from opd_lightning.guards import BOUNDS, crossing
from opd_lightning.report import DEFAULT_THRESHOLDS

ROOT = Path("runs/failure_modes")
RUNS_CSV = Path(__file__).with_name("failure_modes_runs.csv")
PNG = Path(__file__).with_name("failure_modes.png")
DROP = 0.02  # a score this far below the start counts as falling (500 test problems: one problem is 0.002)
PATIENCE = 3  # observations past the threshold before the guard acts
WINDOW = 10  # steps per stored window of the diagnostics
SERIES = ("diag/topk_overlap", "diag/grad_coherence", "diag/logratio_abs", "diag/logratio_mean",
          "diag/logratio_drift", "diag/repetition_rate", "diag/entropy_student", "diag/completion_len")
ORACLE = teacher_dir("builtin:arithmetic_bpe")
WHOLE_TARGET = ["--model.teacher_topk", "null"]
MODES = {
    "cancellation": {
        "title": "Gradient cancellation: sampled-token OPD against a dense top-k reverse KL (one tokenizer)",
        "pair": "same", "watch": "diag/grad_coherence",
        "variants": {
            "sampled_token": ("`sampled_token` (one sample's log-ratio per token)", ["--model.loss", "sampled_token"]),
            "topk_reverse_kl": ("stabiliser: `topk_reverse_kl` (dense over the student's top-k)",
                                ["--model.loss", "topk_reverse_kl"]),
        },
    },
    "overlap": {
        "title": "A teacher whose menu does not overlap the student's: reverse KL from two teachers of one strength",
        "pair": "cross", "watch": "diag/topk_overlap",
        "variants": {
            "char_teacher": ("character teacher (0.956), `exact_spans`", [
                "--model.loss", "reverse_kl", "--model.aligner",
                "{name: exact_spans, branches: null, depth: null, min_mass: 0}", *WHOLE_TARGET]),
            "oracle_teacher": ("BPE teacher (0.958, the student's tokenizer), `identity`", [
                "--model.loss", "reverse_kl", "--model.teacher.path", str(ORACLE), "--model.aligner", "identity",
                *WHOLE_TARGET]),
            "char_teacher_sft": ("stabiliser: character teacher + SFT on gold (weight 0.5)", [
                "--model.loss", "reverse_kl", "--model.aligner",
                "{name: exact_spans, branches: null, depth: null, min_mass: 0}", *WHOLE_TARGET,
                "--model.extra_terms", "[{loss: cross_entropy, weight: 0.5, completions: gold}]"]),
        },
    },
}
OVERLAY = """trainer:
  callbacks:
    - class_path: opd_lightning.evaluation.LmEvalCallback
      init_args: {tasks: [arithmetic], on_fit_start: true}
"""  # the student scored at its start too, then at every validation


def series(version: Path) -> dict[str, list[tuple[int, float]]]:
    """Every `SERIES` metric a run logged, `[(step, value)]` in step order."""
    out: dict[str, list[tuple[int, float]]] = {name: [] for name in SERIES}
    for row in csv.DictReader((version / "metrics.csv").open()):
        for name in SERIES:
            if row.get(name):
                out[name].append((int(row["step"]), float(row[name])))
    return {name: sorted(values) for name, values in out.items()}


def windows(values: list[tuple[int, float]], steps: int) -> list[float]:
    """Means of a series over consecutive windows of `WINDOW` steps (NaN where a window has no finite value)."""
    out = []
    for lo in range(0, steps, WINDOW):
        inside = [v for s, v in values if lo <= s < lo + WINDOW and math.isfinite(v)]
        out.append(statistics.mean(inside) if inside else math.nan)
    return out


def run(mode: str, variant: str, seed: int, steps: int, eval_every: int, start: tuple[Path, float]) -> dict:
    spec = MODES[mode]
    args = ["--config", PAIRS[spec["pair"]]["config"], "--config", str(ROOT / "overlay.yaml"), *seed_args(seed),
            "--model.student.path", str(start[0]), "--model.student.config", "null", "--model.student.tokenizer",
            "null", "--model.diagnostics.grad_coherence_every", "5", *spec["variants"][variant][1]]
    out = ROOT / mode / variant / f"seed_{seed}"
    result = fit_and_score(args, out, steps, {"mode": mode, "variant": variant, "seed": seed,
                                              "start_score": start[1]}, eval_every=eval_every)
    if "score" in result:
        logged = series(out / "logs" / "version_0")
        result["windows"] = {name: windows(values, steps) for name, values in logged.items()}
        watch, limit = spec["watch"], DEFAULT_THRESHOLDS[spec["watch"].removeprefix("diag/")]
        result["crossing"] = crossing(logged[watch], limit, BOUNDS[watch], PATIENCE)
    return result


def to_rows(result: dict) -> list[dict]:
    """A run as CSV rows: one per window of `WINDOW` steps (its diagnostics' means) and one per evaluation."""
    key = {k: result[k] for k in ("mode", "variant", "seed", "steps", "start_score", "wall_s", "date")}
    key["crossing"] = "" if result["crossing"] is None else result["crossing"]
    rows = [{**key, "kind": "window", "step": i * WINDOW, **{n: v[i] for n, v in result["windows"].items()}}
            for i in range(len(next(iter(result["windows"].values()))))]
    return rows + [{**key, "kind": "eval", "step": step, "score": score} for step, score in result["history"]]


def from_rows(rows: list[dict]) -> list[dict]:
    """The runs of `to_rows`' rows (read back from the CSV as strings)."""
    runs: dict[tuple, dict] = {}
    for r in rows:
        key = (r["mode"], r["variant"], int(r["seed"]), int(r["steps"]))
        run_ = runs.setdefault(key, {"mode": key[0], "variant": key[1], "seed": key[2], "steps": key[3],
                                     "start_score": float(r["start_score"]), "wall_s": float(r["wall_s"]),
                                     "date": r["date"], "crossing": int(r["crossing"]) if r["crossing"] else None,
                                     "windows": {n: [] for n in SERIES}, "history": []})
        if r["kind"] == "window":
            for n in SERIES:
                run_["windows"][n].append(float(r[n]) if r[n] not in ("", "nan") else math.nan)
        else:
            run_["history"].append((int(r["step"]), float(r["score"])))
    for run_ in runs.values():
        run_["score"] = run_["history"][-1][1]
    return list(runs.values())


def write_csv(runs: list[dict]) -> None:
    columns = ["mode", "variant", "seed", "steps", "start_score", "wall_s", "date", "crossing", "kind", "step",
               "score", *SERIES]
    with RUNS_CSV.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(runs, key=lambda r: (r["mode"], r["variant"], r["seed"])):
            writer.writerows(to_rows(r))


def read_csv() -> list[dict]:
    return from_rows(list(csv.DictReader(RUNS_CSV.open()))) if RUNS_CSV.exists() else []


def falls(run_: dict) -> int | None:
    """The first evaluation step at which the score is more than `DROP` below the run's start, or None."""
    start = run_["history"][0][1]
    return next((s for s, v in run_["history"] if v < start - DROP), None)


def _f(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _ends(values: list[float]) -> tuple[float, float]:
    """Means of the first and last tenth of a series' finite window values (as `opd report` reads a metric)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    n = max(1, math.ceil(len(finite) / 10))
    return statistics.mean(finite[:n]), statistics.mean(finite[-n:])


def table(mode: str, runs: list[dict]) -> str:
    spec = MODES[mode]
    watch = spec["watch"]
    name = watch.removeprefix("diag/")
    limit, bound = DEFAULT_THRESHOLDS[name], BOUNDS[watch]
    header = (f"| run | seed | score: start → lowest → end | falls at step | `{name}`: first → last window | "
              f"guard ({'<' if bound == 'min' else '>'} {limit:g} for {PATIENCE} observations) acts at step | "
              "mean abs log-ratio (last windows) | grad coherence (last windows) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for variant, (label, _) in spec["variants"].items():
        for r in sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"]):
            scores = [v for _, v in r["history"]]
            first, last = _ends(r["windows"][watch])
            lines.append(
                f"| {label} | {r['seed']} | {scores[0]:.3f} → {min(scores):.3f} → {scores[-1]:.3f} | "
                f"{falls(r) if falls(r) is not None else 'never'} | {_f(first)} → {_f(last)} | "
                f"{r['crossing'] if r['crossing'] is not None else 'never'} | "
                f"{_f(_ends(r['windows']['diag/logratio_abs'])[1])} | "
                f"{_f(_ends(r['windows']['diag/grad_coherence'])[1])} |")
    return "\n".join(lines)


def plot(runs: list[dict], modes: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4 * len(modes)))
    FigureCanvasAgg(fig)
    for row, mode in enumerate(modes):
        watch = MODES[mode]["watch"]
        ax_score, ax_diag = fig.add_subplot(len(modes), 2, 2 * row + 1), fig.add_subplot(len(modes), 2, 2 * row + 2)
        for r in (r for r in runs if r["mode"] == mode):
            label = f"{r['variant']} s{r['seed']}"
            lines = ax_score.plot(*zip(*r["history"], strict=True), marker="o", ms=3, label=label)
            steps = [i * WINDOW for i in range(len(r["windows"][watch]))]
            ax_diag.plot(steps, r["windows"][watch], color=lines[0].get_color(), label=label)
            if r["crossing"] is not None:
                ax_diag.axvline(r["crossing"], color=lines[0].get_color(), ls=":")
        ax_diag.axhline(DEFAULT_THRESHOLDS[watch.removeprefix("diag/")], color="red", ls="--", label="threshold")
        ax_score.set_title(f"{mode}: score (exact match, 500 test problems)", fontsize=9)
        ax_diag.set_title(f"{mode}: {watch} (window means; dotted: the guard acts)", fontsize=9)
        ax_score.legend(fontsize=7)
        ax_diag.legend(fontsize=7)
        ax_score.set_xlabel("step")
        ax_diag.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--start-steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--no-run", action="store_true", help="only write the tables of the runs recorded")
    args = parser.parse_args()
    recorded = {(r["mode"], r["variant"], r["seed"], r["steps"]): r for r in read_csv()}
    if not args.no_run:
        starts = {p: warm_student(p, args.start_steps, ROOT) for p in {MODES[m]["pair"] for m in args.modes}}
        if any("oracle_teacher" in MODES[m]["variants"] for m in args.modes):
            trained_teacher("builtin:arithmetic_bpe")
        prepare(ROOT, OVERLAY)
        jobs = [(m, v, s) for m in args.modes for s in args.seeds for v in MODES[m]["variants"]
                if args.rerun or (m, v, s, args.steps) not in recorded
                or recorded[(m, v, s, args.steps)]["start_score"] != starts[MODES[m]["pair"]][1]]
        print(f"{len(jobs)} runs to do", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            for result in pool.map(lambda j: run(*j, args.steps, args.eval_every, starts[MODES[j[0]]["pair"]]), jobs):
                print(json.dumps({k: result.get(k) for k in ("mode", "variant", "seed", "score", "crossing",
                                                              "wall_s", "error")}), flush=True)
                if "score" in result:
                    recorded[(result["mode"], result["variant"], result["seed"], args.steps)] = result
                    write_csv(list(recorded.values()))
    runs = [r for r in recorded.values() if r["mode"] in args.modes and r["seed"] in args.seeds
            and r["steps"] == args.steps]
    plot(runs, args.modes)
    starts_text = "; ".join(sorted({f"{PAIRS[MODES[r['mode']]['pair']]['title'].split(' (')[0]}: "
                                    f"{r['start_score']:.3f}" for r in runs}))
    blocks = "\n\n".join(f"### {MODES[m]['title']}\n\nConfig: `{PAIRS[MODES[m]['pair']]['config']}`.\n\n"
                         f"{table(m, [r for r in runs if r['mode'] == m])}" for m in args.modes)
    text = f"""## Failure modes, reproduced and caught

Command: `.venv/bin/python -m benchmarks.failure_modes --modes {' '.join(args.modes)} --seeds \
{' '.join(map(str, args.seeds))} --steps {args.steps} --start-steps {args.start_steps} --eval-every {args.eval_every}`.
Runs dated {', '.join(sorted({r['date'] for r in runs}))}. Machine: {machine()}; one thread per run, fp32.
Students warmed up by SFT on gold for {args.start_steps} steps ({starts_text}), then {args.steps} steps of the run
(λ = 0.5, batch 128, AdamW 3e-3), lm-eval every {args.eval_every} steps. "Falls at": the first evaluation more than
{DROP} below the start. Diagnostics: means over the first and last tenth of the run's {WINDOW}-step windows.
What each mode tests: the docstring of `benchmarks/failure_modes.py`.

{blocks}

![failure modes](failure_modes.png)

Each run's windows and scores: `benchmarks/{RUNS_CSV.name}`."""
    print(text)
    record(text, "failure_modes")


if __name__ == "__main__":
    main()
