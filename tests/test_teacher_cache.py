"""The teacher cache: written once, read instead of the teacher, refused when it does not match."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY
from test_module import make_module

from opd_lightning.data import PromptDataModule, collate
from opd_lightning.models import HFModel
from opd_lightning.objective import LossTerm
from opd_lightning.target import TEACHER_TOKEN_LOGPROBS, TEACHER_TOPK
from opd_lightning.teacher_cache import TeacherCache, write_cache

NEEDS = frozenset({TEACHER_TOPK, TEACHER_TOKEN_LOGPROBS})


def data_module(**overrides):
    args = {"batch_size": 4, "limit_train": 12, "limit_eval": 4, "test": None, **overrides}
    data = PromptDataModule(**args)
    data.setup()
    return data


def batch_of(data, split, rows):
    return collate([data.datasets[split][i] for i in rows])


def cached_module(teacher_dir, path, **overrides):
    args = {"teacher_topk": 3, "loss": "forward_kl", "on_policy_fraction": 0.0, **overrides}
    module = make_module(teacher_dir, **args, teacher_cache=str(path) if path is not None else None)
    module.manual_backward = lambda loss: loss.backward()  # outside a Trainer
    return module


@pytest.fixture(scope="module")
def written(teacher_dir, tmp_path_factory):
    """A cache of the tiny teacher (k = 3) on the dataset's completions, train and val."""
    path = tmp_path_factory.mktemp("cache")
    module = cached_module(teacher_dir, None)
    manifest = write_cache(module, data_module(), path, splits=("train", "val"), batch_size=5)
    return path, manifest


def test_the_cached_targets_are_the_teachers(written, teacher_dir):
    path, manifest = written
    assert set(manifest["splits"]) == {"train", "val"} and manifest["config"]["k"] == 3
    entry = manifest["splits"]["train"]["dataset"]
    assert entry["rows"] == 12 and entry["tokens"] > 12 and 0 < entry["bytes_per_token"] < 200
    module, cache, data = cached_module(teacher_dir, None), TeacherCache(path), data_module()
    for rows in ([0, 1, 2, 3], [11, 4, 7], [5]):  # any rows, in any order, in other batches than the writer's
        rollout = module.rollouts(batch_of(data, "train", rows), train=True, step=0)["rollout"]
        assert rollout.source == "dataset" and rollout.rows.tolist() == rows
        live = module.scorer.teacher_target(rollout, NEEDS, module.student)
        cached = cache.target("train", rollout, NEEDS)
        valid = rollout.completion_mask
        assert torch.equal(cached.topk.ids[valid], live.topk.ids[valid])
        assert torch.equal(cached.topk.logprobs[valid], live.topk.logprobs[valid].float())
        assert torch.equal(cached.topk.tail[valid], live.topk.tail[valid].float())
        assert torch.equal(cached.token_logprobs[valid], live.token_logprobs[valid].float())
        assert cached.coverage == live.coverage == 1.0


def test_a_cached_step_equals_the_teachers_and_skips_it(written, teacher_dir):
    path, _ = written
    data = data_module()
    batch = batch_of(data, "train", [3, 9, 1, 6])
    plain, cached = cached_module(teacher_dir, None), cached_module(teacher_dir, path)
    cached.student.load_state_dict(plain.student.state_dict())
    expected, _ = plain._run_step(batch, train=True)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran on a cached batch")

    cached.scorer.teacher_target = no_teacher
    got, _ = cached._run_step(batch, train=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    grads = [p.grad for p in cached.student.parameters()]
    assert all(g is not None for g in grads)


def test_gold_terms_on_validation_read_the_cache_and_on_policy_batches_the_teacher(written, teacher_dir):
    path, _ = written
    gold = [LossTerm("forward_kl", completions="gold", weight=0.5)]
    module = cached_module(teacher_dir, path, on_policy_fraction=1.0, extra_terms=gold)
    calls = []
    live = module.scorer.teacher_target
    module.scorer.teacher_target = lambda rollout, *a, **k: calls.append(rollout.source) or live(rollout, *a, **k)
    module._run_step(batch_of(data_module(), "val", [0, 1]), train=False, split="val")
    assert calls == ["student"]  # the gold rollout came from the cache


def test_the_teachers_own_completions_are_cached_and_replayed(teacher_dir, tmp_path):
    options = {"off_policy_source": "teacher"}
    module = cached_module(teacher_dir, None, **options)
    manifest = write_cache(module, data_module(), tmp_path, splits=("train",))
    assert set(manifest["splits"]["train"]) == {"dataset", "teacher"}
    data = data_module()
    batch = batch_of(data, "train", [2, 5, 0])
    live = module.rollouts(batch, train=True, step=0)["rollout"]  # the teacher's samples at step 0
    cached_run = cached_module(teacher_dir, tmp_path, **options)
    cached_run.student.load_state_dict(module.student.state_dict())
    for step in (0, 7):  # the cache holds one sample per row: the same at every step
        replay = cached_run.rollouts(batch, train=True, step=step)["rollout"]
        assert replay.source == "teacher" and torch.equal(replay.completion_mask, live.completion_mask)
        assert torch.equal(replay.completion_ids[live.completion_mask], live.completion_ids[live.completion_mask])
        assert torch.equal(replay.truncated, live.truncated)
    expected, _ = module._run_step(batch, train=True)
    got, _ = cached_run._run_step(batch, train=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_across_tokenizers_the_cache_keeps_the_aligned_target(bpe_teacher_dir, tmp_path):
    student = HFModel(config=TINY, tokenizer="builtin:char", seed=0)
    module = make_module(bpe_teacher_dir, student=student, aligner="byte_spans", teacher_topk=2, loss="forward_kl",
                         on_policy_fraction=0.0)
    write_cache(module, data_module(), tmp_path, splits=("train",))
    rollout = module.rollouts(batch_of(data_module(), "train", [1, 8]), train=True, step=0)["rollout"]
    live = module.scorer.teacher_target(rollout, NEEDS, module.student)
    cached = TeacherCache(tmp_path).target("train", rollout, NEEDS)
    valid = rollout.completion_mask & live.mask
    assert torch.equal(cached.mask & rollout.completion_mask, valid)
    assert torch.equal(cached.topk.ids[valid], live.topk.ids[valid])
    assert torch.equal(cached.topk.logprobs[valid], live.topk.logprobs[valid].float())
    assert torch.equal(cached.token_logprobs[valid], live.token_logprobs[valid].float())
    if live.token_spans is not None:
        assert torch.equal(cached.token_spans[valid], live.token_spans[valid])


@pytest.mark.parametrize(("change", "message"), [
    ({"teacher_topk": 2}, r"k: cache 3, this run 2"),
    ({"aligner": "vocab_map"}, r"aligner.name: cache 'identity', this run 'vocab_map'"),
    ({"sampling_tokens": 6}, r"max_new_tokens: cache 4, this run 6"),
    ({"mask_special_tokens": True}, r"mask_special_tokens: cache False, this run True"),
])
def test_a_cache_for_another_configuration_is_refused(written, teacher_dir, change, message):
    from opd_lightning.rollout import SamplingConfig

    path, _ = written
    if "sampling_tokens" in change:
        change = {"sampling": SamplingConfig(max_new_tokens=change.pop("sampling_tokens"))}
    with pytest.raises(ValueError, match=message + r".*opd cache-teacher --config CONFIG --out"):
        cached_module(teacher_dir, path, **change)


def test_another_teacher_and_other_data_are_refused(written, teacher_dir, bpe_teacher_dir, tmp_path):
    from lightning.pytorch import Trainer

    path, _ = written
    with pytest.raises(ValueError, match=r"teacher.path: cache .*, this run .*bpe_teacher"):
        cached_module(bpe_teacher_dir, path, aligner="byte_spans")
    module = cached_module(teacher_dir, path)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"train data: cache 12 rows .* this run 16 rows"):
        trainer.fit(module, datamodule=PromptDataModule(batch_size=4, limit_train=16, val=None, test=None))
    assert trainer.global_step == 0


def test_a_batch_whose_tokens_differ_from_the_cached_ones_is_refused(written, teacher_dir):
    path, _ = written
    module = cached_module(teacher_dir, path)
    batch = batch_of(data_module(), "train", [0, 1])
    batch["completion"] = [c + "1" for c in batch["completion"]]
    with pytest.raises(ValueError, match=r"cached dataset completion of train row 0 is not the one this run built"):
        module._run_step(batch, train=True)


def test_a_cache_needs_top_k_and_a_manifest(written, teacher_dir, tmp_path):
    path, _ = written
    with pytest.raises(ValueError, match=r"teacher_cache .* needs model.teacher and model.teacher_topk"):
        cached_module(teacher_dir, path, teacher_topk=None)
    with pytest.raises(FileNotFoundError, match=r"no manifest.json.*opd cache-teacher --config CONFIG"):
        cached_module(teacher_dir, tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**json.loads((path / "manifest.json").read_text()),
                                                        "format": 0}))
    with pytest.raises(ValueError, match=r"format 0"):
        cached_module(teacher_dir, tmp_path)


def test_cache_teacher_and_a_cached_fit_from_the_command_line(teacher_dir, tmp_path):
    import yaml

    from opd_lightning.cli import main

    config = tmp_path / "cached.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "enable_checkpointing": False, "num_sanity_val_steps": 0,
                    "limit_val_batches": 1, "log_every_n_steps": 1, "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False},
        "model": {"student": {"config": TINY, "tokenizer": "builtin:char"}, "teacher": {"path": teacher_dir},
                  "loss": "forward_kl", "teacher_topk": 4, "teacher_cache": str(tmp_path / "cache"),
                  "rollout": {"on_policy_fraction": 0.5}, "sampling": {"max_new_tokens": 4}},
        "data": {"batch_size": 4, "limit_train": 8, "limit_eval": 4}}))
    main(["cache-teacher", "--config", str(config), "--out", str(tmp_path / "cache")])
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "val", "test"} and manifest["config"]["k"] == 4
    main(["fit", "--config", str(config)])
    metrics = (tmp_path / "run").rglob("metrics.csv")
    assert any("train/loss" in m.read_text() for m in metrics)
