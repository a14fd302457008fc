"""Where the transfer across tokenizers is lost: the quickstart's cross-tokenizer distillation, rows that differ only
in the teacher's target.

    .venv/bin/python -m benchmarks.ablation_cross [--rows ...] [--seeds 0 1 2] [--steps 1500] [--parallel 2]

Every row is `configs/quickstart/distill_cross.yaml` (the byte-level BPE student, forward KL, 1,500 steps) at the
recipe it shipped with before the `*_on_policy_sft` rows (λ = 0.5, no SFT term: `RECIPE`), with one change:
- `byte_spans`: the config's aligner before this ablation (off the realised path a longer student token gets its
  first teacher token's mass);
- `exact_spans`: the exact target, every student token's likelihood of its text under the teacher, branches and
  depth unbounded (equal to the brute-force enumeration with full teacher calls: tests/test_exact_spans.py);
- `oracle`: a teacher with the student's own tokenizer (`configs/quickstart/teacher_bpe.yaml`, trained once when
  missing, `benchmarks/teachers.py`) through `identity`: what one tokenizer gives, judged by student/teacher ratio;
- `sft`: SFT on gold (λ = 0, no teacher signal), the baseline every distillation row must beat;
- `exact_spans_sft`: the exact target plus SFT on the gold completions of every step (an extra loss term);
- `exact_spans_top1`, `exact_spans_top3`, `oracle_top1`: the exact target's (or the oracle's) k most likely student
  tokens kept and the rest of its mass as one bucket (`model.teacher_topk`): the teacher's mode and confidence
  without the shape of its other guesses; `exact_spans_top1_sft` adds SFT on gold to the top-1;
- `lead1`: `exact_spans` (default bounds) with `lead_topk: 1`, the whole target: the tree below the teacher's most
  likely first token only;
- `shipped`: `exact_spans` at its default bounds with `teacher_topk: 1`, half the steps on-policy (the config before
  `shipped_on_policy_sft`);
- `shipped_on_policy_sft`: the config as it ships: that target on every step's rollouts (λ = 1) with SFT on the
  same step's gold completions added, SFT's whole signal plus the teacher's on the student's samples; `oracle_on_policy_sft` the same
  recipe from the oracle (its whole target);
- `exact_spans_gold`, `oracle_gold`: the exact target and the oracle on the gold completions only (λ = 0), which
  separates what the teacher's target gives on the dataset's text from what the on-policy half of the steps adds;
- `shipped_hidden`, `shipped_hidden3`: `shipped_on_policy_sft` with the `hidden_match` term on the same gold
  completions at weight 1 and 3 (the student's layers regressed onto the teacher's at the token boundaries both
  tokenizations share, prompt included); `sft_hidden3` the term beside SFT alone (λ = 0, no distribution term;
  the shipped recipe), `sft_hidden1` and `sft_hidden2` the same at weight 1 and 2;
  `oracle_hidden3` the oracle's `oracle_on_policy_sft` recipe with the term (weight 3), `oracle_sft_hidden3` the
  oracle with `sft_hidden3`'s recipe (the shipped one).
Rows run `--parallel` at a time with one thread each; finished runs (same row, seed and steps, in
`benchmarks/ablation_cross_runs.json`, kept with the code so that `--no-run` rebuilds the table from a fresh clone)
are reused unless `--rerun`. Needs the quickstart teacher (`make demo`). Writes the
table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.leaderboard import CROSS_LOSS, RECIPE, _fmt, eval_overlay, fit_and_score, prepare, run_parser, seed_args
from benchmarks.quickstart import machine, record
from benchmarks.teachers import teacher_dir, trained_teacher

ROOT = Path("runs/ablation")
STORE = Path(__file__).with_name("ablation_cross_runs.json")
ORACLE = teacher_dir("builtin:arithmetic_bpe")
CONFIG = "configs/quickstart/distill_cross.yaml"
TRAIN_CHECKED = 500  # training problems each saved student answers, beside the test set
OVERLAY = eval_overlay(evaluate_teacher=True, export=True)  # <run>/hf: how each student misses
EXACT = ["--model.aligner", "{name: exact_spans, branches: null, depth: null, min_mass: 0}"]
ORACLE_ARGS = ["--model.teacher.path", str(ORACLE), "--model.aligner", "identity"]
SFT_TERM = "{loss: cross_entropy, weight: 1.0, completions: gold}"
ON_POLICY_SFT = ["--model.teacher_topk", "1", "--model.rollout.on_policy_fraction", "1.0"]


def hidden_term(weight: float) -> str:
    return f"{{loss: hidden_match, weight: {weight}, completions: gold}}"


ROWS = {
    "byte_spans": ("byte_spans (the config's aligner before this table)", ["--model.aligner", "byte_spans"]),
    "exact_spans": ("exact target (exact_spans, unbounded)", EXACT),
    "oracle": ("oracle: BPE teacher, identity", ORACLE_ARGS),
    "sft": ("SFT on gold (λ = 0)", ["--model.loss", "cross_entropy", "--model.rollout.on_policy_fraction", "0.0"]),
    # The exact target with SFT on the gold completions of every step added (weight 1): the teacher's hedges on
    # hard problems, spread over whole-number tokens, pulled back towards the gold answer.
    "exact_spans_sft": ("exact target + SFT on gold (weight 1)",
                        [*EXACT, "--model.extra_terms", "[{loss: cross_entropy, weight: 1.0, completions: gold}]"]),
    # The exact target's k most likely student tokens kept exactly and the rest of its mass as one bucket, the
    # student free in how it spreads its own rest: the teacher's mode without the shape of its hedges.
    "exact_spans_top1": ("exact target, top-1 + tail bucket", [*EXACT, "--model.teacher_topk", "1"]),
    "exact_spans_top3": ("exact target, top-3 + tail bucket", [*EXACT, "--model.teacher_topk", "3"]),
    # The config as it shipped before the last rows: exact_spans at its default bounds (branches below 1e-4
    # unqueried) with top-1, half the steps on-policy, no SFT term.
    "shipped": ("exact_spans (default bounds), top-1 + tail bucket (the config before `shipped_on_policy_sft`)", []),
    "oracle_top1": ("oracle, top-1 + tail bucket", [*ORACLE_ARGS, "--model.teacher_topk", "1"]),
    # The teacher's leading token fixed to its most likely one at each aligned position, the exact tree below it,
    # the whole target kept: the character teacher's hedges on the digits after the first (neighbours, as the
    # oracle's are) without its hedge on the first digit (a number ten away).
    "lead1": ("exact_spans (default bounds), teacher's top first token (`lead_topk: 1`), whole target",
              ["--model.aligner", "{name: exact_spans, lead_topk: 1}"]),
    "exact_spans_top1_sft": ("exact target, top-1 + tail bucket, + SFT on gold (weight 1)",
                             [*EXACT, "--model.teacher_topk", "1", "--model.extra_terms",
                              "[{loss: cross_entropy, weight: 1.0, completions: gold}]"]),
    # Every step on-policy with the shipped target, plus SFT on the same step's gold completions (weight 1): all of
    # SFT's signal, with the teacher's on the student's own samples added to it (the config before `shipped_hidden3`).
    "shipped_on_policy_sft": ("the same target, every step on-policy (λ = 1), + SFT on gold (weight 1)",
                              ["--model.teacher_topk", "1", "--model.rollout.on_policy_fraction", "1.0",
                               "--model.extra_terms", "[{loss: cross_entropy, weight: 1.0, completions: gold}]"]),
    "oracle_on_policy_sft": ("oracle, every step on-policy (λ = 1), + SFT on gold (weight 1)",
                             [*ORACLE_ARGS, "--model.rollout.on_policy_fraction", "1.0",
                              "--model.extra_terms", "[{loss: cross_entropy, weight: 1.0, completions: gold}]"]),
    # The same targets on the gold completions only (λ = 0): what the on-policy half of the steps adds or costs.
    "exact_spans_gold": ("exact target, gold completions only (λ = 0)",
                         [*EXACT, "--model.rollout.on_policy_fraction", "0.0"]),
    "oracle_gold": ("oracle, gold completions only (λ = 0)",
                    [*ORACLE_ARGS, "--model.rollout.on_policy_fraction", "0.0"]),
    # The teacher's hidden states as well as its distribution: the recipe of `shipped_on_policy_sft` with the
    # `hidden_match` term on the same gold completions, regressing the student's layers onto the character teacher's
    # at every shared token boundary of prompt and completion (where a whole-number student token ends on a digit).
    # At weight 1 (two seeds run) the student's jump in accuracy comes late or not within the budget; at weight 3 it
    # comes early.
    "shipped_hidden": ("`shipped_on_policy_sft` + `hidden_match` on gold (weight 1, prompt and completion)",
                       [*ON_POLICY_SFT, "--model.extra_terms", f"[{SFT_TERM}, {hidden_term(1.0)}]"]),
    "shipped_hidden3": ("`shipped_on_policy_sft` + `hidden_match` on gold (weight 3, prompt and completion)",
                        [*ON_POLICY_SFT, "--model.extra_terms", f"[{SFT_TERM}, {hidden_term(3.0)}]"]),
    # The same term beside SFT alone (λ = 0, no distribution from the teacher): what the states give by themselves.
    # What the config ships now.
    "sft_hidden3": ("**shipped: SFT on gold + `hidden_match` on gold (weight 3), no distribution term (λ = 0)**",
                    ["--model.loss", "cross_entropy", "--model.rollout.on_policy_fraction", "0.0",
                     "--model.extra_terms", f"[{hidden_term(3.0)}]"]),
    # The shipped recipe at lower weights of the term: how much the weight matters.
    **{f"sft_hidden{w}": (f"SFT on gold + `hidden_match` on gold (weight {w}), no distribution term (λ = 0)",
                          ["--model.loss", "cross_entropy", "--model.rollout.on_policy_fraction", "0.0",
                           "--model.extra_terms", f"[{hidden_term(float(w))}]"]) for w in (1, 2)},
    # The oracle's recipe with its states matched the same way (one tokenizer: every token is a boundary).
    "oracle_hidden3": ("oracle, every step on-policy (λ = 1), + SFT + `hidden_match` on gold (weight 3)",
                       [*ORACLE_ARGS, "--model.rollout.on_policy_fraction", "1.0",
                        "--model.extra_terms", f"[{SFT_TERM}, {hidden_term(3.0)}]"]),
    # The shipped recipe (SFT on gold and the states, λ = 0) from the oracle: the same recipe, one tokenizer.
    "oracle_sft_hidden3": ("oracle: SFT on gold + `hidden_match` on gold (weight 3), no distribution term (λ = 0)",
                           [*ORACLE_ARGS, "--model.loss", "cross_entropy", "--model.rollout.on_policy_fraction", "0.0",
                            "--model.extra_terms", f"[{hidden_term(3.0)}]"]),
}


def run(row: str, seed: int, steps: int) -> dict:
    dense = [] if row == "shipped" else ["--model.teacher_topk", "null"]  # a row's own top-k comes after
    # every row from the config's recipe before it took the `shipped_on_policy_sft` row's; a row's own options override
    args = ["--config", CONFIG, "--config", str(ROOT / "overlay.yaml"), *seed_args(seed), *CROSS_LOSS, *RECIPE, *dense,
            *ROWS[row][1]]
    result = fit_and_score(args, ROOT / row / f"seed_{seed}", steps, {"row": row, "seed": seed})
    hf = ROOT / row / f"seed_{seed}" / "hf"
    return {**result, **error_kinds(hf)} if "score" in result and (hf / "config.json").exists() else result


def error_kinds(hf: Path) -> dict[str, float]:
    """How a saved student misses on the 500 test problems, greedy as lm-eval decodes: shares of problems answered
    right, off by 1 or 2 (a neighbour), off by 3 to 9, off by a multiple of ten (a wrong tens digit), or otherwise
    (further off, or not a number); and the share of the first 500 training problems it answers right (`fit/train`:
    near its test score, the student is under-fit, not memorising its training set)."""
    import torch

    from opd_lightning.models import HFModel
    from opd_lightning.tasks.arithmetic import load_problems

    spec = HFModel(path=str(hf))
    tokenizer = spec.load_tokenizer()
    model = spec.load_model(tokenizer).eval()

    def answers(problems: list[dict[str, str]]) -> list[str]:
        enc = tokenizer([p["prompt"] for p in problems], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    problems = load_problems("test")
    kinds = dict.fromkeys(("right", "neighbour", "units", "tens", "other"), 0)
    for problem, text in zip(problems, answers(problems), strict=True):
        gap = abs(int(text.strip()) - int(problem["completion"])) if text.strip().lstrip("-").isdigit() else -1
        kinds["right" if gap == 0 else "neighbour" if 0 < gap <= 2 else "units" if 2 < gap < 10 else
              "tens" if gap % 10 == 0 and gap > 0 else "other"] += 1
    train = load_problems("train")[:TRAIN_CHECKED]
    fit = sum(text.strip() == p["completion"] for p, text in zip(train, answers(train), strict=True)) / len(train)
    return {**{f"errors/{k}": v / len(problems) for k, v in kinds.items()}, "fit/train": fit}


def table(results: list[dict], oracle_ratio: float | None) -> str:
    header = ("| target | student after (seeds) | mean ± std | teacher | student / teacher | of the oracle's ratio | "
              "coverage | non-canonical rollouts | misses: ±1-2 / ±3-9 / ±10k / other | training problems right | "
              "wall s/run |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, (label, _) in ROWS.items():
        runs = [r for r in results if r["row"] == row and "score" in r]
        if not runs:
            continue
        scores = [r["score"] for r in runs]
        teacher = statistics.mean(r["teacher_score"] for r in runs) if row != "sft" else None
        ratio = statistics.mean(scores) / teacher if teacher else None
        share = f"{ratio / oracle_ratio:.2f}" if ratio and oracle_ratio else "–"
        coverage, noncanonical, fit, *misses = (_mean([r.get(k, math.nan) for r in runs]) for k in (
            "diag/align_coverage", "diag/noncanonical_rate", "fit/train", "errors/neighbour", "errors/units",
            "errors/tens", "errors/other"))
        lines.append(f"| {label} | {', '.join(f'{s:.3f}' for s in scores)} | {statistics.mean(scores):.3f} ± "
                     f"{statistics.stdev(scores) if len(scores) > 1 else 0.0:.3f} | "
                     f"{f'{teacher:.3f}' if teacher else '–'} | {f'{ratio:.3f}' if ratio else '–'} | {share} | "
                     f"{_fmt(coverage)} | {_fmt(noncanonical)} | {' / '.join(_fmt(m, 2) for m in misses)} | "
                     f"{_fmt(fit)} | "
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f} |")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    """Mean of the values that are numbers (a metric a run did not log is NaN), NaN when none is."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.mean(known) if known else math.nan


def _recorded(store: Path) -> dict[tuple, dict]:
    """Finished runs in `store`, by (row, seed, steps)."""
    runs = json.loads(store.read_text()) if store.exists() else []
    return {(r["row"], r["seed"], r["steps"]): r for r in runs if "score" in r}


def main() -> None:
    parser = run_parser(steps=1500)
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--no-run", action="store_true", help="only write the table of the runs recorded")
    args = parser.parse_args()
    prepare(ROOT, OVERLAY)
    if any(row.startswith("oracle") for row in args.rows) and not args.no_run:
        trained_teacher("builtin:arithmetic_bpe")
    store = STORE
    done = _recorded(store)
    jobs = [] if args.no_run else [(row, seed) for row in args.rows for seed in args.seeds
                                   if args.rerun or (row, seed, args.steps) not in done]
    print(f"{len(jobs)} runs to do, {len(done)} recorded", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 -- resolved once: the lazy import of
    # transformers is not safe from two threads at once (error_kinds loads each finished student in a worker thread)
    with ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(lambda job: run(*job, args.steps), jobs):
            if "score" in result:
                done = {**_recorded(store), **done, (result["row"], result["seed"], args.steps): result}
            store.write_text(json.dumps(list(done.values()), indent=2))  # merged: other invocations may be writing
            print(json.dumps({k: result.get(k) for k in ("row", "seed", "score", "wall_s", "error")}), flush=True)
    done = {**_recorded(store), **done}
    for key, result in done.items():  # runs recorded before the misses (or the training problems) were counted
        hf = ROOT / result["row"] / f"seed_{result['seed']}" / "hf"
        if "fit/train" not in result and result["steps"] == args.steps and (hf / "config.json").exists():
            done[key] = {**result, **error_kinds(hf)}
    store.write_text(json.dumps(list(done.values()), indent=2))
    results = [r for (row, seed, steps), r in done.items()
               if steps == args.steps and seed in args.seeds and row in args.rows]
    oracle = [r for r in results if r["row"] == "oracle"]
    oracle_ratio = (statistics.mean(r["score"] for r in oracle) / statistics.mean(r["teacher_score"] for r in oracle)
                    if oracle else None)
    dates = sorted({r["date"] for r in results})
    text = f"""## Across tokenizers: where the transfer is lost

Command: `.venv/bin/python -m benchmarks.ablation_cross --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}`
(each row's seeds are listed; rows with fewer seeds than asked had not run yet).
Runs dated {', '.join(dates)}. Machine: {machine()}; runs two at a time, one thread each, fp32.
Every row is `{CONFIG}` ({args.steps} steps, forward KL, the byte-level BPE student) at λ = 0.5 with no SFT term (its
recipe before the `*_on_policy_sft` rows, which change it) and only the target changed (the rows other than `shipped`
set `teacher_topk` themselves); the student starts at 0.000. "Of the oracle's ratio" divides a row's student/teacher ratio by the oracle
row's. Coverage: the share of student completion tokens with a target (`diag/align_coverage`); non-canonical rollouts: the
share of on-policy completions whose tokens are not the student tokenizer's encoding of their text
(`diag/noncanonical_rate`); both means over each run's last 50 logged steps. Misses: the share of the 500 test
problems each saved student (greedy, as lm-eval decodes) answers off by 1-2, by 3-9, by a multiple of ten (a wrong tens
digit) or otherwise, averaged over seeds; the rest it answers right. Training problems right: the share of the first
{TRAIN_CHECKED} training problems the same students answer right (mean over seeds).

{table(results, oracle_ratio)}"""
    print(text)
    record(text, "ablation_cross")


if __name__ == "__main__":
    main()
