"""Distillation across tokenizers, end to end: every cross-tokenizer aligner with the losses it serves, tiny models.

The pairs are genuinely different: the arithmetic task's character tokenizer against a byte-level BPE (one token
per number up to two digits, so student tokens are both finer and coarser than the teacher's), and a byte-level
BPE teacher against a student that keeps part of its merges (the BPE-subset case).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from test_aligners import subset_pair

from opd_lightning.models import HFModel
from opd_lightning.module import DistillationModule
from opd_lightning.rollout import SamplingConfig

BATCH = {"prompt": ["12+34=", "7-3=", "5+5=", "81-9="], "completion": ["46", "4", "10", "72"]}


@pytest.fixture(scope="module")
def subset_dirs(tmp_path_factory):
    """Tiny teacher with a byte-level BPE, and a student tokenizer keeping 30% of its merges."""
    student_tok, teacher_tok = subset_pair(0.3)
    paths = {}
    for name, tok in (("student", student_tok), ("teacher", teacher_tok)):
        path = tmp_path_factory.mktemp(name)
        tok.save_pretrained(path)
        paths[name] = str(path)
    source = HFModel(config=TINY, tokenizer=paths["teacher"], seed=3)
    source.load_model(source.load_tokenizer()).save_pretrained(paths["teacher"])
    return paths


def run_step(module: DistillationModule, train: bool = True) -> tuple[torch.Tensor, dict]:
    module.manual_backward = lambda loss: loss.backward()  # one step without a Trainer
    return module._run_step(BATCH, train=train)


def cross_module(teacher: str, student_tokenizer: str, loss, aligner: str, **kwargs) -> DistillationModule:
    return DistillationModule(student=HFModel(config=TINY, tokenizer=student_tokenizer, seed=0),
                              teacher=HFModel(path=teacher), loss=loss, aligner=aligner,
                              sampling=SamplingConfig(max_new_tokens=6), **kwargs)


CASES = [("vocab_map", "forward_kl"), ("vocab_map", "gold"), ("vocab_map", "uld"), ("byte_spans", "forward_kl"),
         ("byte_spans", "reverse_kl"), ("byte_spans", "sampled_token"), ("byte_spans", "gold"),
         ("char_level", "forward_kl"), ("char_level", "generalized_jsd"), ("mined", "forward_kl"), ("mined", "gold")]


@pytest.mark.parametrize(("aligner", "loss"), CASES)
@pytest.mark.parametrize("direction", ["bpe_student", "char_student"])
def test_each_aligner_trains_the_student_across_tokenizers(teacher_dir, bpe_teacher_dir, aligner, loss, direction):
    if direction == "bpe_student":  # student tokens coarser than the character-level teacher's
        module = cross_module(teacher_dir, "builtin:arithmetic_bpe", loss, aligner)
    else:  # student tokens finer than the BPE teacher's
        module = cross_module(bpe_teacher_dir, "builtin:char", loss, aligner)
    total, _metrics = run_step(module)
    assert torch.isfinite(total)
    grads = [p.grad for p in module.student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert not any(p.grad is not None for p in module.teacher.parameters())
    coverage = float(module.train_diag.compute()["diag/align_coverage"])
    assert 0 < coverage <= 1.0


def test_bpe_subset_trains_with_exact_token_likelihoods(subset_dirs):
    for loss in ("forward_kl", "sampled_token"):
        # Dataset completions: tokenised canonically, as a trained student writes. (An untrained student's token soup
        # often crosses the teacher's token boundaries; those positions get no target.)
        module = cross_module(subset_dirs["teacher"], subset_dirs["student"], loss, "bpe_subset", on_policy_fraction=0.0)
        total, _ = run_step(module)
        assert torch.isfinite(total)
        assert float(module.train_diag.compute()["diag/align_coverage"]) == 1.0


def test_teacher_written_completions_cross_tokenizers(teacher_dir):
    module = cross_module(teacher_dir, "builtin:arithmetic_bpe", "forward_kl", "byte_spans", on_policy_fraction=0.0,
                          off_policy_source="teacher")
    rollout = module._rollouts(BATCH, train=True)["rollout"]
    assert not rollout.on_policy and rollout.completion_mask.any()
    text = module.student_tokenizer.batch_decode(rollout.completion_ids.masked_fill(~rollout.completion_mask, 0),
                                                 skip_special_tokens=True)
    assert all(set(t) <= set("0123456789+-*= \nabcdefghijklmnopqrstuvwxyz?,.:") for t in text)


def test_teacher_written_completions_end_at_stop_strings(teacher_dir):
    teacher_written = {"on_policy_fraction": 0.0, "off_policy_source": "teacher"}
    free = cross_module(teacher_dir, "builtin:arithmetic_bpe", "forward_kl", "byte_spans", **teacher_written)
    free.sampling = SamplingConfig(do_sample=False, max_new_tokens=6, stop_at_eos=False)
    prompt_ids, prompt_mask = free._encode_prompts(BATCH["prompt"])
    enc = free.teacher_tokenizer(BATCH["prompt"], padding=True, return_tensors="pt")
    out = free.teacher.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    texts = free.teacher_tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(texts), texts
    free.sampling = SamplingConfig(do_sample=False, max_new_tokens=6, stop_at_eos=False,
                                   stop=sorted({t[0] for t in texts}))
    rollout = free._teacher_rollout(BATCH["prompt"], prompt_ids, prompt_mask)
    tok = free.student_tokenizer
    got = [tok.decode(ids[mask]) for ids, mask in zip(rollout.completion_ids, rollout.completion_mask, strict=True)]
    assert got == [t[0] for t in texts]  # the first character only, and no EOS appended
    assert not rollout.truncated.any()

def test_bpe_subset_refuses_other_pairs_and_names_the_alternatives(bpe_teacher_dir):
    with pytest.raises(ValueError, match="bpe_subset cannot serve.*'byte_spans'.*'char_level'"):
        cross_module(bpe_teacher_dir, "builtin:char", "forward_kl", "bpe_subset")


def test_a_loss_its_aligner_cannot_feed_names_the_aligners_that_can(bpe_teacher_dir):
    with pytest.raises(ValueError, match=r"needs \['teacher_token_logprobs'\].*char_level.*byte_spans"):
        cross_module(bpe_teacher_dir, "builtin:char", "sampled_token", "char_level")


def test_slow_tokenizers_are_refused_with_the_fix(bpe_teacher_dir):
    from opd_lightning.aligners import ALIGNERS

    class Slow:  # what a slow (Python) tokenizer looks like to an aligner: no backend, no offsets
        is_fast = False

    student = HFModel(config=TINY, tokenizer="builtin:char").load_tokenizer()
    with pytest.raises(ValueError, match="use_fast=True"):
        ALIGNERS.build("byte_spans").bind(student, Slow(), 49, 120)


def test_uncovered_positions_contribute_nothing(teacher_dir):
    module = cross_module(teacher_dir, "builtin:arithmetic_bpe", "forward_kl", "vocab_map")
    rollouts = module._rollouts(BATCH, train=False)
    target = module._reference_target("teacher", rollouts["rollout"], frozenset({"teacher_logits"}))
    assert target.mask is not None and (target.mask <= rollouts["rollout"].completion_mask).all()
    rows = target.teacher_logits[target.mask]
    torch.testing.assert_close(rows.logsumexp(-1), torch.zeros(len(rows)), atol=1e-4, rtol=0)
