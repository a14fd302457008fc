"""Writing the distilled student in Hugging Face format at the end of training."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["ExportStudent"]


class ExportStudent(Callback):
    """Save the student with `save_pretrained` (plus its tokenizer) when fitting ends."""

    def __init__(self, dirpath: str, merge_lora: bool = True) -> None:
        """
        Args:
            dirpath: output directory (created if missing).
            merge_lora: with LoRA, write a merged plain model (true) or only the adapter (false).
        """
        self.dirpath, self.merge_lora = dirpath, merge_lora

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
            pl_module.save_student(self.dirpath, merge_lora=self.merge_lora)
