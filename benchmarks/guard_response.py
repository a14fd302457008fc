"""The gold-likelihood guard answering with a lower learning rate instead of a stop: does it spare the falls, and
what does it cost the runs it acts on that were going to gain?

    .venv/bin/python -m benchmarks.guard_response [--pair same] [--seeds 0 1 2]
        [--response lower cool | shift | shift05 | shift40] [--lr 0.001] [--losses L ...] [--parallel 2] [--no-run]
        [--no-record]

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

`--response shift` (alone) judges the step-size rule's answer instead (block `shift_response`):
`RolloutGuard(step_size: {limit: 0.03, until: null}, lr_factor: 0.333)` (`failure_modes.SHIFT_LR`, with
`diag/policy_shift` measured on every step), on each failure mode's falling runs (their `_shift` variants, run by
`benchmarks/failure_modes.py`) beside the same runs without it and at a third of the rate from the start, and on
every warm-leaderboard run the rule acts on in `benchmarks/step_size.py`'s reruns of its first 40 steps (into
`runs/leaderboard_warm_shift/`), beside its recorded score and its score at a third of the rate from the start
(`leaderboard --warm 300 --lr 0.001`). `--response shift05` does the same at the limit of 0.05 (the `_shift05`
variants, block `shift05_response`), `--response shift40` at `StepSize`'s defaults (0.03 over the first 40 steps:
the `_shift40` variants, block `shift40_response`); their options: `failure_modes.SHIFT_GUARDS`. With `--lr 0.001`
the runs are the warm leaderboard's at that rate (`leaderboard --warm 300 --lr 0.001`), each answered by the cut to
a third of it (block `<answer>_response_lr0.001`).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.early_dips import logged_root, suffix
from benchmarks.failure_modes import (
    DROP,
    GUARD_COOL,
    GUARD_LR,
    GUARD_LR_FACTOR,
    GUARD_RECOVER,
    MODES,
    SHIFT_GUARDS,
    SHIFT_RULES,
    _label,
    falls,
    read_csv,
    series,
)
from benchmarks.failure_modes import (
    ROOT as FAILURE_ROOT,
)
from benchmarks.guard_check import logged
from benchmarks.leaderboard import PAIRS, WARM_CSV, eval_overlay, prepare, run, warm_student
from benchmarks.quickstart import machine, mean_sd, record
from opd_lightning.guards import GoldRise
from opd_lightning.watch import StepSize

# Each answer: the guard's options, where its runs go, and how the tables name it
RESPONSES = {"lower": ((GUARD_LR,), Path("runs/leaderboard_warm_guard"), "rate cut"),
             "cool": ((GUARD_COOL,), Path("runs/leaderboard_warm_cool"), f"rate cut for {GUARD_RECOVER} steps"),
             "shift": (tuple(SHIFT_GUARDS["shift"]), Path("runs/leaderboard_warm_shift"), "step-size rule's rate cut"),
             "shift05": (tuple(SHIFT_GUARDS["shift05"]), Path("runs/leaderboard_warm_shift05"),
                         "step-size rule's rate cut at limit 0.05"),
             "shift40": (tuple(SHIFT_GUARDS["shift40"]), Path("runs/leaderboard_warm_shift40"),
                         "step-size rule's rate cut, first 40 steps")}
SHIFT_ROOT = Path("runs/step_size")  # `benchmarks.step_size`'s reruns of the warm leaderboard's first steps
RUNS_CSV = Path(__file__).with_name("guard_response_runs.csv")
COLUMNS = ("pair", "loss", "seed", "start_score", "acts_at", "score", "response", "guarded", "guard_step", "date",
           "lr")  # lr: the runs' learning rate where not the recipe's (`leaderboard --lr`), else empty
WARM_STEPS = 300  # the warm leaderboard's start (`benchmarks.leaderboard --warm 300`)
STEPS = 1000
CANCELLATION = (("sampled_token", "`sampled_token`"), ("sampled_token_guard", "`sampled_token` with the guard"),
                ("sampled_token_lr", "`sampled_token` at a third of the learning rate from the start"),
                ("sampled_token_cool", f"`sampled_token` with the guard, its cut undone over {GUARD_RECOVER} steps"),
                ("topk_reverse_kl", "`topk_reverse_kl`"), ("topk_reverse_kl_guard", "`topk_reverse_kl` with the guard"),
                ("topk_reverse_kl_cool", f"`topk_reverse_kl` with the guard, its cut undone over {GUARD_RECOVER} steps"))


def failure_table(rows: tuple[tuple[str, str, str], ...], response: str, seeds: list[int] | None = None) -> str:
    """`(mode, variant, label)` rows of `failure_modes`' CSV (the seeds given, or all recorded), with the step at
    which the rule answered by `response` acts on each run: read from the CSV (`GoldRise`), or, for the step-size
    rule, from the run's own logs where they hold `diag/policy_shift`, else from `benchmarks.step_size`'s rerun of its
    first steps ("–": neither here): a guarded run's every act ("5+230": twice, the rate cut at each), a rerun's
    first."""
    runs = read_csv()
    lines = ["| run | seeds | fall (more than 0.05 below the start) | guard acts at step | lowest score | final score |",
             "|---|---|---|---|---|---|"]
    for mode, variant, label in rows:
        mine = sorted((r for r in runs if r["mode"] == mode and r["variant"] == variant
                       and (seeds is None or r["seed"] in seeds)), key=lambda r: r["seed"])
        if not mine:
            continue
        fell, lows, ends, acts = 0, [], [], []
        for r in mine:
            scores = [s for _, s in r["history"]]
            fell += falls(r) is not None
            lows.append(min(scores))
            ends.append(scores[-1])
            if response not in SHIFT_RULES:
                step = r["crossing"].get(_label(GoldRise.metric, None, "rise"))
            else:
                step = "–"
                for root in (FAILURE_ROOT, SHIFT_ROOT):
                    version = root / mode / variant / f"seed_{r['seed']}" / "logs" / "version_0"
                    if (version / "metrics.csv").exists() and (shifts := shift_series(version)):
                        watch = StepSize(**SHIFT_RULES[response]).watch()  # a guarded run's every act (its rate cut
                        # at each); a rerun's first
                        found = [str(s) for s, v in shifts if watch.observe(v)][: None if root == FAILURE_ROOT else 1]
                        step = "+".join(found) or None
                        break
            acts.append("never" if step is None else str(step))
        lines.append(f"| {label} | {', '.join(str(r['seed']) for r in mine)} | {fell} of {len(mine)} | "
                     f"{', '.join(acts)} | {mean_sd(lows)} | {mean_sd(ends)} |")
    return "\n".join(lines)


def cancellation_table() -> str:
    """The cancellation mode's variants, with and without the gold-likelihood guard, from `failure_modes`' CSV."""
    return failure_table(tuple(("cancellation", v, label) for v, label in CANCELLATION), "lower")


def shift_rows(response: str = "shift") -> tuple[tuple[str, str, str], ...]:
    """Each failure mode's falling runs at the recipe's rate, at a third of it, and with the step-size guard at the
    limit of `response` (its `_<response>` variants)."""
    out = []
    for mode, spec in MODES.items():
        for variant, (label, _) in spec["variants"].items():
            if variant.endswith(f"_{response}"):
                base = variant.removesuffix(f"_{response}")
                out += [(mode, base, f"{mode}: {spec['variants'][base][0]}")]
                if f"{base}_lr" in spec["variants"]:
                    out += [(mode, f"{base}_lr", f"{mode}: {spec['variants'][f'{base}_lr'][0]}")]
                out += [(mode, variant, f"{mode}: {label}")]
    return tuple(out)


def gold_step(version: Path) -> int | None:
    """The step `GoldRise` (at its defaults) acts at on a run's logged gold NLL, or None."""
    return GoldRise().crossing(logged(version)[0].get(GoldRise.metric, []))


def shift_series(version: Path) -> list[tuple[int, float]]:
    """A run's logged `diag/policy_shift` (empty where it did not measure it)."""
    return series(version, (StepSize.metric,))[StepSize.metric]


def shift_step(version: Path, rule: StepSize) -> int | None:
    """The step `rule` acts at on a run's logged `diag/policy_shift`, or None."""
    return rule.crossing(shift_series(version))


def rule_step(response: str, version: Path) -> int | None:
    """The step the rule answered by `response` acts at on a run's logs, or None."""
    return shift_step(version, StepSize(**SHIFT_RULES[response])) if response in SHIFT_RULES else gold_step(version)


def acted_on(pair: str, seeds: list[int], response: str = "lower", lr: float | None = None) -> list[dict]:
    """The recorded warm runs of `pair` and `seeds` (at the learning rate `lr`, `leaderboard --lr`, if given) the rule
    answered by `response` acts on, with that step: read on the run's own logs (`GoldRise` on its gold NLL), or, for
    the step-size rule, on `benchmarks.step_size`'s rerun of its first steps with `diag/policy_shift` logged (a run
    not rerun there is left out)."""
    out, logged_at = [], logged_root(lr)
    for entry in json.loads((logged_at / "results.json").read_text()):
        if entry["pair"] != pair or entry["seed"] not in seeds or "score" not in entry:
            continue
        root, folder = (SHIFT_ROOT, pair + suffix(lr)) if response in SHIFT_RULES else (logged_at, pair)
        version = root / folder / entry["loss"] / f"seed_{entry['seed']}" / "logs" / "version_0"
        if not (version / "metrics.csv").exists():
            continue
        if (step := rule_step(response, version)) is not None:
            out.append({**entry, "acts_at": step})
    return sorted(out, key=lambda e: (e["loss"], e["seed"]))


def guarded(pair: str, entry: dict, start: tuple[Path, float], response: str, lr: float | None = None) -> dict:
    """`entry`'s run again (at the learning rate `lr` if given) with the guard answering by `response`: its score,
    and the step the guard acted at read from its logs."""
    options, root, _ = RESPONSES[response]
    root = root.with_name(root.name + suffix(lr))
    rate = () if lr is None else ("--model.optimizer.init_args.lr", f"{lr:g}")
    result = run(pair, entry["loss"], entry["seed"], STEPS, root, start, (*rate, *options))
    if "score" not in result:
        raise SystemExit(f"{entry['loss']} seed {entry['seed']} failed:\n{result['error']}")
    version = root / pair / entry["loss"] / f"seed_{entry['seed']}" / "logs" / "version_0"
    return {**entry, "response": response, "guarded": result["score"], "guard_step": rule_step(response, version),
            "date": result["date"], "lr": "" if lr is None else f"{lr:g}"}


def recorded() -> list[dict]:
    """Every row of `RUNS_CSV` as written (strings), a row without a response read as `lower`, the first one
    measured."""
    rows = list(csv.DictReader(RUNS_CSV.open())) if RUNS_CSV.exists() else []
    return [{**r, "response": r.get("response") or "lower", "lr": r.get("lr") or ""} for r in rows]


def read_runs(pair: str, seeds: list[int], lr: float | None = None) -> list[dict]:
    """The guarded runs recorded in `RUNS_CSV` for `pair` and `seeds`, at the learning rate `lr` (None: the
    recipe's)."""
    rate = "" if lr is None else f"{lr:g}"
    rows = [r for r in recorded() if r["pair"] == pair and int(r["seed"]) in seeds and r["lr"] == rate]
    return [{**r, "seed": int(r["seed"]), "acts_at": int(r["acts_at"]), "start_score": float(r["start_score"]),
             "score": float(r["score"]), "guarded": float(r["guarded"]),
             "guard_step": int(r["guard_step"]) if r["guard_step"] else None} for r in rows]


def write_runs(results: list[dict]) -> None:
    """`results` into `RUNS_CSV`, beside the recorded runs of other pairs, seeds and answers."""
    results = [{**r, "lr": r.get("lr") or ""} for r in results]  # no rate given: the recipe's
    mine = {(r["pair"], r["loss"], r["seed"], r["response"], r["lr"]) for r in results}
    kept = [r for r in recorded() if (r["pair"], r["loss"], int(r["seed"]), r["response"], r["lr"]) not in mine]
    with RUNS_CSV.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([*kept, *results])


def leaderboard_table(results: list[dict], reference: dict[tuple[str, int], float] | None = None) -> str:
    """Per loss, the recorded score of the runs the rule acts on and each answer's score and change; then, per answer,
    every run it was measured on. With `reference` ((loss, seed) -> score), a last column: the same runs' scores
    under another setting (e.g. a third of the rate from the start), where recorded."""
    answers = [a for a in RESPONSES if any(r["response"] == a for r in results)]
    lines = ["| loss | seeds acted on | acts at step | start | recorded score | "
             + " | ".join(f"{RESPONSES[a][2]}: score | change" for a in answers)
             + (" | a third of the rate from the start: score |" if reference is not None else " |"),
             "|---|---|---|---|---|" + "---|---|" * len(answers) + ("---|" if reference is not None else "")]

    def ref(runs: list[dict]) -> str:
        found = [reference[(r["loss"], r["seed"])] for r in runs if (r["loss"], r["seed"]) in reference]
        return f" | {mean_sd(found)} ({len(found)} run{'s' * (len(found) != 1)})" if found else " | –"

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
                     + " | ".join(cells) + (ref(list(runs.values())) if reference is not None else "") + " |")
    for answer in answers:
        mine = [r for r in results if r["response"] == answer]
        change = [r["guarded"] - r["score"] for r in mine]
        cells = ["– | –"] * len(answers)
        cells[answers.index(answer)] = (f"{mean_sd([r['guarded'] for r in mine])} | {statistics.mean(change):+.3f} "
                                        f"(higher on {sum(c > 0 for c in change)}, lower on "
                                        f"{sum(c < 0 for c in change)}, more than 0.05 lower on "
                                        f"{sum(c < -DROP for c in change)})")
        lines.append(f"| every run acted on, {RESPONSES[answer][2]} | {len(mine)} runs | | | "
                     f"{mean_sd([r['score'] for r in mine])} | " + " | ".join(cells)
                     + (ref(mine) if reference is not None else "") + " |")
    return "\n".join(lines)


def low_rate_scores(pair: str) -> dict[tuple[str, int], float]:
    """(loss, seed) -> score of the warm leaderboard's runs at a third of the rate from the start (`leaderboard
    --warm 300 --lr 0.001`), from its CSV."""
    path = WARM_CSV.with_name(f"{WARM_CSV.stem}_lr0.001.csv")
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    return {(r["loss"], int(r["seed"])): float(r["score"]) for r in rows
            if r["pair"] == pair and int(r["steps"]) == STEPS and r["score"] not in ("", "nan")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="same")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--response", nargs="+", choices=sorted(RESPONSES), default=["lower"],
                        help="the guard's answers to run (the table shows every answer recorded; one of `shift`, "
                             "`shift05`, `shift40` alone: the step-size rule's block with those settings)")
    parser.add_argument("--losses", nargs="+", default=None, help="only these losses' runs (default: every one)")
    parser.add_argument("--lr", type=float, default=None,
                        help="the warm leaderboard's runs at this learning rate (`leaderboard --warm 300 --lr`; with "
                             "one step-size answer only): their own folders, CSV rows and block")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--no-run", action="store_true", help="tabulate the guarded runs already made")
    parser.add_argument("--no-record", action="store_true", help="print the block only")
    args = parser.parse_args(argv)
    shift = len(args.response) == 1 and args.response[0] in SHIFT_RULES
    if args.lr is not None and not shift:
        parser.error(f"--lr goes with one step-size answer ({', '.join(SHIFT_RULES)}): the gold-likelihood guard was "
                     "judged at the recipe's rate only")
    if not args.no_run:
        start = warm_student(args.pair, WARM_STEPS)
        jobs = [(e, answer) for answer in args.response for e in acted_on(args.pair, args.seeds, answer, args.lr)
                if args.losses is None or e["loss"] in args.losses]
        for answer in args.response:
            folder = RESPONSES[answer][1]
            prepare(folder.with_name(folder.name + suffix(args.lr)), eval_overlay(task=PAIRS[args.pair]["task"]),
                    args.pair)
        print(f"{len(jobs)} runs to do", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            for result in pool.map(lambda job: guarded(args.pair, job[0], start, job[1], args.lr), jobs):
                write_runs([result])  # run by run: an interrupted invocation keeps what it ran
                print(json.dumps({k: result.get(k) for k in ("loss", "seed", "response", "acts_at", "score",
                                                              "guarded", "guard_step")}), flush=True)
    results = read_runs(args.pair, args.seeds, args.lr)
    if shift:  # that answer's runs alone
        results = [r for r in results if r["response"] == args.response[0]]
    else:  # every answer of the gold-likelihood rule
        results = [r for r in results if r["response"] not in SHIFT_RULES]
    dates = ", ".join(sorted({r["date"] for r in results}))
    command = (f"`.venv/bin/python -m benchmarks.guard_response --pair {args.pair} --seeds "
               f"{' '.join(map(str, args.seeds))} --response "
               f"{args.response[0] if shift else ' '.join(a for a in RESPONSES if any(r['response'] == a for r in results))}"
               f"{'' if args.lr is None else f' --lr {args.lr:g}'}`")
    if shift and args.lr is not None:
        text = shift_lr_text(args, results, command, dates)
    elif shift:
        text = shift_text(args, results, command, dates)
    else:
        text = gold_text(args, results, command, dates)
    print(text)
    if not args.no_record:
        record(text, f"{args.response[0]}_response{suffix(args.lr)}" if shift else "guard_response")


def gold_text(args, results: list[dict], command: str, dates: str) -> str:
    return f"""### The gold-likelihood guard lowering the learning rate (block `guard_response`)

Command: {command} (the cancellation mode's
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


def shift_settings(response: str) -> tuple[float, str, str]:
    """The step-size guard's limit under `response`, its settings as a config writes them, and what it watches."""
    rule = SHIFT_RULES[response]
    until = "null" if rule["until"] is None else rule["until"]
    return (rule["limit"], f"limit: {rule['limit']:g}, until: {until}",
            "the whole run" if rule["until"] is None else f"the first {until} observations")


def shift_text(args, results: list[dict], command: str, dates: str) -> str:
    seeds, response = " ".join(map(str, args.seeds)), args.response[0]
    (limit, settings, span), block = shift_settings(response), f"{response}_response"
    variants = " ".join(dict.fromkeys(v for _, v, _ in shift_rows(response) if v.endswith(f"_{response}")))
    board = (f"every run of seeds {', '.join(map(str, args.seeds))} the rule acts on (in `benchmarks.step_size`'s "
             f"reruns of the first 40 steps), run again with the guard:\n\n"
             f"{leaderboard_table(results, low_rate_scores(args.pair))}" if results else
             "not run with the guard so set.")
    return f"""### The step-size guard ({settings}) lowering the learning rate (block `{block}`)

Command: {command} (the failure modes' runs with the guard: `.venv/bin/python -m benchmarks.failure_modes --modes
cancellation overlap depth repetition --variants {variants} --seeds {seeds}`).
Runs dated {dates or "–"} (leaderboard). Machine: {machine()}; one thread per run, fp32.
The guard: `RolloutGuard(step_size: {{{settings}}}, lr_factor: {GUARD_LR_FACTOR:g})` with
`diagnostics.policy_shift_every: 1` (`StepSize`: the moving mean of 5 steps' `diag/policy_shift` above {limit:g}
nats, over {span}); when it acts, every learning rate and its schedule's peak are multiplied by
{GUARD_LR_FACTOR:g}, and again if the shift's moving mean goes back below the limit and then passes it once more. Where it acts on a run without the
guard: the run's own logs, or `benchmarks.step_size`'s rerun of its first 40 steps, judged at {limit:g}.

The failure modes at the recipe's rate (0.003), at a third of it from the start, and with the guard (600 steps from
each mode's warm student; mean ± sd over seeds):

{failure_table(shift_rows(response), response, args.seeds)}

The warm leaderboard ({PAIRS[args.pair]['title']}; {STEPS} steps from the student after {WARM_STEPS} steps of SFT):
{board}"""


def shift_lr_text(args, results: list[dict], command: str, dates: str) -> str:
    """The step-size guard's answer on the warm leaderboard's runs at `args.lr`: the runs the rule acts on there
    although the rate suits the student, and what the cut costs them."""
    response = args.response[0]
    (_, settings, _), block = shift_settings(response), f"{response}_response{suffix(args.lr)}"
    return f"""### The step-size guard ({settings}) on the warm leaderboard at a learning rate of {args.lr:g} (block `{block}`)

Command: {command}.
Runs dated {dates or "–"}. Machine: {machine()}; one thread per run, fp32.
The guard as in the block `{response}_response` (`RolloutGuard(step_size: {{{settings}}}, lr_factor:
{GUARD_LR_FACTOR:g})`, with `diagnostics.policy_shift_every: 1`); every run at {args.lr:g} from the start
(`leaderboard --warm {WARM_STEPS} --lr {args.lr:g}`), cut to {GUARD_LR_FACTOR * args.lr:.2g} where the rule acts.
The warm leaderboard ({PAIRS[args.pair]['title']}; {STEPS} steps from the student after {WARM_STEPS} steps of SFT),
every run of seeds {', '.join(map(str, args.seeds))} the rule acts on (in `benchmarks.step_size`'s reruns of the
first 40 steps at {args.lr:g}), run again with the guard; "recorded score" is the run's at {args.lr:g} without it:

{leaderboard_table(results) if results else "none."}"""


if __name__ == "__main__":
    main()
