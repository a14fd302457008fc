"""`make demo` (`python -m opd_lightning.demo`) fails, with a non-zero exit, when a stage fails or is killed.

The stages here are tiny versions of the quickstart's (same structure, a few steps), written into a configs folder
the demo is pointed at with `--configs`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import TINY


def stages(tmp_path: Path, distill_steps: int = 2, loss: str = "forward_kl") -> Path:
    configs = tmp_path / "configs"
    configs.mkdir()
    common = {"accelerator": "cpu", "enable_checkpointing": False, "limit_val_batches": 0, "enable_progress_bar": False,
              "log_every_n_steps": 1}
    student = {"config": dict(TINY, max_position_embeddings=32), "tokenizer": "builtin:char"}
    teacher = {"trainer": {**common, "max_steps": 2, "default_root_dir": str(tmp_path / "teacher"),
                           "callbacks": [{"class_path": "opd_lightning.export.ExportStudent"}]},
               "model": {"student": student, "teacher": None, "loss": "cross_entropy",
                         "rollout": {"on_policy_fraction": 0.0}, "sampling": {"max_new_tokens": 4}},
               "data": {"batch_size": 4, "limit_train": 8}}
    distill = {"trainer": {**common, "max_steps": distill_steps, "default_root_dir": str(tmp_path / "out" / "distill"),
                           "callbacks": [{"class_path": "opd_lightning.evaluation.LmEvalCallback",
                                          "init_args": {"tasks": ["arithmetic"], "limit": 4, "on_fit_start": True,
                                                        "evaluate_teacher": True}}],
                           "check_val_every_n_epoch": None, "val_check_interval": distill_steps,
                           "limit_val_batches": 1, "num_sanity_val_steps": 0},
               "model": {"student": student, "teacher": {"path": str(tmp_path / "teacher" / "hf")}, "loss": loss,
                         "sampling": {"max_new_tokens": 4}},
               "data": {"batch_size": 4, "limit_train": 8, "limit_eval": 4}}
    (configs / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    (configs / "distill.yaml").write_text(yaml.safe_dump(distill))
    return configs


def demo(tmp_path: Path, configs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "opd_lightning.demo", "--configs", str(configs), "--skip-cross",
                             "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)


def test_the_demo_writes_its_table_when_every_stage_succeeds(tmp_path):
    run = demo(tmp_path, stages(tmp_path))
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert (tmp_path / "out" / "eval.json").is_file() and "student_after" in out


def test_a_failing_stage_fails_the_demo(tmp_path):
    run = demo(tmp_path, stages(tmp_path, loss="forwrd_kl"))
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0 and "Did you mean 'forward_kl'" in err
    assert not (tmp_path / "out" / "eval.json").exists()


def test_a_killed_demo_exits_non_zero_without_results(tmp_path):
    run = demo(tmp_path, stages(tmp_path, distill_steps=100_000))
    metrics = tmp_path / "out" / "distill" / "logs" / "version_0"
    deadline = time.time() + 240
    while not (metrics / "eval_history.jsonl").is_file() and time.time() < deadline:  # the distillation is training
        time.sleep(0.5)
    time.sleep(2)
    os.kill(run.pid, signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143, err[-3000:]
    assert not (tmp_path / "out" / "eval.json").exists()
