"""The arithmetic teachers the cross-tokenizer benchmarks share, trained once each and reused.

The quickstart's character teacher is `make demo`'s (`configs/quickstart/teacher.yaml`, `runs/quickstart/teacher`).
Every other tokenizer gets a teacher of the same model trained like the ablation's oracle
(`configs/quickstart/teacher.yaml` + `configs/quickstart/teacher_bpe.yaml`: 8,000 steps, so that a teacher whose
tokens are whole numbers scores like the character teacher), with only `model.student.tokenizer` changed, into
`runs/teachers/<tokenizer>/`. Such a teacher serves twice: as the teacher of a pair whose student keeps a share of
its merges, and as the oracle of a pair whose student has its tokenizer (what one tokenizer gives that student).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["CHAR_TEACHER", "teacher_dir", "trained_teacher"]

CHAR_TEACHER = Path("runs/quickstart/teacher/hf")
ROOT = Path("runs/teachers")


def teacher_dir(tokenizer: str) -> Path:
    """Where the teacher with `tokenizer` (a `builtin:` name) is saved in Hugging Face format."""
    if tokenizer == "builtin:char":
        return CHAR_TEACHER
    return ROOT / tokenizer.removeprefix("builtin:") / "hf"


def trained_teacher(tokenizer: str) -> Path:
    """The teacher with `tokenizer`, trained now (one thread) if it is not saved yet; the character teacher must
    come from `make demo`."""
    hf = teacher_dir(tokenizer)
    if (hf / "config.json").exists():
        return hf
    if tokenizer == "builtin:char":
        raise SystemExit(f"{hf} is missing: run `make demo` (or the quickstart teacher stage) first")
    args = [sys.executable, "-m", "opd_lightning", "fit", "--config", "configs/quickstart/teacher.yaml",
            "--config", "configs/quickstart/teacher_bpe.yaml", "--model.student.tokenizer", tokenizer,
            "--trainer.default_root_dir", str(hf.parent)]
    print(f"training the {tokenizer} teacher into {hf.parent}", flush=True)
    subprocess.run(args, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return hf
