"""Learning-rate schedules that LightningCLI can build from YAML (`scheduler: {class_path: ...}`).

Stepped once per optimizer step by the training module.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine"]


class WarmupCosine(LambdaLR):
    """Linear warm-up from 0, then cosine decay to `min_ratio` of the peak rate."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 1000,
                 min_ratio: float = 0.1) -> None:
        """
        Args:
            optimizer: the optimizer whose rate is scheduled (passed in by the training module).
            warmup_steps: optimizer steps of linear warm-up.
            total_steps: step at which the cosine reaches `min_ratio`; constant afterwards.
            min_ratio: final learning rate as a fraction of the peak.
        """
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, max(total_steps, 1), min_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
