"""benchmarks/leaderboard.py: each pair's declared teacher, task and tokenizers agree with the config it runs, and
pairs of two tasks are refused in one invocation (their tables and RESULTS blocks are apart)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import leaderboard as lb

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pair", sorted(lb.PAIRS))
def test_each_pair_names_the_teacher_task_and_aligner_of_its_config(pair):
    spec = lb.PAIRS[pair]
    config = yaml.safe_load((REPO / spec["config"]).read_text())
    model = config["model"]
    assert Path(model["teacher"]["path"]) == spec["teacher"]  # the teacher `prepare` checks is the one the runs load
    evaluated = [c["init_args"]["tasks"] for c in config["trainer"]["callbacks"] if "LmEval" in c["class_path"]]
    assert evaluated and spec["task"] in evaluated[0]
    same = model["student"]["tokenizer"] == "builtin:char"  # every teacher here is a character model
    assert ("default_aligner" not in spec) == same  # across tokenizers, every loss gets an aligner
    assert set(spec.get("skip", ())) == ({"xtoken_hkl", "xtoken_pkl"} if same else set())
    assert lb.overlay_path(Path("root"), pair).name == (
        "overlay.yaml" if spec["task"] == "arithmetic" else f"overlay_{spec['task']}.yaml")


def test_pairs_of_two_tasks_are_refused_in_one_invocation(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["leaderboard", "--pairs", "same", "long", "--no-run"])
    with pytest.raises(SystemExit) as exit_info:
        lb.main()
    assert exit_info.value.code == 2
    assert "mixes tasks (arithmetic, long_addition)" in capsys.readouterr().err
