"""X-Token: W from the tokenizers' strings by hand, P-KL and H-KL against float64 loop references, their properties,
and training across tokenizers end to end.

The hand example: student tokens 1, 2, 3, 23, 123 (merges 2+3, 1+23) against teacher tokens 1, 2, 3, 12 (merge
1+2), each with <eos> and <unk>. The teacher spells 23 as 2·3 and 123 as 12·3; the student spells 12 as 1·2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loss_reference import make_cross_batch, make_projection, ref_top_ranked_pairs, ref_xtoken_hkl, ref_xtoken_pkl
from opd_lightning.aligners import ALIGNERS, piece_weights, projection_entries
from opd_lightning.losses import (
    LOSSES,
    LossInputs,
    TeacherTarget,
    forward_kl,
    generalized_jsd,
    gold,
    reverse_kl,
    top_ranked_pairs,
    xtoken_hkl,
    xtoken_pkl,
)
from test_cross_tokenizer import BATCH, cross_module, run_step
from test_losses_cross import check, grad_of

B, N, VS, VT = 3, 7, 23, 31
S_VOCAB, T_VOCAB = ["<eos>", "<unk>", "1", "2", "3", "23", "123"], ["<eos>", "<unk>", "1", "2", "3", "12"]
# W by hand (rows: student ids, columns: teacher ids): a two-piece split weighs (0.9, 0.09) / 0.99 = (10/11, 1/11).
HAND = {(0, 0): 1, (2, 2): 1, (3, 3): 1, (4, 4): 1, (5, 3): 10 / 11, (5, 4): 1 / 11, (6, 5): 10 / 11, (6, 4): 1 / 11}
# Not pinned: "1" also gets the reverse pass of teacher "12" (10/11 beside its 1 + 1), "2" its 1/11 beside 1 + 1.
UNPINNED = {**HAND, (2, 2): 22 / 32, (2, 5): 10 / 32, (3, 3): 22 / 23, (3, 5): 1 / 23}


HAND_SHAPE = (len(S_VOCAB), len(T_VOCAB))


def dense(projection, shape=HAND_SHAPE):
    w = torch.zeros(shape, dtype=torch.float64)
    w[projection[0], projection[1]] = projection[2].double()
    return w


def as_dense(table):
    w = torch.zeros(len(S_VOCAB), len(T_VOCAB), dtype=torch.float64)
    for (s, t), value in table.items():
        w[s, t] = value
    return w


def hand_tokenizers():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def build(vocab, merges):
        raw = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, unk_token="<unk>"))
        return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>")

    return build(S_VOCAB, [("2", "3"), ("1", "23")]), build(T_VOCAB, [("1", "2")])


def bound(**options):
    aligner = ALIGNERS.build("xtoken", **options)
    aligner.bind(*hand_tokenizers(), len(S_VOCAB), len(T_VOCAB))
    return aligner


# ------------------------------------------------------------------------------------------- W by hand
def test_piece_weights_decay_geometrically_and_sum_to_one():
    assert np.allclose(piece_weights(2, 0.1), [10 / 11, 1 / 11], rtol=1e-12)
    assert np.allclose(piece_weights(3, 0.1), [100 / 111, 10 / 111, 1 / 111], rtol=1e-12)
    assert np.allclose(piece_weights(2, 1.0), [0.5, 0.5], rtol=1e-12)


def test_projection_entries_from_decompositions_by_hand():
    """Student 0 spells itself; student 1 is teacher (2, 2, 3) (a repeated piece adds up); student 2 is 5 pieces, cut
    to 3; student 3 nothing; teacher 4 is student (1, 3) (reverse pass). Top-2 per row, ties to the lower id."""
    forward = [(0,), (2, 2, 3), (1, 2, 3, 4, 0), None]
    backward = [(0,), None, None, None, (1, 3)]
    exact = (torch.tensor([0]), torch.tensor([0]))
    w = dense(projection_entries(forward, backward, exact, 4, 5, topk=2, max_pieces=3), (4, 5))
    want = torch.zeros(4, 5, dtype=torch.float64)
    want[0, 0] = 1
    row1 = {2: 100 / 111 + 10 / 111, 3: 1 / 111, 4: 10 / 11}  # the top 2: teacher 2 and teacher 4, renormalised
    want[1, 2], want[1, 4] = row1[2] / (row1[2] + row1[4]), row1[4] / (row1[2] + row1[4])
    want[2, 1], want[2, 2] = 10 / 11, 1 / 11  # (100, 10) / 111 of the three pieces kept, renormalised
    want[3, 4] = 1.0  # only the reverse pass reaches it, with weight 1/11, renormalised
    torch.testing.assert_close(w, want)
    no_reverse = dense(projection_entries(forward, None, exact, 4, 5, topk=4, max_pieces=4), (4, 5))
    assert no_reverse[3].sum() == 0 and no_reverse[1, 4] == 0
    torch.testing.assert_close(no_reverse[1, [2, 3]], torch.tensor([110 / 111, 1 / 111], dtype=torch.float64))
    none = (torch.zeros(0, dtype=torch.long),) * 2
    tied = dense(projection_entries([(3,)], [None, None, (0,), None], none, 1, 4, topk=1), (1, 4))  # 1 and 1
    assert tied.tolist() == [[0, 0, 1, 0]]  # the lower teacher id wins the tie


@pytest.mark.parametrize(("options", "want"), [({}, HAND), ({"pin_exact": False}, UNPINNED)])
def test_aligner_builds_w_from_the_tokenizers_strings(options, want):
    aligner = bound(**options)
    torch.testing.assert_close(dense(aligner.projection), as_dense(want))
    assert aligner.weights.dtype == torch.float32 and aligner.student_ids.dtype == torch.long
    top1 = dense(bound(topk=1, **options).projection)  # each row keeps its largest weight, renormalised to 1
    torch.testing.assert_close(top1, (as_dense(want) == as_dense(want).amax(-1, keepdim=True)).double()
                               * (as_dense(want).sum(-1, keepdim=True) > 0))


def test_top_ranked_pairs_by_hand():
    """θ = 0.6: the exact pairs, and 123 with 12 (10/11); 23's best, 2 (10/11), is claimed by 2 (1). θ = 1: exact."""
    projection = bound().projection
    s, t = top_ranked_pairs(projection, 0.6)
    assert s.tolist() == [0, 2, 3, 4, 6] and t.tolist() == [0, 2, 3, 4, 5]
    assert [x.tolist() for x in top_ranked_pairs(projection, 1.0)] == [[0, 2, 3, 4], [0, 2, 3, 4]]
    ties = (torch.tensor([0, 0, 1, 2]), torch.tensor([3, 1, 1, 1]), torch.tensor([0.5, 0.5, 0.8, 0.8]))
    assert [x.tolist() for x in top_ranked_pairs(ties, 0.5)] == [[1], [1]]  # row 0 → 1 (lower id); 1 beats 0 and 2
    for seed in range(3):
        random = make_projection(VS, VT, seed=seed)
        assert [x.tolist() for x in top_ranked_pairs(random, 0.4)] == [x.tolist() for x in
                                                                       ref_top_ranked_pairs(random, 0.4)]


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_pkl_matches_reference(beta, dtype):
    student, teacher, _, mask, _ = make_cross_batch(B, N, VS, VT, 1, seed=21)
    student, teacher = student.to(dtype), teacher.to(dtype)
    projection = make_projection(VS, VT, seed=1)
    kwargs = {"beta": beta, "temperature": 1.3, "num_items": 13}
    got = grad_of(lambda s: xtoken_pkl(s, teacher, mask, projection, **kwargs), student)
    check(got, grad_of(lambda s: ref_xtoken_pkl(s, teacher, mask, projection, **kwargs), student.double()), dtype)


@pytest.mark.parametrize(("threshold", "beta", "weights"), [(0.6, 0.0, (1.0, 1.0)), (0.3, 0.5, (0.7, 1.3)),
                                                             (1.0, 1.0, (1.0, 0.2))])
def test_hkl_matches_reference(threshold, beta, weights):
    student, teacher, _, mask, _ = make_cross_batch(B, N, VS, VT, 1, seed=22)
    projection = make_projection(VS, VT, seed=2)
    kwargs = {"threshold": threshold, "beta": beta, "matched_weight": weights[0], "unmatched_weight": weights[1],
              "temperature": 0.8, "num_items": 13}
    got = grad_of(lambda s: xtoken_hkl(s, teacher, mask, projection, **kwargs), student)
    check(got, grad_of(lambda s: ref_xtoken_hkl(s, teacher, mask, projection, **kwargs), student.double()))


# ------------------------------------------------------------------------------------------ properties
def identity(v):
    ids = torch.arange(v)
    return ids, ids, torch.ones(v)


@pytest.mark.parametrize(("beta", "same"), [(0.0, forward_kl), (1.0, reverse_kl), (0.3, None)])
def test_pkl_with_the_identity_is_the_same_vocabulary_divergence(beta, same):
    student, teacher, _, mask, _ = make_cross_batch(B, N, VS, VS, 1, seed=23)
    got = grad_of(lambda s: xtoken_pkl(s, teacher, mask, identity(VS), beta=beta), student)
    want = grad_of(lambda s: (same or generalized_jsd)(s, teacher, mask, **({} if same else {"beta": beta})), student)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_pkl_is_zero_at_the_projected_student_and_ignores_unreachable_teacher_mass():
    student, _, _, mask, _ = make_cross_batch(B, N, VS, VT, 1, seed=24)
    projection = make_projection(VS, VT, seed=4)  # many-to-many, 4 unreachable teacher tokens
    teacher = (torch.softmax(student.double(), -1) @ dense(projection, (VS, VT))).log().float()
    teacher = teacher.clamp_min(-30.0)  # unreachable tokens: tiny but real teacher mass
    value, grad = grad_of(lambda s: xtoken_pkl(s, teacher, mask, projection), student)
    assert value.abs() < 1e-5 and grad.abs().max() < 1e-5
    moved = teacher.clone()
    moved[..., VT - 4 :] = 3.0  # the teacher puts most of its mass where W does not reach
    out = xtoken_pkl(student, moved, mask, projection)
    assert out.loss.abs() < 1e-5 and out.metrics["teacher_reachable_mass"] < 0.5
    carried = (torch.softmax(student[mask].double(), -1) @ dense(projection, (VS, VT))).sum(-1).mean()
    assert 0.3 < carried < 0.99  # some student tokens have empty rows in W: their mass is not carried
    torch.testing.assert_close(out.metrics["projected_mass"].double(), carried)


@pytest.mark.parametrize("name", ["xtoken_pkl", "xtoken_hkl"])
def test_masked_positions_inert_values_non_negative_gradients_finite(name):
    student, teacher, target, mask, _ = make_cross_batch(B, N, VS, VT, 1, seed=25)
    projection = make_projection(VS, VT, seed=5)
    loss = LOSSES.build(name, threshold=0.4) if name == "xtoken_hkl" else LOSSES.build(name)

    def inputs(s, t, y):
        return LossInputs(s, y, mask, teacher=TeacherTarget(native_logits=t, vocab_projection=projection))

    got = grad_of(lambda s: loss(inputs(s, teacher, target)), student)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[~mask], teacher2[~mask] = float("nan"), float("inf")
    got2 = grad_of(lambda s: loss(inputs(s, teacher2, target)), student2)
    assert torch.equal(got[0], got2[0]) and torch.equal(got[1], got2[1]) and got[0] >= 0
    assert torch.equal(got[1][~mask], torch.zeros_like(got[1][~mask])) and got[1][mask].abs().sum() > 0
    # Extreme logits (fp32 probabilities underflow) and -inf padding columns: finite, none into the padding.
    wide = torch.cat([50.0 * student, student.new_full((B, N, 3), float("-inf"))], -1)
    value, grad = grad_of(lambda s: loss(inputs(s, 50.0 * teacher, target)), wide)
    assert torch.isfinite(value) and torch.isfinite(grad).all() and (grad[..., VS:] == 0).all()


def test_hkl_with_exact_pairs_only_is_gold():
    student, teacher, _, mask, pairs = make_cross_batch(B, N, VS, VT, 15, seed=26)
    projection = (*pairs, torch.ones(15))  # one-hot rows: W pins the same-text pairs and holds nothing else
    for kwargs in ({"beta": 0.0, "matched_weight": 1.0, "unmatched_weight": 1.0}, {"beta": 0.5, "matched_weight": 0.3,
                                                                                  "unmatched_weight": 0.7}):
        got = grad_of(lambda s, kw=kwargs: xtoken_hkl(s, teacher, mask, projection, threshold=1.0, **kw), student)
        want = grad_of(lambda s, kw=kwargs: gold(s, teacher, mask, pairs, **kw), student)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["xtoken_pkl", "xtoken_hkl"])
def test_chunked_equals_unchunked(name):
    student, teacher, _, mask, _ = make_cross_batch(B, N, VS, VT, 1, seed=27)
    projection = make_projection(VS, VT, seed=7)
    fn = xtoken_pkl if name == "xtoken_pkl" else xtoken_hkl
    whole = grad_of(lambda s: fn(s, teacher, mask, projection), student)
    chunked = grad_of(lambda s: fn(s, teacher, mask, projection, chunk_size=4), student)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("xtoken_pkl", {"beta": 1.5}, r"beta in \[0, 1\]"), ("xtoken_pkl", {"temperature": 0.0}, "temperature > 0"),
    ("xtoken_hkl", {"threshold": 0.0}, r"threshold must lie in \(0, 1\]"),
    ("xtoken_hkl", {"matched_weight": None}, "set matched_weight and unmatched_weight together")])
def test_invalid_hyperparameters_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LOSSES.build(name, **kwargs)
    with pytest.raises(ValueError, match="need topk ≥ 1"):
        ALIGNERS.build("xtoken", topk=0)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("loss", ["xtoken_pkl", "xtoken_hkl", "gold"])
@pytest.mark.parametrize("direction", ["bpe_student", "char_student"])
def test_xtoken_trains_the_student_across_tokenizers(teacher_dir, bpe_teacher_dir, loss, direction):
    if direction == "bpe_student":  # student tokens coarser than the character-level teacher's
        module = cross_module(teacher_dir, "builtin:arithmetic_bpe", loss, "xtoken")
    else:  # student tokens finer than the BPE teacher's
        module = cross_module(bpe_teacher_dir, "builtin:char", loss, "xtoken")
    total, _ = run_step(module)
    assert torch.isfinite(total)
    grads = [p.grad for p in module.student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert not any(p.grad is not None for p in module.teacher.parameters())
    assert 0 < float(module.train_diag.compute()["diag/align_coverage"]) <= 1.0
    aligner = module.aligner
    assert 0 < aligner.weights.numel() <= aligner.topk * len(aligner.student_bytes)  # sparse, never [V_s, V_t]
    assert not any(key.startswith("aligner.") for key in module.state_dict())  # rebuilt at bind, not checkpointed
    rollout = module.rollouts(BATCH, train=True)["rollout"]
    target = module.scorer.teacher_target(rollout, aligner.provides, module.student)
    assert aligner.provides <= target.filled()


@pytest.mark.parametrize(("loss", "aligner"), [("xtoken_pkl", "vocab_map"), ("xtoken_hkl", "byte_spans")])
def test_refuses_an_aligner_without_w_and_names_xtoken(teacher_dir, loss, aligner):
    with pytest.raises(ValueError, match=rf"loss '{loss}' needs \['vocab_projection'\].*provide.*: \['xtoken'\]\."):
        cross_module(teacher_dir, "builtin:arithmetic_bpe", loss, aligner)


def test_w_on_smollm2_and_gemma3_is_sparse_and_pins_the_teachers_own_tokens(real_tokenizers):
    """49k × 262k real vocabularies: at most `topk` entries a row, and a digit pinned to Gemma's `2` (what its
    tokenizer writes), not to the byte token `<0x32>` that spells the same byte."""
    student, teacher = real_tokenizers
    aligner = ALIGNERS.build("xtoken")
    aligner.bind(student, teacher, len(student), len(teacher))
    rows, cols, weights = aligner.projection
    assert weights.numel() <= aligner.topk * len(student) and weights.dtype == torch.float32
    counts = torch.bincount(rows, weights=weights.double(), minlength=len(student))
    torch.testing.assert_close(counts[counts > 0], torch.ones(int((counts > 0).sum()), dtype=torch.float64))
    for text in ("2", " Hundreds"):
        (s_id,), (t_id,) = (tok(text, add_special_tokens=False)["input_ids"] for tok in (student, teacher))
        assert cols[rows == s_id].tolist() == [t_id] and weights[rows == s_id].tolist() == [1.0]


def test_position_rows_read_like_the_tensor_they_stand_for():
    """`PositionRows` (xtoken's native logits): indexed by a mask, by (rows, cols) or by integers, it gives the rows a
    `[B, N, V]` copy built position by position would (zero where the index is -1), in fp32, from a slice of a larger
    output, from a layout no row view serves and from bf16 values; with no teacher position, zeros."""
    from opd_lightning.target import PositionRows

    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 20, 37, generator=g)
    index = torch.randint(-1, 15, (3, 11), generator=g)
    for values in (full[:, 5:], full[:, :15], full.transpose(1, 2).contiguous().transpose(1, 2)[:, 2:17],
                   full[:, :15].bfloat16()):
        want = torch.zeros(3, 11, 37)
        for b in range(3):
            for n in range(11):
                if index[b, n] >= 0:
                    want[b, n] = values[b, index[b, n]].float()
        rows = PositionRows(values, index)
        mask = index % 3 != 0
        assert rows.shape == (3, 11, 37) and torch.equal(rows.dense(), want)
        assert torch.equal(rows[mask], want[mask]) and torch.equal(rows[1, 4], want[1, 4])
        picked = (torch.tensor([2, 0, 1]), torch.tensor([3, 3, 10]))
        assert torch.equal(rows[picked], want[picked]) and rows[mask].dtype == torch.float32
    assert torch.equal(PositionRows(torch.zeros(2, 0, 5), torch.full((2, 3), -1)).dense(), torch.zeros(2, 3, 5))
