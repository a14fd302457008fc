"""opd-lightning: on-policy distillation of language models with PyTorch Lightning.

Importing the package is cheap and never imports Lightning, so `opd_lightning.losses` can be used on its own.
The Lightning pieces load on first access: `opd_lightning.DistillationModule`, `opd_lightning.PromptDataModule`.
"""

from __future__ import annotations

import importlib

__all__ = ["DistillationModule", "ExportStudent", "LmEvalCallback", "PromptDataModule"]
__version__ = "0.1.0"

_LAZY = {"DistillationModule": "module", "PromptDataModule": "data", "ExportStudent": "export",
         "LmEvalCallback": "evaluation"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"opd_lightning.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'opd_lightning' has no attribute {name!r}")
