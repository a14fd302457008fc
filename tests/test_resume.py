"""Interrupting and resuming through the `opd` command, and checkpoints that rebuild the module.

A fit stopped by a real SIGINT (or SIGTERM) at a step boundary writes `last.ckpt` and exits 130 (143); the same command
with `--ckpt_path last` continues it in the same log version and ends with exactly the uninterrupted run's metrics,
evaluations and exported student. `DistillationModule.load_from_checkpoint` rebuilds a module (teacher included,
reloaded from its recorded path) whose next step equals the uninterrupted run's.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from opd_lightning.data import PromptDataModule
from opd_lightning.module import DistillationModule

TESTS = Path(__file__).parent
STEPS = 6


def write_config(tmp_path: Path, teacher_dir: str, root: Path, callbacks: list | None = None,
                 evaluate: bool = True) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": STEPS, "accelerator": "cpu", "default_root_dir": str(root), "log_every_n_steps": 1,
                    "enable_checkpointing": False, "check_val_every_n_epoch": None, "val_check_interval": STEPS,
                    "limit_val_batches": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "callbacks": [*([{"class_path": "opd_lightning.export.ExportStudent"},
                                     {"class_path": "opd_lightning.evaluation.LmEvalCallback",
                                      "init_args": {"tasks": ["arithmetic"], "limit": 8, "on_fit_start": True,
                                                    "evaluate_teacher": True}}] if evaluate else []),
                                  *(callbacks or [])]},
        "model": {"student": {"config": dict(TINY, max_position_embeddings=32), "tokenizer": "builtin:char"},
                  "teacher": {"path": teacher_dir}, "loss": "forward_kl", "rollout": {"on_policy_fraction": 0.5},
                  "sampling": {"max_new_tokens": 4}},
        "data": {"batch_size": 4, "limit_train": 12, "limit_eval": 4},  # 3 steps an epoch: resumes mid-epoch
    }
    path = tmp_path / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def opd(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "opd_lightning", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def metrics(root: Path) -> list[dict]:
    versions = sorted((root / "logs").glob("version_*"))
    assert [v.name for v in versions] == ["version_0"], versions  # resumed in place: no second version
    rows = list(csv.DictReader((versions[0] / "metrics.csv").open()))
    return sorted(rows, key=lambda r: (int(r["step"]), sorted((k, v) for k, v in r.items() if v)))


def evaluations(root: Path) -> list[dict]:
    lines = (root / "logs" / "version_0" / "eval_history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize(("signal_name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupted_then_resumed_by_last_ends_as_the_uninterrupted_run(teacher_dir, tmp_path, signal_name, code):
    straight = opd("fit", "--config", str(write_config(tmp_path, teacher_dir, tmp_path / "straight")))
    assert straight.returncode == 0, straight.stderr[-3000:]
    root = tmp_path / "interrupted"
    stop = {"class_path": "signal_at.SignalAt", "init_args": {"step": 3, "name": signal_name}}
    stopped = opd("fit", "--config", str(write_config(tmp_path, teacher_dir, root, callbacks=[stop])))
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert (root / "logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (root / "hf").exists()  # nothing exported from a run that did not finish
    resumed = opd("fit", "--config", str(write_config(tmp_path, teacher_dir, root)), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 3" in resumed.stderr

    want, got = metrics(tmp_path / "straight"), metrics(root)
    assert len(got) == len(want) and {r["step"] for r in got} == {str(s) for s in range(STEPS)}
    for a, b in zip(want, got, strict=True):
        assert {k for k, v in a.items() if v} == {k for k, v in b.items() if v}
        for key, value in a.items():
            if value:
                assert float(b[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-9, nan_ok=True), (a["step"], key)
    assert evaluations(root) == evaluations(tmp_path / "straight")  # fit_start once (teacher, student), then the end
    from safetensors.torch import load_file

    exported = load_file(root / "hf" / "model.safetensors")
    for name, value in load_file(tmp_path / "straight" / "hf" / "model.safetensors").items():
        torch.testing.assert_close(exported[name], value, rtol=1e-6, atol=1e-8, msg=name)


def test_a_data_parallel_run_stops_on_every_rank_when_one_rank_is_signalled(teacher_dir, tmp_path):
    """Rank 1 alone gets SIGINT: both ranks stop after the same step (their flags are all-reduced), one checkpoint is
    written, and `--ckpt_path last` under DDP ends with the uninterrupted DDP run's metrics."""
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    config = write_config(tmp_path, teacher_dir, tmp_path / "straight", evaluate=False)
    straight = opd("fit", "--config", str(config), *ddp)
    assert straight.returncode == 0, straight.stderr[-3000:]
    root = tmp_path / "interrupted"
    stop = {"class_path": "signal_at.SignalAt", "init_args": {"step": 2, "name": "SIGINT", "rank": 1}}
    stopped = opd("fit", "--config", str(write_config(tmp_path, teacher_dir, root, [stop], evaluate=False)), *ddp)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    resumed = opd("fit", "--config", str(write_config(tmp_path, teacher_dir, root, evaluate=False)), *ddp,
                  "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = metrics(tmp_path / "straight"), metrics(root)
    assert len(got) == len(want)
    for a, b in zip(want, got, strict=True):
        for key, value in a.items():
            if value:
                assert float(b[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-9, nan_ok=True), (a["step"], key)


def test_resume_by_last_without_a_checkpoint_fails_naming_the_run(teacher_dir, tmp_path):
    done = opd("fit", "--config", str(write_config(tmp_path, teacher_dir, tmp_path / "fresh")), "--ckpt_path", "last")
    assert done.returncode != 0
    assert "--ckpt_path last: no checkpoint under" in done.stderr and str(tmp_path / "fresh") in done.stderr


def _module(teacher_dir: str) -> DistillationModule:
    from opd_lightning.models import HFModel
    from opd_lightning.rollout import SamplingConfig
    from opd_lightning.rollout_source import RolloutPolicy

    return DistillationModule(student=HFModel(config=TINY, tokenizer="builtin:char"), teacher=HFModel(path=teacher_dir),
                              loss="forward_kl", extra_terms=[{"loss": "cross_entropy", "weight": 0.5,
                                                               "completions": "gold"}],
                              rollout=RolloutPolicy(on_policy_fraction=0.5), sampling=SamplingConfig(max_new_tokens=4))


def _fit(module: DistillationModule, root: Path, steps: int, ckpt: str | None = None) -> None:
    seed_everything(0)
    saver = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, callbacks=[saver])
    trainer.fit(module, datamodule=PromptDataModule(batch_size=4, limit_train=12, val=None, test=None), ckpt_path=ckpt)


def test_a_checkpoint_rebuilds_the_module_and_its_next_step_equals_the_uninterrupted_run(teacher_dir, tmp_path):
    straight = _module(teacher_dir)
    _fit(straight, tmp_path / "straight", 3)
    first = _module(teacher_dir)
    _fit(first, tmp_path / "first", 2)
    ckpt = tmp_path / "first" / "step=2.ckpt"
    saved = torch.load(ckpt, weights_only=True)  # plain data only: loadable without trusting pickled code
    assert saved["hyper_parameters"]["teacher"] == {**saved["hyper_parameters"]["teacher"], "path": teacher_dir}
    assert not any(k.startswith("teacher") or "._frozen" in k for k in saved["state_dict"])

    rebuilt = DistillationModule.load_from_checkpoint(ckpt)
    assert rebuilt.teacher is not None and rebuilt.terms[1].name == "cross_entropy@gold"
    for (name, a), b in zip(first.student.state_dict().items(), rebuilt.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    _fit(rebuilt, tmp_path / "rebuilt", 3, ckpt=str(ckpt))  # the optimizer and loop state come from the checkpoint
    for (name, a), b in zip(straight.student.state_dict().items(), rebuilt.student.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_validate_and_test_score_a_checkpoint_written_by_opd(teacher_dir, tmp_path):
    root = tmp_path / "run"
    config = write_config(tmp_path, teacher_dir, root)
    done = opd("fit", "--config", str(config), "--trainer.enable_checkpointing", "true", "--trainer.callbacks", "[]")
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = next((root / "logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    rebuilt = DistillationModule.load_from_checkpoint(ckpt)  # through LightningCLI's recorded config
    assert rebuilt.rollout_policy.on_policy_fraction == 0.5 and rebuilt.teacher is not None
    for command in ("validate", "test"):
        scored = opd(command, "--config", str(config), "--trainer.callbacks", "[]", "--ckpt_path", "last")
        assert scored.returncode == 0, scored.stderr[-3000:]
        assert f"{'val' if command == 'validate' else 'test'}/loss" in scored.stdout
