"""Cross-tokenizer losses (ULD, GOLD): invariances, parity with float64 references, chunking and limits.

The registry-wide properties (`test_losses_properties.py`) check both losses with a teacher of the student's own
vocabulary. Here the teacher has its own vocabulary: 31 tokens against the student's 23, permuted, padded and
partly paired, so that no shared size or order can hide an indexing bug.
"""

from __future__ import annotations

import pytest
import torch
from loss_reference import make_batch, make_cross_batch, probs, ref_gold, ref_gold_parts, ref_sorted_l1, ref_uld
from opd_lightning.losses import (
    LOSSES,
    LossInputs,
    TeacherTarget,
    cross_entropy,
    generalized_jsd,
    gold,
    sorted_l1_per_token,
    uld,
)

B, N, VS, VT, K = 3, 7, 23, 31, 15
PAD = -1e4  # a logit whose probability is exactly 0 in fp32: a vocabulary row that is never predicted
TOL = {torch.float32: {"value": 1e-5, "grad": (1e-4, 1e-7)}, torch.bfloat16: {"value": 1e-5, "grad": (1.6e-2, 1e-5)}}


def grad_of(fn, student):
    """(value, d value / d student) for a loss function of `student`; `LossOutput`s give their `.loss`."""
    student = student.detach().clone().requires_grad_(True)
    value = fn(student)
    value = value.loss if hasattr(value, "loss") else value
    return value, torch.autograd.grad(value, student)[0]


def check(got, ref, dtype=torch.float32):
    torch.testing.assert_close(got[0].double(), ref[0], rtol=TOL[dtype]["value"], atol=1e-7)
    rtol, atol = TOL[dtype]["grad"]
    torch.testing.assert_close(got[1].double(), ref[1], rtol=rtol, atol=atol)


def padded(logits, width):
    return torch.cat([logits, logits.new_full((*logits.shape[:-1], width - logits.shape[-1]), PAD)], -1)


# ----------------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("larger", ["teacher", "student"])
def test_uld_is_zero_for_a_permuted_teacher_of_another_size(larger):
    """Same probabilities in another order, with never-predicted rows padding one vocabulary: the sorted L1 is 0."""
    student, _, target, mask = make_batch(B, N, VS, seed=1)
    teacher = student[..., torch.randperm(VS, generator=torch.Generator().manual_seed(0))]
    if larger == "teacher":
        teacher = padded(teacher, VT)
    else:
        student = padded(student, VT)
    assert uld(student, teacher, mask, target, ce_weight=0.0).loss < 1e-6
    nudged = teacher.clone()
    nudged[..., 0] += 1.0
    assert uld(student, nudged, mask, target, ce_weight=0.0).loss > 1e-2  # the same check can fail


def _agreeing_teacher(student, pairs):
    """Teacher native logits `[B, N, VT]` with the student's probabilities: matched tokens at their partners, the
    student's unmatched tokens permuted into the teacher's unmatched rows, the remaining teacher rows never predicted."""
    s_rest = torch.tensor([v for v in range(VS) if v not in pairs[0].tolist()])
    t_rest = torch.tensor([v for v in range(VT) if v not in pairs[1].tolist()])
    teacher = student.new_full((*student.shape[:-1], VT), PAD)
    teacher[..., pairs[1]] = student[..., pairs[0]]
    teacher[..., t_rest[: len(s_rest)]] = student[..., s_rest.flip(0)]
    return teacher, s_rest


def test_gold_is_zero_when_the_distributions_agree_across_vocabularies():
    student, _, _, mask, pairs = make_cross_batch(B, N, VS, VT, K, seed=2)
    teacher, s_rest = _agreeing_teacher(student, pairs)
    out = gold(student, teacher, mask, pairs, matched_weight=1.0, unmatched_weight=1.0)
    assert out.loss.abs() < 1e-6
    # Move mass from matched to unmatched tokens: the matched conditional is unchanged, the unmatched part sees it.
    moved = student.clone()
    moved[..., s_rest] += 1.0
    out = gold(moved, teacher, mask, pairs, matched_weight=1.0, unmatched_weight=1.0)
    assert out.metrics["matched_jsd"].abs() < 1e-6
    assert out.metrics["unmatched_l1"] > 0.05


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (None, None)])
def test_gold_with_every_token_matched_is_the_generalized_jsd(beta, weights):
    """A teacher vocabulary that is a permutation of the student's, every token paired: exactly GKD's JSD_β."""
    student, teacher, _, mask = make_batch(B, N, VS, seed=3)
    perm = torch.randperm(VS, generator=torch.Generator().manual_seed(1))
    native = torch.empty_like(teacher)
    native[..., perm] = teacher  # student token j is teacher token perm[j]
    pairs = (torch.arange(VS), perm)
    got = grad_of(lambda s: gold(s, native, mask, pairs, beta=beta, matched_weight=weights[0],
                                 unmatched_weight=weights[1]), student)
    want = grad_of(lambda s: generalized_jsd(s, teacher, mask, beta=beta), student)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-7)
    metrics = gold(student, native, mask, pairs, beta=beta).metrics
    assert metrics["unmatched_l1"] == 0
    torch.testing.assert_close(metrics["teacher_matched_mass"], torch.tensor(1.0))


def test_gold_parts_are_the_matched_jsd_and_uld_on_the_unmatched_sub_vectors():
    student, teacher, _, mask, pairs = make_cross_batch(B, N, VS, VT, K, seed=4)
    out = gold(student, teacher, mask, pairs, beta=0.3, temperature=1.3)
    s_rest = torch.tensor([v for v in range(VS) if v not in pairs[0].tolist()])
    t_rest = torch.tensor([v for v in range(VT) if v not in pairs[1].tolist()])
    s_logp, t_logp = (torch.log_softmax(x[mask] / 1.3, -1) for x in (student, teacher))
    library = sorted_l1_per_token(s_logp[:, s_rest], t_logp[:, t_rest]).mean()
    parts = [ref_gold_parts(probs(s, 1.3), probs(t, 1.3), pairs, 0.3) for s, t in zip(student[mask], teacher[mask])]
    mass = torch.stack([probs(t, 1.3)[pairs[1]].sum() for t in teacher[mask]]).mean()
    torch.testing.assert_close(out.metrics["unmatched_l1"], library)
    torch.testing.assert_close(out.metrics["unmatched_l1"].double(), torch.stack([p[1] for p in parts]).mean())
    torch.testing.assert_close(out.metrics["matched_jsd"].double(), torch.stack([p[0] for p in parts]).mean())
    torch.testing.assert_close(out.metrics["teacher_matched_mass"].double(), mass)
    assert 0.2 < out.metrics["teacher_matched_mass"] < 0.8  # both parts carry mass in this batch
    w_m = K / VT
    torch.testing.assert_close(out.loss, w_m * out.metrics["matched_jsd"] + (1 - w_m) * out.metrics["unmatched_l1"])


def test_uld_cross_entropy_term_is_cross_entropy_on_the_targets():
    student, teacher, target, mask, _ = make_cross_batch(B, N, VS, VT, K, seed=5)
    got = grad_of(lambda s: uld(s, teacher, mask, target, distill_weight=0.0, ce_weight=1.0, num_items=11), student)
    want = grad_of(lambda s: cross_entropy(s, target, mask, num_items=11), student)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    out = uld(student, teacher, mask, target)
    torch.testing.assert_close(out.metrics["ce"], cross_entropy(student, target, mask))
    torch.testing.assert_close(out.loss, 1.5 * out.metrics["sorted_l1"] + out.metrics["ce"])


def test_uld_topk_limits():
    student, teacher, target, mask, _ = make_cross_batch(B, N, VS, VT, K, seed=6)

    def l1(**kw):
        return uld(student, teacher, mask, target, ce_weight=0.0, distill_weight=1.0, **kw).loss

    assert torch.equal(l1(topk=VT), l1())  # k ≥ both vocabularies: the full comparison
    assert l1(topk=4) < l1()  # a prefix of the same sorted sum
    top1 = (probs(student[mask]).max(-1).values - probs(teacher[mask]).max(-1).values).abs().mean()
    torch.testing.assert_close(l1(topk=1).double(), top1)


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk", [None, 5])
def test_uld_matches_reference(topk, dtype):
    student, teacher, target, mask, _ = make_cross_batch(B, N, VS, VT, K, seed=7)
    student, teacher = student.to(dtype), teacher.to(dtype)
    kwargs = {"distill_weight": 1.5, "ce_weight": 0.4, "temperature": 1.3, "topk": topk, "num_items": 13}
    got = grad_of(lambda s: uld(s, teacher, mask, target, **kwargs), student)
    check(got, grad_of(lambda s: ref_uld(s, teacher, target, mask, **kwargs), student.double()), dtype)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("weights", [(None, None), (0.7, 1.3)])
def test_gold_matches_reference(beta, weights):
    student, teacher, _, mask, pairs = make_cross_batch(B, N, VS, VT, K, seed=8)
    kwargs = {"beta": beta, "matched_weight": weights[0], "unmatched_weight": weights[1], "temperature": 0.8,
              "num_items": 13}
    got = grad_of(lambda s: gold(s, teacher, mask, pairs, **kwargs), student)
    check(got, grad_of(lambda s: ref_gold(s, teacher, mask, pairs, **kwargs), student.double()))


def test_reference_sorted_l1_pads_the_shorter_vector():
    """The reference itself, by hand: (0.5, 0.3, 0.2) against (0.6, 0.4) padded to (0.6, 0.4, 0)."""
    value = ref_sorted_l1(torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.4, 0.6]))
    torch.testing.assert_close(value, torch.tensor(0.1 + 0.1 + 0.2))


CROSS = {
    "uld": lambda s, t, y, m, pairs, **kw: uld(s, t, m, y, topk=6, **kw),
    "gold": lambda s, t, y, m, pairs, **kw: gold(s, t, m, pairs, beta=0.3, **kw),
}


@pytest.mark.parametrize("name", sorted(CROSS))
def test_chunked_equals_unchunked(name):
    student, teacher, target, mask, pairs = make_cross_batch(B, N, VS, VT, K, seed=9)
    whole = grad_of(lambda s: CROSS[name](s, teacher, target, mask, pairs), student)
    chunked = grad_of(lambda s: CROSS[name](s, teacher, target, mask, pairs, chunk_size=4), student)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------- masking and errors
def _module_inputs(student, teacher, target, mask, pairs):
    return LossInputs(student, target, mask, teacher=TeacherTarget(native_logits=teacher, vocab_pairs=pairs))


@pytest.mark.parametrize("name", ["uld", "gold"])
def test_masked_positions_are_inert_and_values_non_negative(name):
    student, teacher, target, mask, pairs = make_cross_batch(B, N, VS, VT, K, seed=10)
    loss = LOSSES.build(name)
    got = grad_of(lambda s: loss(_module_inputs(s, teacher, target, mask, pairs)), student)
    student2, teacher2, target2 = student.clone(), teacher.clone(), target.clone()
    student2[~mask], teacher2[~mask], target2[~mask] = float("nan"), float("inf"), -100
    got2 = grad_of(lambda s: loss(_module_inputs(s, teacher2, target2, mask, pairs)), student2)
    assert torch.equal(got[0], got2[0]) and torch.equal(got[1], got2[1])
    assert torch.equal(got[1][~mask], torch.zeros_like(got[1][~mask])) and got[1][mask].abs().sum() > 0
    for seed in range(3):
        s, t, y, m, p = make_cross_batch(2, 5, VT, VS, 9, seed=seed, scale=4.0)  # here the student is the larger
        for kwargs in ({}, {"beta": 0.0}, {"beta": 1.0}) if name == "gold" else ({}, {"topk": 3}):
            assert LOSSES.build(name, **kwargs)(_module_inputs(s, t, y, m, p)).loss >= -1e-7


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["uld", "gold"])
def test_non_finite_teacher_native_logits_raise(name, bad):
    student, teacher, target, mask, pairs = make_cross_batch(B, N, VS, VT, K, seed=11)
    teacher[0, 0, VT - 1] = bad  # a row the student's vocabulary does not even have
    with pytest.raises(ValueError, match="teacher native logits contain NaN or inf at 1 valid positions"):
        LOSSES.build(name)(_module_inputs(student, teacher, target, mask, pairs))


@pytest.mark.parametrize(("pairs", "match"), [
    ((torch.tensor([0, 1, 1]), torch.tensor([2, 3, 4])), "student ids must be unique"),
    ((torch.tensor([0, 1]), torch.tensor([2, VT])), r"teacher ids must be unique and lie in \[0, 31\)"),
    ((torch.tensor([0, 1]), torch.tensor([2, 3, 4])), "pair ids one to one"),
    ((torch.tensor([0.0]), torch.tensor([1])), "non-empty 1-D long tensor"),
])
def test_invalid_vocab_pairs_raise(pairs, match):
    student, teacher, _, mask, _ = make_cross_batch(1, 3, VS, VT, K, seed=12)
    with pytest.raises(ValueError, match=match):
        gold(student, teacher, mask, pairs)


def test_teacher_positions_must_match_the_students():
    student, teacher, target, mask, _ = make_cross_batch(B, N, VS, VT, K, seed=13)
    with pytest.raises(ValueError, match="must share \\[B, N\\]"):
        uld(student, teacher[:, :-1], mask, target)
