"""The loss-zoo leaderboard: every registered loss on the embedded gold task, same tokenizer, several seeds.

    .venv/bin/python -m benchmarks.leaderboard [--steps 1000] [--seeds 0 1 2] [--parallel 2]

Each run is the quickstart distillation (`configs/quickstart/distill.yaml`: the stage-1 teacher, the small fresh
student, λ = 0.5, batch 128) with only the loss swapped, for a fixed number of optimizer steps, then lm-eval's
exact match on the 500 test problems. `cross_entropy` is run as plain SFT on the gold completions (λ = 0), the
baseline that needs no teacher signal. Runs go `--parallel` at a time with one thread each; wall times are
comparable with each other only. Needs the quickstart teacher (`make demo` or `opd fit --config
configs/quickstart/teacher.yaml`). Writes the table and `benchmarks/leaderboard.png` into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from opd_lightning.losses import LOSSES

from benchmarks.quickstart import machine, record

ROOT = Path("runs/leaderboard")
TEACHER = Path("runs/quickstart/teacher/hf")
DIAGNOSTICS = ("diag/topk_overlap", "diag/logratio_mean", "diag/entropy_student", "diag/repetition_rate")
OVERLAY = """trainer:
  callbacks:
    - class_path: opd_lightning.evaluation.LmEvalCallback
      init_args: {tasks: [arithmetic]}
"""


def run(loss: str, seed: int, steps: int) -> dict:
    out = ROOT / loss / f"seed_{seed}"
    extra = ["--model.on_policy_fraction", "0.0"] if loss == "cross_entropy" else []
    args = [sys.executable, "-m", "opd_lightning", "fit", "--config", "configs/quickstart/distill.yaml",
            "--config", str(ROOT / "overlay.yaml"), "--model.loss", loss, "--seed_everything", str(seed),
            "--model.seed", str(seed), "--model.student.seed", str(seed), "--data.seed", str(seed),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--model.scheduler.init_args.total_steps", str(steps), "--trainer.default_root_dir", str(out), *extra]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        return {"loss": loss, "seed": seed, "error": done.stderr[-2000:], "wall_s": wall}
    version = out / "logs" / "version_0"
    history = [json.loads(line) for line in (version / "eval_history.jsonl").read_text().splitlines()]
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    diag = {}
    for name in DIAGNOSTICS:
        values = [float(r[name]) for r in rows if r.get(name)][-50:]  # mean of the last 50 logged steps
        diag[name] = statistics.mean(values) if values else float("nan")
    return {"loss": loss, "seed": seed, "wall_s": wall, "score": history[-1]["results"]["arithmetic"]["exact_match"],
            **diag}


def table(results: list[dict]) -> str:
    header = "| loss | exact match (mean ± std) | seeds | wall s/run | topk overlap | log-ratio | student entropy | repetition |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    by_loss: dict[str, list[dict]] = {}
    for r in results:
        by_loss.setdefault(r["loss"], []).append(r)
    order = sorted(by_loss, key=lambda k: -statistics.mean(r.get("score", 0.0) for r in by_loss[k]))
    for loss in order:
        ok = [r for r in by_loss[loss] if "score" in r]
        if not ok:
            lines.append(f"| {loss} | failed: {by_loss[loss][0]['error'].splitlines()[-1][:80]} | | | | | | |")
            continue
        scores = [r["score"] for r in ok]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        mean = {k: statistics.mean(r[k] for r in ok) for k in ("wall_s", *DIAGNOSTICS)}
        label = "cross_entropy (SFT on gold, λ = 0)" if loss == "cross_entropy" else loss
        lines.append(f"| {label} | {statistics.mean(scores):.3f} ± {std:.3f} | "
                     f"{', '.join(f'{s:.3f}' for s in scores)} | {mean['wall_s']:.0f} | "
                     f"{mean['diag/topk_overlap']:.3f} | {mean['diag/logratio_mean']:.3f} | "
                     f"{mean['diag/entropy_student']:.3f} | {mean['diag/repetition_rate']:.4f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_loss: dict[str, list[float]] = {}
    for r in results:
        if "score" in r:
            by_loss.setdefault(r["loss"], []).append(r["score"])
    names = sorted(by_loss, key=lambda k: -statistics.mean(by_loss[k]))
    fig = Figure(figsize=(9, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(names, [statistics.mean(by_loss[n]) for n in names],
           yerr=[statistics.stdev(by_loss[n]) if len(by_loss[n]) > 1 else 0 for n in names], capsize=4)
    for i, n in enumerate(names):
        ax.scatter([i] * len(by_loss[n]), by_loss[n], color="black", s=10, zorder=3)
    ax.set_ylabel("exact match (test, 500)")
    ax.set_title("Loss leaderboard: arithmetic, same tokenizer")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=sorted(LOSSES))
    args = parser.parse_args()
    if not (TEACHER / "config.json").exists():
        raise SystemExit(f"{TEACHER} is missing: run `make demo` (or the quickstart teacher stage) first")
    ROOT.mkdir(parents=True, exist_ok=True)
    (ROOT / "overlay.yaml").write_text(OVERLAY)
    jobs = [(loss, seed) for seed in args.seeds for loss in args.losses]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: run(*job, args.steps), jobs))
    (ROOT / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, Path(__file__).with_name("leaderboard.png"))
    text = f"""## Leaderboard

Command: `.venv/bin/python -m benchmarks.leaderboard --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}`.
Date: {datetime.date.today()}. Machine: {machine()}; runs two at a time, one thread each, fp32.
Setting: the quickstart distillation (teacher 0.956; fresh 134k-parameter student at 0.000; λ = 0.5; batch 128;
AdamW 3e-3) with only the loss changed, {args.steps} optimizer steps, default hyperparameters of each loss.
Diagnostics are means over each run's last 50 logged steps, averaged over seeds. Same-tokenizer rows only: the
cross-tokenizer rows need the cross-tokenizer aligners.

{table(results)}

![leaderboard](leaderboard.png)"""
    print(text)
    record(text, "leaderboard")


if __name__ == "__main__":
    main()
