"""The loss-zoo leaderboard: every registered loss on the embedded gold task, same tokenizer and across
tokenizers, several seeds.

    .venv/bin/python -m benchmarks.leaderboard [--pairs same cross] [--losses ...] [--steps 1000] [--seeds 0 1 2]
        [--parallel 2] [--warm STEPS] [--no-run]

Each run is a quickstart distillation with only the loss swapped, for a fixed number of optimizer steps, then
lm-eval's exact match on the 500 test problems:
- `same`: `configs/quickstart/distill.yaml` (the stage-1 teacher into a small fresh student, same tokenizer,
  aligner `identity`);
- `cross`: `configs/quickstart/distill_cross.yaml` (the same teacher into a fresh student with a byte-level BPE
  tokenizer). Every loss runs through `byte_spans`, except `dskd`, which needs hidden states and runs through
  `dskd_cma`, and X-Token's `xtoken_hkl` and `xtoken_pkl`, which run through its projection (`xtoken`) and only
  across tokenizers.
`cross_entropy` is run as plain SFT on the gold completions (λ = 0), the baseline that needs no teacher signal. Rows
named `sampled_token+<credit>` are `sampled_token` with that credit scheme (`VARIANTS`).
Runs go `--parallel` at a time with one thread each; wall times are comparable with each other only. Finished runs
(same pair, loss, seed and step budget, in `runs/leaderboard/results.json` or the committed
`benchmarks/leaderboard_runs.csv`) are reused unless `--rerun`. Needs the
quickstart teacher (`make demo` or `opd fit --config configs/quickstart/teacher.yaml`). Writes the tables and
`benchmarks/leaderboard.png` into benchmarks/RESULTS.md, and every run's numbers to `benchmarks/leaderboard_runs.csv`.

- `long`: `configs/long_addition/distill.yaml` (the long task's teacher into its small fresh student, same tokenizer,
  completions of 18-41 characters), and `long_cross`: `configs/long_addition/distill_cross.yaml` (the same teacher
  into a student with the quickstart's byte-level BPE tokenizer, aligners as for `cross`); both scored by lm-eval's
  `long_addition` (the sum written after the first `:`), their runs in tables, plots and a RESULTS block of their own
  (`leaderboard_long`, `leaderboard_warm_long`), so run them in an invocation without the arithmetic pairs. They need
  the long task's teacher (`opd fit --config configs/long_addition/teacher.yaml`).

`--warm STEPS` runs the warm-start leaderboard instead: each pair's fresh student is first trained by SFT on the gold
completions for STEPS steps (seed 0, once, `runs/leaderboard_warm/<pair>/start`, its score stated in the table),
and every run goes on from that student; its own table, `benchmarks/leaderboard_warm.png` and
`benchmarks/leaderboard_warm_runs.csv`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from opd_lightning.losses import LOSSES

from benchmarks.quickstart import machine, record

ROOT = Path("runs/leaderboard")
RUNS_CSV = Path(__file__).with_name("leaderboard_runs.csv")
WARM_ROOT = Path("runs/leaderboard_warm")
WARM_CSV = Path(__file__).with_name("leaderboard_warm_runs.csv")
TEACHER = Path("runs/quickstart/teacher/hf")
LONG_TEACHER = Path("runs/long_addition/teacher/hf")  # configs/long_addition/teacher.yaml
DIAGNOSTICS = ("diag/topk_overlap", "diag/logratio_mean", "diag/entropy_student", "diag/repetition_rate",
               "diag/align_coverage", "diag/noncanonical_rate")


def eval_overlay(evaluate_teacher: bool = False, export: bool = False, task: str = "arithmetic",
                 on_fit_start: bool = False) -> str:
    """The config overlay of a benchmark's runs: lm-eval's `task` score after the last step (and the teacher's; and
    the student's before the first step with `on_fit_start`), and the student saved to `<run>/hf` with `export`."""
    options = (f"tasks: [{task}], evaluate_teacher: {str(evaluate_teacher).lower()}, "
               f"on_fit_start: {str(on_fit_start).lower()}")
    callbacks = ["    - class_path: opd_lightning.evaluation.LmEvalCallback", f"      init_args: {{{options}}}"]
    callbacks += ["    - class_path: opd_lightning.export.ExportStudent"] if export else []
    return "\n".join(["trainer:", "  callbacks:", *callbacks]) + "\n"


# What a pair's task fixes (its teacher, lm-eval task and metric, the setting its tables state) and what its
# tokenizers fix (the aligner of each loss), combined into the pairs below.
ARITHMETIC = {"task": "arithmetic", "metric": "exact_match", "teacher": TEACHER, "problems": 500,
              "teacher_command": "make demo (or the quickstart teacher stage)",
              "setting": "the quickstart distillations ({teacher}; {start}; λ = 0.5; batch 128; AdamW 3e-3)"}
LONG_ADDITION = {"task": "long_addition", "metric": "exact_match/sum", "teacher": LONG_TEACHER, "problems": 500,
                 "teacher_command": "opd fit --config configs/long_addition/teacher.yaml",
                 "setting": "the long task's distillations ({teacher}; {start}; λ = 0.5; batch 64; AdamW 3e-3; "
                            "up to 44 new tokens)"}
SAME_TOKENIZER = {"aligners": {},
                  "skip": ("xtoken_hkl", "xtoken_pkl")}  # they compare two vocabularies through X-Token's projection
ACROSS_TOKENIZERS = {"aligners": {"dskd": "dskd_cma", "xtoken_hkl": "xtoken", "xtoken_pkl": "xtoken"},
                     "default_aligner": "byte_spans"}
PAIRS = {
    "same": {**ARITHMETIC, **SAME_TOKENIZER, "config": "configs/quickstart/distill.yaml",
             "title": "same tokenizer (one token per character)"},
    "cross": {**ARITHMETIC, **ACROSS_TOKENIZERS, "config": "configs/quickstart/distill_cross.yaml",
              "title": "across tokenizers (character teacher → byte-level BPE student)"},
    "long": {**LONG_ADDITION, **SAME_TOKENIZER, "config": "configs/long_addition/distill.yaml",
             "title": "long task, same tokenizer (one token per character)"},
    "long_cross": {**LONG_ADDITION, **ACROSS_TOKENIZERS, "config": "configs/long_addition/distill_cross.yaml",
                   "title": "long task, across tokenizers (character teacher → byte-level BPE student)"},
}


# Every run's recipe whatever its config ships (the cross-tokenizer config now adds SFT on gold and rolls out on
# every step): half the steps on-policy, the loss alone. A row's own options come after it.
RECIPE = ["--model.rollout.on_policy_fraction", "0.5", "--model.extra_terms", "[]"]
# The cross-tokenizer quickstart config's loss and target form before it shipped SFT with `hidden_match`, for the
# benchmarks whose rows take them from that config; given before a row's own options.
CROSS_LOSS = ["--model.loss", "forward_kl", "--model.teacher_topk", "1"]


# Rows beyond the registered losses: the policy-gradient losses' credit schemes, each named `<loss>+<variant>`.
VARIANTS = {
    "sampled_token+gae": {"name": "sampled_token", "credit": "gae"},
    "sampled_token+gae_head": {"name": "sampled_token", "credit": "gae", "value": "head"},
    "sampled_token+length_normalised": {"name": "sampled_token", "credit": "length_normalised"},
    "sampled_token+iw_opd": {"name": "sampled_token", "credit": "iw_opd"},
}
ROWS = [*sorted(LOSSES), *VARIANTS]


def aligner_for(pair: str, loss: str) -> str | None:
    spec = PAIRS[pair]
    return spec["aligners"].get(loss, spec.get("default_aligner"))


def recorded_runs(path: Path, text_columns: tuple[str, ...]) -> list[dict]:
    """The runs of a leaderboard's committed CSV (`path`), so that a fresh clone continues the leaderboard instead of
    running it again: `text_columns` stay strings, the rest become numbers (seed and steps integers)."""
    if not path.exists():
        return []
    runs = []
    for r in csv.DictReader(path.open()):
        run = {k: (v if k in text_columns else float(v) if v else math.nan) for k, v in r.items()}
        runs.append({**run, "seed": int(run["seed"]), "steps": int(run["steps"])})
    return runs


def _key(result: dict) -> tuple:
    """What identifies a run in `results.json`."""
    return result["pair"], result["loss"], result["seed"], result["steps"]


def run_parser(steps: int) -> argparse.ArgumentParser:
    """The options every quickstart benchmark of many runs takes: seeds, steps, parallel runs, rerun."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--rerun", action="store_true", help="run again even where a finished run is recorded")
    return parser


def prepare(root: Path, overlay: str, pair: str = "same") -> Path:
    """Check that `pair`'s teacher exists (default: the quickstart's), and write the runs' config overlay into
    `root` (one file per task, so that leaderboards of two tasks can share `root`); its path."""
    teacher = PAIRS[pair]["teacher"]
    if not (teacher / "config.json").exists():
        raise SystemExit(f"{teacher} is missing: run `{PAIRS[pair]['teacher_command']}` first")
    root.mkdir(parents=True, exist_ok=True)
    path = overlay_path(root, pair)
    path.write_text(overlay)
    return path


def overlay_path(root: Path, pair: str) -> Path:
    """Where `prepare` writes the overlay of `pair`'s runs: `overlay.yaml` for the arithmetic pairs."""
    return per_task(root / "overlay.yaml", PAIRS[pair]["task"])


def per_task(path: Path, task: str) -> Path:
    """`path` for the arithmetic pairs' files, `<stem>_<task><suffix>` beside it for another task's."""
    return path if task == "arithmetic" else path.with_name(f"{path.stem}_{task}{path.suffix}")


def seed_args(seed: int) -> list[str]:
    """The options that seed a quickstart run: Lightning's, the rollout draws', the student's and the data's."""
    return ["--seed_everything", str(seed), "--model.seed", str(seed), "--model.student.seed", str(seed),
            "--data.seed", str(seed)]


def fit_and_score(config_args: list[str], out: Path, steps: int, key: dict, task: str = "arithmetic",
                  metric: str = "exact_match", eval_every: int | None = None) -> dict:
    """One `opd fit` into `out` (emptied first), `steps` optimizer steps, one thread; its lm-eval score (`metric`
    of `task`), wall time and the means of `DIAGNOSTICS` over its last 50 logged steps, merged into `key`. With
    `eval_every`, lm-eval also scores the student every that many steps, and "history" holds every score by step
    (`[(step, score)]`, the fit's start at step 0 when the config evaluates there)."""
    args = [sys.executable, "-m", "opd_lightning", "fit", *config_args, "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(eval_every or steps),
            "--model.scheduler.init_args.total_steps", str(steps), "--trainer.default_root_dir", str(out)]
    key = {**key, "steps": steps, "date": str(datetime.date.today())}
    shutil.rmtree(out, ignore_errors=True)  # a run into a used folder would log to version_1 and be read stale
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        return {**key, "error": done.stderr[-2000:], "wall_s": wall}
    return {**scored_run(out, key, task, metric, history=bool(eval_every)), "wall_s": wall}


def scored_run(out: Path, key: dict, task: str = "arithmetic", metric: str = "exact_match",
               history: bool = False) -> dict:
    """What `fit_and_score` returns of a finished run in `out`, read from its logs (no wall time)."""
    version = out / "logs" / "version_0"
    evals = [json.loads(line) for line in (version / "eval_history.jsonl").read_text().splitlines()]
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    diag = {}
    for name in DIAGNOSTICS:
        values = [float(r[name]) for r in rows if r.get(name)][-50:]  # mean of the last 50 logged steps
        diag[name] = statistics.mean(values) if values else float("nan")
    scores = {entry["model"]: entry["results"][task][metric] for entry in evals}  # the last of each model
    teacher = {"teacher_score": scores["teacher"]} if "teacher" in scores else {}
    if history:
        diag["history"] = [(e["step"], e["results"][task][metric]) for e in evals if e["model"] == "student"]
    return {**key, "score": scores["student"], **teacher, **diag}


def warm_student(pair: str, steps: int, root: Path = WARM_ROOT) -> tuple[Path, float]:
    """The warm start of `pair`'s student: the fresh student of the pair's config after `steps` optimizer steps of
    SFT on the gold completions (seed 0), saved once under `<root>/<pair>/start`; its path and lm-eval score (the
    pair's metric of its task)."""
    spec, out = PAIRS[pair], root / pair / "start"
    scored = out / "score.json"
    if not scored.exists() or json.loads(scored.read_text())["steps"] != steps:
        overlay = prepare(root, eval_overlay(export=True, task=spec["task"]), pair)
        args = ["--config", spec["config"], "--config", str(overlay), "--model.loss", "cross_entropy",
                "--model.rollout.on_policy_fraction", "0.0", "--model.extra_terms", "[]", *seed_args(0)]
        result = fit_and_score(args, out, steps, {"pair": pair}, task=spec["task"], metric=spec["metric"])
        if "score" not in result:
            raise SystemExit(f"the warm start of {pair} failed:\n{result['error']}")
        scored.write_text(json.dumps(result))
    return out / "hf", json.loads(scored.read_text())["score"]


def run(pair: str, loss: str, seed: int, steps: int, root: Path = ROOT,
        start: tuple[Path, float] | None = None, options: tuple[str, ...] = ()) -> dict:
    """One leaderboard run of `loss` on `pair` into `<root>/<pair>/<loss>/seed_<seed>`, from `start` (a warm
    student) if given; `options` are further `opd fit` options, given last."""
    aligner = aligner_for(pair, loss)
    key = {"pair": pair, "loss": loss, "seed": seed, "aligner": aligner or "identity"}
    if start is not None:
        key["start_score"] = start[1]  # which start: runs from another build of it are not mixed with these
    args = run_args(pair, loss, seed, None if start is None else start[0], options)
    args[2:2] = ["--config", str(overlay_path(root, pair))]  # after the pair's config
    return fit_and_score(args, root / pair / loss / f"seed_{seed}", steps, key, PAIRS[pair]["task"],
                         PAIRS[pair]["metric"])


def run_args(pair: str, loss: str, seed: int, start: Path | None = None, options: tuple[str, ...] = ()) -> list[str]:
    """The `opd fit` options of a leaderboard run of `loss` on `pair` (from the warm student at `start` if given), but
    its evaluation overlay and its length (`fit_and_score` adds those)."""
    extra = ["--model.rollout.on_policy_fraction", "0.0"] if loss == "cross_entropy" else []
    if aligner := aligner_for(pair, loss):
        extra += ["--model.aligner", aligner]
    if start is not None:  # a warm start: the student is the saved one, its architecture and tokenizer with it
        extra += ["--model.student.path", str(start), "--model.student.config", "null", "--model.student.tokenizer",
                  "null"]
    spec = json.dumps(VARIANTS[loss]) if loss in VARIANTS else loss  # a mapping is YAML too
    return ["--config", PAIRS[pair]["config"], "--model.loss", spec, "--model.teacher_topk", "null", *seed_args(seed),
            *RECIPE, *extra, *options]  # every loss on the whole target


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def table(results: list[dict], metric: str = "exact match") -> str:
    header = (f"| loss | aligner | {metric} (mean ± std) | seeds | wall s/run | topk overlap | log-ratio | "
              "student entropy | repetition | coverage |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    by_loss: dict[str, list[dict]] = {}
    for r in results:
        by_loss.setdefault(r["loss"], []).append(r)
    order = sorted(by_loss, key=lambda k: -statistics.mean(r.get("score", 0.0) for r in by_loss[k]))
    for loss in order:
        ok = [r for r in by_loss[loss] if "score" in r]
        label = "cross_entropy (SFT on gold, λ = 0)" if loss == "cross_entropy" else loss
        aligner = by_loss[loss][0]["aligner"]
        if not ok:
            lines.append(f"| {label} | {aligner} | failed: {by_loss[loss][0]['error'].splitlines()[-1][:80]} "
                         "| | | | | | | |")
            continue
        scores = [r["score"] for r in ok]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        mean = {k: statistics.mean(r.get(k, math.nan) for r in ok) for k in ("wall_s", *DIAGNOSTICS)}
        lines.append(f"| {label} | {aligner} | {statistics.mean(scores):.3f} ± {std:.3f} | "
                     f"{', '.join(f'{s:.3f}' for s in scores)} | {mean['wall_s']:.0f} | "
                     f"{_fmt(mean['diag/topk_overlap'])} | {_fmt(mean['diag/logratio_mean'])} | "
                     f"{_fmt(mean['diag/entropy_student'])} | {_fmt(mean['diag/repetition_rate'], 4)} | "
                     f"{_fmt(mean['diag/align_coverage'])} |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6 * len(results)))
    FigureCanvasAgg(fig)
    for row, (pair, runs) in enumerate(results.items(), start=1):
        by_loss: dict[str, list[float]] = {}
        for r in runs:
            if "score" in r:
                by_loss.setdefault(r["loss"], []).append(r["score"])
        names = sorted(by_loss, key=lambda k: -statistics.mean(by_loss[k]))
        ax = fig.add_subplot(len(results), 1, row)
        ax.bar(names, [statistics.mean(by_loss[n]) for n in names],
               yerr=[statistics.stdev(by_loss[n]) if len(by_loss[n]) > 1 else 0 for n in names], capsize=4)
        for i, n in enumerate(names):
            ax.scatter([i] * len(by_loss[n]), by_loss[n], color="black", s=10, zorder=3)
        spec = PAIRS[pair]
        ax.set_ylabel(f"{spec['metric']} (test, {spec['problems']})")
        ax.set_ylim(0, 1)
        ax.set_title(f"Loss leaderboard: {spec['task']}, {spec['title']}")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = run_parser(steps=1000)
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["same", "cross"])
    parser.add_argument("--losses", nargs="+", choices=ROWS, default=ROWS)
    parser.add_argument("--warm", type=int, default=None, metavar="STEPS",
                        help="the warm-start leaderboard: every run starts from the pair's student after STEPS steps "
                             "of SFT on gold (written to its own table, CSV and plot)")
    parser.add_argument("--lr", type=float, default=None,
                        help="every run's learning rate (default: each config's, 0.003); its runs, CSV, plot and "
                             "block are its own")
    parser.add_argument("--no-run", action="store_true", help="only write the tables of the runs recorded")
    args = parser.parse_args()
    warm = args.warm is not None
    tasks = {PAIRS[pair]["task"] for pair in args.pairs}
    if len(tasks) > 1:
        parser.error(f"--pairs {' '.join(args.pairs)} mixes tasks ({', '.join(sorted(tasks))}): run each task's "
                     "pairs in an invocation of their own")
    task = tasks.pop()
    metric = PAIRS[args.pairs[0]]["metric"]
    root, runs_csv = (WARM_ROOT, WARM_CSV) if warm else (ROOT, RUNS_CSV)
    suffix, options = ("", ()) if args.lr is None else (f"_lr{args.lr:g}", ("--model.optimizer.init_args.lr",
                                                                             f"{args.lr:g}"))
    root, runs_csv = root.with_name(root.name + suffix), runs_csv.with_name(runs_csv.stem + suffix + ".csv")
    starts = {pair: warm_student(pair, args.warm) for pair in args.pairs} if warm else {}
    prepare(root, eval_overlay(task=task), args.pairs[0])  # after the warm starts, replacing their overlay (export)
    store = root / "results.json"
    recorded = json.loads(store.read_text()) if store.exists() else []
    csv_runs = recorded_runs(runs_csv, ("pair", "loss", "aligner", "date"))
    done = {_key(r): r for r in [*csv_runs, *recorded] if "score" in r and not math.isnan(r["score"])}
    if warm:  # a start rebuilt by other code scores differently: its runs are not this start's, and are run again
        other = {k for k, r in done.items() if r.get("start_score") != starts.get(r["pair"], (None, None))[1]}
        if other := {k for k in other if k[0] in starts}:
            print(f"{len(other)} recorded runs went on from another warm start (its score differs from "
                  f"{', '.join(f'{p}: {s:.3f}' for p, (_, s) in starts.items())}): dropped, to be run again",
                  flush=True)
            done = {k: r for k, r in done.items() if k not in other}
    jobs = [] if args.no_run else [(pair, loss, seed) for pair in args.pairs for seed in args.seeds
                                   for loss in args.losses if loss not in PAIRS[pair].get("skip", ())
                                   and (args.rerun or (pair, loss, seed, args.steps) not in done)]
    print(f"{len(jobs)} runs to do, {len(done)} recorded", flush=True)
    columns = ["pair", "loss", "aligner", "seed", "steps", "score", "wall_s", *DIAGNOSTICS, "date",
               *(["start_score"] if warm else [])]
    with ThreadPoolExecutor(args.parallel) as pool:
        jobs_run = pool.map(lambda job: run(*job, args.steps, root, starts.get(job[0]), options), jobs)
        for result in jobs_run:
            if "score" in result:
                done[_key(result)] = result
                store.write_text(json.dumps(list(done.values()), indent=2))
                write_runs(runs_csv, columns, done)  # kept with the code after every run: an interrupted
                # invocation's finished runs are reused by the next, from a fresh clone too
            print(json.dumps({k: result.get(k) for k in ("pair", "loss", "seed", "score", "wall_s", "error")}),
                  flush=True)
    chosen = {pair: [done[(pair, loss, seed, args.steps)] for loss in args.losses for seed in args.seeds
                     if (pair, loss, seed, args.steps) in done] for pair in args.pairs}
    name = (("leaderboard_warm" if warm else "leaderboard") + ("" if task == "arithmetic" else f"_{task.split('_')[0]}")
            + suffix)
    plot(chosen, Path(__file__).with_name(f"{name}.png"))
    write_runs(runs_csv, columns, done)
    dates = sorted({r["date"] for runs in chosen.values() for r in runs})
    at_lr = "" if args.lr is None else f" at a learning rate of {args.lr:g}"
    kind = ", ".join([*(["warm start"] if warm else []), *([f"learning rate {args.lr:g}"] if at_lr else [])])
    tables = "\n\n".join(f"### Leaderboard{f' ({kind})' if kind else ''}: {PAIRS[pair]['title']}\n\n"
                         f"Config: `{PAIRS[pair]['config']}`.\n\n{table(runs, metric)}"
                         for pair, runs in chosen.items())
    start = ("students warmed up by SFT on gold for " + f"{args.warm} steps (" + "; ".join(
        f"{PAIRS[p]['title'].split(' (')[0]}: {score:.3f}" for p, (_, score) in starts.items()) + "), each run "
             "going on from that student") if warm else "fresh students at 0.000"
    setting = PAIRS[args.pairs[0]]["setting"].format(teacher=f"teacher {teacher_score(args.pairs[0], warm)}",
                                                     start=start)
    on_task = "" if task == "arithmetic" else f" on the `{task}` task"
    text = f"""## Leaderboard{' from warm students' if warm else ''}{on_task}{at_lr}

Command: `.venv/bin/python -m benchmarks.leaderboard --pairs {' '.join(args.pairs)} --steps {args.steps} \
--seeds {' '.join(map(str, args.seeds))}{f' --warm {args.warm}' if warm else ''}{f' --lr {args.lr:g}' if at_lr else ''}`.
Runs dated {', '.join(dates)}. Machine: {machine()}; runs {args.parallel} at a time, one thread each, fp32.
Setting: {setting}
with only the loss changed{f" and every run's learning rate {args.lr:g}" if at_lr else ""}, {args.steps} optimizer
steps, default hyperparameters of each loss. Diagnostics are
means over each run's last 50 logged steps, averaged over seeds (– where a loss has no teacher distribution to
compare). Coverage is the share of student positions the aligner gives a target. Rows `sampled_token+<credit>` are
`sampled_token` with that credit scheme.

{tables}

![{name}]({name}.png)

Each run's own numbers (score, wall time, diagnostics): `benchmarks/{runs_csv.name}`."""
    print(text)
    record(text, name)


def write_runs(path: Path, columns: list[str], done: dict) -> None:
    """Every recorded run (of any selection; not means) into the CSV kept with the code."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(done[k] for k in sorted(done))


def teacher_score(pair: str, warm: bool) -> str:
    """`pair`'s teacher's score as the tables state it: the cold-start arithmetic runs recorded were made with the
    teacher of their day (0.956); the others with today's teacher of the pair, scored once here (lm-eval on the test
    problems) and kept in `runs/leaderboard_warm/teacher_score.json` (arithmetic) or
    `runs/leaderboard_warm/teacher_score_<task>.json`."""
    spec = PAIRS[pair]
    if not warm and spec["task"] == "arithmetic":
        return "0.956"
    cache = per_task(WARM_ROOT / "teacher_score.json", spec["task"])
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"score": score_saved(spec["teacher"], spec["task"], spec["metric"])}))
    return f"{json.loads(cache.read_text())['score']:.3f}"


def score_saved(path: Path, task: str, metric: str, limit: int | None = None) -> float:
    """lm-eval's `metric` on `task` of the model saved in `path`, loaded as the library loads it."""
    from opd_lightning.evaluation import evaluate_model
    from opd_lightning.models import HFModel

    spec = HFModel(path=str(path))
    tokenizer = spec.load_tokenizer()
    return evaluate_model(spec.load_model(tokenizer), tokenizer, [task], limit=limit)[task][metric]


if __name__ == "__main__":
    main()
