"""The teacher's target in its top-k form, and the numerics every dense loss shares.

- Top-k form: every dense loss accepts `TopK` (the teacher's k most likely tokens, their log-probs, the tail mass).
  Forward/reverse KL, JSD, the skew KLs and TV compare the k + 1 bucket distributions (one tail bucket), checked
  against a float64 reference written by loops; with k = V that is exactly the dense loss, and below it a lower bound
  (the data-processing inequality). Top-k reverse KL reads only the support, so the form gives exactly its dense value.
  entropy_aware's forward KL is exact and its gate reads the bucket entropy; sampled_token's baseline credit reads the
  bucket KL.
- Numerics: fp64 inputs are computed in fp64 (fp16/bf16 upcast to fp32); a student logit of −inf (a padded
  vocabulary column) gives a finite loss, equal to the loss on the vocabulary without that column, and a zero
  gradient there.
"""

from __future__ import annotations

import pytest
import torch
from loss_reference import make_batch, ref_bucketed, ref_dense
from opd_lightning.losses import (
    LOSSES,
    DenseDivergence,
    LossInputs,
    TeacherTarget,
    TopK,
    entropy_aware,
    sampled_token,
)

DENSE = sorted(name for name, cls in LOSSES.items() if issubclass(cls, DenseDivergence))
PARAMS = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2},
          "topk_reverse_kl": {"k": 4}}


def run(name: str, student: torch.Tensor, teacher, mask: torch.Tensor, **params):
    """(value, gradient with respect to the student's logits) of a registered dense loss."""
    student = student.detach().clone().requires_grad_(True)
    form = TeacherTarget(topk=teacher) if isinstance(teacher, TopK) else TeacherTarget(logits=teacher)
    loss = LOSSES.build(name, **{**PARAMS.get(name, {}), **params})
    out = loss(LossInputs(student, torch.zeros(mask.shape, dtype=torch.long), mask, teacher=form, num_items=11))
    return out.loss, torch.autograd.grad(out.loss, student)[0]


def test_every_dense_loss_is_tested_here():
    assert DENSE == ["forward_kl", "generalized_jsd", "reverse_kl", "skew_kl", "skew_reverse_kl", "topk_reverse_kl",
                     "tvd"]
    assert all(LOSSES[name].accepts_topk for name in [*DENSE, "entropy_aware", "sampled_token"])
    assert not any(LOSSES[name].accepts_topk for name in ("uld", "gold", "dskd", "cross_entropy"))


@pytest.mark.parametrize("name", DENSE)
def test_topk_form_with_every_token_is_the_dense_loss(name):
    student, teacher, _, mask = make_batch(3, 7, 37, seed=21)
    dense = run(name, student, teacher, mask)
    topk = run(name, student, TopK.from_logits(teacher, 37), mask)
    torch.testing.assert_close(topk[0], dense[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(topk[1], dense[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("name", [n for n in DENSE if n != "topk_reverse_kl"])
def test_topk_form_is_the_one_tail_bucket_divergence(name, k):
    student, teacher, _, mask = make_batch(2, 5, 23, seed=22)
    value, grad = run(name, student, TopK.from_logits(teacher, k), mask)
    ref = student.double().requires_grad_(True)
    ref_value = ref_bucketed(name, ref, teacher, mask, k, num_items=11, **PARAMS.get(name, {}))
    (ref_grad,) = torch.autograd.grad(ref_value, ref)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    if name != "tvd":  # bucketing can only lose information: a lower bound of the dense divergence
        assert value <= run(name, student, teacher, mask)[0] + 1e-6


@pytest.mark.parametrize("kept", [4, 7])
def test_topk_reverse_kl_reads_only_the_support_so_the_form_is_exact(kept):
    student, teacher, _, mask = make_batch(3, 6, 29, seed=23)
    dense = run("topk_reverse_kl", student, teacher, mask)
    topk = run("topk_reverse_kl", student, TopK.from_logits(teacher, kept), mask)
    torch.testing.assert_close(topk[0], dense[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(topk[1], dense[1], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="needs at least 4 of the teacher's tokens, but its top-k form keeps 3"):
        run("topk_reverse_kl", student, TopK.from_logits(teacher, 3), mask)


def test_topk_tail_is_the_exact_mass_outside_the_tokens():
    _, teacher, _, _ = make_batch(2, 4, 19, seed=24, dtype=torch.float64)
    form = TopK.from_logits(teacher, 6)
    p = torch.softmax(teacher, -1)
    outside = 1 - p.gather(-1, form.ids).sum(-1)
    torch.testing.assert_close(form.tail.exp(), outside, rtol=1e-12, atol=1e-15)
    assert torch.equal(form.ids, p.topk(6, -1).indices)
    assert torch.isneginf(TopK.from_logits(teacher, 19).tail).all()  # every token kept: no mass outside


def test_topk_taken_at_another_temperature_is_refused():
    student, teacher, _, mask = make_batch(1, 3, 11, seed=25)
    with pytest.raises(ValueError, match="runs at temperature 2.0, but the teacher's top-k were taken at 1.0"):
        run("forward_kl", student, TopK.from_logits(teacher, 4), mask, temperature=2.0)
    value = run("forward_kl", student, TopK.from_logits(teacher, 11, temperature=2.0), mask, temperature=2.0)[0]
    torch.testing.assert_close(value, run("forward_kl", student, teacher, mask, temperature=2.0)[0], rtol=1e-5, atol=0)


def test_entropy_aware_with_the_topk_form():
    """Its forward KL on the teacher's top-k is exact; its gate reads the k + 1 bucket entropy (a lower bound)."""
    student, teacher, target, mask = make_batch(3, 7, 37, seed=26, scale=3.0)
    tokens = torch.log_softmax(teacher, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    kwargs = {"entropy_threshold": 0.0, "k": 6, "teacher_token_logprobs": tokens}  # every position gated
    dense = entropy_aware(student, target, teacher, mask, **kwargs)
    full = entropy_aware(student, target, TopK.from_logits(teacher, 37), mask, **kwargs)
    kept = entropy_aware(student, target, TopK.from_logits(teacher, 8), mask, **kwargs)
    torch.testing.assert_close(full.loss, dense.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kept.metrics["forward_kl"], dense.metrics["forward_kl"], rtol=1e-5, atol=1e-7)
    assert kept.metrics["teacher_entropy"] <= dense.metrics["teacher_entropy"] + 1e-6


def test_sampled_token_baseline_with_the_topk_form():
    student, teacher, target, mask = make_batch(2, 6, 17, seed=27)
    tokens = torch.log_softmax(teacher, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    dense = sampled_token(student, target, mask, teacher_logits=teacher, credit="baseline")
    full = sampled_token(student, target, mask, teacher_logits=TopK.from_logits(teacher, 17),
                         teacher_token_logprobs=tokens, credit="baseline")
    torch.testing.assert_close(full.loss, dense.loss, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs teacher_token_logprobs"):
        sampled_token(student, target, mask, teacher_logits=TopK.from_logits(teacher, 5), credit="baseline")


# ------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", DENSE)
def test_float64_stays_float64_and_half_precision_is_upcast(name):
    student, teacher, _, mask = make_batch(2, 5, 13, seed=28, dtype=torch.float64)
    value, grad = run(name, student, teacher, mask)
    assert value.dtype == torch.float64 and grad.dtype == torch.float64
    params = PARAMS.get(name, {})
    ref = ref_dense(name, student, teacher, mask, num_items=11, **params)
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-14)  # beyond what fp32 arithmetic could reach
    low = run(name, student.bfloat16(), teacher.bfloat16(), mask)[0]
    assert low.dtype == torch.float32


@pytest.mark.parametrize("name", [*DENSE, "entropy_aware", "sampled_token", "gold"])
def test_minus_inf_student_logits_give_finite_losses_and_zero_gradient_there(name):
    """Columns 0 and 5 are padding for every row (−inf), column 9 for some rows: the loss equals the loss on the
    vocabulary without the padded columns (the teacher renormalised there) and their gradient is exactly zero."""
    student, teacher, target, mask = make_batch(2, 6, 17, seed=29)
    target = target.clamp_min(10)  # the completion tokens themselves are in the vocabulary
    padded = torch.zeros(17, dtype=torch.bool)
    padded[[0, 5]] = True
    student[..., padded] = float("-inf")
    student[0, :3, 9] = float("-inf")
    extra = {"sampled_token": {"credit": "baseline"}, "entropy_aware": {"entropy_threshold": 0.0, "k": 4},
             "gold": {"matched_weight": 1.0, "unmatched_weight": 0.0}}.get(name, PARAMS.get(name, {}))
    ids = torch.arange(17)
    form = TeacherTarget(logits=teacher, native_logits=teacher, vocab_pairs=(ids, ids),
                         token_logprobs=torch.log_softmax(teacher, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1))
    loss = LOSSES.build(name, **extra)
    s = student.clone().requires_grad_(True)
    value = loss(LossInputs(s, target, mask, teacher=form, num_items=11)).loss
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert torch.equal(grad[..., padded], torch.zeros_like(grad[..., padded])) and grad[0, :3, 9].eq(0).all()
    if name in DENSE:  # equal to the same loss with the always-padded columns removed from both vocabularies
        keep = ~padded
        reduced = student[..., keep].clone()
        reduced[0, :3, 9 - 2] = float("-inf")  # column 9 is column 7 once 0 and 5 are gone
        want = loss(LossInputs(reduced, target, mask, teacher=TeacherTarget(logits=teacher[..., keep]),
                               num_items=11)).loss
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-7)
