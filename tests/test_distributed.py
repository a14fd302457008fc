"""Data parallel: the loss normaliser is the valid-token count of the whole step across ranks."""

import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).parent / "ddp_worker.py"


def test_ddp_step_equals_single_process_step(teacher_dir, tmp_path):
    for devices in (1, 2):
        subprocess.run([sys.executable, str(WORKER), teacher_dir, str(tmp_path / f"w{devices}.pt"), str(devices)],
                       check=True, capture_output=True, timeout=300, cwd=tmp_path)
    single, ddp = torch.load(tmp_path / "w1.pt"), torch.load(tmp_path / "w2.pt")
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
