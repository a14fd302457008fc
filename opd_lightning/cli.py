"""The `opd` command: LightningCLI over DistillationModule and PromptDataModule.

`opd fit|validate|test --config configs/....yaml`. Losses and aligners are chosen by registry name
(`model.loss: reverse_kl`) or by `class_path`/`init_args`; optimizers and schedulers by `class_path`. Unless
a config names a logger, metrics go to CSV under the run's `trainer.default_root_dir`.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from opd_lightning.data import PromptDataModule
from opd_lightning.module import DistillationModule

__all__ = ["OPDCLI", "main"]


class OPDCLI(LightningCLI):
    """LightningCLI with a CSV logger under the run directory by default."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        trainer = config["trainer"]
        # The module optimizes manually (the loss normaliser spans the whole step), so these live on the model.
        if trainer.get("accumulate_grad_batches") not in (None, 1):
            raise ValueError("trainer.accumulate_grad_batches is not used by opd-lightning: make data.batch_size the "
                             "optimizer step's batch and set model.micro_batch_size to accumulate over micro-batches")
        if trainer.get("gradient_clip_val") is not None:
            raise ValueError("trainer.gradient_clip_val is not used by opd-lightning: set model.grad_clip_norm")
        if trainer.get("logger") in (None, True):
            trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                 "init_args": {"save_dir": trainer.get("default_root_dir") or "runs/default",
                                               "name": "logs"}}


def main(args: list[str] | None = None) -> None:
    """Entry point of the `opd` console script (`args` default to the command line).

    `opd report RUN_DIR` is dispatched to `opd_lightning.report` before LightningCLI is built.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:
        from opd_lightning import report  # imported here: matplotlib stays out of training start-up

        report.main(argv[1:])
        return
    OPDCLI(DistillationModule, PromptDataModule, args=args, auto_configure_optimizers=False,
                  save_config_kwargs={"overwrite": True}, trainer_defaults={"default_root_dir": "runs/default"})
