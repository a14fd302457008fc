"""The aligner leaderboard: which cross-tokenizer aligner, with which loss, makes the best student, on three pairs.

    .venv/bin/python -m benchmarks.aligner_leaderboard [--pairs char_bpe bpe_10 bpe_90] [--rows ...] [--steps 1000]
        [--seeds 0 1 2] [--parallel 2] [--rerun] [--no-run]

Every run is `configs/quickstart/distill_cross.yaml` (a fresh student, λ = 0.5, batch 128, AdamW 3e-3) with the
pair's teacher and student tokenizer, one aligner and one loss, for `--steps` optimizer steps; the score is lm-eval's
exact match on the 500 arithmetic test problems. Pairs:
- `char_bpe`: the quickstart's character teacher into the byte-level BPE student (`builtin:arithmetic_bpe`);
- `bpe_10`, `bpe_90`: the BPE teacher (`builtin:arithmetic_bpe`, trained to the character teacher's score) into
  students keeping the first 10% and 90% of its merges (`builtin:arithmetic_bpe_10`, `_90`): ordered BPE subsets.
Rows: every cross-tokenizer aligner with `forward_kl`, `reverse_kl` and `sampled_token` (a pairing the library
refuses, e.g. `sampled_token` with `char_level`, or `bpe_subset` on a pair that is not a BPE subset, is listed as
such without a run); `gold` and `uld` through `byte_spans`, `dskd` through `dskd_cma`, X-Token's `xtoken_pkl` and
`xtoken_hkl` through `xtoken`; and two references: SFT on gold (λ = 0, no teacher) and the oracle, a teacher with
the student's own tokenizer (trained once, `benchmarks/teachers.py`) distilled through `identity` with forward KL.
Teachers missing from `runs/` are trained first (the character teacher comes from `make demo`). Runs go `--parallel`
at a time with one thread each; finished runs (in `runs/aligner_leaderboard/results.json`) are reused unless
`--rerun`. Writes the tables, `benchmarks/aligner_leaderboard.png` and a recommendation into
benchmarks/RESULTS.md, and every run to `benchmarks/aligner_leaderboard_runs.csv`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from opd_lightning.aligners import ALIGNERS, bpe_subset_problem
from opd_lightning.losses import LOSSES

from benchmarks.leaderboard import (
    DIAGNOSTICS,
    RECIPE,
    _fmt,
    eval_overlay,
    fit_and_score,
    prepare,
    recorded_runs,
    run_parser,
    seed_args,
)
from benchmarks.quickstart import machine, record
from benchmarks.teachers import teacher_dir, trained_teacher

ROOT = Path("runs/aligner_leaderboard")
CONFIG = "configs/quickstart/distill_cross.yaml"
OVERLAY = eval_overlay(evaluate_teacher=True)


@dataclass(frozen=True)
class Pair:
    title: str
    teacher: str  # the teacher's tokenizer (a builtin name; benchmarks/teachers.py finds or trains the teacher)
    student: str  # the student's tokenizer


PAIRS = {
    "char_bpe": Pair("character teacher → byte-level BPE student (the quickstart)", "builtin:char",
                     "builtin:arithmetic_bpe"),
    "bpe_10": Pair("BPE teacher → student keeping 10% of its merges", "builtin:arithmetic_bpe",
                   "builtin:arithmetic_bpe_10"),
    "bpe_90": Pair("BPE teacher → student keeping 90% of its merges", "builtin:arithmetic_bpe",
                   "builtin:arithmetic_bpe_90"),
}
TEXT_ALIGNERS = ("vocab_map", "byte_spans", "exact_spans", "bpe_subset", "char_level", "mined")  # xtoken: its losses
MAIN_LOSSES = ("forward_kl", "reverse_kl", "sampled_token")
ROWS = {f"{a}+{loss}": (a, loss) for a in TEXT_ALIGNERS for loss in MAIN_LOSSES} | {
    "byte_spans+gold": ("byte_spans", "gold"), "byte_spans+uld": ("byte_spans", "uld"),
    "dskd_cma+dskd": ("dskd_cma", "dskd"), "xtoken+xtoken_pkl": ("xtoken", "xtoken_pkl"),
    "xtoken+xtoken_hkl": ("xtoken", "xtoken_hkl"),
    "sft": (None, "cross_entropy"), "oracle": ("identity", "forward_kl")}
REFERENCES = {"sft": "SFT on gold (λ = 0)", "oracle": "oracle: student's own tokenizer, identity + forward_kl"}


def refusal(pair: Pair, row: str) -> str | None:
    """Why the library refuses `row` on `pair` when its module is built (the same checks), or None."""
    aligner, loss = ROWS[row]
    if aligner is None or row == "oracle":
        return None
    missing = LOSSES.build(loss).requires - ALIGNERS[aligner].provides  # what check_pairing compares
    if missing:
        return f"{aligner} does not provide {', '.join(sorted(missing))}"
    if aligner == "bpe_subset":
        from opd_lightning.tasks.arithmetic import builtin_tokenizer

        problem = bpe_subset_problem(builtin_tokenizer(pair.student), builtin_tokenizer(pair.teacher))
        return f"not a BPE subset: {problem}" if problem else None
    return None


RUNS_CSV = Path(__file__).with_name("aligner_leaderboard_runs.csv")


def committed_runs() -> list[dict]:
    """The runs recorded in `aligner_leaderboard_runs.csv` (committed with the tables)."""
    return recorded_runs(RUNS_CSV, ("pair", "row", "date"))


def run(pair_name: str, row: str, seed: int, steps: int) -> dict:
    pair, (aligner, loss) = PAIRS[pair_name], ROWS[row]
    teacher = teacher_dir(pair.student if row == "oracle" else pair.teacher)
    args = ["--config", CONFIG, "--config", str(ROOT / "overlay.yaml"), "--model.student.tokenizer", pair.student,
            "--model.teacher.path", str(teacher), "--model.loss", loss, "--model.teacher_topk", "null",
            *seed_args(seed), *RECIPE]
    args += ["--model.rollout.on_policy_fraction", "0.0"] if aligner is None else ["--model.aligner", aligner]
    return fit_and_score(args, ROOT / pair_name / row / f"seed_{seed}", steps,
                         {"pair": pair_name, "row": row, "seed": seed})


def _spread(s: dict) -> str:
    """Mean ± standard deviation; the mean alone for one seed (no spread measured)."""
    return f"{s['mean']:.3f}" + ("" if math.isnan(s["std"]) else f" ± {s['std']:.3f}")


def summary(runs: list[dict]) -> dict:
    scores = [r["score"] for r in runs]
    out = {"mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else math.nan,
           "scores": scores, "wall_s": statistics.mean(r["wall_s"] for r in runs)}
    teachers = [r["teacher_score"] for r in runs if not math.isnan(r.get("teacher_score", math.nan))]
    out["teacher"] = statistics.mean(teachers) if teachers else math.nan
    out |= {k: statistics.mean(r.get(k, math.nan) for r in runs) for k in DIAGNOSTICS}
    return out


def table(pair: Pair, results: dict[str, list[dict]]) -> tuple[str, list[tuple[str, dict]]]:
    """The pair's table, rows by mean score (references marked), and the ranked (row, summary) of the aligners."""
    header = ("| aligner | loss | exact match (mean ± std) | seeds | student / teacher | of the oracle's | "
              "coverage | top-k overlap | non-canonical | wall s/run |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    done = {row: summary([r for r in runs if "score" in r]) for row, runs in results.items()
            if any("score" in r for r in runs)}
    oracle = done.get("oracle")
    oracle_ratio = oracle["mean"] / oracle["teacher"] if oracle and oracle["teacher"] > 0 else math.nan
    ranked = sorted(done.items(), key=lambda kv: -kv[1]["mean"])
    for row, s in ranked:
        aligner, loss = ROWS[row]
        ratio = s["mean"] / s["teacher"] if s["teacher"] > 0 else math.nan
        name = f"**{REFERENCES[row]}**" if row in REFERENCES else aligner
        lines.append(f"| {name} | {loss} | {_spread(s)} | "
                     f"{', '.join(f'{x:.3f}' for x in s['scores'])} | {_fmt(ratio)} | {_fmt(ratio / oracle_ratio, 2)} | "
                     f"{_fmt(s['diag/align_coverage'])} | {_fmt(s['diag/topk_overlap'])} | "
                     f"{_fmt(s['diag/noncanonical_rate'])} | {s['wall_s']:.0f} |")
    refused = [f"`{row}` ({runs[0]['refused']})" for row, runs in results.items() if runs and "refused" in runs[0]]
    if refused:
        lines.append(f"\nNot run, refused by the library when the module is built: {'; '.join(refused)}.")
    return "\n".join(lines), [(row, s) for row, s in ranked if row not in REFERENCES]


def plot(per_pair: dict[str, dict[str, list[dict]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8 * len(per_pair)))
    FigureCanvasAgg(fig)
    for i, (pair, results) in enumerate(per_pair.items(), start=1):
        scores = {row: [r["score"] for r in runs if "score" in r] for row, runs in results.items()}
        names = sorted((n for n in scores if scores[n]), key=lambda n: -statistics.mean(scores[n]))
        ax = fig.add_subplot(len(per_pair), 1, i)
        colors = ["tab:gray" if n in REFERENCES else "tab:blue" for n in names]
        ax.bar(names, [statistics.mean(scores[n]) for n in names], color=colors,
               yerr=[statistics.stdev(scores[n]) if len(scores[n]) > 1 else 0 for n in names], capsize=3)
        for k, n in enumerate(names):
            ax.scatter([k] * len(scores[n]), scores[n], color="black", s=8, zorder=3)
        ax.set_ylabel("exact match (test, 500)")
        ax.set_title(f"Aligner leaderboard: {PAIRS[pair].title} (grey: references)")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def recommendation(ranked: dict[str, list[tuple[str, dict]]], per_pair: dict[str, dict[str, list[dict]]]) -> str:
    """Which aligner + loss to use, from the numbers: the best row of each pair and where it stands against SFT and
    the oracle; and the row with the best mean rank over the pairs that ran."""
    lines = []
    for pair, rows in ranked.items():
        if not rows:
            continue
        best, s = rows[0]
        refs = {row: summary([r for r in per_pair[pair].get(row, []) if "score" in r])
                for row in REFERENCES if any("score" in r for r in per_pair[pair].get(row, []))}
        against = "; ".join(f"{REFERENCES[k].split(':')[0]} {v['mean']:.3f}" for k, v in refs.items())
        lines.append(f"- {PAIRS[pair].title}: best `{best.replace('+', '` + `')}` at {_spread(s)}"
                     f"{f' ({against})' if against else ''}.")
    common = set.intersection(*({r for r, _ in rows} for rows in ranked.values())) if ranked else set()
    if len(ranked) > 1 and common:
        rank = {row: statistics.mean([r for r, _ in rows].index(row) + 1 for rows in ranked.values())
                for row in common}
        best = min(rank, key=rank.get)
        lines.append(f"- Over the {len(ranked)} pairs, the best mean rank is `{best.replace('+', '` + `')}` "
                     f"({rank[best]:.1f}).")
    return "\n".join(lines)


def main() -> None:
    parser = run_parser(steps=1000)
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--no-run", action="store_true", help="only write the tables of the runs recorded")
    args = parser.parse_args()
    prepare(ROOT, OVERLAY)
    store = ROOT / "results.json"
    key = lambda r: (r["pair"], r["row"], r["seed"], r["steps"])
    done = {key(r): r for r in [*committed_runs(), *(json.loads(store.read_text()) if store.exists() else [])]
            if "score" in r}
    refused = {(p, row): refusal(PAIRS[p], row) for p in args.pairs for row in args.rows}
    jobs = [] if args.no_run else [(p, row, seed) for seed in args.seeds for p in args.pairs for row in args.rows
                                   if not refused[p, row] and (args.rerun or (p, row, seed, args.steps) not in done)]
    if jobs:
        for tokenizer in {t for p, row, _ in jobs for t in (PAIRS[p].teacher, PAIRS[p].student if row == "oracle"
                                                              else PAIRS[p].teacher)}:
            trained_teacher(tokenizer)
    print(f"{len(jobs)} runs to do, {len(done)} recorded", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(lambda job: run(*job, args.steps), jobs):
            if "score" in result:
                recorded = {key(r): r for r in (json.loads(store.read_text()) if store.exists() else [])}
                done = {**recorded, **done, key(result): result}  # merged: another invocation may be writing
                store.write_text(json.dumps(list(done.values()), indent=2))
            print(json.dumps({k: result.get(k) for k in ("pair", "row", "seed", "score", "wall_s", "error")}),
                  flush=True)
    per_pair = {p: {row: ([{"refused": refused[p, row]}] if refused[p, row] else
                          [done[p, row, s, args.steps] for s in args.seeds if (p, row, s, args.steps) in done])
                    for row in args.rows} for p in args.pairs}
    tables, ranked = [], {}
    for p in args.pairs:
        text, ranked[p] = table(PAIRS[p], per_pair[p])
        tables.append(f"### Aligners: {PAIRS[p].title}\n\nTeacher `{teacher_dir(PAIRS[p].teacher)}` "
                      f"(`{PAIRS[p].teacher}`), student tokenizer `{PAIRS[p].student}`.\n\n{text}")
    plot(per_pair, Path(__file__).with_name("aligner_leaderboard.png"))
    columns = ["pair", "row", "seed", "steps", "score", "teacher_score", "wall_s", *DIAGNOSTICS, "date"]
    with RUNS_CSV.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(done[k] for k in sorted(done))  # every finished run, of any selection
    dates = sorted({r["date"] for rows in per_pair.values() for runs in rows.values() for r in runs if "date" in r})
    newline = "\n"
    text = f"""## Aligner leaderboard

Command: `.venv/bin/python -m benchmarks.aligner_leaderboard --pairs {' '.join(args.pairs)} --steps {args.steps} \
--seeds {' '.join(map(str, args.seeds))}`.
Runs dated {', '.join(dates) or '–'}. Machine: {machine()}; runs {args.parallel} at a time, one thread each, fp32.
Setting: `{CONFIG}` with the pair's teacher and student tokenizer and only the aligner and loss changed, \
{args.steps} optimizer steps, each loss's and aligner's defaults. "Of the oracle's" divides a row's student/teacher \
ratio by the oracle's. Diagnostics are means over each run's last 50 logged steps, averaged over seeds (– where a \
row logs none): coverage (`diag/align_coverage`), top-k overlap, and the share of on-policy completions that are not \
the student tokenizer's own spelling of their text (`diag/noncanonical_rate`).

{(newline * 2).join(tables)}

![aligner leaderboard](aligner_leaderboard.png)

Recommendation, from these numbers:
{recommendation(ranked, per_pair)}

Each run's own numbers: `benchmarks/aligner_leaderboard_runs.csv`."""
    print(text)
    record(text, "aligner_leaderboard")


if __name__ == "__main__":
    main()
