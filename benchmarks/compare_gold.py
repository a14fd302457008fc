"""TRL's GOLD trainer against this library across tokenizers, everything else equal.

    .venv/bin/python -m benchmarks.compare_gold [--comparison quickstart|smollm2_10|smollm2_90]
        [--rows trl_gold opd_gold opd_best] [--steps 1500] [--seeds 0 1 2] [--out DIR] [--best-aligner ...]
        [--best-loss ...] [--best-topk K] [--teacher-steps N] [--rerun] [--no-record]

GOLD (Patiño et al. 2025, `trl.experimental.gold.GOLDTrainer`) is the reference implementation of on-policy
distillation across tokenizers, so it is the baseline a claim about this library's cross-tokenizer path has to
beat, in the same run, on the same machine. Comparisons (`--comparison`):
- `quickstart`: `configs/quickstart/distill_cross.yaml`, a fresh byte-level BPE student on the arithmetic task;
- `smollm2_10`, `smollm2_90`: `configs/real/smollm2_same_tokenizer.yaml` + `configs/real/sequences.yaml`,
  SmolLM2-135M-Instruct teaching the 15-layer student cut from it, whose tokenizer keeps only the first 10% or 90% of
  SmolLM2's merges (`keep_merges`, written to `<out>/student_tokenizer`; the student's embeddings are remapped to it
  with `remap_vocab`), on the `sequences` task. Both tokenizers are byte-level BPE, which GOLD accepts.
Rows:
- `trl_gold`: `GOLDTrainer` with its ULD cross-tokenizer loss and the hybrid matched/unmatched loss, as GOLD's
  documentation recommends for different tokenizers (`use_uld_loss`, `uld_use_hybrid_loss`, weights 0.6 / 0.4);
- `opd_gold`: this library's `gold` loss (the same hybrid, same β and weights) through the `byte_spans` aligner;
- `opd_best`: this library with the comparison's best aligner, loss and teacher top-k (`--best-aligner`,
  `--best-loss`, `--best-topk` override them);
- `opd_best_hidden`: `opd_best` with the `hidden_match` term added on the same rollouts (weight 1): the student's
  layers regressed onto the teacher's at the shared token boundaries of prompt and completion; no other data.
Everything that can be shared is: the student (built by the same code from the same config and seed), the teacher,
the training rows (the gold completion closed by the student's EOS, tokenised as the library does, checked row by
row in the TRL run), the batch, λ, the sampling settings, the optimizer and its schedule (TRL gets a torch AdamW and a
`WarmupCosine` built from the config, as the library builds them), gradient clipping, the seeds, fp32 and one thread.
What cannot be made equal is printed with the table ("not equal: ..., because ...").

The quickstart's teacher: GOLD aligns by byte offsets and accepts only ByteLevel tokenizers, which its character
teacher (`builtin:char`, WordLevel with a Fuse decoder) is not; the script checks this with TRL's own encoder. When
TRL refuses it, a teacher with a byte-level tokenizer without merges (one token per byte: the same segmentation of
this task's ASCII text as the character tokenizer) is trained here once with `configs/quickstart/teacher.yaml`
(`--teacher-steps` shortens it for smoke tests) into `<out>/teacher` and serves all three rows. The TRL row runs in
a worker process of this script (`--worker gold`), as the library's rows run in `opd fit` processes.

Measures, taken the same way for every row: the score is lm-eval's exact match on the task's test problems, computed
by `opd_lightning.evaluation.evaluate_model` (the function `LmEvalCallback` runs on in-memory models) on each run's
saved `hf` directory; seconds per optimizer step is the wall time from the start of the first step to the end of the
last, divided by the steps (start-up, saving and evaluation excluded); peak memory is the training process's
`ru_maxrss` read at the end of its last step, before any evaluation (the library's runs evaluate in-process after
that step, so a whole-process peak would charge lm-eval to them only). Runs go one at a time; finished runs (same
row, settings, seed, steps and teacher, in `<out>/results.json`) are reused unless `--rerun`; processes running other
seeds into the same `--out` at once add to that store, not over each other's runs. Writes the table into
benchmarks/RESULTS.md (one block per comparison) unless `--no-record`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

from benchmarks.leaderboard import fit_and_score, score_saved, seed_args
from benchmarks.quickstart import machine, mean_sd, record

CONFIG = "configs/quickstart/distill_cross.yaml"
TEACHER_CONFIG = "configs/quickstart/teacher.yaml"
CHAR_TEACHER = Path("runs/quickstart/teacher/hf")


@dataclass(frozen=True)
class Comparison:
    """One side-by-side comparison: the library's configs, the task, and the student's tokenizer."""

    configs: tuple[str, ...]  # `opd fit --config` files, in order
    task: str  # lm-eval task scored, against its gold answers
    metric: str  # the task's score, as `evaluate_model` names it
    limit: int | None  # test documents scored (None: all)
    merges: float | None  # None: the config's student; else the teacher's tokenizer keeping this share of merges
    best: tuple[str, str, int | None]  # aligner, loss and teacher_topk of the `opd_best` row (unless given as options)
    description: str


COMPARISONS = {
    "quickstart": Comparison((CONFIG, "benchmarks/compare_gold_quickstart.yaml"), "arithmetic", "exact_match", None, None, ("exact_spans", "forward_kl", 1), "the quickstart's fresh byte-level BPE student"),
    **{f"smollm2_{p}": Comparison(("configs/real/smollm2_same_tokenizer.yaml", "configs/real/sequences.yaml"),
                               "sequences", "exact_match/strict", 300, p / 100, ("bpe_subset", "reverse_kl", None),
                               f"the 15-layer SmolLM2 student of the real config with a tokenizer keeping {p}% of "
                               "SmolLM2's merges (embeddings remapped, `remap_vocab`)")
       for p in (10, 90)},
}
GOLD_HYBRID = {"beta": 0.5, "matched_weight": 0.6, "unmatched_weight": 0.4}  # TRL's β default, GOLD docs' weights
DEFAULTS = {"out": None, "best_aligner": None, "best_loss": None, "best_topk": None,
            "teacher_steps": None}  # options left out of the recorded command when unchanged
ROWS = {"trl_gold": "GOLD (TRL `GOLDTrainer`, ULD hybrid)", "opd_gold": "opd-lightning `gold`",
        "opd_best": "opd-lightning, best", "opd_best_hidden": "opd-lightning, best + `hidden_match`"}
HIDDEN_TERMS = "[{loss: hidden_match, weight: 3.0}]"  # on the rollouts: the same rows GOLD trains on
OVERLAY = """trainer:
  callbacks:
    - class_path: opd_lightning.evaluation.LmEvalCallback
      init_args: {{tasks: [{task}], limit: {limit}}}
    - class_path: opd_lightning.export.ExportStudent
    - class_path: benchmarks.compare_gold.StepTimer
"""
NOT_EQUAL = [
    ("rollout draws: same temperature, top-p, top-k and max new tokens, but the library samples each row with "
     "Gumbel noise keyed by (seed, step, dataset row) and TRL with `generate`'s multinomial sampling from torch's "
     "global generator, because TRL's generation has no per-row noise streams: the same distribution, other samples"),
    ("λ draws: the same probability, but the library decides each step by `uniform(seed, step) < λ` and TRL by "
     "`random.random() <= lmbda` from Python's global generator, because each trainer owns its draw: the on-policy "
     "steps differ (realised shares in the table)"),
    ("data order: both shuffle the same 20,000 rows with the seed, the library with `torch.randperm(seed + epoch)`, "
     "TRL with its `RepeatSampler`, because each trainer owns its sampler: the batches differ"),
    ("loss normalisation: the library sums per-token losses over the step's valid completion tokens and divides once "
     "by their number; TRL's ULD loss averages over the aligned groups of each sequence, then over sequences, "
     "because that is how `ULDLoss` reduces (every sequence weighs the same whatever its length)"),
    ("alignment (what is compared, by design): TRL groups tokens on shared byte boundaries and merges each group "
     "into one distribution per model (`bayesian`: the last position's distribution times the realised earlier "
     "tokens' probabilities), compared on the token strings both vocabularies hold; `byte_spans` and `exact_spans` "
     "carry the teacher's mass onto the student's next token"),
    ("matched part of the hybrid: TRL applies its generalized JSD to the raw matched probabilities (a "
     "sub-probability vector, clamped at 1e-8 before the log), the library's `gold` to the distributions "
     "renormalised on the matched tokens, because the raw form is not a divergence at β = 0 or 1 (losses/gold.py)"),
    ("unmatched part of the hybrid: TRL skips the sorted L1 whenever one side has no unmatched token (with the "
     "byte-level teacher every teacher token has a student partner, so TRL's loss is 0.6 × the matched JSD), while "
     "the library's `gold` compares the student's unmatched tokens with the empty teacher vector (0.4 × the "
     "student's mass on them), because each implements the zero-padded sort its own way"),
    ("position ids: TRL's student forward on left-padded rows passes none (positions count the padding), the "
     "library's skips the padding, because `GOLDTrainer.compute_loss` does not build them; with rotary embeddings "
     "only relative positions matter, so this changes rounding only"),
    ("time per step: the library computes its `diag/*` diagnostics every step (its default; a few percent of a "
     "step, benchmarks/RESULTS.md) and tokenises each batch inside the step, TRL tokenises the whole dataset before "
     "training (outside the timed steps, inside the peak memory), because that is how each trainer is built"),
    ("peak memory: each process holds its own framework (Lightning; TRL with accelerate and datasets), because "
     "the frameworks are what is compared; the models and batches are the same"),
]
STOP_NOT_EQUAL = ("stop strings: the config stops sampling at a newline or comma, but TRL's generation has no stop "
                  "strings, so the library's rows run with `--model.sampling.stop []` and both write up to the "
                  "config's new tokens (lm-eval cuts the answer at the same characters either way)")
TRL_SET = ("TRL options set off their defaults to match the library: top_p and top_k from the config's sampling "
           "(GOLD: 0.95 and 0), "
           "uld_token_merge_strategy `bayesian` (the default `observed` reads each answer token's logits, which "
           "predict the following token, so the first answer token's prediction is never trained), "
           "uld_skip_student_eos / uld_skip_teacher_eos false (the library trains the EOS prediction), bf16 and "
           "gradient_checkpointing false (SFTConfig defaults: true), max_length 32 (the student's context)")


class _Clock:
    """Time from the first optimizer step's start to the last one's end, and the process's peak RSS at that end."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end, self.steps, self.peak_kb, self.on_policy = 0.0, 0, 0, 0

    def begin(self) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def finish(self, on_policy: bool) -> None:
        self.end, self.steps = time.perf_counter(), self.steps + 1
        self.on_policy += int(on_policy)
        self.peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, the peak since start-up

    def write(self, path: Path, **extra) -> None:
        steps = max(self.steps, 1)
        path.write_text(json.dumps({"steps": self.steps, "step_s": (self.end - (self.start or self.end)) / steps,
                                    "peak_rss_mb": self.peak_kb / 1024, "on_policy_share": self.on_policy / steps,
                                    **extra}))


class StepTimer(Callback):
    """`_Clock` for an `opd fit` run (one batch is one optimizer step); writes `<default_root_dir>/steps.json`."""

    def __init__(self) -> None:
        self.clock = _Clock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.finish(bool(trainer.callback_metrics.get("train/rollout/on_policy", 0.0)))

    def on_train_end(self, trainer, pl_module) -> None:
        self.clock.write(Path(trainer.default_root_dir) / "steps.json")


def distill_config(comparison: Comparison) -> dict:
    """The comparison's configs merged as `opd fit` merges them, the one source of every shared setting."""

    def merge(base: dict, over: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}

    config: dict = {}
    for path in comparison.configs:
        config = merge(config, yaml.safe_load(Path(path).read_text()))
    return config


def student_overrides(comparison: Comparison, out: Path) -> list[str]:
    """`opd fit` options that give the student the comparison's tokenizer (a share of the teacher's merges, written
    once into `<out>/student_tokenizer`), with its embeddings remapped; none for the quickstart."""
    if comparison.merges is None:
        return []
    directory = out / "student_tokenizer"
    if not (directory / "tokenizer.json").exists():
        from opd_lightning.aligners import keep_merges

        from opd_lightning.models import HFModel

        teacher = HFModel(**distill_config(comparison)["model"]["teacher"]).load_tokenizer()
        keep_merges(teacher, comparison.merges).save_pretrained(directory)
    return ["--model.student.tokenizer", str(directory), "--model.student.remap_vocab", "true",
            "--model.sampling.stop", "[]"]  # TRL's generation has no stop strings


def grad_clip_norm(model: dict) -> float | None:
    """The library's gradient clipping for `model` (the config's `model:` block): its value or the default."""
    import inspect

    from opd_lightning.module import DistillationModule

    return model.get("grad_clip_norm", inspect.signature(DistillationModule).parameters["grad_clip_norm"].default)


def byte_tokenizer():
    """A ByteLevel BPE without merges: one token per byte (`<pad>` 0, `<eos>` 1, then the 256 byte symbols)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    vocab.update({symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()), start=2)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<pad>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left", clean_up_tokenization_spaces=False)


def gold_refusal(tokenizer) -> str | None:
    """Why TRL's GOLD cannot align `tokenizer` (the error of the encoder its teacher inputs go through), or None."""
    from trl.experimental.utils import encode_with_byte_offsets

    try:
        encode_with_byte_offsets(tokenizer.backend_tokenizer, ["12+34=46"])
    except NotImplementedError as error:
        return str(error)
    return None


def score_dir(path: Path, comparison: Comparison) -> float:
    """lm-eval exact match of the saved model in `path` on the comparison's test split, loaded as the library loads."""
    return score_saved(path, comparison.task, comparison.metric, comparison.limit)


def shared_teacher(out: Path, teacher_steps: int | None, comparison: Comparison) -> dict:
    """The teacher of every row: the config's teacher if GOLD accepts its tokenizer; for the quickstart, whose
    character teacher it refuses, a byte-level one trained here (`<out>/teacher`, reused while its step count
    matches)."""
    from opd_lightning.models import HFModel
    from opd_lightning.tasks.arithmetic import char_tokenizer

    if comparison.merges is not None:
        spec = HFModel(**distill_config(comparison)["model"]["teacher"])
        refusal = gold_refusal(spec.load_tokenizer())
        if refusal:
            raise SystemExit(f"TRL's GOLD refuses the teacher {spec.path}: {refusal}")
        return {"path": spec.path, "name": f"{spec.path}", "refusal": None, "score": score_dir(Path(spec.path), comparison)}
    refusal = gold_refusal(char_tokenizer())
    if refusal is None:
        return {"path": str(CHAR_TEACHER), "name": "quickstart character teacher", "refusal": None,
                "score": score_dir(CHAR_TEACHER, comparison)}
    steps = teacher_steps or yaml.safe_load(Path(TEACHER_CONFIG).read_text())["trainer"]["max_steps"]
    root, hf = out / "teacher", out / "teacher" / "hf"
    info = root / "teacher.json"
    if info.exists() and json.loads(info.read_text())["steps"] == steps and (hf / "config.json").exists():
        return json.loads(info.read_text())
    shutil.rmtree(root, ignore_errors=True)
    tokenizer_dir = out / "byte_tokenizer"
    byte_tokenizer().save_pretrained(tokenizer_dir)
    print(f"TRL's GOLD refuses the character teacher ({refusal}); training a byte-level teacher, {steps} steps",
          flush=True)
    subprocess.run([sys.executable, "-m", "opd_lightning", "fit", "--config", TEACHER_CONFIG,
                    "--model.student.tokenizer", str(tokenizer_dir), "--trainer.default_root_dir", str(root),
                    "--trainer.max_steps", str(steps), "--model.scheduler.init_args.total_steps", str(steps)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    teacher = {"path": str(hf), "name": f"byte-level teacher ({TEACHER_CONFIG}, {steps} steps)", "steps": steps,
               "refusal": refusal, "score": score_dir(hf, comparison)}
    info.write_text(json.dumps(teacher, indent=2))
    return teacher


def _measured(result: dict, run_dir: Path, comparison: Comparison) -> dict:
    """`result` with the step clock's numbers and the score of the saved student (or the error if there is none)."""
    if "error" in result:
        return result
    steps_file, hf = run_dir / "steps.json", run_dir / "hf"
    if not steps_file.exists() or not (hf / "config.json").exists():
        return {**result, "error": f"no {steps_file} or {hf}: the run did not finish"}
    return {**result, **json.loads(steps_file.read_text()), "score": score_dir(hf, comparison)}


def run_opd(row: str, setting: dict, seed: int, steps: int, out: Path, teacher: dict,
            comparison: Comparison) -> dict:
    """One library row through `opd fit` (leaderboard's `fit_and_score`), then its saved student scored."""
    run_dir = out / row / f"seed_{seed}"
    args = [arg for path in comparison.configs for arg in ("--config", path)]
    args += ["--config", str(out / "overlay.yaml"), "--model.teacher.path", teacher["path"],
             "--model.aligner", setting["aligner"], "--model.loss", setting["loss"], "--model.teacher_topk",
             str(setting.get("topk") or "null"), *seed_args(seed), *student_overrides(comparison, out)]
    if "terms" in setting:
        args += ["--model.extra_terms", setting["terms"]]
    result = fit_and_score(args, run_dir, steps, _key(row, setting, seed, teacher), comparison.task,
                           comparison.metric)
    if "score" in result:
        result["score_in_fit"] = result.pop("score")  # LmEvalCallback's, on the in-memory student: a cross-check
    return _measured(result, run_dir, comparison)


def run_trl(row: str, setting: dict, seed: int, steps: int, out: Path, teacher: dict,
            comparison: Comparison) -> dict:
    """The TRL row in a worker process of this script, then its saved student scored."""
    run_dir = out / row / f"seed_{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    name = next(k for k, v in COMPARISONS.items() if v == comparison)
    student_overrides(comparison, out)  # writes the student's tokenizer, which the worker reads
    args = [sys.executable, "-m", "benchmarks.compare_gold", "--worker", "gold", "--seeds", str(seed), "--steps",
            str(steps), "--out", str(run_dir), "--teacher", teacher["path"], "--comparison", name]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    result = {**_key(row, setting, seed, teacher), "steps": steps, "date": str(datetime.date.today()),
              "wall_s": time.perf_counter() - start}
    if done.returncode:
        result["error"] = done.stderr[-2000:]
    return _measured(result, run_dir, comparison)


def _key(row: str, setting: dict, seed: int, teacher: dict) -> dict:
    topk = f" (teacher top-{setting['topk']})" if setting.get("topk") else ""
    topk += f" + {setting['terms']}" if "terms" in setting else ""
    return {"row": row, "setting": f"{setting['aligner']} + {setting['loss']}{topk}", "seed": seed,
            "teacher": teacher["name"]}


def _class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def train_rows(config: dict) -> str:
    """The training data the config reads (the data module's default when it names none)."""
    import inspect

    from opd_lightning.data import PromptDataModule

    return config.get("data", {}).get("train") or inspect.signature(PromptDataModule).parameters["train"].default


def _trl_dataset(train: str):
    """The training rows as TRL's prompt/completion dataset (GOLD appends the student's EOS, as the library does)."""
    from datasets import Dataset

    from opd_lightning.data import load_rows

    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in load_rows(train)])


def tokenisation_mismatches(prepared, tokenizer, train: str) -> int:
    """Rows whose ids or completion boundary in TRL's prepared dataset differ from the library's encoding (prompt
    as `encode_prompts` encodes it, completion as `rollout_from_texts` does, then EOS)."""
    from opd_lightning.aligners import prefixless_encoder

    from opd_lightning.data import load_rows

    rows = load_rows(train)
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    completions = prefixless_encoder(tokenizer).encode_batch([r["completion"] for r in rows], add_special_tokens=False)
    bad = 0
    for prompt, completion, row in zip(prompts, completions, prepared, strict=True):
        ids = prompt + completion.ids + [tokenizer.eos_token_id]
        bad += row["input_ids"] != ids or row["completion_mask"] != [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    return bad


def gold_worker(seed: int, steps: int, run_dir: Path, teacher_path: str, comparison: Comparison) -> None:
    """Train the `trl_gold` row in this process: the comparison's student, the shared teacher, GOLD's hybrid ULD."""
    import datasets
    from transformers import TrainerCallback
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    from opd_lightning.models import HFModel
    from opd_lightning.rollout import SamplingConfig

    datasets.disable_progress_bars()
    config = distill_config(comparison)
    model, sampling = config["model"], SamplingConfig(**config["model"]["sampling"])
    student = dict(model["student"])
    if comparison.merges is not None:  # as `student_overrides` sets it for the library's rows
        student.update(tokenizer=str(run_dir.parent.parent / "student_tokenizer"), remap_vocab=True)
    else:
        student["seed"] = seed
    student_spec = HFModel(**student)
    tokenizer = student_spec.load_tokenizer()
    student = student_spec.load_model(tokenizer)  # the library's default context limit: the student's
    teacher = HFModel(path=teacher_path).load_model()
    optimizer = _class(model["optimizer"]["class_path"])(student.parameters(), **model["optimizer"]["init_args"])
    scheduler = _class(model["scheduler"]["class_path"])(optimizer, **{**model["scheduler"]["init_args"],
                                                                       "total_steps": steps})
    args = GOLDConfig(
        output_dir=str(run_dir / "trl"), max_steps=steps, per_device_train_batch_size=config["data"]["batch_size"],
        gradient_accumulation_steps=1, lmbda=model["rollout"]["on_policy_fraction"], beta=GOLD_HYBRID["beta"],
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        max_completion_length=sampling.max_new_tokens,
        max_length=model["rollout"].get("max_length") or student.config.max_position_embeddings, use_uld_loss=True,
        uld_use_hybrid_loss=True, uld_hybrid_matched_weight=GOLD_HYBRID["matched_weight"],
        uld_hybrid_unmatched_weight=GOLD_HYBRID["unmatched_weight"], uld_token_merge_strategy="bayesian",
        uld_skip_student_eos=False, uld_skip_teacher_eos=False, teacher_tokenizer_name_or_path=teacher_path,
        max_grad_norm=grad_clip_norm(model) or 0.0, seed=seed, data_seed=seed, use_cpu=True, bf16=False,
        gradient_checkpointing=False, dataloader_drop_last=True, report_to="none", save_strategy="no",
        logging_steps=10, disable_tqdm=True)
    clock = _Clock()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.finish(bool(trainer._buffered_on_policy and trainer._buffered_on_policy[0]))

    train = train_rows(config)
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                          train_dataset=_trl_dataset(train), optimizers=(optimizer, scheduler), callbacks=[Timer()])
    mismatches = tokenisation_mismatches(trainer.train_dataset, tokenizer, train)
    trainer.train()
    clock.write(run_dir / "steps.json", tokenisation_mismatches=mismatches)
    trainer.save_model(str(run_dir / "hf"))


def table(results: list[dict], settings: dict) -> str:
    header = ("| row | aligner + loss | exact match (mean ± std) | seeds | s / optimizer step | peak RSS (MB) | "
              "on-policy share | wall s/run |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row, label in ROWS.items():
        runs = [r for r in results if r["row"] == row]
        ok = [r for r in runs if "score" in r]
        if runs and not ok:
            lines.append(f"| {label} | {runs[0]['setting']} | failed: {runs[0]['error'].strip().splitlines()[-1][:80]} "
                         "| | | | | |")
        if not ok:
            continue
        seeds = ", ".join(f"{r['score']:.3f}" for r in ok)
        lines.append(f"| {label} | {settings[row]['label']} | {mean_sd([r['score'] for r in ok], 3)} | {seeds} | "
                     f"{mean_sd([r['step_s'] for r in ok], 3)} | "
                     f"{mean_sd([r['peak_rss_mb'] for r in ok], 0)} | {mean_sd([r['on_policy_share'] for r in ok], 2)} | "
                     f"{statistics.mean(r['wall_s'] for r in ok):.0f} |")
    return "\n".join(lines)


def row_settings(best_aligner: str, best_loss: str, best_topk: int | None) -> dict:
    gold = json.dumps({"name": "gold", **GOLD_HYBRID})
    hybrid = ", ".join(f"{k} {v}" for k, v in GOLD_HYBRID.items())
    return {"trl_gold": {"aligner": "trl_byte_offsets", "loss": gold,
                         "label": f"TRL byte-offset groups (`bayesian`) + ULD hybrid ({hybrid})"},
            "opd_gold": {"aligner": "byte_spans", "loss": gold, "label": f"byte_spans + gold ({hybrid})"},
            "opd_best": {"aligner": best_aligner, "loss": best_loss, "topk": best_topk,
                         "label": f"`{best_aligner}` + `{best_loss}`" + (f", teacher top-{best_topk}" if best_topk
                                                                          else "")},
            "opd_best_hidden": {"aligner": best_aligner, "loss": best_loss, "topk": best_topk, "terms": HIDDEN_TERMS,
                                "label": f"`{best_aligner}` + `{best_loss}`" + (f", teacher top-{best_topk}"
                                                                                 if best_topk else "")
                                + ", + `hidden_match` on the rollouts (weight 3)"}}


def checks(results: list[dict]) -> str:
    """What each run checked: TRL's training rows against the library's encoding, and each library run's in-fit
    score (`LmEvalCallback`, in memory) against the score of its saved model."""
    trl = [r for r in results if "tokenisation_mismatches" in r]
    opd = [r for r in results if "score_in_fit" in r]
    bad_rows = {f"seed {r['seed']}": r["tokenisation_mismatches"] for r in trl if r["tokenisation_mismatches"]}
    bad_scores = {f"{r['row']} seed {r['seed']}": (r["score_in_fit"], r["score"]) for r in opd
                  if abs(r["score_in_fit"] - r["score"]) > 1e-9}
    lines = [f"- checked: TRL's prepared training rows hold the library's ids and completion boundary: "
             f"{'in every TRL run' if not bad_rows else f'NOT in {bad_rows} (mismatching rows)'}." if trl else "",
             f"- checked: a library run's in-fit score equals its saved model's: "
             f"{'in every run' if not bad_scores else f'NOT in {bad_scores} (in fit, saved)'}." if opd else ""]
    return "\n".join(line for line in lines if line)


def report(args: argparse.Namespace, results: list[dict], settings: dict, teacher: dict,
           comparison: Comparison) -> str:
    config = distill_config(comparison)
    model = config["model"]
    optimizer = model["optimizer"]["init_args"]
    why = (f" TRL's GOLD refuses the quickstart's character teacher (\"{teacher['refusal']}\"), so every row uses "
           "this byte-level one." if teacher.get("refusal") else "")
    dates = sorted({r["date"] for r in results})
    options = {"--out": args.given_out, "--best-aligner": args.best_aligner, "--best-loss": args.best_loss,
               "--best-topk": args.best_topk,
               "--teacher-steps": args.teacher_steps}
    extra = "".join(f" {name} {shlex.quote(str(value))}" for name, value in options.items()
                    if value != DEFAULTS[name.removeprefix("--").replace("-", "_")])
    command = (f".venv/bin/python -m benchmarks.compare_gold --comparison {args.comparison} --rows "
               f"{' '.join(args.rows)} --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}{extra}")
    not_equal = [*NOT_EQUAL, *([STOP_NOT_EQUAL] if "stop" in model["sampling"] else [])]
    not_equal_text = "\n".join(f"- not equal: {item}." for item in not_equal)
    scored = f"the first {comparison.limit}" if comparison.limit else "all the"
    return f"""## GOLD (TRL) against opd-lightning, across tokenizers: {args.comparison}

Command: `{command}`.
Runs dated {', '.join(dates)}. Machine: {machine()}; runs one at a time, one thread each (OMP_NUM_THREADS=1), fp32.
Setting: `{' + '.join(comparison.configs)}`, {comparison.description}; λ = {model['rollout']['on_policy_fraction']}, \
batch {config['data']['batch_size']}, temperature {model['sampling']['temperature']}, \
{model['sampling']['max_new_tokens']} new tokens, AdamW {optimizer['lr']} with the config's warm-up, gradient \
clipping {grad_clip_norm(model)}, {args.steps} optimizer steps.
Teacher for every row: {teacher['name']}, exact match {teacher['score']:.3f}.{why}
Score: lm-eval `{comparison.metric}` on {scored} test problems of `{comparison.task}`, `opd_lightning.evaluation.evaluate_model` on
each run's saved `hf` directory. s / step: wall time from the first optimizer step's start to the last one's end, over the steps. Peak
RSS: the training process's `ru_maxrss` at the end of its last step. On-policy share: the steps that rolled out.
Wall s/run: the whole training process, start-up included (and, in the library's rows, its in-fit lm-eval check).

{table(results, settings)}

{TRL_SET}.

{checks(results)}
{not_equal_text}"""


def _recorded(store: Path) -> dict[tuple, dict]:
    runs = json.loads(store.read_text()) if store.exists() else []
    return {_identity(r): r for r in runs if "score" in r}


def _identity(result: dict) -> tuple:
    return result["row"], result["setting"], result["seed"], result["steps"], result["teacher"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparison", choices=list(COMPARISONS), default="quickstart")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=DEFAULTS["out"], help="default: runs/compare_gold/<comparison>")
    parser.add_argument("--best-aligner", default=DEFAULTS["best_aligner"],
                        help="--model.aligner of the opd_best row (default: the comparison's)")
    parser.add_argument("--best-loss", default=DEFAULTS["best_loss"],
                        help="--model.loss of the opd_best row (default: the comparison's)")
    parser.add_argument("--best-topk", type=int, default=DEFAULTS["best_topk"],
                        help="--model.teacher_topk of the opd_best row (default: the comparison's; 0: none)")
    parser.add_argument("--teacher-steps", type=int, default=DEFAULTS["teacher_steps"],
                        help=f"steps of the byte-level teacher, when one is trained (default: {TEACHER_CONFIG}'s)")
    parser.add_argument("--rerun", action="store_true", help="run again even where a finished run is recorded")
    parser.add_argument("--no-record", action="store_true", help="print the table; leave benchmarks/RESULTS.md alone")
    parser.add_argument("--worker", choices=["gold"], help=argparse.SUPPRESS)  # one TRL run, in its own process
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args()
    comparison = COMPARISONS[args.comparison]
    args.given_out = args.out
    args.out = args.out or Path("runs/compare_gold") / args.comparison
    best_aligner, best_loss, best_topk = comparison.best
    best_aligner, best_loss = args.best_aligner or best_aligner, args.best_loss or best_loss
    best_topk = best_topk if args.best_topk is None else args.best_topk or None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; lm-eval and datasets must not look online
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(1)  # scoring in this process runs on one thread, as the runs do
    if args.worker:
        gold_worker(args.seeds[0], args.steps, args.out, args.teacher, comparison)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlay.yaml").write_text(OVERLAY.format(task=comparison.task, limit=comparison.limit or "null"))
    teacher = shared_teacher(args.out, args.teacher_steps, comparison)
    settings = row_settings(best_aligner, best_loss, best_topk)
    store = args.out / "results.json"
    done = _recorded(store)
    wanted = {row: {seed: _identity({**_key(row, settings[row], seed, teacher), "steps": args.steps})
                    for seed in args.seeds} for row in args.rows}
    for seed in args.seeds:
        for row in args.rows:
            if wanted[row][seed] in done and not args.rerun:
                continue
            run = run_trl if row == "trl_gold" else run_opd
            result = run(row, settings[row], seed, args.steps, args.out, teacher, comparison)
            done = {**_recorded(store), **done, _identity(result): result}  # with runs another process recorded
            partial = store.with_suffix(".partial")
            partial.write_text(json.dumps(list(done.values()), indent=2))
            partial.replace(store)  # whole, for a process reading it at the same moment
            print(json.dumps({k: result.get(k) for k in ("row", "seed", "score", "step_s", "peak_rss_mb", "error")}),
                  flush=True)
    results = [done[identity] for seeds in wanted.values() for identity in seeds.values() if identity in done]
    text = report(args, results, settings, teacher, comparison)
    print(text)
    if not args.no_record:
        record(text, f"compare_gold_{args.comparison}")


if __name__ == "__main__":
    main()
