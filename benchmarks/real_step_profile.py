"""Where a training step of the real-model run goes (configs/real/smollm2_same_tokenizer.yaml by default).

    .venv/bin/python -m benchmarks.real_step_profile [--config ... [--config OVERLAY]] [--warmup 1] [--steps 20]

Builds the Trainer, DistillationModule and data exactly as `opd fit --config CONFIG` does (LightningCLI with
`run=False`, so every setting is the config's), drops the lm-eval callback and the progress bar, and runs
`warmup + steps` real optimizer steps through `Trainer.fit`, logging metrics as the fit does but into a temporary
directory. Each phase is timed with `time.perf_counter` around the module's own calls (CPU only: there is no
asynchronous work to synchronise):

- rollout generation: `RolloutSource.generate` (the student's `generate`, on-policy steps only);
- gold completions: `_text_rollout` (tokenising the dataset's completions, off-policy steps);
- teacher forward: `ReferenceScorer.teacher_target` (no-grad teacher forward on the rollout), less the alignment;
- alignment: the aligner's `teacher_inputs` (re-tokenising the rollout for the teacher) and `project` (bringing
  its outputs to the student's positions);
- student forward: `completion_logits` called on the student (with grad, outside generation);
- loss: the loss modules' forward; diagnostics: `_diagnose` plus the `diag/*` compute at the step's end;
- student backward: `manual_backward` (through the loss into the student);
- optimizer: gradient clipping plus `AdamW.step`;
- other: the step's wall time (from `on_train_batch_start` to `on_train_batch_end`) minus all of the above:
  prompt tokenisation, the on/off-policy draw, token counts, zero_grad, the scheduler, `self.log`.

Data loading between steps is outside the step's wall time. The rollout draws are seeded per step as in the fit,
so steps 2..N see the same on-policy/gold pattern as the fit's. Prints one table (seconds per step, averaged over the
on-policy steps, the gold steps and all measured steps) and, first, the validation loss of the untrained student (one
validation batch, as `trainer.validate` computes it).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import lightning.pytorch as pl
import torch

import opd_lightning.module as module_lib
from benchmarks.quickstart import machine
from opd_lightning.cli import OPDCLI
from opd_lightning.data import PromptDataModule
from opd_lightning.evaluation import LmEvalCallback
from opd_lightning.module import DistillationModule

PHASES = ("rollout generation", "gold completions", "teacher forward", "alignment", "student forward", "loss",
          "diagnostics", "student backward", "optimizer")


class StepClock(pl.Callback):
    """Per-step phase timings, filled by the wrappers that `instrument` installs."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: defaultdict[str, float] = defaultdict(float)

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] += seconds

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        optimizer.step = self.timed("optimizer", optimizer.step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.current, self.start = defaultdict(float), time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.current["step"] = time.perf_counter() - self.start
        self.current["teacher forward"] -= self.current["alignment"]  # timed inside the teacher's phase
        self.current["on_policy"] = float("rollout generation" in self.current)
        self.steps.append(dict(self.current))

    def timed(self, phase: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)

        return wrapper


def instrument(module: DistillationModule, clock: StepClock) -> None:
    """Wrap the module's phases (instance attributes shadow the methods; the forward helper is module-level)."""
    source, scorer = module.rollout_source, module.scorer
    source.generate = clock.timed("rollout generation", source.generate)
    source.text_rollout = clock.timed("gold completions", source.text_rollout)
    scorer.teacher_target = clock.timed("teacher forward", scorer.teacher_target)
    module.aligner.teacher_inputs = clock.timed("alignment", module.aligner.teacher_inputs)
    module.aligner.project = clock.timed("alignment", module.aligner.project)
    module._diagnose = clock.timed("diagnostics", module._diagnose)
    module.train_diag.compute = clock.timed("diagnostics", module.train_diag.compute)
    module.manual_backward = clock.timed("student backward", module.manual_backward)
    module.clip_gradients = clock.timed("optimizer", module.clip_gradients)
    for term in module.terms:
        term.loss.forward = clock.timed("loss", term.loss.forward)
    original = module_lib.completion_logits

    def completion_logits(model, *args, **kwargs):  # the teacher's calls (in reference.py) are timed as its forward
        return clock.timed("student forward", original)(model, *args, **kwargs)

    module_lib.completion_logits = completion_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="config file; repeat for overlays, as with `opd fit` "
                        "(default: configs/real/smollm2_same_tokenizer.yaml)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not counted")
    parser.add_argument("--steps", type=int, default=20, help="steps measured")
    args = parser.parse_args()
    args.config = args.config or ["configs/real/smollm2_same_tokenizer.yaml"]
    sys.argv = sys.argv[:1]  # LightningCLI below reads only `args`; keep it from warning about ours
    total = args.warmup + args.steps
    log_dir = tempfile.mkdtemp(prefix="opd_profile_")  # metrics are logged as in the fit, but not into its run
    cli = OPDCLI(DistillationModule, PromptDataModule, run=False, auto_configure_optimizers=False,
                 save_config_callback=None,
                 args=[*(a for c in args.config for a in ("--config", c)), "--trainer.max_steps", str(total), "--trainer.default_root_dir",
                       log_dir, "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    trainer, module = cli.trainer, cli.model
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LmEvalCallback)]
    [val] = trainer.validate(module, datamodule=cli.datamodule, verbose=False)
    print(f"untrained student: val/loss {val['val/loss']:.4f} (one validation batch, on-policy)")

    clock = StepClock()
    trainer.callbacks.append(clock)
    instrument(module, clock)
    trainer.fit(module, datamodule=cli.datamodule)  # val_check_interval > total: no validation here
    measured = clock.steps[args.warmup:]
    groups = {"on-policy": [s for s in measured if s["on_policy"]],
              "gold (off-policy)": [s for s in measured if not s["on_policy"]], "all": measured}
    print(f"\n{machine()}; config {' + '.join(args.config)}; batch {cli.datamodule.batch_size}; steps {args.warmup + 1}..{total} "
          f"measured after {args.warmup} warm-up: {len(groups['on-policy'])} on-policy, "
          f"{len(groups['gold (off-policy)'])} gold\n")
    means = {name: {p: statistics.mean(s.get(p, 0.0) for s in steps) for p in (*PHASES, "step")} if steps else None
             for name, steps in groups.items()}
    for m in means.values():
        if m is not None:
            m["other"] = m["step"] - sum(m[p] for p in PHASES)
    print("| phase (s per step) | " + " | ".join(f"{n} ({len(groups[n])})" for n in groups) + " | share of all |")
    print("|---|" + "---|" * (len(groups) + 1))
    for phase in (*PHASES, "other", "step"):
        cells = [f"{m[phase]:.3f}" if m is not None else "-" for m in means.values()]
        print(f"| {phase} | " + " | ".join(cells) + f" | {means['all'][phase] / means['all']['step']:.1%} |")
    print("per step:", [round(s["step"], 3) for s in measured], f"torch threads {torch.get_num_threads()}")

if __name__ == "__main__":
    main()
