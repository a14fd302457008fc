"""Interrupting and resuming a run without losing work or changing what it computes.

Why: a run stopped by Ctrl-C (SIGINT) or by a scheduler (SIGTERM) should leave a checkpoint from which it continues
exactly, and `opd fit --ckpt_path last` should continue the same run: the same log directory, the same metrics file,
no new `version_N` and no silent restart from step 0.

Choices:
- `Interruptible` turns the first SIGINT or SIGTERM into a flag; at the end of the step in progress every rank agrees
  to stop (one all-reduce) and a checkpoint `last.ckpt` is written to `<log dir>/checkpoints/`; the run ends before
  the next step starts (once the finished step's metrics are logged) with exit code 130 (SIGINT) or 143 (SIGTERM). A
  signal during the last step lets the run finish. A second signal falls back to the default behaviour.
- A fit stopped by a served teacher that no longer answers (`served.TeacherServerError`, after its retries) writes
  `last.ckpt` too, before the error ends the run.
- `find_last_checkpoint` resolves `last` to the newest `.ckpt` under the run directory (`trainer.default_root_dir`).
- `RunLogger` is Lightning's CSV logger with one change: resuming into an existing version keeps its metrics file,
  dropping only the rows of steps the resumed run will log again (`Interruptible.on_train_start` does that).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import signal
from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from opd_lightning.served import TeacherServerError

__all__ = ["Interrupted", "Interruptible", "RunLogger", "find_last_checkpoint", "version_of"]

log = logging.getLogger(__name__)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as a shell reports it


class Interrupted(SystemExit):
    """The run stopped at a step boundary on a signal, after writing its checkpoint; `code` is 128 + the signal."""


def find_last_checkpoint(root_dir: str | os.PathLike) -> Path | None:
    """The most recently written `.ckpt` file (or sharded checkpoint directory) under `root_dir`, or None."""
    root = Path(root_dir)
    if not root.is_dir():
        return None
    found = [p for p in root.rglob("*.ckpt") if p.is_file() or (p / "meta.pt").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def version_of(checkpoint: Path) -> int | None:
    """N of the `logs/version_N/checkpoints/` directory holding `checkpoint`, or None."""
    match = re.search(r"(?:^|/)version_(\d+)/checkpoints/", checkpoint.as_posix())
    return int(match[1]) if match else None


class _KeepingWriter(ExperimentWriter):
    """A CSV writer that appends to an existing metrics file instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def drop_from(self, step: int) -> None:
        """Remove the saved rows of `step` and later (a resumed run logs them again)."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = [r for r in csv.DictReader(file) if not r.get("step") or int(float(r["step"])) < step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class RunLogger(CSVLogger):
    """Lightning's `CSVLogger` that, with `resume`, continues an existing version's metrics file."""

    def __init__(self, save_dir: str, name: str = "logs", version: int | str | None = None, resume: bool = False,
                 flush_logs_every_n_steps: int = 100) -> None:
        """
        Args:
            save_dir: the run directory (`trainer.default_root_dir`).
            name: sub-directory of the versions.
            version: the version to write; None takes the next free one.
            resume: keep the version's existing metrics (rows of steps logged again are replaced).
            flush_logs_every_n_steps: how often metrics are written to disk.
        """
        super().__init__(save_dir, name=name, version=version, flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.resume = resume

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.resume and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return super().experiment

    def drop_from(self, step: int) -> None:
        """Forget the saved rows of `step` and later (no-op unless resuming)."""
        if self.resume and isinstance(self.experiment, _KeepingWriter):
            self.experiment.drop_from(step)


class Interruptible(Callback):
    """On SIGINT or SIGTERM, finish the current step, write `last.ckpt` and end the run (see the module docstring)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._stop_code = 0  # set once the checkpoint is written; the run ends before the next step
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:  # a second signal: give the default behaviour back and re-deliver it
            self._restore()
            signal.raise_signal(signum)
            return
        self.signal = signum
        log.warning("received %s: stopping after this step, with a checkpoint to resume from",
                    signal.Signals(signum).name)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, RunLogger):
                logger.drop_from(trainer.global_step)
        self.signal, self._stop_code = None, 0
        if trainer.ckpt_path is not None:
            log.info("resumed from %s at step %d", trainer.ckpt_path, trainer.global_step)
        try:  # after Lightning's own SIGTERM handler, which would end the run with exit code 0
            self._previous = {s: signal.signal(s, self._handle) for s in EXIT_CODES}
        except ValueError:  # not the main thread: signals stay as they are
            self._previous = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._stop_code:
            return
        code = EXIT_CODES.get(self.signal, 0)
        if trainer.world_size > 1:  # every rank stops at the same step, whichever received the signal
            flag = torch.tensor([code], device=pl_module.device)
            code = int(trainer.strategy.reduce(flag, reduce_op="max"))
        if not code:
            return
        path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("interrupted after step %d; checkpoint %s. Resume with the same command and --ckpt_path last",
                    trainer.global_step, path)
        self._restore()
        self._stop_code = code

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self._stop_code:  # the step before was checkpointed and its metrics logged
            raise Interrupted(self._stop_code)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A served teacher that stopped answering ends a fit with `last.ckpt` at the last finished step, so that no
        trained step is lost (one process; with several ranks, whose others may wait in a collective, the periodic
        checkpoints are the resume points)."""
        if not isinstance(exception, TeacherServerError) or trainer.state.fn != "fit" or trainer.world_size > 1:
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.total.started > progress.total.processed:
            # A training step failed: its batch was fetched and started, never trained. The checkpoint says so (as
            # one written between two steps: every counter at the last finished step), and the loader serves that
            # batch again on resume. (A failure in validation leaves the counters at a finished step already.)
            for counts in (progress.total, progress.current):
                counts.ready = counts.started = counts.processed
            if hasattr(trainer.train_dataloader, "forget_last"):
                trainer.train_dataloader.forget_last()
        path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("the teacher server failed during step %d; checkpoint %s holds the %d steps before it. Resume with "
                    "the same command and --ckpt_path last once the server answers", trainer.global_step + 1, path,
                    trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()
