"""Tests of `ExportStudent`: where the student is written, and that only global rank 0 writes it.

The callback is called directly with stub trainer and module objects: a real fit would cost seconds and test
nothing more, since all the callback does is pick a directory and call `save_student`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from opd_lightning.export import ExportStudent


class RecordingModule:
    """Records each `save_student` call instead of writing a model."""

    def __init__(self):
        self.calls = []

    def save_student(self, path, merge_lora=True):
        self.calls.append((path, merge_lora))


def stub_trainer(root, is_global_zero=True):
    return SimpleNamespace(is_global_zero=is_global_zero, default_root_dir=str(root))


@pytest.mark.parametrize("merge_lora", [True, False])
def test_default_dirpath_is_under_the_run_directory(tmp_path, monkeypatch, caplog, merge_lora):
    """Two runs with different default_root_dir get different exports; writing to a fixed path fails this."""
    monkeypatch.chdir(tmp_path)  # a wrong relative default lands here, not in the repository
    module = RecordingModule()
    callback = ExportStudent(merge_lora=merge_lora)
    with caplog.at_level(logging.INFO, logger="opd_lightning.export"):
        for run in ("run_a", "run_b"):
            callback.on_train_end(stub_trainer(tmp_path / run), module)
    assert module.calls == [(str(tmp_path / "run_a" / "hf"), merge_lora), (str(tmp_path / "run_b" / "hf"), merge_lora)]
    assert (tmp_path / "run_a" / "hf").is_dir() and (tmp_path / "run_b" / "hf").is_dir()
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "opd_lightning.export"] == [
        (logging.INFO, f"exported the student (merge_lora={merge_lora}) to {tmp_path / run / 'hf'}")
        for run in ("run_a", "run_b")
    ]


def test_explicit_dirpath_is_used_as_given(tmp_path, monkeypatch):
    """An absolute dirpath ignores default_root_dir; a relative one is relative to the working directory."""
    module = RecordingModule()
    ExportStudent(dirpath=str(tmp_path / "out" / "student")).on_train_end(stub_trainer(tmp_path / "run"), module)
    monkeypatch.chdir(tmp_path)
    ExportStudent(dirpath="rel/hf", merge_lora=False).on_train_end(stub_trainer(tmp_path / "run"), module)
    assert module.calls == [(str(tmp_path / "out" / "student"), True), ("rel/hf", False)]
    assert (tmp_path / "out" / "student").is_dir() and (tmp_path / "rel" / "hf").is_dir()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dirpath", [None, "explicit"])
def test_non_zero_ranks_write_nothing(tmp_path, monkeypatch, dirpath):
    module = RecordingModule()
    monkeypatch.chdir(tmp_path)
    ExportStudent(dirpath=dirpath).on_train_end(stub_trainer(tmp_path / "run", is_global_zero=False), module)
    assert module.calls == [] and list(Path(tmp_path).iterdir()) == []
