"""Do the warm leaderboard's gaining runs dip first? Their first steps again, scored every few steps.

    .venv/bin/python -m benchmarks.early_dips [--steps 100] [--eval-every 10] [--seeds 0 1 2] [--lr 0.001]
        [--parallel 2] [--rerun] [--no-run]

`benchmarks/guard_check.py` counts an alarm on a warm-leaderboard run that ends above its start as a false one: those
runs are scored at their start and end only. The failure modes' sampled-token runs also end above their start
(`benchmarks/failure_modes.py`, cancellation mode), after a fall in their first 30 steps that only their frequent
evaluations show. So an alarm on a gaining run may come before a dip nobody scored. This script reruns the first
`--steps` steps of every same-tokenizer warm-leaderboard run at the recipe's rate (`runs/leaderboard_warm/same`) with
lm-eval every `--eval-every` steps (the start included), and sets each run's early scores beside the step at which
the gold-likelihood rule (`GoldRise`) and the drift rule act on its logged run. The runs are deterministic for a seed
at one thread, and scoring does not change the training (each rerun's training loss is checked against its logged
run's, step by step, and the start score against the leaderboard's). Runs go to `runs/early_dips/`; the block
`early_dips` in benchmarks/RESULTS.md is written from them. With `--lr`, the runs of the leaderboard at that learning
rate (`benchmarks.leaderboard --lr`) instead, into `runs/early_dips_lr<lr>/` and the block `early_dips_lr<lr>`.
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

from benchmarks import leaderboard
from benchmarks.failure_modes import DROP, series
from benchmarks.guard_check import RULES, GoldRule, JointRule, leaderboard_runs
from benchmarks.quickstart import machine, record

ROOT = Path("runs/early_dips")
PAIR = "same"
TOTAL = 1000  # the logged runs' length (their schedules' total steps)


def suffix(lr: float | None) -> str:
    """What the leaderboard appends to its folder (and this script to its own and its block) for a learning rate."""
    return "" if lr is None else f"_lr{lr:g}"


def logged_root(lr: float | None) -> Path:
    return leaderboard.WARM_ROOT.with_name(leaderboard.WARM_ROOT.name + suffix(lr))


def out_root(lr: float | None) -> Path:
    return ROOT.with_name(ROOT.name + suffix(lr))


def rerun(loss: str, seed: int, steps: int, every: int, lr: float | None = None) -> dict:
    """The logged run's first `steps` steps, scored every `every` steps; its scores and loss agreement, or an error."""
    out = out_root(lr) / loss / f"seed_{seed}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    overlay = out / "overlay.yaml"
    overlay.write_text(leaderboard.eval_overlay(task=leaderboard.PAIRS[PAIR]["task"], on_fit_start=True))
    options = () if lr is None else ("--model.optimizer.init_args.lr", f"{lr:g}")  # as `leaderboard --lr` gives it
    args = leaderboard.run_args(PAIR, loss, seed, leaderboard.WARM_ROOT / PAIR / "start" / "hf", options)
    args[2:2] = ["--config", str(overlay)]  # after the pair's config, as the logged run had its own
    command = [sys.executable, "-m", "opd_lightning", "fit", *args, "--trainer.max_steps", str(steps),
               "--trainer.val_check_interval", str(every), "--model.scheduler.init_args.total_steps", str(TOTAL),
               "--trainer.default_root_dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    key = {"loss": loss, "seed": seed}
    if done.returncode:
        return {**key, "error": done.stderr[-2000:]}
    return {**key, **read(loss, seed, lr)}


def loss_agreement(version: Path, logged: Path) -> tuple[int, int]:
    """(steps whose training loss equals the logged run's, steps logged) of a rerun's logs `version` against the
    logged run's `logged` (both `logs/version_0` folders)."""
    mine, theirs = (dict(series(v, ("train/loss",))["train/loss"]) for v in (version, logged))
    return sum(abs(v - theirs.get(s, float("nan"))) <= 1e-6 * max(1.0, abs(v)) for s, v in mine.items()), len(mine)


def read(loss: str, seed: int, lr: float | None = None) -> dict:
    """A rerun's score history and whether its training losses equal its logged run's."""
    version = out_root(lr) / loss / f"seed_{seed}" / "logs" / "version_0"
    metric = leaderboard.PAIRS[PAIR]["metric"]
    task = leaderboard.PAIRS[PAIR]["task"]
    history = [(e["step"], e["results"][task][metric]) for e in
               map(json.loads, (version / "eval_history.jsonl").read_text().splitlines()) if e["model"] == "student"]
    agree, steps = loss_agreement(version, logged_root(lr) / PAIR / loss / f"seed_{seed}" / "logs" / "version_0")
    return {"history": history, "agree": agree, "steps": steps}


def acts(lr: float | None = None) -> dict[str, dict]:
    """Per logged run (`<loss>/seed_<n>`): how it ended and the steps the gold-likelihood and drift rules act at."""
    gold = next(rule for rule in RULES if isinstance(rule, GoldRule))
    drift = next(rule for rule in RULES if isinstance(rule, JointRule))
    out = {}
    for run in leaderboard_runs(root=logged_root(lr)):
        if run["pair"] != PAIR:
            continue
        logs, off_policy = run["logs"]
        out[run["run"].removeprefix(f"{PAIR}/")] = {
            "moved": run["moved"], "gold": gold.acts_at(logs, off_policy) if gold.judges(logs, off_policy) else None,
            "drift": drift.acts_at(logs, off_policy) if drift.judges(logs, off_policy) else None}
    return out


def dip(history: list[tuple[int, float]]) -> int | None:
    """The first scored step more than `DROP` below the start, or None."""
    start = history[0][1]
    return next((step for step, score in history[1:] if score < start - DROP), None)


def halved(history: list[tuple[int, float]]) -> int | None:
    """The first scored step at or below half the start, or None."""
    start = history[0][1]
    return next((step for step, score in history[1:] if score <= start / 2), None)


def _step(step: int | None) -> str:
    return "–" if step is None else str(step)


def table(results: list[dict], judged: dict[str, dict], steps: int) -> str:
    head = ("| run | losses equal to the logged run's | start | lowest (step) | first more than "
            f"{DROP} below the start | first at half the start or below | end (step 1000) | gold-likelihood rule "
            "acts at | drift rule acts at |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = f"{r['loss']}/seed_{r['seed']}"
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].splitlines()[-1][:80]} | | | | | | | |")
            continue
        start = r["history"][0][1]
        low_step, low = min(r["history"][1:], key=lambda item: item[1])
        j = judged.get(name, {})
        lines.append(f"| {name} | {r['agree']}/{r['steps']} | {start:.3f} | {low:.3f} ({low_step}) | "
                     f"{_step(dip(r['history']))} | {_step(halved(r['history']))} | {j.get('moved', '?')} | "
                     f"{_step(j.get('gold'))} | {_step(j.get('drift'))} |")
    return "\n".join(lines)


def summary(results: list[dict], judged: dict[str, dict], steps: int) -> str:
    """How many runs dip, and where the gold-likelihood rule acts against the dips, among the runs that end up."""
    ok = [r for r in results if "history" in r]
    up = [r for r in ok if judged.get(f"{r['loss']}/seed_{r['seed']}", {}).get("moved") == "up"]
    lines = []
    for label, seen in ((f"more than {DROP} below the start", dip), ("at half the start or below", halved)):
        dipped = [r for r in up if seen(r["history"]) is not None]
        gold = [r for r in up if (s := judged[f"{r['loss']}/seed_{r['seed']}"]["gold"]) is not None and s <= steps]
        before = [r for r in gold if seen(r["history"]) is not None
                  and judged[f"{r['loss']}/seed_{r['seed']}"]["gold"] < seen(r["history"])]
        quiet = [r for r in up if seen(r["history"]) is None]
        acted_quiet = [r for r in quiet if r in gold]
        lines.append(f"- A dip {label} within the first {steps} steps: {len(dipped)} of the {len(up)} runs that end "
                     f"up. The gold-likelihood rule acts within those steps on {len(gold)} of them, before the dip on "
                     f"{len(before)}, and on {len(acted_quiet)} of the {len(quiet)} that do not dip so.")
    lows = [min(s for _, s in r["history"][1:]) - r["history"][0][1] for r in up]
    if lows:
        lines.append(f"- Lowest early score against the start, runs that end up: median {statistics.median(lows):+.3f}"
                     f", range {min(lows):+.3f} to {max(lows):+.3f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=None, help="default: every loss of the logged leaderboard")
    parser.add_argument("--lr", type=float, default=None, help="the leaderboard's runs at this learning rate")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--no-run", action="store_true", help="only write the table of the reruns in runs/early_dips")
    parser.add_argument("--rerun", action="store_true", help="run again the reruns already in runs/early_dips")
    args = parser.parse_args(argv)
    logged = json.loads((logged_root(args.lr) / "results.json").read_text())
    names = args.losses or sorted({e["loss"] for e in logged if e["pair"] == PAIR})
    jobs = [(loss, seed) for loss in names for seed in args.seeds  # those logged: their losses are compared
            if (logged_root(args.lr) / PAIR / loss / f"seed_{seed}" / "logs" / "version_0" / "metrics.csv").exists()]
    def kept(loss: str, seed: int) -> dict | None:  # a rerun already here, of these steps and evaluations
        try:
            result = {"loss": loss, "seed": seed, **read(loss, seed, args.lr)}
        except OSError:
            return None
        whole = [s for s, _ in result["history"]] == list(range(0, args.steps + 1, args.eval_every))
        return result if whole and result["steps"] == args.steps else None

    if args.no_run:
        results = [{"loss": loss, "seed": seed, **read(loss, seed, args.lr)} for loss, seed in jobs]
    else:
        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(lambda job: (None if args.rerun else kept(*job))
                                    or rerun(*job, args.steps, args.eval_every, args.lr), jobs))
    judged = acts(args.lr)
    rate = "0.003" if args.lr is None else f"{args.lr:g}"
    section = (f"### Early scores of the warm leaderboard's runs at {rate}\n\nCommand: `.venv/bin/python -m benchmarks.early_dips "
               f"--steps {args.steps} --eval-every {args.eval_every} --seeds {' '.join(map(str, args.seeds))}"
               f"{'' if args.lr is None else f' --lr {args.lr:g}'}`. Date: "
               f"{datetime.date.today()}. Machine: {machine()}; one thread per run, fp32.\n"
               f"The first {args.steps} steps of each run of `{logged_root(args.lr) / PAIR}` (learning rate {rate}) "
               f"again, lm-eval every {args.eval_every} steps; how each run ended and the steps the rules act at are "
               f"its logged run's.\n\n{table(results, judged, args.steps)}\n\n{summary(results, judged, args.steps)}")
    print(section)
    record(section, "early_dips" + suffix(args.lr))


if __name__ == "__main__":
    main()
