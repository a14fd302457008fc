"""The size and the use of each optimizer step, on runs that fall and on runs that gain: does either warn first?

    .venv/bin/python -m benchmarks.step_size [--steps 40] [--seeds 0 1 2] [--parallel 2] [--rerun] [--no-run] [--block B]
        [--limits L ...] [--groups G ...] [--losses L ...] [--root runs/step_size] [--no-record]

Every failure mode reproduced by `benchmarks/failure_modes.py` follows the learning rate (at a third of it none
falls), so a diagnostic of the step itself might warn before any score moves. Two are measured here, both opt-in
(`diagnostics.policy_shift_every`): `diag/policy_shift`, KL(before ‖ after) between the student's next-token
distributions on the step's own rollout before and after the optimizer step, and `diag/step_gain`, how much closer
that step brought the student to the teacher there (KL(before ‖ teacher) - KL(after ‖ teacher), reverse KL on the
teacher's dense target). Their ratio over a window of steps (gain per unit of shift) is the step's efficiency: a rate
too high for the run should move the policy far for little gain.

This script reruns the first `--steps` steps of the logged runs of the seeds asked for, with those diagnostics on
every step and no evaluation. The runs are the failure-mode variants that fall at the recipe's rate (0.003) and their
runs at a third of it, and every same-tokenizer warm-leaderboard run at 0.003 and at 0.001 (`leaderboard --lr`). A
rerun already in `runs/step_size/` is kept unless `--rerun`. The runs are deterministic for a seed at one thread,
and the diagnostics draw no random numbers, so each rerun's training loss must equal its logged run's step for step
(checked, and stated in the table). What the logged run did later is read from its logs (`benchmarks.guard_check`):
a failure-mode run's fall, or a leaderboard run's end and, where `benchmarks/early_dips.py` reran it with frequent
evaluations, its first fall to half its start. A second table judges limits on the shift's moving mean
(`watch.StepSize`, the rule `RolloutGuard(step_size=...)` applies) against those falls. The block `step_size` (or
`--block`) in benchmarks/RESULTS.md is written from them. `--groups` and `--losses` pick runs; `--root` keeps reruns of
another length apart (`--steps 1000 --root runs/step_size_whole`: whole runs, where the rule may act after the first
40 steps), and their table's windows then span a quarter of the steps each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import early_dips, failure_modes, leaderboard
from benchmarks.failure_modes import series
from benchmarks.guard_check import failure_mode_runs, leaderboard_runs
from benchmarks.quickstart import machine, record
from opd_lightning.watch import crossing

ROOT = Path("runs/step_size")
WINDOW = 10  # steps per window of the table
# (mode, variant) of `failure_modes.MODES`: the variants that fall at the recipe's rate, and the same at a third of it
FAILING = (("cancellation", "sampled_token"), ("cancellation", "topk_reverse_kl"), ("overlap", "char_teacher"),
           ("depth", "on_policy"), ("repetition", "sampled_token"))
LOW_RATE = (("cancellation", "sampled_token_lr"), ("overlap", "char_teacher_lr"), ("depth", "on_policy_lr"),
            ("repetition", "sampled_token_lr"))
SHOWN = ("forward_kl", "reverse_kl", "sampled_token", "topk_reverse_kl")  # warm-leaderboard losses in the run table
RATES = (None, 0.001)  # the warm leaderboard's runs at the recipe's rate (0.003) and at `leaderboard --lr 0.001`
LIMITS = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06)  # nats per step: the shift limits judged (a moving mean of
# `SHIFT_WINDOW` steps)
SHIFT_WINDOW = 5
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
    for lr in RATES:
        root = early_dips.logged_root(lr)
        losses = sorted({e["loss"] for e in json.loads((root / "results.json").read_text()) if e["pair"] == "same"})
        options = () if lr is None else ("--model.optimizer.init_args.lr", f"{lr:g}")
        for loss in losses:
            for seed in seeds:
                out.append({"group": f"warm leaderboard at {'0.003' if lr is None else f'{lr:g}'}",
                            "run": f"same{early_dips.suffix(lr)}/{loss}/seed_{seed}", "total": LEADERBOARD_STEPS,
                            "args": leaderboard.run_args("same", loss, seed, start, options), "lr": lr,
                            "loss": loss, "seed": seed, "logged": root / "same" / loss / f"seed_{seed}"})
    return out


def rerun(job: dict, steps: int, root: Path | None = None) -> str | None:
    """The job's first `steps` steps into `root/<run>`, diagnostics of the step on every step; an error or None."""
    out = (root or ROOT) / job["run"]
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-m", "opd_lightning", "fit", *job["args"], "--model.diagnostics.policy_shift_every", "1",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.limit_val_batches", "0", "--model.scheduler.init_args.total_steps", str(job["total"]),
            "--trainer.default_root_dir", str(out)]
    finished = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              check=False)
    return finished.stderr[-2000:] if finished.returncode else None


def window(steps: int) -> int:
    """Steps per window of the table: `WINDOW` over the first 40 steps, a quarter of the steps beyond."""
    return WINDOW if steps <= 4 * WINDOW else steps // 4


def summary(job: dict, steps: int, root: Path | None = None) -> dict:
    """A rerun's windows (mean shift, efficiency) and whether its losses equal its logged run's."""
    version = (root or ROOT) / job["run"] / "logs" / "version_0"
    agree, logged_steps = early_dips.loss_agreement(version, job["logged"] / "logs" / "version_0")
    shift, gain = (dict(values) for values in series(version, ("diag/policy_shift", "diag/step_gain")).values())
    windows, size = [], window(steps)
    for lo in range(0, steps, size):
        s = [shift[t] for t in range(lo, lo + size) if t in shift]
        g = [gain[t] for t in range(lo, lo + size) if t in gain]
        windows.append((statistics.mean(s) if s else float("nan"), sum(g) / sum(s) if g and sum(s) else float("nan")))
    return {"agree": agree, "steps": logged_steps, "windows": windows, "shift": sorted(shift.items())}


def done(job: dict, steps: int, root: Path | None = None) -> bool:
    """Whether the job's rerun is in `root` already, with the step's diagnostics on each of `steps` steps."""
    try:
        return len(series((root or ROOT) / job["run"] / "logs" / "version_0", ("diag/policy_shift",))["diag/policy_shift"]) == steps
    except OSError:
        return False


def outcomes(jobs_: list[dict]) -> dict[str, dict]:
    """What each logged run did after the steps rerun here, by rerun: its text for the table and the step its score
    is first seen to fall (a failure-mode run: more than `DROP` below its start; a leaderboard run rerun by
    `benchmarks.early_dips`: to half its start or below), or None."""
    out = {}
    for r in failure_mode_runs():
        out[r["run"]] = {"text": "never falls" if r["fall"] is None else f"falls, seen at step {r['fall']}",
                         "fall": r["fall"]}
    for lr in RATES:
        for r in leaderboard_runs(root=early_dips.logged_root(lr)):
            if r["pair"] != "same":
                continue
            loss, seed = r["run"].split("/")[1], int(r["run"].rsplit("_", 1)[1])
            ended = {"up": "gains", "down": "falls", "level": "level"}[r["moved"]] + " by step 1000"
            try:
                half = early_dips.halved(early_dips.read(loss, seed, lr)["history"])
            except OSError:  # not rerun by early_dips: its early scores unknown
                out[f"same{early_dips.suffix(lr)}/{loss}/seed_{seed}"] = {"text": ended, "fall": None, "early": False}
                continue
            text = f"{ended}; {'at half its start by step ' + str(half) if half else 'never at half its start'}"
            out[f"same{early_dips.suffix(lr)}/{loss}/seed_{seed}"] = {"text": text, "fall": half, "early": True,
                                                                      "moved": r["moved"]}
    return out


def rule_table(results: list[dict], limits: tuple[float, ...] = LIMITS) -> str:
    """For each shift limit, per group: the runs the rule acts on within the steps rerun, and on how many of those
    whose score is first seen to fall later (`outcomes`) it acts before that."""
    groups = list(dict.fromkeys(r["group"] for r in results))
    lines = ["| `policy_shift` limit (moving mean of " + f"{SHIFT_WINDOW} steps) | "
             + " | ".join(f"{g}: acts on / runs | {g}: acts before the fall / falls" for g in groups) + " |",
             "|---|" + "---|---|" * len(groups)]
    for limit in limits:
        cells = []
        for group in groups:
            ok = [r for r in results if r["group"] == group and "shift" in r]
            acts = {r["run"]: crossing(r["shift"], limit, "max", 1, window=SHIFT_WINDOW) for r in ok}
            falls = [r for r in ok if r["fall"] is not None]
            early = sum(acts[r["run"]] is not None and acts[r["run"]] < r["fall"] for r in falls)
            steps = sorted(a for a in acts.values() if a is not None)
            at = f" (steps {steps[0]}-{steps[-1]})" if steps else ""
            cells.append(f"{sum(a is not None for a in acts.values())}/{len(ok)}{at} | {early}/{len(falls)}")
        lines.append(f"| {limit:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: list[dict], steps: int) -> str:
    spans = [f"{lo}-{lo + window(steps) - 1}" for lo in range(0, steps, window(steps))]
    heads = " | ".join([*(f"shift, steps {s}" for s in spans), *(f"efficiency, steps {s}" for s in spans)])
    lines = [f"| group | run | what the logged run did | losses equal to the logged run's | {heads} |",
             "|---|---|---|---|" + "---|" * (2 * len(spans))]
    for r in results:
        if r.get("loss", SHOWN[0]) not in SHOWN:  # the leaderboard's other losses: in the rule table only
            continue
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
    parser.add_argument("--rerun", action="store_true", help="run again the reruns already in runs/step_size")
    parser.add_argument("--block", default="step_size", help="the RESULTS.md block (another keeps other seeds' table)")
    parser.add_argument("--limits", type=float, nargs="+", default=list(LIMITS),
                        help="the shift limits the second table judges")
    parser.add_argument("--no-record", action="store_true", help="print the block only")
    parser.add_argument("--groups", nargs="+", default=None, help="only these groups' runs (e.g. 'warm leaderboard "
                                                                   "at 0.001')")
    parser.add_argument("--losses", nargs="+", default=None, help="only these warm-leaderboard losses")
    parser.add_argument("--root", type=Path, default=ROOT, help="where the reruns go")
    args = parser.parse_args(argv)
    todo = [j for j in jobs(args.seeds) if (j["logged"] / "logs" / "version_0" / "metrics.csv").exists()
            and (args.groups is None or j["group"] in args.groups)
            and (args.losses is None or j.get("loss") in args.losses)]
    if not todo:
        raise SystemExit("no logged run to repeat for these seeds: run benchmarks.failure_modes and "
                         "benchmarks.leaderboard --warm first")
    if not args.no_run:
        fresh = [j for j in todo if args.rerun or not done(j, args.steps, args.root)]
        print(f"{len(fresh)} runs to do", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            for job, error in zip(fresh, pool.map(lambda j: rerun(j, args.steps, args.root), fresh), strict=True):
                print(job["run"], "failed" if error else "done", flush=True)
                if error:
                    job["error"] = error
    ends = outcomes(todo)
    results = []
    for job in todo:
        end = ends.get(job["run"], {"text": "not judged", "fall": None})
        job = {**job, "outcome": end["text"], "fall": end["fall"], "early": end.get("early", True)}
        results.append(job if "error" in job else {**job, **summary(job, args.steps, args.root)})
    section = (f"### The step's size and use, on runs that fall and runs that gain\n\nCommand: `.venv/bin/python -m "
               f"benchmarks.step_size --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}"
               f"{'' if args.block == 'step_size' else f' --block {args.block}'}"
               f"{'' if args.limits == list(LIMITS) else ' --limits ' + ' '.join(f'{x:g}' for x in args.limits)}"
               f"{'' if args.groups is None else ' --groups ' + ' '.join(repr(g) for g in args.groups)}"
               f"{'' if args.losses is None else ' --losses ' + ' '.join(args.losses)}"
               f"{'' if args.root == ROOT else f' --root {args.root}'}`. Date: "
               f"{datetime.date.today()}. Machine: {machine()}; one thread per run, fp32.\n"
               f"The first {args.steps} steps of each logged run again, `diag/policy_shift` and `diag/step_gain` on "
               f"every step, no evaluation. Windows of {window(args.steps)} steps; of the warm leaderboard's losses, "
               f"{', '.join(f'`{loss}`' for loss in SHOWN)} (every loss is in the second table). A leaderboard run's "
               f"early scores are those of `benchmarks/early_dips.py`'s rerun of it.\n\n{table(results, args.steps)}"
               f"\n\n{spread(results, args.steps)}\n\nA limit on `diag/policy_shift` (a moving mean of {SHIFT_WINDOW} "
               f"steps above it) judged on every rerun: where it acts within the {args.steps} steps, and before which "
               f"falls (a failure-mode run: its first evaluation more than {failure_modes.DROP} below its start; a "
               f"leaderboard run: its first at half its start or below).\n\n{rule_table(results, tuple(args.limits))}")
    print(section)
    if not args.no_record:
        record(section, args.block)


if __name__ == "__main__":
    main()
