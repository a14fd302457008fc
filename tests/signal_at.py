"""A callback that sends this process a signal after a given optimizer step: a real Ctrl-C (or SIGTERM) mid-run."""

import os
import signal

from lightning.pytorch import Callback


class SignalAt(Callback):
    def __init__(self, step: int = 3, name: str = "SIGINT", rank: int | None = None) -> None:
        """Signal `name` to this process after optimizer step `step`, on global rank `rank` only (None: every rank)."""
        self.step, self.signum, self.rank = step, getattr(signal, name), rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class KillAt(Callback):
    def __init__(self, step: int, pid: int, port: int) -> None:
        """Terminate process `pid` (a teacher server listening on `port`) after optimizer step `step`, and wait until
        the port refuses connections."""
        self.step, self.pid, self.port = step, pid, port

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        import socket
        import time

        os.kill(self.pid, signal.SIGTERM)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                time.sleep(0.05)
            except OSError:
                return
        raise RuntimeError(f"the server on port {self.port} did not stop")
