"""The `opd` command: shipped configs parse, help answers, a short run writes CSV metrics in its run directory."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
DISTILL = REPO / "configs" / "quickstart" / "distill.yaml"


def config_stack(path: Path) -> list[str]:
    """Overlay configs (those that say to run after another) are parsed on top of the quickstart distillation."""
    header = path.read_text().split("\n", 10)
    base = [] if path.parent.name == "quickstart" or not any("--config" in h and "quickstart" in h for h in header) \
        else ["--config", str(DISTILL)]
    return [*base, "--config", str(path)]


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_every_shipped_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_stack(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["student"] and printed["trainer"]["default_root_dir"]


def test_help_answers():
    for args in (["--help"], ["fit", "--help"]):
        out = subprocess.run([sys.executable, "-m", "opd_lightning", *args], capture_output=True, text=True, check=True)
        assert "usage" in out.stdout.lower()
    assert "--model.loss" in out.stdout and "--model.aligner" in out.stdout


@pytest.mark.parametrize("loss", ["forward_kl", "{class_path: opd_lightning.losses.GeneralizedJSD, init_args: {beta: 0.3}}"])
def test_short_run_writes_csv_metrics_in_the_run_directory(teacher_dir, tmp_path, loss):
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 2, "accelerator": "cpu", "default_root_dir": str(tmp_path / "run"),
                    "log_every_n_steps": 1, "enable_checkpointing": False, "limit_val_batches": 0},
        "model": {"student": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                         "num_key_value_heads": 2, "max_position_embeddings": 32},
                              "tokenizer": "builtin:char"},
                  "teacher": {"path": teacher_dir}, "sampling": {"max_new_tokens": 4},
                  "extra_terms": [{"loss": "cross_entropy", "weight": 0.5, "completions": "gold"}]},
        "data": {"batch_size": 4, "limit_train": 16},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--model.loss", loss])
    metrics = tmp_path / "run" / "logs" / "version_0" / "metrics.csv"
    rows = list(csv.DictReader(metrics.open()))
    assert len([r for r in rows if r.get("train/loss")]) == 2
    assert all(float(r["train/loss/cross_entropy@gold"]) > 0 for r in rows if r.get("train/loss"))
    diagnostics = {"diag/topk_overlap", "diag/logratio_mean", "diag/logratio_pos_frac", "diag/entropy_student",
                   "diag/entropy_teacher", "diag/completion_len", "diag/truncation_rate", "diag/repetition_rate",
                   "diag/repeat_advantage_ratio", "diag/align_coverage", "diag/grad_coherence"}
    assert diagnostics <= {k for r in rows for k, v in r.items() if v}
    saved = yaml.safe_load((tmp_path / "run" / "logs" / "version_0" / "config.yaml").read_text())
    if "class_path" in loss:
        assert saved["model"]["loss"]["class_path"] == "opd_lightning.losses.GeneralizedJSD"
        assert saved["model"]["loss"]["init_args"]["beta"] == 0.3
    else:
        assert saved["model"]["loss"] == loss


def test_unknown_loss_name_is_an_error_naming_the_fix(teacher_dir, tmp_path):
    with pytest.raises(KeyError, match="Did you mean 'forward_kl'"):
        main(["fit", "--config", str(DISTILL), "--model.teacher.path", teacher_dir, "--model.loss", "forwrd_kl",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1"])


@pytest.mark.parametrize(("flag", "fix"), [("--trainer.accumulate_grad_batches=4", "model.micro_batch_size"),
                                           ("--trainer.gradient_clip_val=1.0", "model.grad_clip_norm")])
def test_trainer_accumulation_and_clipping_point_to_the_model_options(flag, fix, tmp_path):
    with pytest.raises(ValueError, match=fix):
        main(["fit", "--config", str(DISTILL), flag, "--trainer.default_root_dir", str(tmp_path)])


def test_readme_yaml_examples_parse(tmp_path, capsys):
    import re

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    printed = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"readme_{i}.yaml"
        path.write_text(block)
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(DISTILL), "--config", str(path), "--print_config"])
        printed.append(yaml.safe_load(capsys.readouterr().out))
    model = printed[0]["model"]
    assert model["loss"]["init_args"]["credit"] == "discounted"
    assert [t["init_args"]["weight"] if "init_args" in t else t["weight"] for t in model["extra_terms"]] == [0.5, 0.1]
    guard = printed[1]["trainer"]["callbacks"][0]
    assert guard["class_path"] == "opd_lightning.guards.RolloutGuard" and guard["init_args"]["stop"] is True
