"""Diagnostics: hand-computed values on tiny tensors, masked positions inert, accumulation and reset."""

from __future__ import annotations

import math

import pytest
import torch

from opd_lightning import diagnostics
from opd_lightning.diagnostics import Diagnostics, output_layer_grad_coherence, repeated_token_mask


def _logits(*probs: list[float]) -> torch.Tensor:
    """Logits `[1, N, V]` whose softmax is each of the given distributions."""
    return torch.tensor(probs).log()[None]


def _ref_repeats(ids: list[int], mask: list[bool], n: int) -> list[bool]:
    """Brute force: the n-gram ending at i is fully valid and equals a fully valid earlier one."""
    grams = [tuple(ids[i - n + 1 : i + 1]) if i >= n - 1 and all(mask[i - n + 1 : i + 1]) else None
             for i in range(len(ids))]
    return [g is not None and g in grams[:i] for i, g in enumerate(grams)]


def test_topk_overlap_logratio_and_entropy_by_hand():
    student = _logits([0.4, 0.3, 0.2, 0.1], [0.6, 0.3, 0.05, 0.05])
    teacher = _logits([0.1, 0.5, 0.3, 0.1], [0.2, 0.7, 0.05, 0.05])
    diag = Diagnostics(topk=2)
    diag.update_tokens(student, teacher, torch.tensor([[1, 0]]), torch.ones(1, 2, dtype=torch.bool))
    out = diag.compute()
    # position 0: K_S = {0, 1}, K_T = {1, 2}, shared {1}: (0.3 + 0.5) / 2; position 1: both {0, 1}: (0.9 + 0.9) / 2
    assert out["diag/topk_overlap"].item() == pytest.approx((0.4 + 0.9) / 2, abs=1e-6)
    a = [math.log(0.5 / 0.3), math.log(0.2 / 0.6)]
    assert out["diag/logratio_mean"].item() == pytest.approx(sum(a) / 2, abs=1e-6)
    assert out["diag/logratio_pos_frac"].item() == 0.5
    assert out["diag/logratio_abs"].item() == pytest.approx((abs(a[0]) + abs(a[1])) / 2, abs=1e-6)
    h = [-sum(p * math.log(p) for p in ps) for ps in ([0.4, 0.3, 0.2, 0.1], [0.6, 0.3, 0.05, 0.05])]
    assert out["diag/entropy_student"].item() == pytest.approx(sum(h) / 2, abs=1e-6)
    assert out["diag/repetition_rate"].item() == 0.0
    assert "diag/completion_len" not in out and "diag/grad_coherence" not in out


def test_entropy_of_uniform_and_topk_clipped_to_vocab():
    diag = Diagnostics(topk=10)
    logits = torch.zeros(2, 3, 4)
    diag.update_tokens(logits, logits.clone(), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))
    out = diag.compute()
    assert out["diag/entropy_student"].item() == pytest.approx(math.log(4))
    assert out["diag/entropy_teacher"].item() == pytest.approx(math.log(4))
    assert out["diag/topk_overlap"].item() == pytest.approx(1.0)
    assert out["diag/logratio_mean"].item() == 0.0 and out["diag/logratio_pos_frac"].item() == 0.0


def test_entropy_with_minus_inf_logits():
    diag = Diagnostics()
    logits = torch.tensor([[[0.0, 0.0, -torch.inf]]])
    diag.update_tokens(logits, logits, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))
    assert diag.compute()["diag/entropy_student"].item() == pytest.approx(math.log(2))


@pytest.mark.parametrize(("n", "expected"), [(3, [0, 0, 0, 0, 0, 1, 1]), (2, [0, 0, 0, 0, 1, 1, 1]),
                                             (1, [0, 0, 0, 1, 1, 1, 1])])
def test_repeated_token_mask_by_hand(n, expected):
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    got = repeated_token_mask(ids, torch.ones_like(ids, dtype=torch.bool), n)
    assert got.tolist() == [[bool(e) for e in expected]]


def test_repeated_token_mask_ignores_padding_and_masked_tokens():
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 0, 0, 0, 0], [1, 2, 1, 2, 1, 0, 0, 0, 0, 0], [3, 3, 0, 0, 0, 0, 0, 0, 0, 0]])
    mask = ids != 0
    mask[1, 2] = False  # a hole: the bigrams (2, 1) and (1, 2) through position 2 do not exist
    got = repeated_token_mask(ids, mask, 2)
    assert got[0].tolist() == [False] * 4 + [True, True] + [False] * 4  # padding zeros never repeat
    assert got[1].tolist() == [False] * 10  # without the hole: positions 3 and 4
    assert got[2].tolist() == [False] * 10  # (3, 3) once; the padding (0, 0) bigrams are not counted
    assert repeated_token_mask(ids[:, :2], mask[:, :2], 3).tolist() == [[False, False]] * 3  # shorter than n


def test_repeated_token_mask_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3, (4, 23), generator=gen)
    mask = torch.rand(4, 23, generator=gen) > 0.15
    for n in (1, 2, 3, 4):
        want = [_ref_repeats(r.tolist(), m.tolist(), n) for r, m in zip(ids, mask, strict=True)]
        assert repeated_token_mask(ids, mask, n).tolist() == want


def test_repetition_rate_and_repeat_advantage_ratio_by_hand():
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5], [1, 2, 3, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    student = torch.zeros(2, 7, 8)  # uniform: log p_S(y) = -ln 8
    boost = torch.tensor([[0.0, 1.0, 2.0, 0.5, 3.0, 4.0, 0.0], [1.0, 1.0, 1.0, 9.0, 9.0, 9.0, 9.0]])
    teacher = torch.zeros(2, 7, 8).scatter(-1, ids[..., None], boost[..., None])  # y_t gets logit c_t
    diag = Diagnostics(ngram=3)
    diag.update_tokens(student, teacher, ids, mask)
    out = diag.compute()
    assert out["diag/repetition_rate"].item() == pytest.approx(2 / 10)  # positions 5, 6 of row 0
    a = [math.log(8 * math.exp(c) / (math.exp(c) + 7)) for c in boost[0].tolist() + boost[1, :3].tolist()]
    repeated, other = a[5:7], a[:5] + a[7:]
    want = (sum(repeated) / 2) / (sum(other) / 8)
    assert out["diag/repeat_advantage_ratio"].item() == pytest.approx(want, rel=1e-5)
    assert out["diag/repeat_advantage_gap"].item() == pytest.approx(sum(repeated) / 2 - sum(other) / 8, rel=1e-5)
    diag.reset()
    diag.update_tokens(student[1:], teacher[1:], ids[1:], mask[1:])  # no repeated token: undefined
    out = diag.compute()
    assert math.isnan(out["diag/repeat_advantage_ratio"].item()) and math.isnan(out["diag/repeat_advantage_gap"].item())


def test_repeat_advantage_gap_keeps_its_sign_where_the_ratio_reads_backwards():
    """Both groups' mean advantage negative, the repeated tokens less penalised: favoured, gap > 0, ratio < 1."""
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    mask = torch.ones(1, 7, dtype=torch.bool)
    student = torch.zeros(1, 7, 8).scatter(-1, ids[..., None], 4.0)  # the student is sure of its tokens
    boost = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0]])  # the teacher less so, least on the others
    teacher = torch.zeros(1, 7, 8).scatter(-1, ids[..., None], boost[..., None])
    diag = Diagnostics(ngram=3)
    diag.update_tokens(student, teacher, ids, mask)
    out = diag.compute()
    assert out["diag/repeat_advantage_ratio"].item() < 1 < out["diag/repeat_advantage_gap"].item()


def test_logratio_by_position_in_the_completion_by_hand():
    """Row 0 has 7 valid tokens: positions 0-3 are its first half (2t < 7), 4-6 its second; row 1 has 3: 0-1 and 2."""
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5], [1, 2, 3, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    student = torch.zeros(2, 7, 8)
    boost = torch.tensor([[0.0, 1.0, 2.0, 0.5, 3.0, 4.0, 0.0], [1.0, 1.0, 1.0, 9.0, 9.0, 9.0, 9.0]])
    teacher = torch.zeros(2, 7, 8).scatter(-1, ids[..., None], boost[..., None])
    diag = Diagnostics()
    diag.update_tokens(student, teacher, ids, mask)
    out = diag.compute()
    a = lambda c: math.log(8 * math.exp(c) / (math.exp(c) + 7))
    early = [a(c) for c in (0.0, 1.0, 2.0, 0.5, 1.0, 1.0)]
    late = [a(c) for c in (3.0, 4.0, 0.0, 1.0)]
    assert out["diag/logratio_early"].item() == pytest.approx(sum(early) / 6, rel=1e-5)
    assert out["diag/logratio_late"].item() == pytest.approx(sum(late) / 4, rel=1e-5)
    assert out["diag/logratio_drift"].item() == pytest.approx(sum(late) / 4 - sum(early) / 6, rel=1e-5)
    diag.reset()
    diag.update_tokens(student[:, :1], teacher[:, :1], ids[:, :1], mask[:, :1])  # one token per row: no second half
    assert "diag/logratio_drift" not in diag.compute()


def test_gold_nll_and_top1_by_hand_on_gold_steps_only():
    """`diag/gold_nll`: the student's mean -log p of the gold tokens at valid positions; `diag/gold_top1`: the share
    of them that are its most likely token (a tie counts); both logged only through `update_gold`, which the module calls
    on the gold completions a step reads, not by `update_tokens`."""
    student = _logits([0.4, 0.3, 0.2, 0.1], [0.6, 0.3, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25])
    ids, mask = torch.tensor([[0, 3, 2]]), torch.tensor([[True, True, False]])
    diag = Diagnostics()
    diag.update_tokens(student, None, ids, mask)
    assert "diag/gold_nll" not in diag.compute() and "diag/gold_top1" not in diag.compute()
    diag.update_gold(student, ids, mask)
    out = diag.compute()
    assert out["diag/gold_nll"].item() == pytest.approx(-(math.log(0.4) + math.log(0.05)) / 2, rel=1e-6)
    assert out["diag/gold_top1"].item() == 0.5  # the masked third position is left out
    diag.reset()
    diag.update_gold(student, ids, mask)
    diag.update_gold(student[:, 2:], torch.tensor([[1]]), torch.tensor([[True]]))  # a four-way tie, accumulated
    out = diag.compute()
    assert out["diag/gold_nll"].item() == pytest.approx(-(math.log(0.4) + math.log(0.05) + math.log(0.25)) / 3,
                                                         rel=1e-6)
    assert out["diag/gold_top1"].item() == pytest.approx(2 / 3)
    diag.reset()
    diag.update_gold(student, ids, torch.zeros_like(mask))  # nothing valid: no value rather than 0/0
    assert "diag/gold_nll" not in diag.compute()


def test_length_and_truncation():
    diag = Diagnostics()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    diag.update_rollout(mask, torch.tensor([False, True]))
    assert diag.compute() == {"diag/completion_len": torch.tensor(4.0), "diag/truncation_rate": torch.tensor(0.5)}


def _random_batch(seed: int, b: int = 3, n: int = 9, v: int = 11):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n, generator=gen) > 0.3
    return (torch.randn(b, n, v, generator=gen), torch.randn(b, n, v, generator=gen),
            torch.randint(0, 3, (b, n), generator=gen), mask)


def test_masked_positions_are_inert():
    student, teacher, ids, mask = _random_batch(1)
    diag = Diagnostics(topk=3, ngram=2)
    diag.update_tokens(student, teacher, ids, mask)
    want = diag.compute()
    diag.reset()
    student[~mask], teacher[~mask] = torch.nan, torch.inf
    diag.update_tokens(student, teacher, ids.masked_fill(~mask, 1), mask)
    got = diag.compute()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], equal_nan=True)


def test_two_updates_equal_one_concatenated_update():
    first, second = _random_batch(2), _random_batch(3, b=2)
    split, joined = Diagnostics(topk=3, ngram=1), Diagnostics(topk=3, ngram=1)
    for batch in (first, second):
        split.update_tokens(*batch)
        split.update_rollout(batch[3], batch[3][:, -1])
    cat = [torch.cat(parts) for parts in zip(first, second, strict=True)]
    joined.update_tokens(*cat)
    joined.update_rollout(cat[3], cat[3][:, -1])
    got, want = split.compute(), joined.compute()
    assert got.keys() == want.keys() and len(got) == 14
    for key in want:
        torch.testing.assert_close(got[key], want[key], equal_nan=True)


def test_reset_scalar_updates_and_no_teacher():
    diag = Diagnostics()
    assert diag.compute() == {}
    diag.update_coverage(0.5)
    diag.update_coverage(torch.tensor(1.0))
    diag.update_grad_coherence(0.25)
    assert diag.compute() == {"diag/align_coverage": torch.tensor(0.75), "diag/grad_coherence": torch.tensor(0.25)}
    diag.reset()
    assert diag.compute() == {}
    student, _, ids, mask = _random_batch(4)
    diag.update_tokens(student, None, ids, mask)
    assert set(diag.compute()) == {"diag/entropy_student", "diag/repetition_rate"}
    diag.reset()
    diag.update_tokens(student, student, ids, torch.zeros_like(mask))  # nothing valid: nothing to report
    assert diag.compute() == {}
    with pytest.raises(ValueError, match="differ"):
        diag.update_tokens(student, student[..., :5], ids, mask)


def test_states_are_not_persistent_nor_cast():
    diag = Diagnostics(ngram=1).to(torch.bfloat16)
    assert len(diag.state_dict()) == 0
    student, teacher, ids, mask = _random_batch(5)
    diag.update_tokens(student.bfloat16(), teacher.bfloat16(), ids, mask)
    assert diag._totals.totals.dtype == torch.float64
    assert len(diag.state_dict()) == 0
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in diag.compute().values())


def _brute_coherence(dlogits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    grads = [torch.outer(d, h) for d, h in zip(dlogits.double(), hidden.double(), strict=True)]  # each [V, H]
    return torch.stack(grads).sum(0).norm() / sum(g.norm() for g in grads)


@pytest.mark.parametrize(("n", "v", "h"), [(2, 11, 5), (3, 40, 9), (7, 5, 3), (13, 17, 6)])  # Gram, then direct
def test_grad_coherence_matches_brute_force(n, v, h):
    gen = torch.Generator().manual_seed(n)
    dlogits, hidden = torch.randn(n, v, generator=gen), torch.randn(n, h, generator=gen)
    got = output_layer_grad_coherence(dlogits, hidden)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _brute_coherence(dlogits, hidden), rtol=1e-5, atol=1e-6)


def test_chunking_changes_nothing(monkeypatch):
    student, teacher, ids, mask = _random_batch(6, b=4, n=13, v=7)
    dlogits, hidden = torch.randn(9, 7), torch.randn(9, 5)
    want, coherence = Diagnostics(topk=3), output_layer_grad_coherence(dlogits, hidden)
    want.update_tokens(student, teacher, ids, mask)
    monkeypatch.setattr(diagnostics, "_CHUNK_ELEMENTS", 15)  # two positions, or three vocabulary columns, a chunk
    got = Diagnostics(topk=3)
    got.update_tokens(student, teacher, ids, mask)
    torch.testing.assert_close(got.compute(), want.compute(), equal_nan=True)
    torch.testing.assert_close(output_layer_grad_coherence(dlogits, hidden), coherence)


def test_grad_coherence_limits():
    d, h = torch.randn(1, 6), torch.randn(1, 4)
    assert output_layer_grad_coherence(d.expand(5, 6), h.expand(5, 4)).item() == pytest.approx(1.0, abs=1e-6)
    assert output_layer_grad_coherence(-3 * torch.eye(5, 6), h.expand(5, 4)).item() == pytest.approx(5**-0.5)
    assert math.isnan(output_layer_grad_coherence(torch.zeros(3, 6), torch.randn(3, 4)).item())


def test_max_positions_subsamples_distribution_statistics_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    ids, mask = torch.randint(7, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    full, capped = Diagnostics(), Diagnostics(max_positions=3)
    full.update_tokens(student, teacher, ids, mask)
    capped.update_tokens(student, teacher, ids, mask)
    a, b = full.compute(), capped.compute()
    for key in ("diag/logratio_mean", "diag/logratio_pos_frac", "diag/repetition_rate"):
        torch.testing.assert_close(a[key], b[key])
    picked = [0, 4, 9]  # evenly spaced among the 10 valid positions, row-major
    entropy = -(student.log_softmax(-1).exp() * student.log_softmax(-1)).sum(-1).flatten()[picked].mean()
    torch.testing.assert_close(b["diag/entropy_student"], entropy)
    assert not torch.isclose(a["diag/entropy_student"], b["diag/entropy_student"])


def test_noncanonical_rows_flag_completions_the_tokenizer_would_spell_otherwise():
    from opd_lightning.diagnostics import noncanonical_rows
    from opd_lightning.tasks.arithmetic import bpe_tokenizer

    tok = bpe_tokenizer()
    c, eos = tok.convert_tokens_to_ids, tok.eos_token_id
    ids = torch.tensor([[c("4"), c("6"), eos], [c("46"), eos, 0], [c("13"), c("6"), eos], [c("61"), c("3"), 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    # "4","6" spells "46" (one token); "13","6" is how the tokenizer writes "136", and "6","13" how it writes "613"
    assert noncanonical_rows(tok, ids, mask).tolist() == [True, False, False, True]
    diag = Diagnostics()
    diag.update_noncanonical(noncanonical_rows(tok, ids, mask))
    assert float(diag.compute()["diag/noncanonical_rate"]) == 0.5


def test_coherence_sums_over_chunks_equal_the_one_piece_coherence():
    from opd_lightning.diagnostics import CoherenceSums, output_layer_grad_coherence

    g = torch.Generator().manual_seed(0)
    d, h = torch.randn(13, 50, generator=g), torch.randn(13, 7, generator=g)
    for step in (1, 4, 13):
        sums = CoherenceSums()
        for lo in range(0, 13, step):
            sums.add(d[lo : lo + step], h[lo : lo + step])
        torch.testing.assert_close(sums.value(), output_layer_grad_coherence(d, h), rtol=1e-5, atol=1e-6)
    aligned = CoherenceSums()
    aligned.add(torch.ones(3, 5), torch.ones(3, 2))  # every position pushes the same way
    torch.testing.assert_close(aligned.value(), torch.tensor(1.0))
    assert CoherenceSums().value().isnan()
