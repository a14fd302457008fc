"""The size and the use of each optimizer step, on runs that fall and on runs that gain: does either warn first?

    .venv/bin/python -m benchmarks.step_size [--steps 40] [--seeds 0 1 2] [--parallel 2] [--no-run]

Every failure mode reproduced by `benchmarks/failure_modes.py` follows the learning rate (at a third of it none
falls), so a diagnostic of the step itself might warn before any score moves. Two are measured here, both opt-in
(`diagnostics.policy_shift_every`): `diag/policy_shift`, KL(before ‖ after) between the student's next-token
distributions on the step's own rollout before and after the optimizer step, and `diag/step_gain`, how much closer
that step brought the student to the teacher there (KL(before ‖ teacher) - KL(after ‖ teacher), reverse KL on the
teacher's dense target). Their ratio over a window of steps (gain per unit of shift) is the step's efficiency: a rate
too high for the run should move the policy far for little gain.

This script reruns the first `--steps` steps of runs already logged, with those diagnostics on every step and no
evaluation: the failure-mode variants that fall at the recipe's rate (0.003) and their runs at a third of it, and the
warm leaderboard's runs (same tokenizer) of four losses at the recipe's rate, which gain. The runs are deterministic
for a seed at one thread and the diagnostics draw no random numbers, so each rerun's training loss must equal its
logged run's step for step (checked, and stated in the table); what the logged run did later (its fall, or its gain)
is read from its logs (`benchmarks.guard_check`). Runs go to `runs/step_size/`; the block `step_size` in
benchmarks/RESULTS.md is written from them.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import failure_modes, leaderboard
from benchmarks.guard_check import failure_mode_runs, leaderboard_runs
from benchmarks.quickstart import machine, record

ROOT = Path("runs/step_size")
WINDOW = 10  # steps per window of the table
# (mode, variant) of `failure_modes.MODES`: the variants that fall at the recipe's rate, and the same at a third of it
FAILING = (("cancellation", "sampled_token"), ("cancellation", "topk_reverse_kl"), ("overlap", "char_teacher"),
           ("depth", "on_policy"), ("repetition", "sampled_token"))
LOW_RATE = (("cancellation", "sampled_token_lr"), ("overlap", "char_teacher_lr"), ("depth", "on_policy_lr"),
            ("repetition", "sampled_token_lr"))
GAINING = ("forward_kl", "reverse_kl", "sampled_token", "topk_reverse_kl")  # warm leaderboard, pair `same`, 0.003
FAILURE_STEPS, LEADERBOARD_STEPS = 600, 1000  # the logged runs' lengths (their schedules' total steps)


def jobs(seeds: list[int]) -> list[dict]:
    """Every rerun: its label, `opd fit` options (but length), the logged run it repeats and that run's length."""
    out = []
    for group, pairs in (("falls at 0.003", FAILING), ("a third of the rate", LOW_RATE)):
        for mode, variant in pairs:
            start = failure_modes.ROOT / failure_modes.MODES[mode]["start"] / "start" / "hf"
            for seed in seeds:
                out.append({"group": group, "run": f"{mode}/{variant}/seed_{seed}", "total": FAILURE_STEPS,
                            "args": failure_modes.run_args(mode, variant, seed, start),
                            "logged": failure_modes.ROOT / mode / variant / f"seed_{seed}"})
    start = leaderboard.WARM_ROOT / "same" / "start" / "hf"
    for loss in GAINING:
        for seed in seeds:
            out.append({"group": "warm leaderboard", "run": f"same/{loss}/seed_{seed}", "total": LEADERBOARD_STEPS,
                        "args": leaderboard.run_args("same", loss, seed, start),
                        "logged": leaderboard.WARM_ROOT / "same" / loss / f"seed_{seed}"})
    return out


def rerun(job: dict, steps: int) -> str | None:
    """The job's first `steps` steps into `ROOT/<run>`, diagnostics of the step on every step; an error or None."""
    out = ROOT / job["run"]
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-m", "opd_lightning", "fit", *job["args"], "--model.diagnostics.policy_shift_every", "1",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.limit_val_batches", "0", "--model.scheduler.init_args.total_steps", str(job["total"]),
            "--trainer.default_root_dir", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    return done.stderr[-2000:] if done.returncode else None


def metrics(run: Path, names: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """`{name: {step: value}}` of a run's metrics.csv."""
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    return {name: {int(r["step"]): float(r[name]) for r in rows if r.get(name)} for name in names}


def summary(job: dict, steps: int) -> dict:
    """A rerun's windows (mean shift, efficiency) and whether its losses equal its logged run's."""
    mine = metrics(ROOT / job["run"], ("train/loss", "diag/policy_shift", "diag/step_gain"))
    logged = metrics(job["logged"], ("train/loss",))["train/loss"]
    losses = mine["train/loss"]
    agree = sum(abs(v - logged.get(s, float("nan"))) <= 1e-6 * max(1.0, abs(v)) for s, v in losses.items())
    shift, gain = mine["diag/policy_shift"], mine["diag/step_gain"]
    windows = []
    for lo in range(0, steps, WINDOW):
        s = [shift[t] for t in range(lo, lo + WINDOW) if t in shift]
        g = [gain[t] for t in range(lo, lo + WINDOW) if t in gain]
        windows.append((statistics.mean(s) if s else float("nan"), sum(g) / sum(s) if g and sum(s) else float("nan")))
    return {"agree": agree, "steps": len(losses), "windows": windows}


def outcomes() -> dict[str, str]:
    """What each logged run did after the steps rerun here: the step its fall was first seen, or how it ended."""
    out = {}
    for r in failure_mode_runs():
        out[r["run"]] = "never falls" if r["fall"] is None else f"falls, seen at step {r['fall']}"
    for r in leaderboard_runs(root=leaderboard.WARM_ROOT):
        out[r["run"]] = {"up": "gains", "down": "falls", "level": "level"}[r["moved"]] + " (by step 1000)"
    return out


def table(results: list[dict], steps: int) -> str:
    spans = [f"{lo}-{lo + WINDOW - 1}" for lo in range(0, steps, WINDOW)]
    heads = " | ".join([*(f"shift, steps {s}" for s in spans), *(f"efficiency, steps {s}" for s in spans)])
    lines = [f"| group | run | what the logged run did | losses equal to the logged run's | {heads} |",
             "|---|---|---|---|" + "---|" * (2 * len(spans))]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['group']} | {r['run']} | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        shift = " | ".join(f"{s:.3f}" for s, _ in r["windows"])
        eff = " | ".join(f"{e:.2f}" for _, e in r["windows"])
        lines.append(f"| {r['group']} | {r['run']} | {r['outcome']} | {r['agree']}/{r['steps']} | {shift} | {eff} |")
    return "\n".join(lines)


def spread(results: list[dict], steps: int) -> str:
    """Per group, the range over its runs of the first window's shift and of the efficiency over all windows."""
    lines = []
    for group in dict.fromkeys(r["group"] for r in results):
        ok = [r for r in results if r["group"] == group and "windows" in r]
        if not ok:
            continue
        first = [r["windows"][0][0] for r in ok]
        late = [s for r in ok for s, _ in r["windows"][1:]]
        eff = [e for r in ok for _, e in r["windows"]]
        lines.append(f"- {group} ({len(ok)} runs): first-window shift {min(first):.3f}-{max(first):.3f}; later "
                     f"windows' shift {min(late, default=float('nan')):.3f}-{max(late, default=float('nan')):.3f}; "
                     f"efficiency {min(eff):.2f}-{max(eff):.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--no-run", action="store_true", help="only write the table of the reruns in runs/step_size")
    args = parser.parse_args(argv)
    todo = jobs(args.seeds)
    missing = [j["run"] for j in todo if not (j["logged"] / "logs" / "version_0" / "metrics.csv").exists()]
    if missing:
        raise SystemExit(f"no logged run to repeat for {', '.join(missing)}: run benchmarks.failure_modes and "
                         "benchmarks.leaderboard --warm first")
    if not args.no_run:
        with ThreadPoolExecutor(args.parallel) as pool:
            for job, error in zip(todo, pool.map(lambda j: rerun(j, args.steps), todo), strict=True):
                print(job["run"], "failed" if error else "done", flush=True)
                if error:
                    job["error"] = error
    done = outcomes()
    results = [{**j, "outcome": done.get(j["run"], "not judged")} if "error" in j else
               {**j, **summary(j, args.steps), "outcome": done.get(j["run"], "not judged")} for j in todo]
    section = (f"### The step's size and use, on runs that fall and runs that gain\n\nCommand: `.venv/bin/python -m "
               f"benchmarks.step_size --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}`. Date: "
               f"{datetime.date.today()}. Machine: {machine()}; one thread per run, fp32.\n"
               f"The first {args.steps} steps of each logged run again, `diag/policy_shift` and `diag/step_gain` on "
               f"every step, no evaluation. Windows of {WINDOW} steps.\n\n{table(results, args.steps)}\n\n"
               f"{spread(results, args.steps)}")
    print(section)
    record(section, "step_size")


if __name__ == "__main__":
    main()
