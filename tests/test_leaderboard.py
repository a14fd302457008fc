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


def test_a_learning_rate_override_runs_into_its_own_folder_csv_and_block(monkeypatch, tmp_path):
    """`--lr`: every run gets the rate as its last option, and its runs, CSV, plot and RESULTS block are apart from
    the recipe's (named by the rate), so the recipe's recorded runs are neither reused nor overwritten."""
    calls, recorded = [], {}

    def fake_run(pair, loss, seed, steps, root, start, options):
        calls.append((root, options))
        return {"pair": pair, "loss": loss, "seed": seed, "steps": steps, "score": 0.5, "wall_s": 1.0,
                "aligner": "identity", "date": "2026-12-06", "start_score": start[1]}

    monkeypatch.setattr(lb, "WARM_ROOT", tmp_path / "leaderboard_warm")
    monkeypatch.setattr(lb, "WARM_CSV", tmp_path / "leaderboard_warm_runs.csv")
    monkeypatch.setattr(lb, "run", fake_run)
    monkeypatch.setattr(lb, "warm_student", lambda pair, steps: (tmp_path / "start", 0.082))
    monkeypatch.setattr(lb, "prepare", lambda root, overlay, pair: root.mkdir(parents=True, exist_ok=True))
    monkeypatch.setattr(lb, "teacher_score", lambda pair, warm: "0.970")
    monkeypatch.setattr(lb, "plot", lambda chosen, path: recorded.setdefault("plot", path))
    monkeypatch.setattr(lb, "record", lambda text, name: recorded.update(text=text, name=name))
    monkeypatch.setattr(sys, "argv", ["leaderboard", "--pairs", "same", "--losses", "forward_kl", "--seeds", "0",
                                      "--steps", "5", "--warm", "300", "--lr", "0.001", "--parallel", "1"])
    lb.main()
    assert calls == [(tmp_path / "leaderboard_warm_lr0.001", ("--model.optimizer.init_args.lr", "0.001"))]
    assert (tmp_path / "leaderboard_warm_runs_lr0.001.csv").exists() and not (tmp_path / "leaderboard_warm_runs.csv").exists()
    assert recorded["name"] == "leaderboard_warm_lr0.001" and recorded["plot"].name == "leaderboard_warm_lr0.001.png"
    assert "--warm 300 --lr 0.001`" in recorded["text"] and "(warm start, learning rate 0.001)" in recorded["text"]
