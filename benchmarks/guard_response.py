"""The gold-likelihood guard answering with a lower learning rate instead of a stop: does it spare the falls, and
what does it cost the runs it acts on that were going to gain?

    .venv/bin/python -m benchmarks.guard_response [--pair same] [--seeds 0 1 2] [--response lower cool]
        [--parallel 2] [--no-run] [--no-record]

`GoldRise` (`diag/gold_nll` risen 0.2 nats above its start) acts before most of the cancellation mode's falls, and
also on most warm-leaderboard runs that go on to gain (RESULTS.md, block `guard_check_gold`): stopping on it would
end those. `RolloutGuard(gold_rise: {}, lr_factor: 0.333)` answers instead by cutting the learning rate to a third
(`failure_modes.GUARD_LR`, the response `lower`), or cools the run down: the same cut, climbing back to the
recipe's rate over `failure_modes.GUARD_RECOVER` steps (`lr_recover`; `GUARD_COOL`, the response `cool`). This script
judges each answer on two sets of runs:
- the cancellation mode (`benchmarks/failure_modes.py`, run there): `sampled_token` and `topk_reverse_kl` with and
  without the guard (either answer), and `sampled_token` at a third of the learning rate from the start, read from
  its CSV: how many seeds fall (an evaluation more than `DROP` below the start), the lowest and the final scores;
- the warm leaderboard: every recorded run of `--pair` and `--seeds` on whose logged gold NLL the rule acts, run
  again with the guard into `runs/leaderboard_warm_guard/` (`lower`) or `runs/leaderboard_warm_cool/` (`cool`)
  (a run it does not act on is the same run step for step: the guard only reads), against its recorded score.
Each guarded run's scores go into `benchmarks/guard_response_runs.csv`; `--no-run` tabulates the runs recorded there.
Writes one block into benchmarks/RESULTS.md unless `--no-record`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.failure_modes import (
    DROP,
    GUARD_COOL,
    GUARD_LR,
    GUARD_LR_FACTOR,
    GUARD_RECOVER,
    _label,
    falls,
    read_csv,
)
from benchmarks.guard_check import logged
from benchmarks.leaderboard import PAIRS, WARM_ROOT, eval_overlay, prepare, run, warm_student
from benchmarks.quickstart import machine, mean_sd, record
from opd_lightning.guards import GoldRise

# Each answer: the guard's option, where its runs go, and how the tables name it
RESPONSES = {"lower": (GUARD_LR, Path("runs/leaderboard_warm_guard"), "rate cut"),
             "cool": (GUARD_COOL, Path("runs/leaderboard_warm_cool"), f"rate cut for {GUARD_RECOVER} steps")}
RUNS_CSV = Path(__file__).with_name("guard_response_runs.csv")
COLUMNS = ("pair", "loss", "seed", "start_score", "acts_at", "score", "response", "guarded", "guard_step", "date")
WARM_STEPS = 300  # the warm leaderboard's start (`benchmarks.leaderboard --warm 300`)
STEPS = 1000
CANCELLATION = (("sampled_token", "`sampled_token`"), ("sampled_token_guard", "`sampled_token` with the guard"),
                ("sampled_token_lr", "`sampled_token` at a third of the learning rate from the start"),
                ("sampled_token_cool", f"`sampled_token` with the guard, its cut undone over {GUARD_RECOVER} steps"),
                ("topk_reverse_kl", "`topk_reverse_kl`"), ("topk_reverse_kl_guard", "`topk_reverse_kl` with the guard"),
                ("topk_reverse_kl_cool", f"`topk_reverse_kl` with the guard, its cut undone over {GUARD_RECOVER} steps"))


def cancellation_table() -> str:
    """The cancellation mode's variants, with and without the guard, from `failure_modes`' CSV."""
    runs = [r for r in read_csv() if r["mode"] == "cancellation"]
    lines = ["| run | seeds | fall (more than 0.05 below the start) | guard acts at step | lowest score | final score |",
             "|---|---|---|---|---|---|"]
    for variant, label in CANCELLATION:
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        if not mine:
            continue
        fell, lows, ends, acts = 0, [], [], []
        for r in mine:
            scores = [s for _, s in r["history"]]
            fell += falls(r) is not None
            lows.append(min(scores))
            ends.append(scores[-1])
            step = r["crossing"].get(_label(GoldRise.metric, None, "rise"))
            acts.append("never" if step is None else str(step))
        lines.append(f"| {label} | {', '.join(str(r['seed']) for r in mine)} | {fell} of {len(mine)} | "
                     f"{', '.join(acts)} | {mean_sd(lows)} | {mean_sd(ends)} |")
    return "\n".join(lines)


def gold_step(version: Path) -> int | None:
    """The step `GoldRise` (at its defaults) acts at on a run's logged gold NLL, or None."""
    return GoldRise().crossing(logged(version)[0].get(GoldRise.metric, []))


def acted_on(pair: str, seeds: list[int]) -> list[dict]:
    """The recorded warm runs of `pair` and `seeds` whose logged gold NLL `GoldRise` acts on, with that step."""
    out = []
    for entry in json.loads((WARM_ROOT / "results.json").read_text()):
        if entry["pair"] != pair or entry["seed"] not in seeds or "score" not in entry:
            continue
        version = WARM_ROOT / pair / entry["loss"] / f"seed_{entry['seed']}" / "logs" / "version_0"
        if not (version / "metrics.csv").exists():
            continue
        if (step := gold_step(version)) is not None:
            out.append({**entry, "acts_at": step})
    return sorted(out, key=lambda e: (e["loss"], e["seed"]))


def guarded(pair: str, entry: dict, start: tuple[Path, float], response: str) -> dict:
    """`entry`'s run again with the guard answering by `response`: its score, and the step the guard acted at read
    from its logs."""
    option, root, _ = RESPONSES[response]
    result = run(pair, entry["loss"], entry["seed"], STEPS, root, start, (option,))
    if "score" not in result:
        raise SystemExit(f"{entry['loss']} seed {entry['seed']} failed:\n{result['error']}")
    version = root / pair / entry["loss"] / f"seed_{entry['seed']}" / "logs" / "version_0"
    return {**entry, "response": response, "guarded": result["score"], "guard_step": gold_step(version),
            "date": result["date"]}


def recorded() -> list[dict]:
    """Every row of `RUNS_CSV` as written (strings), a row without a response read as `lower`, the first one
    measured."""
    rows = list(csv.DictReader(RUNS_CSV.open())) if RUNS_CSV.exists() else []
    return [{**r, "response": r.get("response") or "lower"} for r in rows]


def read_runs(pair: str, seeds: list[int]) -> list[dict]:
    """The guarded runs recorded in `RUNS_CSV` for `pair` and `seeds`."""
    rows = [r for r in recorded() if r["pair"] == pair and int(r["seed"]) in seeds]
    return [{**r, "seed": int(r["seed"]), "acts_at": int(r["acts_at"]), "start_score": float(r["start_score"]),
             "score": float(r["score"]), "guarded": float(r["guarded"]),
             "guard_step": int(r["guard_step"]) if r["guard_step"] else None} for r in rows]


def write_runs(results: list[dict]) -> None:
    """`results` into `RUNS_CSV`, beside the recorded runs of other pairs, seeds and answers."""
    mine = {(r["pair"], r["loss"], r["seed"], r["response"]) for r in results}
    kept = [r for r in recorded() if (r["pair"], r["loss"], int(r["seed"]), r["response"]) not in mine]
    with RUNS_CSV.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([*kept, *results])


def leaderboard_table(results: list[dict]) -> str:
    """Per loss, the recorded score of the runs the rule acts on and each answer's score and change; then, per answer,
    every run it was measured on."""
    answers = [a for a in RESPONSES if any(r["response"] == a for r in results)]
    lines = ["| loss | seeds acted on | acts at step | start | recorded score | "
             + " | ".join(f"{RESPONSES[a][2]}: score | change" for a in answers) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(answers)]
    for loss in sorted({r["loss"] for r in results}):
        runs = {r["seed"]: r for r in results if r["loss"] == loss}  # one per seed: the recorded side
        seeds = sorted(runs)
        cells = []
        for answer in answers:
            mine = [r for r in results if r["loss"] == loss and r["response"] == answer]
            change = [r["guarded"] - r["score"] for r in mine]
            cells.append(f"{mean_sd([r['guarded'] for r in mine])} | {statistics.mean(change):+.3f}" if mine
                         else "– | –")
        lines.append(f"| `{loss}` | {', '.join(map(str, seeds))} | {', '.join(str(runs[s]['acts_at']) for s in seeds)}"
                     f" | {runs[seeds[0]]['start_score']:.3f} | {mean_sd([runs[s]['score'] for s in seeds])} | "
                     + " | ".join(cells) + " |")
    for answer in answers:
        mine = [r for r in results if r["response"] == answer]
        change = [r["guarded"] - r["score"] for r in mine]
        cells = ["– | –"] * len(answers)
        cells[answers.index(answer)] = (f"{mean_sd([r['guarded'] for r in mine])} | {statistics.mean(change):+.3f} "
                                        f"(higher on {sum(c > 0 for c in change)}, lower on "
                                        f"{sum(c < 0 for c in change)}, more than 0.05 lower on "
                                        f"{sum(c < -DROP for c in change)})")
        lines.append(f"| every run acted on, {RESPONSES[answer][2]} | {len(mine)} runs | | | "
                     f"{mean_sd([r['score'] for r in mine])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="same")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--response", nargs="+", choices=sorted(RESPONSES), default=["lower"],
                        help="the guard's answers to run (the table shows every answer recorded)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--no-run", action="store_true", help="tabulate the guarded runs already made")
    parser.add_argument("--no-record", action="store_true", help="print the block only")
    args = parser.parse_args(argv)
    if not args.no_run:
        entries = acted_on(args.pair, args.seeds)
        start = warm_student(args.pair, WARM_STEPS)
        jobs = [(e, answer) for answer in args.response for e in entries]
        for answer in args.response:
            prepare(RESPONSES[answer][1], eval_overlay(task=PAIRS[args.pair]["task"]), args.pair)
        print(f"{len(jobs)} runs to do", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            for result in pool.map(lambda job: guarded(args.pair, job[0], start, job[1]), jobs):
                write_runs([result])  # run by run: an interrupted invocation keeps what it ran
                print(json.dumps({k: result.get(k) for k in ("loss", "seed", "response", "acts_at", "score",
                                                              "guarded", "guard_step")}), flush=True)
    results = read_runs(args.pair, args.seeds)
    dates = ", ".join(sorted({r["date"] for r in results}))
    text = f"""### The gold-likelihood guard lowering the learning rate (block `guard_response`)

Command: `.venv/bin/python -m benchmarks.guard_response --pair {args.pair} --seeds {' '.join(map(str, args.seeds))} \
--response {' '.join(a for a in RESPONSES if any(r["response"] == a for r in results))}` (the cancellation mode's
runs: `.venv/bin/python -m benchmarks.failure_modes --modes cancellation --seeds 0 1 2 3 4 5 6 --steps 600`).
Runs dated {dates}. Machine: {machine()}; one thread per run, fp32.
The guard: `RolloutGuard(gold_rise: {{}}, lr_factor: {GUARD_LR_FACTOR:g})`, `GoldRise` at its defaults; when it
acts, every learning rate and its schedule's peak are multiplied by {GUARD_LR_FACTOR:g} (the rate cut). With
`lr_recover: {GUARD_RECOVER}` as well (the rate cut for {GUARD_RECOVER} steps), the rate climbs back linearly to the
recipe's over the next {GUARD_RECOVER} steps.

The cancellation mode (600 steps from the student at 0.196, scored every 10 steps; mean ± sd over seeds):

{cancellation_table()}

The warm leaderboard ({PAIRS[args.pair]['title']}; {STEPS} steps from the student after {WARM_STEPS} steps of SFT),
every run of seeds {', '.join(map(str, args.seeds))} the rule acts on, run again with the guard:

{leaderboard_table(results)}"""
    print(text)
    if not args.no_record:
        record(text, "guard_response")


if __name__ == "__main__":
    main()
