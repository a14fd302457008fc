"""Writing the distilled student in Hugging Face format at the end of training.

By default the student goes under the run's own directory (``<trainer.default_root_dir>/hf``), so two runs that
differ only in ``--trainer.default_root_dir`` never overwrite each other's export. Only global rank 0 writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["ExportStudent"]

log = logging.getLogger(__name__)


class ExportStudent(Callback):
    """Save the student with `save_pretrained` (plus its tokenizer) when fitting ends."""

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True) -> None:
        """Choose where and how the student is written.

        Args:
            dirpath: output directory (created if missing). None writes to ``<trainer.default_root_dir>/hf``; a
                relative path is used as given, relative to the working directory.
            merge_lora: with LoRA, write a merged plain model (true) or only the adapter (false).
        """
        self.dirpath, self.merge_lora = dirpath, merge_lora

    def output_dir(self, trainer: Trainer) -> Path:
        """The directory the student is written to for `trainer`: `dirpath`, or ``<default_root_dir>/hf``."""
        return Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir) / "hf"

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            path = self.output_dir(trainer)
            path.mkdir(parents=True, exist_ok=True)
            pl_module.save_student(str(path), merge_lora=self.merge_lora)
            log.info("exported the student (merge_lora=%s) to %s", self.merge_lora, path)
