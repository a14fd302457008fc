"""Data parallel: the loss normaliser is the valid-token count of the whole step across ranks, and every rank draws
the same rollout source for a step, so DDP and FSDP2 steps equal the single-process steps, λ = 0.5 included."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "ddp_worker.py"


def run(teacher_dir, tmp_path, devices, strategy, case, timeout=300):
    return subprocess.run([sys.executable, str(WORKER), teacher_dir, str(tmp_path / f"{strategy}.pt"), str(devices),
                           strategy, case], capture_output=True, text=True, timeout=timeout, cwd=tmp_path, check=False)


@pytest.mark.parametrize(("strategy", "case"), [("ddp", "same"), ("fsdp2", "same"), ("ddp", "mixed"),
                                              ("fsdp2", "mixed"), ("ddp", "resume"), ("fsdp2", "resume"),
                                              ("ddp", "dskd_cma"), ("fsdp2", "dskd_cma"), ("fsdp2", "dskd_cma_clip"),
                                              ("ddp", "fused"), ("fsdp2", "fused"), ("ddp", "fused_cross_rows"),
                                              ("fsdp2", "fused_tied")])
def test_data_parallel_steps_equal_single_process_steps(teacher_dir, tmp_path, strategy, case):
    """Also DSKD across tokenizers (its projectors and cross-model attention train outside the student), and λ = 0.5
    over 6 sampled steps: each finishes within the timeout (a step where ranks took different rollout sources would
    hang in a collective) and ends with the single process's weights; so does a run checkpointed after 3 of the 6
    steps (one full checkpoint file under FSDP2) and resumed from it."""
    for devices, name in ((1, "auto"), (2, strategy)):
        done = run(teacher_dir, tmp_path, devices, name, case)
        assert done.returncode == 0, done.stderr[-3000:]
    single, parallel = torch.load(tmp_path / "auto.pt"), torch.load(tmp_path / f"{strategy}.pt")
    for name, value in single.items():
        torch.testing.assert_close(parallel[name], value, rtol=1e-5, atol=1e-6, msg=name)
    if case in ("mixed", "resume"):  # both kinds of step happened
        assert len(set(json.loads((tmp_path / "auto.draws.json").read_text()))) == 2


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ranks_that_disagree_fail_with_an_error_instead_of_hanging(teacher_dir, tmp_path, strategy):
    done = run(teacher_dir, tmp_path, 2, strategy, "disagree", timeout=240)
    assert done.returncode != 0
    assert "data-parallel ranks disagree on step" in done.stderr


def test_fsdp2_resume_of_an_optimizer_without_state_fails_saying_why(teacher_dir, tmp_path):
    done = run(teacher_dir, tmp_path, 2, "fsdp2", "resume_stateless")
    assert done.returncode != 0
    assert "its optimizer keeps no state" in done.stderr and "SGD with momentum" in done.stderr
