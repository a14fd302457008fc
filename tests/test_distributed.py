"""Data parallel: the loss normaliser is the valid-token count of the whole step across ranks."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "ddp_worker.py"


@pytest.mark.parametrize(("strategy", "case"), [("ddp", "same"), ("fsdp2", "same"), ("ddp", "dskd_cma"),
                                              ("fsdp2", "dskd_cma"), ("fsdp2", "dskd_cma_clip")])
def test_data_parallel_step_equals_single_process_step(teacher_dir, tmp_path, strategy, case):
    """Also DSKD across tokenizers: its projectors and cross-model attention train outside the student."""
    for devices, name in ((1, "auto"), (2, strategy)):
        done = subprocess.run([sys.executable, str(WORKER), teacher_dir, str(tmp_path / f"{name}.pt"), str(devices),
                               name, case], capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = torch.load(tmp_path / "auto.pt"), torch.load(tmp_path / f"{strategy}.pt")
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
