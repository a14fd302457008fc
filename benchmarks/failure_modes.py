"""OPD's failure modes reproduced at CPU scale, each run beside a named stabiliser, with the diagnostic that should
warn before the score falls.

    .venv/bin/python -m benchmarks.failure_modes [--modes cancellation overlap depth] [--seeds 0] [--steps 600]
        [--eval-every N] [--parallel 2] [--variants V ...] [--rerun] [--no-run]

Every run goes on from a warm student: its config's fresh student after a few hundred steps of SFT on gold (seed 0,
`runs/failure_modes/<start>/start`, the steps per mode in `MODES`): from scratch the failing losses never leave
0.000, so nothing can fall. lm-eval scores the student every `eval_every` steps of its mode (`--eval-every`
overrides; its start included), and `diag/grad_coherence` is measured every 5 steps. Modes:

- `cancellation` (Li et al., arXiv 2604.13016, their hypothesis for why sampled-token OPD stalls): `sampled_token`
  (one sample's log-ratio as the advantage of its token) against the stabiliser `topk_reverse_kl` (the reverse KL
  over the student's top-k tokens, a dense gradient), one tokenizer. If per-token advantages cancel, the sampled-token
  run has large `diag/logratio_abs` (mean |log p_T - log p_S| of the sampled tokens) with a small
  `diag/grad_coherence` (norm of the summed output-layer gradient over the sum of its per-position norms), and the
  dense run does not. Two more stabilisers: `sampled_token` at a third of the learning rate from the start, and with
  `RolloutGuard(gold_rise: {}, lr_factor: 0.333)` (`GUARD_LR`: the rate cut to a third when the gold likelihood
  rises; `benchmarks/guard_response.py` sets these runs beside the warm leaderboard's); and `topk_reverse_kl` with
  the same guard. Both losses with that guard's cut undone over `GUARD_RECOVER` steps too (`GUARD_COOL`,
  `lr_recover`).
- `overlap` (Li et al., arXiv 2604.13016: a teacher whose next-token menu does not overlap the student's does not
  help, however strong): reverse KL on the student's rollouts from teachers of about the same strength (each run
  scores its teacher), the character teacher across tokenizers through `exact_spans` (the student's tokens are whole
  numbers, the teacher's characters), and the same-tokenizer oracle (`benchmarks/teachers.py`) through `identity`; the
  stabilisers are SFT on gold mixed in (`extra_terms`, weight 0.5) with the character teacher, and the character
  teacher's run at a third of the learning rate (`LOW_LR`). Watched: `diag/topk_overlap`.
- `depth` (the survey's open question, the teacher's advice getting worse deeper into the student's own prefix):
  the long task (`configs/long_addition/distill.yaml`, answers of 18-41 characters), reverse KL on the student's
  rollouts only (λ = 1), where every later token is judged after the student's own earlier ones, against the
  stabilisers SFT on gold mixed in and a third of the learning rate. Watched: `diag/logratio_drift` (mean log-ratio
  over the second half of each completion minus over its first half).
- `repetition` (Luo et al., arXiv 2604.08527: repetition collapse under sampled-token OPD once repeated tokens get
  several times the mean advantage): the long task's student trained by `sampled_token` on its own rollouts (λ = 1)
  from a teacher that continues a loop written in its context (`copy_teacher`: the long task's teacher config trained
  with a quarter of its rows looping in context, as pretrained teachers copy in context; the long task's own teacher
  does not, `benchmarks/repetition_probe.py`), against the stabilisers SFT on gold mixed in and a third of the
  learning rate. Watched: `diag/repetition_rate`, `diag/repeat_advantage_ratio`.

Each mode's falling variant also runs answered by the step-size guard, one variant per setting of `SHIFT_RULES`
(`<variant>_shift`: `RolloutGuard(step_size: {limit: 0.03, until: null}, lr_factor: 0.333)`, watching the whole run;
`_shift05`: the same at 0.05; `_shift40`: at `StepSize`'s defaults, 0.03 over the first 40 observations), judged
beside the same runs without it by `benchmarks/guard_response.py --response shift` (`shift05`, `shift40`).

For each run the table gives the score's path (start, lowest, end), the first evaluation below the start by more
than `DROP` (the score falls), and, for each watched (diagnostic, limit) of the mode (`opd report`'s threshold unless
`MODES` gives one), the step at which it had stayed past the limit for `PATIENCE` observations (`guards.crossing`: the
step `RolloutGuard` with that limit acts at, and stops the run with `stop: true`); a "drop" watch judges the top-k
overlap by its fall below the mean of the run's first `BASELINE` observations (`RolloutGuard`'s
`max_topk_overlap_drop`, at `opd report`'s `topk_overlap_drop` unless `MODES` gives one). Runs are stored in
`benchmarks/failure_modes_runs.csv` (each run's diagnostics as means over windows of `WINDOW` steps, and its scores;
the guards' steps are read again from the run folders when they are here); the table and
`benchmarks/failure_modes.png` are regenerated from it with `--no-run`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from benchmarks.leaderboard import (
    CROSS_LOSS,
    PAIRS,
    RECIPE,
    _fmt,
    eval_overlay,
    fit_and_score,
    prepare,
    scored_run,
    seed_args,
    warm_student,
)
from benchmarks.quickstart import machine, record
from benchmarks.teachers import teacher_dir, trained_teacher
from opd_lightning.data import load_rows
from opd_lightning.guards import BOUNDS, GoldRise, crossing
from opd_lightning.report import DEFAULT_THRESHOLDS, metric_ends

ROOT = Path("runs/failure_modes")
RUNS_CSV = Path(__file__).with_name("failure_modes_runs.csv")
PNG = Path(__file__).with_name("failure_modes.png")
# A score this far below the start counts as falling: lm-eval's score on 500 problems has a sampling spread of
# sqrt(p (1 - p) / 500), 0.018 at p = 0.2, so 0.05 is 2.8 of them (2.3 at the long task's p = 0.6).
DROP = 0.05
PATIENCE = 3  # observations past the threshold before the guard acts
BASELINE = 10  # observations that set a drop watch's reference (RolloutGuard's default `baseline`)
WINDOW = 10  # steps per stored window of the diagnostics
SERIES = ("diag/topk_overlap", "diag/grad_coherence", "diag/logratio_abs", "diag/logratio_mean",
          "diag/logratio_drift", "diag/repetition_rate", "diag/repeat_advantage_ratio", "diag/repeat_advantage_gap",
          "diag/entropy_student", "diag/completion_len", "diag/gold_nll",
          "diag/gold_top1")
ORACLE = teacher_dir("builtin:arithmetic_bpe")
LONG_TEACHER = Path("runs/long_addition/teacher/hf")  # configs/long_addition/distill.yaml's teacher
COPY_TEACHER = ROOT / "copy_teacher" / "hf"
LOOP_LENGTH = 62  # characters of a looping row (prompt and completion; its EOS makes 63 of the 64-token context)
WHOLE_TARGET = ["--model.teacher_topk", "null"]
# λ = 1 runs read no gold completions: score them without gradient every 5 steps for `diag/gold_nll` (`GoldRise`)
GOLD_PROBE = ("--model.diagnostics.gold_every", "5")
LOW_LR = ("--model.optimizer.init_args.lr", "0.001")  # a third of every mode's recipe rate (0.003)
GUARD_LR_FACTOR = 0.333  # the guard's response: the learning rate cut to about a third when it acts
GUARD_RECOVER = 100  # steps over which the cooling guard's cut rate climbs back to the recipe's (`lr_recover`)


def guard_option(rule: str, settings: dict | None = None, **answer) -> str:
    """The option appending `RolloutGuard` watching `rule` alone (one of its rule arguments, with `settings`, else at
    its defaults) to the run's callbacks, answering with `answer` (its `lr_factor`, `lr_recover`) when it acts."""
    return "--trainer.callbacks+=" + json.dumps({
        "class_path": "opd_lightning.guards.RolloutGuard",
        "init_args": {"max_repetition_rate": None, "max_truncation_rate": None, rule: settings or {}, **answer}})


def gold_guard(**answer) -> str:
    """`guard_option` for the gold-likelihood rule (`GoldRise`)."""
    return guard_option("gold_rise", **answer)


def shift_guard(settings: dict, **answer) -> list[str]:
    """The options measuring `diag/policy_shift` on every step and `guard_option` for the step-size rule
    (`StepSize`) with `settings`."""
    return ["--model.diagnostics.policy_shift_every", "1", guard_option("step_size", settings, **answer)]


GUARD_LR = gold_guard(lr_factor=GUARD_LR_FACTOR)  # the cut lasts
GUARD_COOL = gold_guard(lr_factor=GUARD_LR_FACTOR, lr_recover=GUARD_RECOVER)  # the cut climbs back: a cool-down
# The step-size rule's answer, the same lasting cut, under three settings, each given in full so that a run's options
# say which: watching the whole run at its limit (0.03, picked on seeds 0-2 of the runs that fall and of the warm
# leaderboard) and at a quieter one (0.05; block `step_size_fresh` in RESULTS.md), and at `StepSize`'s defaults
# (0.03 over the first 40 observations, since block `step_size_whole`)
SHIFT_RULES = {"shift": {"limit": 0.03, "until": None}, "shift05": {"limit": 0.05, "until": None},
               "shift40": {"limit": 0.03, "until": 40}}
SHIFT_GUARDS = {key: shift_guard(rule, lr_factor=GUARD_LR_FACTOR) for key, rule in SHIFT_RULES.items()}


def shift_label(rule: dict) -> str:
    """How the tables name a variant answered by the step-size guard with `rule`'s settings."""
    horizon = "" if rule["until"] is None else f", first {rule['until']} steps"
    return f"the step-size guard (limit {rule['limit']:g}{horizon}) cutting the learning rate to {GUARD_LR_FACTOR:g}x"


SHIFT_LABELS = {key: shift_label(rule) for key, rule in SHIFT_RULES.items()}
SHIFT_LR, SHIFT_LABEL = SHIFT_GUARDS["shift"], SHIFT_LABELS["shift"]  # the `_shift` variants' (the first measured)
GUARDED = (GUARD_LR, GUARD_COOL, *(g[-1] for g in SHIFT_GUARDS.values()))  # options under which a guard changed the
# run after it acted
GUARD_LABEL = f"stabiliser: `sampled_token`, the gold-rise guard cutting the learning rate to {GUARD_LR_FACTOR:g}x"
MODES = {
    "cancellation": {
        "title": "Gradient cancellation: sampled-token OPD against a dense top-k reverse KL (one tokenizer)",
        "start": "same", "config": PAIRS["same"]["config"], "task": "arithmetic", "start_steps": 600,
        "eval_every": 10,  # the sampled-token runs' score fell within the first 50 steps: seen step by step
        # The hypothesis' own signal at opd report's floor, and the top-k overlap at a floor set after the first
        # three seeds (the signal that moved before the score fell in them; not validated on other runs).
        # The gold likelihood (`GoldRise`, at its defaults) was added after these runs, logged when they ran again.
        "watch": (("diag/grad_coherence", None), ("diag/topk_overlap", 0.9), ("diag/topk_overlap", None, "drop"),
                  ("diag/gold_nll", None, "rise")),
        "plot": 3,  # the one that moved first
        "variants": {
            "sampled_token": ("`sampled_token` (one sample's log-ratio per token)", ["--model.loss", "sampled_token"]),
            "topk_reverse_kl": ("stabiliser: `topk_reverse_kl` (dense over the student's top-k)",
                                ["--model.loss", "topk_reverse_kl"]),
            "sampled_token_lr": ("stabiliser: `sampled_token` at a third of the learning rate (0.001)",
                                 ["--model.loss", "sampled_token", *LOW_LR]),
            "sampled_token_guard": (GUARD_LABEL, ["--model.loss", "sampled_token", GUARD_LR]),
            "topk_reverse_kl_guard": ("`topk_reverse_kl` with the same guard", ["--model.loss", "topk_reverse_kl",
                                                                              GUARD_LR]),
            "sampled_token_cool": (f"`sampled_token`, the same guard's cut undone over {GUARD_RECOVER} steps",
                                   ["--model.loss", "sampled_token", GUARD_COOL]),
            "topk_reverse_kl_cool": (f"`topk_reverse_kl`, the same guard's cut undone over {GUARD_RECOVER} steps",
                                     ["--model.loss", "topk_reverse_kl", GUARD_COOL]),
            "sampled_token_shift": (f"stabiliser: `sampled_token`, {SHIFT_LABEL}",
                                    ["--model.loss", "sampled_token", *SHIFT_LR]),
            "topk_reverse_kl_shift": (f"`topk_reverse_kl`, {SHIFT_LABEL}", ["--model.loss", "topk_reverse_kl",
                                                                         *SHIFT_LR]),
        },
    },
    "overlap": {
        "title": "A teacher whose menu does not overlap the student's: reverse KL from two teachers of one strength",
        "start": "cross", "config": PAIRS["cross"]["config"], "task": "arithmetic", "start_steps": 600,
        "eval_every": 50,
        "watch": (("diag/topk_overlap", None), ("diag/topk_overlap", 0.9), ("diag/topk_overlap", None, "drop"),
                  ("diag/gold_nll", None, "rise")),  # the last added after these runs, logged when they ran again
        "needs": (lambda: trained_teacher("builtin:arithmetic_bpe"),),
        "variants": {
            "char_teacher": ("character teacher, `exact_spans`", [
                "--model.loss", "reverse_kl", "--model.aligner",
                "{name: exact_spans, branches: null, depth: null, min_mass: 0}", *WHOLE_TARGET]),
            "oracle_teacher": ("BPE teacher (the student's tokenizer), `identity`", [
                "--model.loss", "reverse_kl", "--model.teacher.path", str(ORACLE), "--model.aligner", "identity",
                *WHOLE_TARGET]),
            "char_teacher_sft": ("stabiliser: character teacher + SFT on gold (weight 0.5)", [
                "--model.loss", "reverse_kl", "--model.aligner",
                "{name: exact_spans, branches: null, depth: null, min_mass: 0}", *WHOLE_TARGET,
                "--model.extra_terms", "[{loss: cross_entropy, weight: 0.5, completions: gold}]"]),
            "char_teacher_lr": ("stabiliser: character teacher at a third of the learning rate (0.001)", [
                "--model.loss", "reverse_kl", "--model.aligner",
                "{name: exact_spans, branches: null, depth: null, min_mass: 0}", *WHOLE_TARGET, *LOW_LR]),
            "oracle_teacher_lr": ("BPE teacher at a third of the learning rate (0.001)", [
                "--model.loss", "reverse_kl", "--model.teacher.path", str(ORACLE), "--model.aligner", "identity",
                *WHOLE_TARGET, *LOW_LR]),
            "char_teacher_shift": (f"stabiliser: character teacher, {SHIFT_LABEL}", [
                "--model.loss", "reverse_kl", "--model.aligner",
                "{name: exact_spans, branches: null, depth: null, min_mass: 0}", *WHOLE_TARGET, *SHIFT_LR]),
        },
    },
    "depth": {
        "title": "The teacher's advice deeper into the student's own prefix: on-policy only against SFT mixed in",
        "start": "long", "config": PAIRS["long"]["config"], "task": "long_addition", "start_steps": 800,
        "metric": "exact_match/sum", "eval_every": 50,
        "watch": (("diag/logratio_drift", None), ("diag/topk_overlap", 0.9), ("diag/topk_overlap", None, "drop"),
                  ("diag/gold_nll", None, "rise")),  # the last added after these runs, logged when they ran again
        "options": GOLD_PROBE,
        "needs": (lambda: long_teacher(),),
        "variants": {
            "on_policy": ("reverse KL on the student's rollouts only (λ = 1)", [
                "--model.loss", "reverse_kl", "--model.rollout.on_policy_fraction", "1.0"]),
            "on_policy_sft": ("stabiliser: the same + SFT on gold (weight 0.5)", [
                "--model.loss", "reverse_kl", "--model.rollout.on_policy_fraction", "1.0", "--model.extra_terms",
                "[{loss: cross_entropy, weight: 0.5, completions: gold}]"]),
            "on_policy_lr": ("stabiliser: the same at a third of the learning rate (0.001)", [
                "--model.loss", "reverse_kl", "--model.rollout.on_policy_fraction", "1.0", *LOW_LR]),
            "on_policy_shift": (f"stabiliser: the same, {SHIFT_LABEL}", [
                "--model.loss", "reverse_kl", "--model.rollout.on_policy_fraction", "1.0", *SHIFT_LR]),
        },
    },
    "repetition": {
        "title": "Repetition collapse under sampled-token OPD, from a teacher that copies a loop in its context",
        "start": "long", "config": PAIRS["long"]["config"], "task": "long_addition", "start_steps": 800,
        "metric": "exact_match/sum", "eval_every": 50,
        "watch": (("diag/repetition_rate", None), ("diag/repeat_advantage_ratio", None),
                  ("diag/repeat_advantage_gap", None), ("diag/topk_overlap", 0.9), ("diag/topk_overlap", None, "drop"),
                  ("diag/gold_nll", None, "rise")),  # the last added after these runs, logged when they ran again
        "options": GOLD_PROBE,
        "needs": (lambda: copy_teacher(), lambda: long_teacher()),
        "variants": {
            "sampled_token": ("`sampled_token` on the student's rollouts only (λ = 1)", [
                "--model.teacher.path", str(COPY_TEACHER), "--model.loss", "sampled_token",
                "--model.rollout.on_policy_fraction", "1.0"]),
            "sampled_token_sft": ("stabiliser: the same + SFT on gold (weight 0.5)", [
                "--model.teacher.path", str(COPY_TEACHER), "--model.loss", "sampled_token",
                "--model.rollout.on_policy_fraction", "1.0", "--model.extra_terms",
                "[{loss: cross_entropy, weight: 0.5, completions: gold}]"]),
            # The control: the same loss from the long task's own teacher, which does not copy a loop.
            "sampled_token_own_teacher": ("control: `sampled_token` (λ = 1) from the long task's own teacher", [
                "--model.loss", "sampled_token", "--model.rollout.on_policy_fraction", "1.0"]),
            "sampled_token_lr": ("stabiliser: the copying teacher's run at a third of the learning rate (0.001)", [
                "--model.teacher.path", str(COPY_TEACHER), "--model.loss", "sampled_token",
                "--model.rollout.on_policy_fraction", "1.0", *LOW_LR]),
            "sampled_token_shift": (f"stabiliser: the copying teacher's run, {SHIFT_LABEL}", [
                "--model.teacher.path", str(COPY_TEACHER), "--model.loss", "sampled_token",
                "--model.rollout.on_policy_fraction", "1.0", *SHIFT_LR]),
        },
    },
}

# Each `_shift` variant (its options end with `SHIFT_LR`) again under the step-size guard's other settings
for _spec in MODES.values():
    for _variant, (_label, _options) in list(_spec["variants"].items()):
        if _variant.endswith("_shift"):
            for _key in [k for k in SHIFT_RULES if k != "shift"]:
                _spec["variants"][f"{_variant.removesuffix('_shift')}_{_key}"] = (
                    _label.replace(SHIFT_LABEL, SHIFT_LABELS[_key]), [*_options[: -len(SHIFT_LR)], *SHIFT_GUARDS[_key]])


def _train_teacher(hf: Path, args: list[str]) -> Path:
    """`opd fit` with `args` into `hf`'s parent (one thread) unless `hf` is saved already."""
    if not (hf / "config.json").exists():
        print(f"training a teacher into {hf.parent}", flush=True)
        subprocess.run([sys.executable, "-m", "opd_lightning", "fit", *args], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return hf


def copy_rows(rows: list[dict], share: float, seed: int) -> list[dict]:
    """The long task's rows with `share` of them turned into loops in context: the gold completion's first step
    written over and over, its first two copies in the prompt and the rest as the completion, to `LOOP_LENGTH`
    characters in all. A step written twice never happens in a gold completion, so a teacher trained on these solves
    a clean prompt and, once its context repeats a step, continues the loop: the in-context copying Luo et al. find in
    pretrained teachers. Two things a first try got wrong: with one copy in the prompt, a loop row's context equals a
    gold row's after its first step, and the teacher looped on clean prompts; with loops ending at the gold
    completion's length, the teacher learnt to stop at a length and cut the last digit of long sums (0.46-0.49 on
    the task). Ending every loop after any gold row ends leaves the stop to the gold rows."""
    rng, out = random.Random(seed), []
    for row in rows:
        first = row["completion"].split(",")[0].split(":")[0] + ","
        loop = first * (LOOP_LENGTH // len(first) + 1)
        cut = 2 * len(first)  # two steps, each with its comma
        if rng.random() < share:
            row = {**row, "prompt": row["prompt"] + loop[:cut],
                   "completion": loop[cut : LOOP_LENGTH - len(row["prompt"])]}
        out.append(row)
    return out


def copy_teacher() -> Path:
    """The long task's teacher config trained on `copy_rows` (a quarter of the rows looping in context)."""
    data = ROOT / "copy_teacher" / "train.jsonl"
    if not (COPY_TEACHER / "config.json").exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        rows = copy_rows(load_rows("builtin:long_addition/train"), 0.25, seed=0)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The looping prompts run to 30 tokens: a context of 96 keeps every completion whole (44 new tokens after them;
    # with the new tokens capped to 32 instead, the long sums' ends were cut from the gold rows and the teacher
    # stopped a digit short on them).
    return _train_teacher(COPY_TEACHER, [
        "--config", "configs/long_addition/teacher.yaml", "--data.train", str(data), "--model.student.config",
        json.dumps({**yaml.safe_load(Path("configs/long_addition/teacher.yaml").read_text())["model"]["student"][
            "config"], "max_position_embeddings": 96}),
        "--trainer.default_root_dir", str(COPY_TEACHER.parent)])


def long_teacher() -> Path:
    """The long task's teacher (`configs/long_addition/teacher.yaml`), trained now (one thread) if it is not saved."""
    return _train_teacher(LONG_TEACHER, ["--config", "configs/long_addition/teacher.yaml"])


def watches(mode: str) -> list[tuple[str, float | None, str]]:
    """`mode`'s watched (diagnostic, limit, kind): kind "level" (a limit on the value), "drop" (a limit on its fall
    below the mean of the run's first `BASELINE` observations, `RolloutGuard(max_topk_overlap_drop=...)`) or "rise"
    (`diag/gold_nll`'s rise above its first observations, `RolloutGuard(gold_rise=GoldRise(limit))`)."""
    return [(w[0], w[1], w[2] if len(w) > 2 else "level") for w in MODES[mode]["watch"]]


def limit_of(metric: str, limit: float | None, kind: str = "level") -> float:
    """A watched diagnostic's limit: the one given, else `opd report`'s threshold (for a drop, its `<name>_drop`; for
    a rise of the gold likelihood, `GoldRise`'s)."""
    if limit is not None:
        return limit
    if kind == "rise":
        return GoldRise.limit
    return DEFAULT_THRESHOLDS[metric.removeprefix("diag/") + ("_drop" if kind == "drop" else "")]


def _label(metric: str, limit: float | None, kind: str = "level") -> str:
    if kind in ("drop", "rise"):
        return f"{metric} {kind}>{limit_of(metric, limit, kind):g}"
    return f"{metric}{'<' if BOUNDS[metric] == 'min' else '>'}{limit_of(metric, limit):g}"


def crossings(mode: str, logged: dict[str, list[tuple[int, float]]]) -> dict[str, int | None]:
    """For each watched (diagnostic, limit, kind) of `mode`, the step the guard acts at (`guards.crossing`), or
    None."""
    def step(metric: str, limit: float | None, kind: str) -> int | None:
        if kind == "rise":
            return GoldRise(limit=limit_of(metric, limit, kind)).crossing(logged.get(metric, []))
        if kind == "drop":
            return crossing(logged[metric], -limit_of(metric, limit, kind), "min", PATIENCE, baseline=BASELINE)
        return crossing(logged[metric], limit_of(metric, limit), BOUNDS[metric], PATIENCE)

    return {_label(m, lim, kind): step(m, lim, kind) for m, lim, kind in watches(mode)}


def _crossings(mode: str, cell: str) -> dict[str, int | None]:
    """The CSV's crossing cell: a JSON object, or (older rows) the first watched diagnostic's step alone."""
    if cell.startswith("{"):
        return json.loads(cell)
    return {_label(*MODES[mode]["watch"][0]): int(cell) if cell else None}


def series(version: Path, names: Iterable[str] = SERIES) -> dict[str, list[tuple[int, float]]]:
    """Every metric of `names` a run logged, `[(step, value)]` in step order."""
    out: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    for row in csv.DictReader((version / "metrics.csv").open()):
        for name, values in out.items():
            if row.get(name):
                values.append((int(row["step"]), float(row[name])))
    return {name: sorted(values) for name, values in out.items()}


def windows(values: list[tuple[int, float]], steps: int) -> list[float]:
    """Means of a series over consecutive windows of `WINDOW` steps (NaN where a window has no finite value)."""
    out = []
    for lo in range(0, steps, WINDOW):
        inside = [v for s, v in values if lo <= s < lo + WINDOW and math.isfinite(v)]
        out.append(statistics.mean(inside) if inside else math.nan)
    return out


def finished(mode: str, variant: str, seed: int, steps: int, eval_every: int,
             start: tuple[Path, float]) -> dict | None:
    """A run its folder holds whole (evaluated at the start's score, then every `eval_every` steps to `steps`),
    read back with its date and no wall time; None otherwise. What an interrupted invocation ran is not run again."""
    spec, out = MODES[mode], ROOT / mode / variant / f"seed_{seed}"
    history_file = out / "logs" / "version_0" / "eval_history.jsonl"
    if not history_file.exists():
        return None
    key = {"mode": mode, "variant": variant, "seed": seed, "start_score": start[1], "steps": steps, "wall_s": math.nan,
           "date": str(datetime.date.fromtimestamp(history_file.stat().st_mtime))}
    try:
        result = scored_run(out, key, spec["task"], spec.get("metric", "exact_match"), history=True)
    except (KeyError, ValueError, OSError):
        return None
    if result["history"][0] != (0, start[1]) or [s for s, _ in result["history"]] != list(range(0, steps + 1,
                                                                                                 eval_every)):
        return None
    return with_logs(result, mode, out, steps)


def with_logs(result: dict, mode: str, out: Path, steps: int) -> dict:
    """A scored run with what its logs in `out` add: each series' window means, and the watched guards' steps."""
    logged = series(out / "logs" / "version_0")
    return {**result, "windows": {n: windows(v, steps) for n, v in logged.items()}, "crossing": crossings(mode, logged)}


def run_args(mode: str, variant: str, seed: int, start: Path) -> list[str]:
    """The `opd fit` options of a run of `mode`'s `variant` from the warm student at `start`, but its evaluation
    overlay and its length (`fit_and_score` adds those)."""
    spec = MODES[mode]
    pinned = [*CROSS_LOSS, *RECIPE] if spec["config"] == PAIRS["cross"]["config"] else []  # its recipe before SFT
    return ["--config", spec["config"], *seed_args(seed), *pinned, "--model.student.path", str(start),
            "--model.student.config", "null", "--model.student.tokenizer", "null",
            "--model.diagnostics.grad_coherence_every", "5", *spec.get("options", ()), *spec["variants"][variant][1]]


def run(mode: str, variant: str, seed: int, steps: int, eval_every: int, start: tuple[Path, float],
        reuse: bool = True) -> dict:
    spec = MODES[mode]
    if reuse and (done := finished(mode, variant, seed, steps, eval_every, start)) is not None:
        return done
    args = run_args(mode, variant, seed, start[0])
    args[2:2] = ["--config", str(ROOT / mode / "overlay.yaml")]  # after the mode's config
    out = ROOT / mode / variant / f"seed_{seed}"
    result = fit_and_score(args, out, steps, {"mode": mode, "variant": variant, "seed": seed,
                                              "start_score": start[1]}, task=spec["task"],
                           metric=spec.get("metric", "exact_match"), eval_every=eval_every)
    return with_logs(result, mode, out, steps) if "score" in result else result


def to_rows(result: dict) -> list[dict]:
    """A run as CSV rows: one per window of `WINDOW` steps (its diagnostics' means) and one per evaluation."""
    key = {k: result.get(k, "") for k in ("mode", "variant", "seed", "steps", "start_score", "wall_s", "date",
                                           "teacher_score")}
    key["crossing"] = json.dumps(result["crossing"])
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
                                     "date": r["date"], "crossing": _crossings(key[0], r["crossing"]),
                                     "teacher_score": float(r.get("teacher_score") or math.nan),
                                     "windows": {n: [] for n in SERIES}, "history": []})
        if r["kind"] == "window":
            for n in SERIES:
                run_["windows"][n].append(float(r[n]) if r.get(n) not in (None, "", "nan") else math.nan)
        else:
            run_["history"].append((int(r["step"]), float(r["score"])))
    for run_ in runs.values():
        run_["score"] = run_["history"][-1][1]
    return list(runs.values())


def write_csv(runs: list[dict]) -> None:
    columns = ["mode", "variant", "seed", "steps", "start_score", "wall_s", "date", "teacher_score", "crossing",
               "kind", "step",
               "score", *SERIES]
    with RUNS_CSV.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(runs, key=lambda r: (r["mode"], r["variant"], r["seed"])):
            writer.writerows(to_rows(r))


def read_csv() -> list[dict]:
    return from_rows(list(csv.DictReader(RUNS_CSV.open()))) if RUNS_CSV.exists() else []


def _key(run_: dict) -> tuple:
    return run_["mode"], run_["variant"], run_["seed"], run_["steps"]


def falls(run_: dict) -> int | None:
    """The first evaluation step at which the score is more than `DROP` below the run's start, or None."""
    start = run_["history"][0][1]
    return next((s for s, v in run_["history"] if v < start - DROP), None)


def _ends(values: list[float]) -> tuple[float, float]:
    """The first and last tenth's means of a run's window values, as `opd report` reads a metric's start and end."""
    return metric_ends(list(enumerate(values)))


def table(mode: str, runs: list[dict]) -> str:
    spec = MODES[mode]
    watched = watches(mode)
    metrics = list(dict.fromkeys(m for m, _, _ in watched))
    header = ("| run | seed | teacher | score: start → lowest → end | falls at step | "
              + " | ".join(f"`{m.removeprefix('diag/')}`: first → last window" for m in metrics) + " | "
              + " | ".join(f"guard `{_label(*w).removeprefix('diag/')}` acts at step" for w in watched)
              + " | mean abs log-ratio (last windows) | entropy (first → last) |")
    lines = [header, "|" + "---|" * (7 + len(metrics) + len(watched))]
    for variant, (label, _) in spec["variants"].items():
        for r in sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"]):
            scores = [v for _, v in r["history"]]
            ends = [" → ".join(map(_fmt, _ends(r["windows"][m]))) for m in metrics]
            acts = [r["crossing"].get(_label(*w), "–") for w in watched]  # –: not computed (no logs here)
            lines.append(
                f"| {label} | {r['seed']} | {_fmt(r['teacher_score'])} | "
                f"{scores[0]:.3f} → {min(scores):.3f} → {scores[-1]:.3f} | "
                f"{falls(r) if falls(r) is not None else 'never'} | {' | '.join(ends)} | "
                f"{' | '.join('never' if a is None else str(a) for a in acts)} | "  # a step, never or –
                f"{_fmt(_ends(r['windows']['diag/logratio_abs'])[1])} | "
                f"{' → '.join(map(_fmt, _ends(r['windows']['diag/entropy_student'])))} |")
    return "\n".join(lines)


def plot(runs: list[dict], modes: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4 * len(modes)))
    FigureCanvasAgg(fig)
    for row, mode in enumerate(modes):
        watch, limit, kind = watches(mode)[MODES[mode].get("plot", 0)]
        ax_score, ax_diag = fig.add_subplot(len(modes), 2, 2 * row + 1), fig.add_subplot(len(modes), 2, 2 * row + 2)
        variants, labelled = list(MODES[mode]["variants"]), set()
        for r in (r for r in runs if r["mode"] == mode):  # one colour per variant, one line style per seed
            color, style = f"C{variants.index(r['variant']) % 10}", ("-", "--", "-.", ":")[r["seed"] % 4]
            label = None if r["variant"] in labelled else r["variant"]
            labelled.add(r["variant"])
            ax_score.plot(*zip(*r["history"], strict=True), marker="o", ms=2, lw=1, color=color, ls=style,
                          label=label)
            steps = [i * WINDOW for i in range(len(r["windows"][watch]))]
            ax_diag.plot(steps, r["windows"][watch], color=color, ls=style, lw=1, label=label)
            if (acts := r["crossing"].get(_label(watch, limit, kind))) is not None:
                ax_diag.axvline(acts, color=color, ls=":")
        if kind == "level":  # a relative limit has no one level to draw
            ax_diag.axhline(limit_of(watch, limit), color="red", ls="--", label="threshold")
        ax_score.set_title(f"{mode}: score (exact match, 500 test problems; line style: seed)", fontsize=9)
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
    parser.add_argument("--eval-every", type=int, default=None, help="for every mode (default: each mode's own)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=None,
                        help="run only these variants of the modes (their logs, e.g. for benchmarks.step_size)")
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--no-run", action="store_true", help="only write the tables of the runs recorded")
    args = parser.parse_args()
    recorded, mine = {_key(r): r for r in read_csv()}, {}
    if not args.no_run:
        for m in args.modes:
            for need in MODES[m].get("needs", ()):
                need()
        starts = {MODES[m]["start"]: warm_student(MODES[m]["start"], MODES[m]["start_steps"], ROOT) for m in args.modes}
        for m in args.modes:
            prepare(ROOT / m, eval_overlay(evaluate_teacher=True, task=MODES[m]["task"], on_fit_start=True))
        jobs = [(m, v, s) for m in args.modes for s in args.seeds for v in MODES[m]["variants"]
                if (args.variants is None or v in args.variants)
                and (args.rerun or (m, v, s, args.steps) not in recorded
                     or recorded[(m, v, s, args.steps)]["start_score"] != starts[MODES[m]["start"]][1])]
        print(f"{len(jobs)} runs to do", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            for result in pool.map(lambda j: run(*j, args.steps, args.eval_every or MODES[j[0]]["eval_every"],
                                                 starts[MODES[j[0]]["start"]], not args.rerun), jobs):
                print(json.dumps({k: result.get(k) for k in ("mode", "variant", "seed", "score", "crossing",
                                                              "wall_s", "error")}), flush=True)
                if "score" in result:
                    mine[(result["mode"], result["variant"], result["seed"], args.steps)] = result
                    # merged with what is on disk now: another invocation may have written runs since this one began
                    recorded = {**{_key(r): r for r in read_csv()}, **mine}
                    write_csv(list(recorded.values()))
    runs = [r for r in recorded.values() if r["mode"] in args.modes and r["seed"] in args.seeds
            and r["steps"] == args.steps]
    for r in runs:  # the guards' steps again from the logs where they are here (a limit in MODES may have changed)
        if (logs := ROOT / r["mode"] / r["variant"] / f"seed_{r['seed']}" / "logs" / "version_0").exists():
            r["crossing"] = crossings(r["mode"], series(logs))
    write_csv(list({**{_key(r): r for r in read_csv()}, **{_key(r): r for r in runs}}.values()))
    plot(runs, args.modes)
    starts_text = "; ".join(sorted({f"{r['mode']}: {MODES[r['mode']]['start_steps']} steps, {r['start_score']:.3f}"
                                    for r in runs}))
    blocks = "\n\n".join(f"### {MODES[m]['title']}\n\nConfig: `{MODES[m]['config']}`, scored on "
                         f"`{MODES[m]['task']}`.\n\n{table(m, [r for r in runs if r['mode'] == m])}"
                         for m in args.modes)
    evals = ", ".join(f"{args.eval_every or MODES[m]['eval_every']} ({m})" for m in args.modes)
    text = f"""## Failure modes, reproduced and caught

Command: `.venv/bin/python -m benchmarks.failure_modes --modes {' '.join(args.modes)} --seeds \
{' '.join(map(str, args.seeds))} --steps {args.steps}{f" --eval-every {args.eval_every}" if args.eval_every else ""}`.
Runs dated {', '.join(sorted({r['date'] for r in runs}))}. Machine: {machine()}; one thread per run, fp32.
Students warmed up by SFT on gold (steps and score of each mode's start: {starts_text}), then {args.steps} steps of
the run (the config's λ, batch and optimizer unless the variant says otherwise), lm-eval every {evals} steps.
"Falls at": the first evaluation more than {DROP} below the start. Diagnostics: means over the first and last
tenth of the run's {WINDOW}-step windows.
What each mode tests: the docstring of `benchmarks/failure_modes.py`.

{blocks}

![failure modes](failure_modes.png)

Each run's windows and scores: `benchmarks/{RUNS_CSV.name}`."""
    print(text)
    record(text, "failure_modes")


if __name__ == "__main__":
    main()
