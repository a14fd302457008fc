"""A callback that sends this process a signal after a given optimizer step: a real Ctrl-C (or SIGTERM) mid-run."""

import os
import signal

from lightning.pytorch import Callback


class SignalAt(Callback):
    def __init__(self, step: int = 3, name: str = "SIGINT") -> None:
        self.step, self.signum = step, getattr(signal, name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
