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
    """Overlay configs (those that say to run after another) are parsed on top of the config their header names
    first (`opd fit --config BASE --config OVERLAY`), or of the quickstart distillation."""
    header = path.read_text().split("\n", 10)[:10]
    rel = str(path.relative_to(REPO))
    for line in header:
        words = line.split()
        if "--config" in words and rel in words and words.index(rel) > words.index("--config") + 1:
            return ["--config", str(REPO / words[words.index("--config") + 1]), "--config", str(path)]
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


def test_help_answers_and_lists_the_registry_names():
    from opd_lightning.aligners import ALIGNERS
    from opd_lightning.losses import LOSSES

    for args in (["--help"], ["fit", "--help"]):
        out = subprocess.run([sys.executable, "-m", "opd_lightning", *args], capture_output=True, text=True, check=True)
        assert "usage" in out.stdout.lower()
    assert "--model.loss" in out.stdout and "--model.aligner" in out.stdout
    help_text = " ".join(out.stdout.split())  # argparse wraps long lines
    assert ", ".join(sorted(LOSSES)) in help_text and ", ".join(sorted(ALIGNERS)) in help_text
    assert "--model.rollout.help" in out.stdout and "--model.diagnostics.help" in out.stdout
    group = subprocess.run([sys.executable, "-m", "opd_lightning", "fit", "--model.rollout.help", "RolloutPolicy"],
                           capture_output=True, text=True, check=True).stdout
    assert "--model.rollout.on_policy_fraction" in group and "--model.rollout.micro_batch_size" in group


LOSS_ARGS = {
    "name": ["--model.loss", "forward_kl"],
    "class_path": ["--model.loss", "{class_path: opd_lightning.losses.GeneralizedJSD, init_args: {beta: 0.3}}"],
    "name_with_dotted_args": ["--model.loss", "sampled_token", "--model.loss.credit", "discounted"],
    "name_with_args_mapping": ["--model.loss", "{name: sampled_token, credit: discounted}"],
}


@pytest.mark.parametrize("form", sorted(LOSS_ARGS))
def test_short_run_writes_csv_metrics_in_the_run_directory(teacher_dir, tmp_path, form, caplog):
    """Also: the console says which models were loaded and where the export and the evaluations went."""
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 2, "accelerator": "cpu", "default_root_dir": str(tmp_path / "run"),
                    "log_every_n_steps": 1, "enable_checkpointing": False, "limit_val_batches": 0,
                    "callbacks": [{"class_path": "opd_lightning.export.ExportStudent"},
                                  {"class_path": "opd_lightning.evaluation.LmEvalCallback",
                                   "init_args": {"tasks": ["arithmetic"], "limit": 4, "on_fit_start": True}}]},
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
    with caplog.at_level("INFO", logger="opd_lightning"):
        main(["fit", "--config", str(path), *LOSS_ARGS[form]])
    said = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("opd_lightning"))
    assert f"loaded model from {teacher_dir}" in said and "built model from config" in said
    assert f"exported the student (merge_lora=True) to {tmp_path / 'run' / 'hf'}" in said
    assert "lm-eval fit_start student at step 0" in said and "eval_history.jsonl" in said
    metrics = tmp_path / "run" / "logs" / "version_0" / "metrics.csv"
    rows = list(csv.DictReader(metrics.open()))
    assert len([r for r in rows if r.get("train/loss")]) == 2
    assert all(float(r["train/loss/cross_entropy@gold"]) > 0 for r in rows if r.get("train/loss"))
    diagnostics = {"diag/topk_overlap", "diag/logratio_mean", "diag/logratio_pos_frac", "diag/entropy_student",
                   "diag/entropy_teacher", "diag/completion_len", "diag/truncation_rate", "diag/repetition_rate",
                   "diag/repeat_advantage_ratio", "diag/align_coverage", "diag/grad_coherence"}
    assert diagnostics <= {k for r in rows for k, v in r.items() if v}
    saved = yaml.safe_load((tmp_path / "run" / "logs" / "version_0" / "config.yaml").read_text())["model"]["loss"]
    if form == "class_path":
        assert saved == {"class_path": "opd_lightning.losses.GeneralizedJSD", "init_args": {**saved["init_args"],
                                                                                           "beta": 0.3}}
    elif form == "name_with_dotted_args":
        assert saved["class_path"] == "opd_lightning.losses.sampled_token.SampledToken"
        assert saved["init_args"]["credit"] == "discounted"
    elif form == "name_with_args_mapping":
        assert saved == {"name": "sampled_token", "credit": "discounted"}
    else:
        assert saved == "forward_kl"
    if form.startswith("name_with"):  # the sampled-token loss ran, with its metrics
        assert all(r["train/sampled_token/advantage"] for r in rows if r.get("train/loss"))


def test_a_registry_name_with_arguments_builds_that_loss_and_names_unknown_arguments():
    from opd_lightning.objective import resolve_aligner, resolve_loss

    loss = resolve_loss({"name": "sampled_token", "credit": "discounted", "gamma": 0.9})
    assert type(loss).__name__ == "SampledToken" and (loss.credit, loss.gamma) == ("discounted", 0.9)
    assert resolve_aligner({"name": "mined", "topk": 3}).topk == 3
    with pytest.raises(TypeError, match=r"loss 'forward_kl' does not take \['betta'\]"):
        resolve_loss({"name": "forward_kl", "betta": 1})
    with pytest.raises(KeyError, match="Did you mean 'reverse_kl'"):
        resolve_loss({"name": "revers_kl"})


@pytest.mark.parametrize(("old", "new"), [("on_policy_fraction", "rollout.on_policy_fraction"),
                                          ("micro_batch_size", "rollout.micro_batch_size"),
                                          ("mask_special_tokens", "rollout.mask_special_tokens"),
                                          ("diag_topk", "diagnostics.topk")])
def test_flat_options_that_moved_into_groups_fail_with_the_new_name(tmp_path, old, new):
    with pytest.raises(ValueError, match=f"model.{old} is now model.{new}"):
        main(["fit", "--config", str(DISTILL), f"--model.{old}", "1", "--print_config"])
    overlay = tmp_path / "old.yaml"
    overlay.write_text(yaml.safe_dump({"model": {old: 1}}))
    with pytest.raises(ValueError, match=f"old.yaml: model.{old} is now model.{new}"):
        main(["fit", "--config", str(DISTILL), "--config", str(overlay), "--print_config"])
    overlay.write_text(yaml.safe_dump({"model": {"diagnostics": False}}))
    with pytest.raises(ValueError, match="diagnostics is now a group"):
        main(["fit", "--config", str(DISTILL), "--config", str(overlay), "--print_config"])


def readme_commands(marker: str) -> list[str]:
    """The README's command lines (in its bash blocks) that contain `marker`, as printed."""
    import re

    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if marker in line]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_the_readme_multi_device_commands_run_as_printed(teacher_dir, tmp_path, strategy):
    """Each printed command, with overrides appended that make it small (the teacher, steps, data, no callbacks)."""
    import shlex

    (command,) = [c for c in readme_commands("--trainer.strategy") if c.endswith(f"--trainer.strategy {strategy}")]
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/opd"
    small = ["--model.teacher.path", teacher_dir, "--trainer.max_steps", "2", "--trainer.default_root_dir",
             str(tmp_path / "run"), "--trainer.callbacks", "[]", "--trainer.limit_val_batches", "0",
             "--data.batch_size", "4", "--data.limit_train", "16"]
    done = subprocess.run([str(REPO / argv[0]), *argv[1:], *small], capture_output=True, text=True, cwd=REPO,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "version_0" / "metrics.csv").open()))
    assert len([r for r in rows if r.get("train/loss")]) == 2


def test_unknown_loss_name_is_an_error_naming_the_fix(teacher_dir, tmp_path):
    with pytest.raises(KeyError, match="Did you mean 'forward_kl'"):
        main(["fit", "--config", str(DISTILL), "--model.teacher.path", teacher_dir, "--model.loss", "forwrd_kl",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1"])


@pytest.mark.parametrize(("flag", "fix"), [("--trainer.accumulate_grad_batches=4", "model.rollout.micro_batch_size"),
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
    assert model["loss"] == {"name": "sampled_token", "credit": "discounted", "gamma": 0.95, "clip_eps": 0.2}
    assert model["rollout"]["on_policy_fraction"] == 0.8 and model["rollout"]["micro_batch_size"] == 8
    assert [t["init_args"]["weight"] if "init_args" in t else t["weight"] for t in model["extra_terms"]] == [0.5, 0.1]
    guard = printed[1]["trainer"]["callbacks"][0]
    assert guard["class_path"] == "opd_lightning.guards.RolloutGuard" and guard["init_args"]["stop"] is True


def test_readme_python_examples_run():
    import re

    for block in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL):
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 -- the README's own examples


def _callbacks(paths: list[str], capsys) -> list[str]:
    with pytest.raises(SystemExit):
        main(["fit", *paths, "--print_config"])
    return [c["class_path"] for c in yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"] or []]


@pytest.mark.parametrize("path", [p for p in CONFIGS if config_stack(p)[:2] == ["--config", str(DISTILL)]],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_overlays_keep_the_base_configs_callbacks(path, capsys):
    """An overlay replaces the callback list when it names one: it must still export (and evaluate) as the base
    config does, e.g. `quantized_teacher.yaml` once dropped ExportStudent."""
    base = _callbacks(["--config", str(DISTILL)], capsys)
    assert "opd_lightning.export.ExportStudent" in base
    assert set(base) <= set(_callbacks(config_stack(path), capsys))


def test_the_progress_bar_counts_optimizer_steps_out_of_max_steps(teacher_dir, tmp_path):
    from lightning.pytorch import Trainer
    from test_module import make_module

    from opd_lightning.data import PromptDataModule
    from opd_lightning.progress import StepProgressBar

    bar = StepProgressBar()
    totals = []

    class Watch(__import__("lightning.pytorch").pytorch.Callback):
        def on_train_batch_end(self, trainer, *args):
            totals.append((bar.train_progress_bar.n, bar.train_progress_bar.total))

    trainer = Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=[bar, Watch()])
    trainer.fit(make_module(teacher_dir), datamodule=PromptDataModule(batch_size=4, limit_train=8, val=None, test=None))
    assert trainer.current_epoch >= 2  # two steps an epoch: the bar went on across epochs
    assert totals == [(step, 5) for step in range(1, 6)]


def test_data_without_the_fields_the_configuration_reads_fails_at_set_up(teacher_dir, tmp_path):
    from lightning.pytorch import Trainer
    from test_module import make_module

    from opd_lightning.data import PromptDataModule

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "{i}+1="}}\n' for i in range(8)))
    module = make_module(teacher_dir, on_policy_fraction=0.5)
    trainer = Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"8 of 8 rows of .*prompts.jsonl lack a completion .*on_policy_fraction < 1"):
        trainer.fit(module, datamodule=PromptDataModule(train=str(data), val=None, test=None, batch_size=4))
    assert trainer.global_step == 0  # refused before any step, not at the first off-policy one
    on_policy = make_module(teacher_dir, on_policy_fraction=1.0)  # reads no completion: runs
    Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path).fit(
        on_policy, datamodule=PromptDataModule(train=str(data), val=None, test=None, batch_size=4))


@pytest.mark.parametrize("rich", [True, False], ids=["rich installed", "tqdm only"])
def test_the_cli_trainer_counts_optimizer_steps_whichever_bar_lightning_picks(teacher_dir, tmp_path, monkeypatch,
                                                                              rich):
    """Lightning picks RichProgressBar where `rich` is installed (transformers brings it) and TQDM elsewhere; the
    CLI replaces either with the step bar."""
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.trainer.connectors import callback_connector

    from opd_lightning.cli import OPDCLI
    from opd_lightning.data import PromptDataModule
    from opd_lightning.module import DistillationModule
    from opd_lightning.progress import StepProgressBar

    monkeypatch.setattr(callback_connector, "_RICH_AVAILABLE", rich)
    cli = OPDCLI(DistillationModule, PromptDataModule, run=False, auto_configure_optimizers=False, args=[
        "--config", str(DISTILL), "--model.teacher.path", str(teacher_dir), "--trainer.default_root_dir",
        str(tmp_path), "--trainer.callbacks", "[]"])
    bars = [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]
    assert [type(b) for b in bars] == [StepProgressBar]
