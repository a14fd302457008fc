"""A progress bar counted in optimizer steps out of `trainer.max_steps`.

Distillation runs are sized in steps (`trainer.max_steps`), and their datasets are small enough that an epoch is a
few dozen steps: Lightning's bar, counted in batches of the current epoch and restarted every epoch, never says how
far the run is. This bar counts `trainer.global_step` against `max_steps` (the epoch's batches when no step limit is
set), and survives epochs; a resumed run starts where its checkpoint was.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StepProgressBar"]


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, counting optimizer steps out of `trainer.max_steps`."""

    def on_train_epoch_start(self, trainer: Trainer, *_) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch (or a resumed run's): one bar for the whole run
            bar.reset(total=trainer.max_steps)
            bar.initial = 0
            bar.n = trainer.global_step
            bar.refresh()
        bar.set_description(f"step (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = trainer.global_step
        if self.train_progress_bar is not None and self._should_update(n, self.train_progress_bar.total):
            self.train_progress_bar.n = n
            self.train_progress_bar.refresh()
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
