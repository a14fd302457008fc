"""Properties every registered loss must have: zero at equality, non-negative, masked positions inert, limits.

Each test iterates over `LOSSES` with default arguments, so a newly registered loss is checked without edits
here; a loss is exempted from a property only where the maths excludes it, with the reason next to it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from loss_reference import make_batch
from opd_lightning.losses import (
    LOSSES,
    TEACHER_LOGITS,
    TEACHER_NATIVE_LOGITS,
    TEACHER_TOKEN_LOGPROBS,
    VOCAB_PAIRS,
    VOCAB_PROJECTION,
    LossInputs,
    TeacherSequence,
    TeacherTarget,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    topk_reverse_kl,
)

from opd_lightning.registry import UnknownNameError

# `hidden_match` compares hidden states along whole sequences, not distributions at the completion positions: its
# properties are tested in test_hidden_match.py.
NAMES = sorted(set(LOSSES) - {"hidden_match"})
# Losses whose value is not a divergence between the two distributions, and why.
SURROGATES = {
    "sampled_token": "a policy-gradient surrogate: its value is −r·A and takes the advantages' sign",
    "entropy_aware": "contains the sampled-token policy-gradient surrogate, whose value takes the advantages' sign",
}
NO_TEACHER = {"cross_entropy": "reads no teacher: its minimum is the completions' entropy, not zero at p_S = p_T"}
# Hyperparameters that switch off a loss's non-divergence term for the equality property, and why.
AT_EQUALITY = {"uld": {"ce_weight": 0.0}}  # its cross-entropy term reads no teacher (see NO_TEACHER)
# Losses with a term that is not zero when the two distributions are equal, and why.
NOT_ZERO_AT_EQUALITY = {"dskd": "its cross-entropy trains the teacher-to-student projector on the targets; its KD "
                                "parts vanish when projected states reproduce the targets (test_dskd.py)"}
HIDDEN = 8  # hidden size of both models for the losses that read hidden states


def build(name: str, **kwargs):
    """A registered loss with its size-dependent parameters created, as the training module would."""
    loss = LOSSES.build(name, **kwargs)
    loss.setup(HIDDEN, HIDDEN)
    return loss


def inputs_for(student, teacher, target, mask, **extra) -> LossInputs:
    """Every field a loss may read; teacher token log-probs are gathered from the teacher logits.

    Cross-tokenizer fields describe a teacher with the student's vocabulary: its native logits are `teacher`, every
    token is paired with itself, and the vocabulary projection W is the identity. Hidden states and output layers
    are fixed random tensors of width `HIDDEN`.
    """
    token = torch.log_softmax(teacher.float(), -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ids = torch.arange(student.shape[-1])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, *target.shape, HIDDEN, generator=g)  # [2, B, N, H]: student, teacher
    heads = torch.randn(2, student.shape[-1], HIDDEN, generator=g)  # [2, V, H]
    target_ = TeacherTarget(logits=teacher, token_logprobs=token, native_logits=teacher, vocab_pairs=(ids, ids),
                            vocab_projection=(ids, ids, torch.ones(len(ids))), hidden=hidden[1],
                            sequence=TeacherSequence(teacher), head=heads[1])
    return LossInputs(student, target, mask, teacher=target_, student_hidden=hidden[0], student_head=heads[0],
                      **extra)


def value_and_grad(loss, student, teacher, target, mask, **extra):
    student = student.detach().clone().requires_grad_(True)
    out = loss(inputs_for(student, teacher, target, mask, **extra))
    (grad,) = torch.autograd.grad(out.loss, student)
    return out, grad


def test_registry_holds_exactly_the_documented_losses():
    assert set(LOSSES) == {"forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "tvd",
                           "topk_reverse_kl", "sampled_token", "entropy_aware", "cross_entropy", "uld", "gold",
                           "dskd", "xtoken_pkl", "xtoken_hkl", "cr_opd", "hidden_match"}
    with pytest.raises(UnknownNameError, match="Did you mean 'reverse_kl'"):
        LOSSES.build("revers_kl")


def test_importing_losses_does_not_import_lightning():
    code = ("import sys, opd_lightning.losses; "
            "sys.exit(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("name", NAMES)
def test_zero_at_equality(name):
    if name in NO_TEACHER or name in NOT_ZERO_AT_EQUALITY:
        pytest.skip(NO_TEACHER.get(name) or NOT_ZERO_AT_EQUALITY[name])
    student, _, target, mask = make_batch(3, 7, 37, seed=1)
    out, grad = value_and_grad(build(name, **AT_EQUALITY.get(name, {})), student, student.clone(), target, mask)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, torch.zeros(()), atol=1e-6, rtol=0)  # surrogates: a_t = 0 -> value 0


@pytest.mark.parametrize("name", NAMES)
def test_non_negative_on_random_inputs(name):
    if name in SURROGATES:
        pytest.skip(SURROGATES[name])
    for seed in range(3):
        student, teacher, target, mask = make_batch(2, 5, 23, seed=seed)
        assert build(name)(inputs_for(student, teacher, target, mask)).loss >= -1e-7


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_are_inert(name):
    """Garbage (NaN, inf, huge values, out-of-range ids) at masked positions changes neither value nor gradient."""
    student, teacher, target, mask = make_batch(3, 7, 37, seed=2)
    old = torch.log_softmax(student, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1) - 0.3
    loss = build(name)
    out, grad = value_and_grad(loss, student, teacher, target, mask, old_logprobs=old)
    masked = ~mask
    student2, teacher2, target2, old2 = student.clone(), teacher.clone(), target.clone(), old.clone()
    student2[masked] = torch.where(torch.rand_like(student2[masked]) < 0.5, 1e4, float("nan"))
    teacher2[masked] = float("inf")
    target2[masked] = -100
    old2[masked] = float("nan")
    out2, grad2 = value_and_grad(loss, student2, teacher2, target2, mask, old_logprobs=old2)
    assert torch.equal(out.loss, out2.loss)
    assert torch.equal(grad, grad2)
    assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))
    assert grad[mask].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_num_items_normalises_the_sum_once(name):
    student, teacher, target, mask = make_batch(2, 5, 23, seed=3)
    loss = build(name)
    default = loss(inputs_for(student, teacher, target, mask)).loss
    given = loss(inputs_for(student, teacher, target, mask, num_items=torch.tensor(40.0))).loss
    torch.testing.assert_close(given, default * mask.sum() / 40.0)
    zero = loss(inputs_for(student, teacher, target, torch.zeros_like(mask))).loss  # nothing valid: 0 / max(0, 1)
    assert zero == 0


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_teacher_raises(name):
    loss = build(name)
    if not loss.requires:
        pytest.skip(NO_TEACHER[name])
    student, teacher, target, mask = make_batch(2, 5, 23, seed=4)
    b, t = mask.nonzero()[1].tolist()
    teacher[b, t, 3] = float("nan")
    with pytest.raises(ValueError, match="contain NaN or inf at 1 valid positions; check the teacher's dtype"):
        loss(inputs_for(student, teacher, target, mask))


@pytest.mark.parametrize("name", NAMES)
def test_missing_teacher_input_names_the_loss(name):
    loss = build(name)
    if not loss.requires:
        pytest.skip(NO_TEACHER[name])
    student, _, target, mask = make_batch(1, 3, 11)
    with pytest.raises(ValueError, match=f"loss {name!r} needs"):
        loss(LossInputs(student, target, mask))


def test_requires_declares_what_is_read():
    assert LOSSES["reverse_kl"].requires == {TEACHER_LOGITS}
    assert LOSSES["cross_entropy"].requires == frozenset()
    assert LOSSES.build("sampled_token").requires == {TEACHER_TOKEN_LOGPROBS}
    assert LOSSES.build("sampled_token", credit="baseline").requires == {TEACHER_TOKEN_LOGPROBS, TEACHER_LOGITS}
    assert LOSSES.build("entropy_aware").requires == {TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS}
    assert LOSSES["uld"].requires == {TEACHER_NATIVE_LOGITS}
    assert LOSSES["gold"].requires == {TEACHER_NATIVE_LOGITS, VOCAB_PAIRS}
    assert LOSSES["xtoken_pkl"].requires == LOSSES["xtoken_hkl"].requires == {TEACHER_NATIVE_LOGITS, VOCAB_PROJECTION}


# ------------------------------------------------------------------------------------------------ limits
def _limit_batch():
    student, teacher, _, mask = make_batch(3, 7, 37, seed=5)
    return student.requires_grad_(True), teacher, mask


def _same(a, b, student):
    assert torch.equal(a, b)
    assert torch.equal(*(torch.autograd.grad(x, student, retain_graph=True)[0] for x in (a, b)))


def test_generalized_jsd_endpoints_are_exactly_the_kls():
    student, teacher, mask = _limit_batch()
    _same(generalized_jsd(student, teacher, mask, beta=0.0), forward_kl(student, teacher, mask), student)
    _same(generalized_jsd(student, teacher, mask, beta=1.0), reverse_kl(student, teacher, mask), student)


def test_generalized_jsd_scaled_limits_approach_the_kls():
    student, teacher, mask = _limit_batch()
    eps = 1e-4
    torch.testing.assert_close(generalized_jsd(student, teacher, mask, beta=eps) / eps,
                               forward_kl(student, teacher, mask), rtol=1e-2, atol=0)
    torch.testing.assert_close(generalized_jsd(student, teacher, mask, beta=1 - eps) / eps,
                               reverse_kl(student, teacher, mask), rtol=1e-2, atol=0)


def test_skew_kls_at_alpha_zero_are_the_plain_kls():
    student, teacher, mask = _limit_batch()
    _same(skew_kl(student, teacher, mask, alpha=0.0), forward_kl(student, teacher, mask), student)
    _same(skew_reverse_kl(student, teacher, mask, alpha=0.0), reverse_kl(student, teacher, mask), student)


@pytest.mark.parametrize("k", [37, 100])
def test_topk_with_k_at_least_vocab_is_reverse_kl(k):
    student, teacher, mask = _limit_batch()
    _same(topk_reverse_kl(student, teacher, mask, k=k), reverse_kl(student, teacher, mask), student)


def test_topk_uses_the_teachers_support():
    """Student mass outside the teacher's top-k is invisible to the loss."""
    student, teacher, mask = _limit_batch()
    top = teacher.topk(4, -1).indices
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, top, False)
    moved = student.detach().masked_fill(outside, 9.0)
    torch.testing.assert_close(topk_reverse_kl(student, teacher, mask, k=4), topk_reverse_kl(moved, teacher, mask, k=4))


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("generalized_jsd", {"beta": 1.5}, r"beta must lie in \[0, 1\]"),
    ("generalized_jsd", {"beta": -0.1}, r"beta must lie in \[0, 1\]"),
    ("skew_kl", {"alpha": 1.0}, r"alpha must lie in \[0, 1\)"),
    ("skew_reverse_kl", {"alpha": -0.5}, r"alpha must lie in \[0, 1\)"),
    ("topk_reverse_kl", {"k": 0}, "k must be a positive integer"),
    ("entropy_aware", {"k": 0}, "k must be a positive integer"),
    ("sampled_token", {"credit": "monte_carlo"}, "valid ones: immediate, return_to_go, discounted, baseline"),
    ("sampled_token", {"gamma": 0.0}, r"gamma must lie in \(0, 1\]"),
    ("sampled_token", {"gamma": 1.5}, r"gamma must lie in \(0, 1\]"),
    ("sampled_token", {"clip_eps": 0.0}, "clip_eps must be positive"),
    ("reverse_kl", {"temperature": 0.0}, "temperature must be positive"),
    ("uld", {"distill_weight": -1.0}, "need distill_weight ≥ 0"),
    ("uld", {"ce_weight": -0.5}, "ce_weight ≥ 0"),
    ("uld", {"temperature": 0.0}, "temperature > 0"),
    ("uld", {"topk": 0}, "topk must be None or a positive integer"),
    ("gold", {"beta": 1.5}, r"beta in \[0, 1\]"),
    ("gold", {"matched_weight": 0.5}, "set matched_weight and unmatched_weight together"),
    ("gold", {"matched_weight": -0.5, "unmatched_weight": 1.0}, "must be ≥ 0"),
])
def test_invalid_hyperparameters_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LOSSES.build(name, **kwargs)
