"""Aligners: how a teacher with the same or another tokenizer scores a student's rollout.

`ALIGNERS` maps names to classes; build one by name with `ALIGNERS.build(name, **kwargs)`.
"""

from .base import ALIGNERS, AlignedTarget, Aligner, TeacherInputs, fit_vocab
from .identity import IdentityAligner

__all__ = ["ALIGNERS", "AlignedTarget", "Aligner", "IdentityAligner", "TeacherInputs", "fit_vocab"]
