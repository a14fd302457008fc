"""Distillation across tokenizers, end to end: every cross-tokenizer aligner with the losses it serves, tiny models.

The pairs are genuinely different: the arithmetic task's character tokenizer against a byte-level BPE (one token
per number up to two digits, so student tokens are both finer and coarser than the teacher's), and a byte-level
BPE teacher against a student that keeps part of its merges (the BPE-subset case).
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from conftest import TINY
from opd_lightning.aligners import ALIGNERS
from opd_lightning.losses import LOSSES, LossInputs

from opd_lightning.hidden import vocab_size
from opd_lightning.models import HFModel
from opd_lightning.module import DistillationModule
from opd_lightning.reference import completion_logits
from opd_lightning.rollout import SamplingConfig
from opd_lightning.rollout_source import RolloutPolicy

BATCH = {"prompt": ["12+34=", "7-3=", "5+5=", "81-9="], "completion": ["46", "4", "10", "72"]}


def run_step(module: DistillationModule, train: bool = True) -> tuple[torch.Tensor, dict]:
    module.manual_backward = lambda loss: loss.backward()  # one step without a Trainer
    return module._run_step(BATCH, train=train)


def cross_module(teacher: str, student_tokenizer: str, loss, aligner: str, **policy) -> DistillationModule:
    return DistillationModule(student=HFModel(config=TINY, tokenizer=student_tokenizer, seed=0),
                              teacher=HFModel(path=teacher), loss=loss, aligner=aligner,
                              sampling=SamplingConfig(max_new_tokens=6), rollout=RolloutPolicy(**policy))


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
    rollout = module.rollouts(BATCH, train=True)["rollout"]
    assert not rollout.on_policy and rollout.completion_mask.any()
    text = module.student_tokenizer.batch_decode(rollout.completion_ids.masked_fill(~rollout.completion_mask, 0),
                                                 skip_special_tokens=True)
    assert all(set(t) <= set("0123456789+-*= \nabcdefghijklmnopqrstuvwxyz?,.:") for t in text)


def test_teacher_written_completions_end_at_stop_strings(teacher_dir):
    teacher_written = {"on_policy_fraction": 0.0, "off_policy_source": "teacher"}
    free = cross_module(teacher_dir, "builtin:arithmetic_bpe", "forward_kl", "byte_spans", **teacher_written)
    source = free.rollout_source
    source.sampling = SamplingConfig(do_sample=False, max_new_tokens=6, stop_at_eos=False)
    prompt_ids, prompt_mask = source.encode_prompts(BATCH["prompt"], free.device)
    enc = free.teacher_tokenizer(BATCH["prompt"], padding=True, return_tensors="pt")
    out = free.teacher.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    texts = free.teacher_tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(texts), texts
    source.sampling = SamplingConfig(do_sample=False, max_new_tokens=6, stop_at_eos=False,
                                     stop=sorted({t[0] for t in texts}))
    rollout = source.teacher_rollout(free.teacher, BATCH["prompt"], prompt_ids, prompt_mask, [0] * 4)
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
    """Positions the aligner leaves without a target are out of the loss: NaN written into the target there changes
    neither the loss nor its gradient, and the loss is the forward KL summed over the covered positions only, divided
    by all valid tokens. Dropping the intersection with the target's mask (`LossInputs.valid`) fails this."""
    module = cross_module(teacher_dir, "builtin:arithmetic_bpe", "forward_kl", "vocab_map")
    rollout = module.rollouts(BATCH, train=False)["rollout"]  # an untrained student's tokens: many uncovered
    target = module._target("teacher", rollout, frozenset({"teacher_logits"}))
    mask = rollout.completion_mask
    uncovered = mask & ~target.mask
    assert target.mask is not None and uncovered.any() and (target.mask & mask).any()
    assert (target.mask <= mask).all()
    rows = target.logits[target.mask]
    torch.testing.assert_close(rows.logsumexp(-1), torch.zeros(len(rows)), atol=1e-4, rtol=0)

    logits = completion_logits(module.student, rollout.sequences, rollout.attention_mask, rollout.position_ids,
                               mask.shape[1]).detach()
    loss = LOSSES.build("forward_kl")

    def value_and_grad(teacher_target):
        student = logits.clone().requires_grad_(True)
        out = loss(LossInputs(student, rollout.completion_ids, mask, teacher=teacher_target, num_items=mask.sum()))
        return out.loss, torch.autograd.grad(out.loss, student)[0]

    value, grad = value_and_grad(target)
    poisoned = dataclasses.replace(target, logits=target.logits.masked_fill(uncovered.unsqueeze(-1), float("nan")))
    value2, grad2 = value_and_grad(poisoned)
    assert torch.equal(value, value2) and torch.equal(grad, grad2)
    assert torch.equal(grad[uncovered], torch.zeros_like(grad[uncovered]))
    covered = target.mask & mask
    t_logp, s_logp = target.logits[covered].double().log_softmax(-1), logits[covered].double().log_softmax(-1)
    expected = (t_logp.exp() * (t_logp - s_logp)).sum() / mask.sum()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("every", [1, 2, 8])
def test_vocab_map_mass_coverage_is_the_matched_share_at_the_measured_positions(teacher_dir, every):
    """`mass_coverage` is the mean, over the targeted positions whose student index is divisible by
    `coverage_every`, of the teacher probability the matched tokens hold (by hand from the teacher's logits, in
    float64); every targeted position keeps its target whatever the sample."""
    module = cross_module(teacher_dir, "builtin:arithmetic_bpe", "forward_kl",
                          ALIGNERS.build("vocab_map", coverage_every=every))
    batch = {"prompt": BATCH["prompt"], "completion": ["46", "136", "10 and 12+34=46", "7"]}
    rollout = module.rollouts(batch, train=True)["rollout"]
    inputs = module.aligner.teacher_inputs(rollout)
    with torch.no_grad():
        logits = completion_logits(module.teacher, inputs.input_ids, inputs.attention_mask, inputs.position_ids,
                                   inputs.completion_length)
    target = module.aligner.project(logits, inputs, rollout, frozenset({"teacher_logits"}))
    at = inputs.alignment.teacher_at_start.masked_fill(~rollout.completion_mask, -1)
    assert torch.equal(target.mask, at >= 0)
    t_ids = module.aligner.pairs[1]
    shares = [float(logits[b, t].double().softmax(-1)[t_ids].sum()) for b, i in (at >= 0).nonzero().tolist()
              if i % every == 0 for t in [int(at[b, i])]]
    assert shares and target.mass_coverage == pytest.approx(sum(shares) / len(shares), rel=1e-5)
    with pytest.raises(ValueError, match="coverage_every must be >= 1"):
        ALIGNERS.build("vocab_map", coverage_every=0)


class OracleTeacher(torch.nn.Module):
    """A teacher that knows the text: at every position all its mass (a logit of 30) is on the token its input holds
    next, so each target an aligner builds from it must point at what the text really holds there."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(-1, torch.roll(input_ids, -1, dims=1).unsqueeze(-1), 30.0)
        return types.SimpleNamespace(logits=logits[:, -logits_to_keep:])


LONG = {"prompt": ["12+34=", "7-3=", "5+5=", "81-9="], "completion": ["46 and 12+34=46", "4", "10, 20", "72 sum 9"]}


@pytest.mark.parametrize("aligner", ["vocab_map", "byte_spans", "char_level", "mined"])
@pytest.mark.parametrize("direction", ["bpe_student", "char_student"])
def test_aligned_targets_point_at_the_realised_next_token(teacher_dir, bpe_teacher_dir, aligner, direction):
    """Every form an aligner fills, at every covered position, points at the student token the text holds there: the
    dense target's argmax and the native logits' argmax spell its first byte (byte_spans: it is the token itself, and
    each span's log-likelihood is ~0), so a target shifted by one position, or read from the wrong teacher row,
    fails (`test_each_aligner_trains_the_student_across_tokenizers` checks only that training runs)."""
    teacher, student = ((teacher_dir, "builtin:arithmetic_bpe") if direction == "bpe_student"
                        else (bpe_teacher_dir, "builtin:char"))
    module = cross_module(teacher, student, "forward_kl", aligner, on_policy_fraction=0.0)
    module.scorer.teacher = OracleTeacher(vocab_size(module.teacher))
    rollout = module.rollouts(LONG, train=True)["rollout"]  # the dataset's completions: real text
    s_bytes, t_bytes = module.aligner.student_bytes, module.aligner.teacher_bytes
    ids = rollout.completion_ids

    def first(table, token):  # first byte of a token's spelling, 256 for EOS
        return 256 if token == table.eos_id else table.table[token][0]

    forms = module.aligner.provides & {"teacher_logits", "teacher_native_logits"}
    target = module.scorer.teacher_target(rollout, frozenset(forms), module.student)
    covered = target.mask & rollout.completion_mask
    if aligner == "mined":  # approximate inside spans by design: judged where both tokenizations start a token
        covered &= module.aligner.teacher_inputs(rollout).alignment.teacher_at_start >= 0
    assert covered.sum() >= 8
    for b, i in covered.nonzero().tolist():
        want = first(s_bytes, int(ids[b, i]))
        dense = int(target.logits[b, i].argmax())
        assert (dense if aligner == "char_level" else first(s_bytes, dense)) == want, (b, i)
        if aligner == "byte_spans":
            assert dense == int(ids[b, i]), (b, i)
        if target.native_logits is not None:
            assert first(t_bytes, int(target.native_logits[b, i].argmax())) == want, (b, i)
    if aligner == "byte_spans":
        spans = module.scorer.teacher_target(rollout, frozenset({"teacher_token_logprobs"}), module.student)
        scored = spans.token_logprobs[spans.mask & rollout.completion_mask]  # the oracle's log p of the text: ~0
        assert len(scored) >= 8 and (scored > -1e-3).all()


@pytest.mark.parametrize("aligner", ["identity", "vocab_map", "byte_spans", "bpe_subset", "char_level", "mined",
                                     "dskd_cma"])
def test_every_capability_an_aligner_declares_is_filled(teacher_dir, subset_dirs, aligner):
    """Asked for one capability at a time, the aligner's target carries it (`TeacherTarget.filled`), for every
    capability in its `provides`: a declared but empty capability would let a loss fall back silently."""
    from opd_lightning.aligners import ALIGNERS

    if aligner == "bpe_subset":
        module = cross_module(subset_dirs["teacher"], subset_dirs["student"], "forward_kl", aligner,
                              on_policy_fraction=0.0)
    else:
        student = "builtin:char" if aligner == "identity" else "builtin:arithmetic_bpe"
        module = cross_module(teacher_dir, student, "dskd" if aligner == "dskd_cma" else "forward_kl", aligner,
                              on_policy_fraction=0.0)
    rollout = module.rollouts(BATCH, train=True)["rollout"]
    provides = ALIGNERS[aligner].provides
    assert provides
    for capability in sorted(provides):
        target = module.aligner.project(*_teacher_outputs(module, rollout), frozenset({capability}))
        if capability == "hidden_states":
            target = module.scorer.teacher_target(rollout, frozenset({capability}), module.student)
        assert capability in target.filled(), (aligner, capability)


def _teacher_outputs(module, rollout):
    inputs = module.aligner.teacher_inputs(rollout)
    with torch.no_grad():
        logits = completion_logits(module.teacher, inputs.input_ids, inputs.attention_mask, inputs.position_ids,
                                   inputs.completion_length)
    return logits, inputs, rollout
