"""A guard against degenerate rollouts: repetition and truncation that a loss curve hides.

Repetition can become locally rewarding in OPD and collapse a run within tens of steps (Luo et al. 2026);
completions that keep hitting the length limit are the usual first sign. The guard reads the step's diagnostics
(`diag/repetition_rate`, `diag/truncation_rate`) and warns when one stays above its limit for `patience` steps in a
row; with `stop: true` it also ends training, so a checkpoint from before the collapse is what remains.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["RolloutGuard"]


class RolloutGuard(Callback):
    """Warn, and optionally stop, when repetition or truncation passes a threshold."""

    def __init__(self, max_repetition_rate: float | None = 0.3, max_truncation_rate: float | None = 0.5,
                 patience: int = 3, stop: bool = False) -> None:
        """
        Args:
            max_repetition_rate: limit on `diag/repetition_rate` (share of completion tokens that repeat an earlier
                n-gram of their completion); None disables the check.
            max_truncation_rate: limit on `diag/truncation_rate` (share of completions cut by the length limit);
                None disables the check.
            patience: consecutive training steps above a limit before the guard acts.
            stop: end training (`trainer.should_stop`) when the guard acts, instead of only warning.
        """
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.limits = {"diag/repetition_rate": max_repetition_rate, "diag/truncation_rate": max_truncation_rate}
        self.patience, self.stop = patience, stop
        self.strikes = dict.fromkeys(self.limits, 0)
        self.tripped: list[tuple[int, str, float]] = []  # (step, metric, value) each time the guard acted

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        for name, limit in self.limits.items():
            value = trainer.callback_metrics.get(name)
            if limit is None or value is None:
                continue
            value = float(value)
            self.strikes[name] = self.strikes[name] + 1 if value > limit else 0
            if self.strikes[name] == self.patience:
                self.tripped.append((trainer.global_step, name, value))
                action = "stopping training" if self.stop else "continuing (set stop: true to end the run here)"
                rank_zero_warn(f"{name} = {value:.3f} has exceeded {limit} for {self.patience} steps at step "
                               f"{trainer.global_step}: rollouts are degenerating; {action}")
                if self.stop:
                    trainer.should_stop = True
