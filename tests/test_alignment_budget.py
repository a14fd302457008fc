"""benchmarks/alignment_budget.py: each timed pass computes what its row says, over the rows it says, so that the
floors it records are floors of the work the aligners do."""

from __future__ import annotations

import pytest
import torch
from opd_lightning.aligners import ALIGNERS

from benchmarks import alignment_budget as ab
from benchmarks.alignment import aligned_starts, make_rollout, synthetic_pair, text_bank


def test_the_compiled_loops_equal_float64_sums_at_the_rows_indexed():
    loops = ab.compiled_loops()
    if loops is None:
        pytest.skip("no C compiler or glibc libmvec here")
    rows = torch.randn(50, 333, generator=torch.Generator().manual_seed(0)) * 4
    index = torch.tensor([7, 8, 9, 3, 3, 49, 0])  # runs, a repeat, the last and the first row
    got = loops.exp_sums(rows, index, torch.full((len(index),), float("nan")))
    want = rows.double()[index].exp()
    torch.testing.assert_close(got.double(), want.sum(-1), rtol=1e-5, atol=0)
    classes = torch.randint(0, 11, (333,), generator=torch.Generator().manual_seed(1))
    classes[:40] = 3  # a long chain into one class, as the most common first byte makes
    got = loops.exp_class_sums(rows, index, classes.int(), torch.full((len(index), 12), float("nan")))
    torch.testing.assert_close(got.double(), torch.zeros(len(index), 12, dtype=torch.float64).index_add_(1, classes, want),
                               rtol=1e-5, atol=0)  # column 11 collects nothing: exactly 0


def test_each_pass_computes_what_it_is_named_after_over_the_aligned_rows():
    bank = text_bank()
    student, teacher = synthetic_pair(bank, 0.1)
    rollout = make_rollout(student, bank, 3, 96)
    aligner = ALIGNERS.build("char_level")
    aligner.bind(student, teacher, len(student), len(teacher))
    m = aligner.teacher_inputs(rollout).completion_length
    logits = torch.randn(3, m, len(teacher), generator=torch.Generator().manual_seed(0))
    at = aligned_starts(aligner, rollout)
    batch, pos = (at >= 0).nonzero(as_tuple=True)
    rows = logits[batch, at[batch, pos]].double()  # [n, V_t] the aligned teacher rows, in order
    assert 0 < len(rows) < rollout.completion_mask.sum()  # some positions have no shared start

    steps = dict(ab.passes(student, teacher, rollout, logits))
    labels = list(steps)
    torch.testing.assert_close(steps[labels[0]]().double(), rows.sum(-1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(steps[labels[1]]().double(), rows.exp().sum(-1), rtol=1e-5, atol=0)
    if steps[labels[2]] is not None:
        torch.testing.assert_close(steps[labels[2]]().double(), rows.exp().sum(-1), rtol=1e-5, atol=0)
    c = len(steps[labels[3]]())  # the first block of exps, summed into byte classes (the skipped ones last)
    classes = aligner.teacher_classes[: len(teacher)]
    want = torch.zeros(c, 258, dtype=torch.float64).index_add_(1, classes.where(classes >= 0, 257), rows[:c].exp())
    torch.testing.assert_close(steps[labels[3]]().double(), want, rtol=1e-5, atol=1e-9)
    spans = ALIGNERS.build("byte_spans")
    spans.bind(student, teacher, len(student), len(teacher))
    first = spans.lookahead.root_map[: len(teacher)]  # each teacher token's first student token, -1: none
    want = torch.zeros(c, len(student) + 1, dtype=torch.float64).index_add_(
        1, first.where(first >= 0, len(student)), rows[:c].exp())
    torch.testing.assert_close(steps[labels[4]]().double(), want, rtol=1e-5, atol=1e-9)
    if steps[labels[5]] is not None:  # every aligned row's byte classes, by the fused loop
        want = torch.zeros(len(rows), 258, dtype=torch.float64).index_add_(1, classes.where(classes >= 0, 257),
                                                                           rows.exp())
        torch.testing.assert_close(steps[labels[5]]().double(), want, rtol=1e-5, atol=1e-9)
    values, ids = steps[labels[6]]()  # the top 10 of the last block, which is the first block's rows again
    n = len(rows) % c or c
    top = rows[:n].exp().topk(ab.TOPK, -1)
    torch.testing.assert_close(values.double(), top.values, rtol=1e-6, atol=0)
    assert torch.equal(ids, top.indices)
    flat = steps[labels[7]]()  # [B * N, V_s]: the aligned rows' first V_s logits, zeros elsewhere
    written = torch.zeros(at.numel(), len(student), dtype=torch.float64)
    written[batch * at.shape[1] + pos] = rows[:, : len(student)]
    assert torch.equal(flat.double(), written)
