"""Parity of every loss with naive float64 references (values and gradients), chunking, and credit by hand.

Shapes are odd on purpose (3×7×37, 2×5×123) so that no power-of-two coincidence hides an indexing bug.
Tolerances are per input dtype: fp32 inputs are computed in fp32 against a float64 reference; bf16 inputs are
upcast inside the loss, so values stay fp32-accurate while gradients come back rounded to bf16.
"""

from __future__ import annotations

import math

import pytest
import torch
from loss_reference import make_batch, ref_cross_entropy, ref_dense, ref_entropy_aware, ref_sampled_token
from opd_lightning.losses import (
    LOSSES,
    LossInputs,
    TeacherTarget,
    cross_entropy,
    entropy_aware,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sampled_token,
    skew_kl,
    skew_reverse_kl,
    topk_reverse_kl,
    tvd,
)

SHAPES = [(3, 7, 37), (2, 5, 123)]
# value tolerance (relative), gradient tolerances (relative, absolute) per input dtype
TOL = {torch.float32: {"value": 1e-5, "grad": (1e-4, 1e-7)}, torch.bfloat16: {"value": 1e-5, "grad": (1.6e-2, 1e-5)}}
DENSE = {
    "forward_kl": (forward_kl, {}),
    "reverse_kl": (reverse_kl, {}),
    "tvd": (tvd, {}),
    "generalized_jsd": (generalized_jsd, {"beta": 0.3}),
    "skew_kl": (skew_kl, {"alpha": 0.1}),
    "skew_reverse_kl": (skew_reverse_kl, {"alpha": 0.2}),
    "topk_reverse_kl": (topk_reverse_kl, {"k": 5}),
}


def grad_of(fn, student, *args, **kwargs):
    """(value, d value / d student) for a loss function of `student`."""
    student = student.detach().clone().requires_grad_(True)
    value = fn(student, *args, **kwargs)
    value = value.loss if hasattr(value, "loss") else value
    return value, torch.autograd.grad(value, student)[0]


def check(value, grad, ref_value, ref_grad, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(value.double(), ref_value, rtol=tol["value"], atol=1e-7)
    rtol, atol = tol["grad"]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(DENSE))
def test_dense_losses_match_reference(name, shape, dtype):
    fn, params = DENSE[name]
    student, teacher, _, mask = make_batch(*shape, seed=11, dtype=dtype)
    temperature = 1.7 if shape[-1] == 123 else 1.0
    value, grad = grad_of(fn, student, teacher, mask, temperature=temperature, num_items=13, **params)
    ref_value, ref_grad = grad_of(lambda s: ref_dense(name, s, teacher, mask, temperature=temperature,
                                                      num_items=13, **params), student.double())
    check(value, grad, ref_value, ref_grad, dtype)


@pytest.mark.parametrize("name", sorted(DENSE))
def test_chunked_equals_unchunked(name):
    fn, params = DENSE[name]
    student, teacher, _, mask = make_batch(3, 7, 37, seed=12)
    whole = grad_of(fn, student, teacher, mask, **params)
    chunked = grad_of(fn, student, teacher, mask, chunk_size=4, **params)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-8)


def test_chunked_module_equals_unchunked_entropy_aware():
    student, teacher, target, mask = make_batch(3, 7, 37, seed=13)

    def run(s, chunk_size):
        return LOSSES.build("entropy_aware", entropy_threshold=2.5, k=6, chunk_size=chunk_size)(
            LossInputs(s, target, mask, teacher=TeacherTarget(logits=teacher)))

    whole, chunked = grad_of(run, student, None), grad_of(run, student, 4)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_matches_reference(shape, dtype):
    student, _, target, mask = make_batch(*shape, seed=14, dtype=dtype)
    value, grad = grad_of(cross_entropy, student, target, mask)
    check(value, grad, *grad_of(ref_cross_entropy, student.double(), target, mask), dtype)


@pytest.mark.parametrize("credit", ["immediate", "return_to_go", "discounted", "baseline"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sampled_token_matches_reference(credit, shape):
    student, teacher, target, mask = make_batch(*shape, seed=15)
    temperature = 1.3 if shape[-1] == 123 else 1.0
    # a stale rollout: old log-probs moved by ±0.4 so that some ratios leave the clip range
    current = torch.log_softmax(student / temperature, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    old = current + 0.4 * torch.randn(current.shape, generator=torch.Generator().manual_seed(0))
    kwargs = {"credit": credit, "gamma": 0.9, "clip_eps": 0.2, "temperature": temperature, "num_items": 17}
    value, grad = grad_of(lambda s: sampled_token(s, target, mask, teacher_logits=teacher, old_logprobs=old,
                                                  **kwargs), student)
    ref = grad_of(lambda s: ref_sampled_token(s, teacher, target, mask, old_logprobs=old, **kwargs), student.double())
    check(value, grad, *ref, torch.float32)
    metrics = sampled_token(student, target, mask, teacher_logits=teacher, old_logprobs=old, **kwargs).metrics
    assert 0 < metrics["clip_frac"] < 1  # both PPO branches are exercised


def test_entropy_aware_matches_reference():
    student, teacher, target, mask = make_batch(3, 7, 37, seed=16, scale=3.0)
    value, grad = grad_of(lambda s: entropy_aware(s, target, teacher, mask, entropy_threshold=2.0, k=6,
                                                  forward_weight=0.7), student)
    ref = grad_of(lambda s: ref_entropy_aware(s, teacher, target, mask, entropy_threshold=2.0, k=6,
                                              forward_weight=0.7), student.double())
    check(value, grad, *ref, torch.float32)
    out = entropy_aware(student, target, teacher, mask, entropy_threshold=2.0, k=6)
    assert 0 < out.metrics["gated_frac"] < 1  # the threshold splits this batch, so both branches are exercised
    sampled = sampled_token(student, target, mask, teacher_logits=teacher, credit="immediate")
    torch.testing.assert_close(out.metrics["pg"], sampled.loss)


# ------------------------------------------------------------------------------------- credit by hand
# B = 1, N = 4, V = 2; the last position is masked. The student is uniform everywhere, p_S = (½, ½); the teacher
# is p_T = (0.8, 0.2). Sampled tokens y = (0, 1, 0, 1), so the log-ratios a_t = log p_T(y_t) − log p_S(y_t) are
# (ln 1.6, ln 0.4, ln 1.6), and the exact per-step reverse KL is ½ ln(0.5/0.8) + ½ ln(0.5/0.2) = ln 1.25.
L16, L04 = math.log(1.6), math.log(0.4)
HAND_ADVANTAGES = {
    "immediate": [L16, L04, L16, 0.0],
    "return_to_go": [L16 + L04 + L16, L04 + L16, L16, 0.0],
    "discounted": [L16 + 0.5 * L04 + 0.25 * L16, L04 + 0.5 * L16, L16, 0.0],  # γ = 0.5
    "baseline": [math.log(2.0), -math.log(2.0), math.log(2.0), 0.0],  # ln 1.6 + ln 1.25 = ln 2, ln 0.4 + ln 1.25 = −ln 2
}


@pytest.mark.parametrize("credit", sorted(HAND_ADVANTAGES))
@pytest.mark.parametrize("source", ["token_logprobs", "teacher_logits"])
def test_temporal_credit_by_hand(credit, source):
    student = torch.zeros(1, 4, 2, requires_grad=True)
    teacher = torch.log(torch.tensor([0.8, 0.2])).expand(1, 4, 2).clone()
    target = torch.tensor([[0, 1, 0, 1]])
    mask = torch.tensor([[True, True, True, False]])
    token = torch.log(torch.tensor([[0.8, 0.2, 0.8, 0.2]]))
    loss = LOSSES.build("sampled_token", credit=credit, gamma=0.5)
    inputs = LossInputs(student, target, mask, teacher=TeacherTarget(
        logits=teacher if source == "teacher_logits" or credit == "baseline" else None,
        token_logprobs=token if source == "token_logprobs" else None))
    out = loss(inputs)
    (grad,) = torch.autograd.grad(out.loss, student)
    advantages = torch.tensor(HAND_ADVANTAGES[credit])
    # ∇_logits log p_S(y) = onehot(y) − p_S; loss = −Σ_t A_t log p_S(y_t) / 3 in gradient
    dlogp = torch.nn.functional.one_hot(target, 2).float() - 0.5  # [1, 4, 2]
    expected = -(advantages.view(1, 4, 1) * dlogp) / 3
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.metrics["advantage"], advantages[:3].mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, -advantages[:3].sum() / 3, rtol=1e-6, atol=1e-7)  # ratio 1: value −ΣA/n


def test_baseline_advantage_has_zero_mean_under_the_student():
    """Σ_y p_S(y) A(y) = 0 per position: the baseline subtracts the exact expectation of the log-ratio."""
    student, teacher, _, _ = make_batch(1, 1, 9, seed=17)
    mask = torch.ones(9, 1, dtype=torch.bool)
    ids = torch.arange(9).view(9, 1)  # every token of the vocabulary, one row each
    s, t = student.expand(9, 1, 9), teacher.expand(9, 1, 9)
    out = sampled_token(s, ids, mask, teacher_logits=t, credit="baseline", num_items=1)
    p_s = torch.softmax(student[0, 0], -1)
    log_ratio = torch.log_softmax(teacher[0, 0], -1) - torch.log_softmax(student[0, 0], -1)
    advantages = log_ratio + (p_s * -log_ratio).sum()
    torch.testing.assert_close((p_s * advantages).sum(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, -advantages.sum(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("shift", [3.0, -3.0])
def test_importance_ratio_clipping_stops_the_gradient(shift):
    """r = e^{±3} is far outside [0.8, 1.2]: positions whose advantage pushes r further out get no gradient."""
    student, teacher, target, mask = make_batch(2, 6, 11, seed=18)
    logp = torch.log_softmax(student, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    old = logp - shift  # shift > 0: r = e^3; shift < 0: r = e^-3
    s = student.clone().requires_grad_(True)
    out = sampled_token(s, target, mask, teacher_logits=teacher, old_logprobs=old, credit="immediate", clip_eps=0.2)
    (grad,) = torch.autograd.grad(out.loss, s)
    a = torch.log_softmax(teacher, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1) - logp
    clipped = mask & ((a > 0) if shift > 0 else (a < 0))
    free = mask & ~clipped
    assert clipped.any() and free.any()
    assert torch.equal(grad[clipped], torch.zeros_like(grad[clipped]))
    dlogp = torch.nn.functional.one_hot(target, 11).float() - torch.softmax(student, -1)
    expected = -(a * math.exp(shift)).unsqueeze(-1) * dlogp / mask.sum()  # unclipped branch: −A·r·∇log p / n
    torch.testing.assert_close(grad[free], expected[free], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.metrics["clip_frac"], clipped.sum() / mask.sum())
