"""The `opd` command: LightningCLI over DistillationModule and PromptDataModule.

`opd fit|validate|test --config configs/....yaml`. Losses and aligners are chosen by registry name
(`model.loss: reverse_kl`), by name with arguments (`model.loss: {name: sampled_token, credit: discounted}`, or on the
command line `--model.loss sampled_token --model.loss.credit discounted`), or by `class_path`/`init_args`;
optimizers and schedulers by `class_path`. What this class adds to LightningCLI:
- metrics go to CSV under the run's `trainer.default_root_dir` unless a config names a logger;
- `--ckpt_path last` resumes the run's newest checkpoint, in the same log version (`resume`);
- SIGINT and SIGTERM end a fit at the next step boundary with a checkpoint and exit code 130 / 143;
- the progress bar counts optimizer steps out of `trainer.max_steps`;
- options that moved into groups (`model.on_policy_fraction` -> `model.rollout.on_policy_fraction`) fail with the
  new name, and INFO lines of `opd_lightning` (models loaded, exports and evaluations written) reach the console.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from opd_lightning.data import PromptDataModule
from opd_lightning.module import DistillationModule
from opd_lightning.progress import StepProgressBar
from opd_lightning.resume import Interruptible, find_last_checkpoint, version_of

__all__ = ["OPDCLI", "RENAMED", "check_renamed", "expand_registry_names", "main"]

# Flat model options that moved into typed groups: old name -> new name.
RENAMED = {
    "on_policy_fraction": "rollout.on_policy_fraction",
    "off_policy_source": "rollout.off_policy_source",
    "micro_batch_size": "rollout.micro_batch_size",
    "max_length": "rollout.max_length",
    "use_chat_template": "rollout.use_chat_template",
    "mask_special_tokens": "rollout.mask_special_tokens",
    "diag_topk": "diagnostics.topk",
    "diag_ngram": "diagnostics.ngram",
    "diag_max_positions": "diagnostics.max_positions",
    "grad_coherence_every": "diagnostics.grad_coherence_every",
}


def _renamed_message(old: str, where: str) -> str:
    return (f"{where}: model.{old} is now model.{RENAMED[old]} (the rollout-policy and diagnostics options are "
            "grouped; see `opd fit --help`)")


def check_renamed(argv: list[str]) -> None:
    """Raise, naming the new option, when `argv` or a `--config` file it names uses a flat option that moved."""
    configs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    configs += [b for a, b in itertools.pairwise(argv) if a == "--config"]
    for arg in argv:
        key = arg.split("=", 1)[0].removeprefix("--model.")
        if arg.startswith("--model.") and key in RENAMED:
            raise ValueError(_renamed_message(key, "command line"))
        if arg.startswith("--model.diagnostics=") and arg.split("=", 1)[1].lower() in ("true", "false"):
            raise ValueError("command line: model.diagnostics is now a group: use --model.diagnostics.enabled")
    for path in configs:
        file = Path(path)
        model = (yaml.safe_load(file.read_text()) or {}).get("model") if file.is_file() else None
        if not isinstance(model, dict):
            continue
        for key in model:
            if key in RENAMED:
                raise ValueError(_renamed_message(key, str(path)))
        if isinstance(model.get("diagnostics"), bool):
            enabled = str(model["diagnostics"]).lower()  # a configuration error, like the renamed options above
            raise ValueError(f"{path}: model.diagnostics is now a group: write `diagnostics: {{enabled: {enabled}}}`")  # noqa: TRY004


def expand_registry_names(argv: list[str]) -> list[str]:
    """`--model.loss NAME --model.loss.ARG VALUE` with NAME a registry name: NAME becomes its class path, so that
    LightningCLI reads the `.ARG` options as the class's arguments (likewise `--model.aligner`)."""
    from opd_lightning.aligners import ALIGNERS
    from opd_lightning.losses import LOSSES

    out = list(argv)
    for option, registry in (("--model.loss", LOSSES), ("--model.aligner", ALIGNERS)):
        if not any(a.startswith(option + ".") for a in out):
            continue
        for i, arg in enumerate(out):
            if arg == option and i + 1 < len(out) and out[i + 1] in registry:
                cls = registry[out[i + 1]]
                out[i + 1] = f"{cls.__module__}.{cls.__qualname__}"
            elif arg.startswith(option + "=") and arg.split("=", 1)[1] in registry:
                cls = registry[arg.split("=", 1)[1]]
                out[i] = f"{option}={cls.__module__}.{cls.__qualname__}"
    return out


class OPDCLI(LightningCLI):
    """LightningCLI with run-directory logs, resume by `last`, interruption and a step progress bar."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._resume_version = None
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if config is None or config.get("ckpt_path") != "last":
            return
        root = config["trainer"].get("default_root_dir") or "runs/default"
        found = find_last_checkpoint(root)
        if found is None:
            raise ValueError(f"--ckpt_path last: no checkpoint under {root} (the run's trainer.default_root_dir). A "
                             "fit writes one when it is interrupted (Ctrl-C, SIGTERM) or through ModelCheckpoint "
                             "(trainer.enable_checkpointing); give the path of another one with --ckpt_path PATH")
        config["ckpt_path"] = str(found)
        self._resume_version = version_of(found) if subcommand == "fit" else None

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        trainer = config["trainer"]
        # The module optimizes manually (the loss normaliser spans the whole step), so these live on the model.
        if trainer.get("accumulate_grad_batches") not in (None, 1):
            raise ValueError("trainer.accumulate_grad_batches is not used by opd-lightning: make data.batch_size the "
                             "optimizer step's batch and set model.rollout.micro_batch_size to accumulate over "
                             "micro-batches")
        if trainer.get("gradient_clip_val") is not None:
            raise ValueError("trainer.gradient_clip_val is not used by opd-lightning: set model.grad_clip_norm")
        strategy = trainer.get("strategy")
        if isinstance(strategy, str) and "." in strategy:
            raise ValueError(f"trainer.strategy {strategy!r} is a class path, which Lightning reads as a strategy "
                             "name: use a registered name (ddp, fsdp2, ...) or, in YAML, {class_path: ..., init_args: "
                             "{...}}")
        if trainer.get("logger") in (None, True):
            resume = getattr(self, "_resume_version", None)
            trainer["logger"] = {"class_path": "opd_lightning.resume.RunLogger",
                                 "init_args": {"save_dir": trainer.get("default_root_dir") or "runs/default",
                                               "name": "logs", "version": resume, "resume": resume is not None}}

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        for i, callback in enumerate(trainer.callbacks):  # Lightning's default bar counts batches per epoch
            if type(callback) in (TQDMProgressBar, RichProgressBar):  # Rich is the default where rich is installed
                trainer.callbacks[i] = StepProgressBar(refresh_rate=getattr(callback, "refresh_rate", 1))
        if self.subcommand == "fit":
            trainer.callbacks.append(Interruptible())
        return trainer


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def _console_logging() -> None:
    """Print the `opd_lightning` INFO lines (on rank 0), as Lightning prints its own."""
    logger = logging.getLogger("opd_lightning")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("opd: %(message)s"))
        handler.addFilter(_RankZero())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(args: list[str] | None = None) -> None:
    """Entry point of the `opd` console script (`args` default to the command line).

    `opd report RUN_DIR` is dispatched to `opd_lightning.report`, `opd cache-teacher --config CONFIG --out DIR`
    to `opd_lightning.teacher_cache` and `opd serve-teacher --model DIR` to `opd_lightning.serve`, before
    LightningCLI is built.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:
        from opd_lightning import report  # imported here: matplotlib stays out of training start-up

        report.main(argv[1:])
        return
    if argv[:1] == ["serve-teacher"]:
        from opd_lightning import serve

        _console_logging()
        serve.main(argv[1:])
        return
    if argv[:1] == ["cache-teacher"]:
        from opd_lightning import teacher_cache

        _console_logging()
        teacher_cache.main(argv[1:])
        return
    check_renamed(argv)
    _console_logging()
    if args is None:  # the console script: LightningCLI (and a multi-process launcher) reads sys.argv itself
        sys.argv[1:] = expand_registry_names(argv)
    else:
        args = expand_registry_names(argv)
    try:
        OPDCLI(DistillationModule, PromptDataModule, args=args, auto_configure_optimizers=False,
               save_config_kwargs={"overwrite": True}, trainer_defaults={"default_root_dir": "runs/default"})
    except SIGTERMException:  # Lightning's own stop on SIGTERM (before a fit's handler took over) exits with 0
        raise SystemExit(143) from None
