"""Byte spans: the two tokenizations grouped into the minimal spans that end on the same byte, with all of the
teacher's probability mass carried into the student's vocabulary.

At every student token that starts where a teacher token starts, the teacher's distributions become one over the
student's next token: a teacher token longer than student tokens gives its mass to the first student token of its
spelling (`trie.TokenTrie`), and student tokens longer than teacher tokens get the teacher's likelihood of their
text by walking the teacher's later distributions along the realised text (`lookahead.Lookahead`). Mass is
conserved up to tokens the other side cannot spell. Student tokens inside a teacher token get no dense target here
(`bpe_subset` gives them one when the pair qualifies). For the sampled-token
loss the aligner scores whole spans: the teacher's log-likelihood of a span's text is the sum of its tokens'
log-probs, exact for the teacher's own tokenization of the text, and sits on the span's last student token. When a
loss needs the dense target and token log-probs together, the token log-probs are read from the dense target (one
per student token, no spans), so that both describe the same distribution.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from opd_lightning.buffers import scratch
from opd_lightning.rollout import Rollout
from opd_lightning.target import (
    TEACHER_LOGITS,
    TEACHER_NATIVE_LOGITS,
    TEACHER_TOKEN_LOGPROBS,
    VOCAB_PAIRS,
    PositionRows,
    TeacherTarget,
)

from .base import ALIGNERS, TeacherInputs, dense_token_logprobs
from .columns import ColumnSums, column_blocks, spelled_shares
from .lookahead import Lookahead
from .rows import copy_rows_, floored_log
from .text import TextAligner, span_logprobs, target_rows
from .trie import TokenTrie

__all__ = ["ByteSpanAligner"]

# Blocks of the first level: 32 teacher rows, and at least 2**21 values. The bookkeeping per block here is heavier
# than elsewhere, so wide rows want more of them per block than `rows.BLOCK_ELEMENTS` gives (16 of a 262k
# vocabulary), and narrow rows fewer (524 of an 8,000-token one). Calls on `benchmarks/alignment.py`'s batches (random
# logits, 2 threads, three alternating runs each): SmolLM2/Gemma-3, 1.15-1.19 s in blocks of 2**23 values (32 rows),
# 1.18-1.25 s in 2**22, 1.26-1.34 s in 2**21; the synthetic 90% pair, 63-69 ms in 2**21 (262 rows), 71-76 ms in 2**22,
# 78-83 ms in 2**23. The other aligners gained nothing from larger blocks on the real pair.
SPAN_ROWS, SPAN_MIN_ELEMENTS = 32, 2**21


@ALIGNERS.register("byte_spans")
class ByteSpanAligner(TextAligner):
    """Span alignment on UTF-8 bytes; dense targets at shared token starts, span log-likelihoods everywhere."""

    provides = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TEACHER_NATIVE_LOGITS, VOCAB_PAIRS})
    reads_rows = True  # through `gather_rows`, `PositionRows` and `token_logprobs_chunked` only

    def __init__(self) -> None:
        """Takes no options: spellings and the decomposition trie are built when the aligner is bound."""
        super().__init__()
        self.lookahead: Lookahead | None = None

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        super().bind(student_tokenizer, teacher_tokenizer, student_vocab_size, teacher_vocab_size)
        trie = TokenTrie(self.teacher_bytes, self.student_bytes, student_tokenizer, student_vocab_size)
        self.lookahead = Lookahead(self.student_bytes, self.teacher_bytes, teacher_tokenizer, student_tokenizer,
                                   trie.first)
        self.root_sums = ColumnSums(self.lookahead.root_map[:teacher_vocab_size], student_vocab_size)

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        view = inputs.alignment
        completion = rollout.completion_mask
        if needs & {TEACHER_LOGITS, TEACHER_NATIVE_LOGITS, VOCAB_PAIRS}:
            return self._dense(teacher_logits, view, rollout, needs)
        logp = span_logprobs(teacher_logits, view, completion.shape[1])
        in_span = (view.student_span >= 0) & completion
        spans = view.student_span.masked_fill(~in_span, -1)
        return TeacherTarget(coverage=self.coverage(in_span, rollout), mask=in_span, token_logprobs=logp,
                             token_spans=spans)

    def _dense(self, teacher_logits: Tensor, view, rollout: Rollout, needs: frozenset[str]) -> TeacherTarget:
        at = view.teacher_at_start.masked_fill(~rollout.completion_mask, -1)  # [B, N]
        batch, pos = (at >= 0).nonzero(as_tuple=True)
        starts = tuple(x.cpu().numpy() for x in (batch, pos, at[batch, pos]))  # host copies for the bookkeeping
        walks = self.lookahead.plan(view.teacher_ids.cpu().numpy(), view.teacher_mask.sum(-1).cpu().numpy(),
                                    starts[0], starts[2], device=teacher_logits.device)
        deep = walks.deep.cpu().numpy()
        logp, kept, q, masses = first_level(teacher_logits, starts, at.shape[1], walks.queries,
                                            self.root_sums, self.student_vocab_size, deep)  # [B, N, V_s]
        native = PositionRows(teacher_logits, at) if TEACHER_NATIVE_LOGITS in needs else None  # read when indexed
        if len(deep):  # the starts the walks below the first level move mass in: masses until here
            start, column, value = self.lookahead.flow(walks, q)
            order = torch.empty(len(batch), dtype=torch.long, device=start.device)
            order[walks.deep] = torch.arange(len(deep), device=start.device)  # start -> its row among the deep ones
            cells = order[start].to(masses.device) * self.student_vocab_size + column.to(masses.device)
            masses.view(-1).index_add_(0, cells, value.to(masses.dtype))
            kept_deep = masses.clamp_min_(0).sum(-1)  # clamped: rounding in the subtractions
            masses.div_(kept_deep.clamp_min(torch.finfo(masses.dtype).tiny)[:, None])
            rows = starts[0][deep] * at.shape[1] + starts[1][deep]
            flat = logp.view(-1, self.student_vocab_size)
            copy_rows_(flat, rows, masses, np.arange(len(deep)), op=floored_log)
            if (empty := (kept_deep <= 0).cpu().numpy()).any():  # nothing spelled: no target
                flat[torch.from_numpy(rows[empty]).to(flat.device)] = 0.0
            kept[walks.deep.to(kept.device)] = kept_deep.to(kept.dtype)
        valid = torch.zeros(at.shape, dtype=torch.bool, device=at.device)
        valid[batch, pos] = kept > 0
        tokens = dense_token_logprobs(logp, rollout, valid) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=logp, native_logits=native,
                             vocab_pairs=tuple(p.to(logp.device) for p in self.pairs), token_logprobs=tokens,
                             mass_coverage=float(kept.mean()) if len(kept) else 0.0)


def first_level(teacher_logits: Tensor, starts: tuple[np.ndarray, ...], n_student: int,
                queries: tuple[np.ndarray, ...], root_sums: ColumnSums, size: int,
                deep: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass over the teacher rows the projection reads: the first-level student-token distributions at the
    starts, and the probabilities the lookahead's walks read (at the starts and at the later positions the walks
    reach).

    Each row is exponentiated once (`columns.column_blocks`, a few rows at a time, scattered into columns and read while
    in cache; normalised by the sum of its columns, or soft-maxed where exp without the max is unsafe), whether a start,
    a walk position or both; the row bookkeeping is done on the host. A start no walk goes below (most of them) is
    final at the first level: its row is renormalised over the mass the student can spell and written as log-probs
    (floored at `LOG_FLOOR`) while its block is at hand. The `deep` starts' rows are kept apart as masses normalised
    by the teacher's whole row, for the walks' flow to move mass within them first.

    Args:
        teacher_logits: `[B, M, V_t]`.
        starts: (row [n], student position [n], teacher position [n]) of each start, in (row, position) order.
        n_student: N, the student's completion length.
        queries: (row [Q], teacher position [Q], teacher id [Q]) probabilities to read (`Walks.queries`).
        root_sums: the column sums carrying each teacher token's mass where it goes at the first level (its
            `[V_t]` index: the lookahead's `root_map`, -1: nowhere).
        size: the student's vocabulary size.
        deep: indices (ascending) of the starts the walks go below (`Walks.deep`).

    Returns:
        (log-probs `[B, N, size]` at the final starts, zero off the starts (the deep starts' rows to be written by the
        caller); the share of the teacher's mass each start keeps `[n]` (the deep ones' to be recomputed after the
        flow); probabilities `[Q]`; the deep starts' masses `[len(deep), size]`).
    """
    device, (big_b, big_m, v_t) = teacher_logits.device, teacher_logits.shape
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    out = target_rows((big_b, n_student, size), t(starts[0]), t(starts[1]))  # every start's row is written below
    flat = out.view(-1, size)
    is_deep = np.zeros(len(starts[0]), dtype=bool)
    is_deep[deep] = True
    masses = scratch(len(deep), size, device, slot="deep").zero_()  # reused: no fresh pages to fault in per call
    deep_at = np.cumsum(is_deep) - 1  # each deep start's row in `masses`
    kept = torch.zeros(len(starts[0]), device=device)
    start_key, query_key = starts[0] * big_m + starts[2], queries[0] * big_m + queries[1]
    keys = np.unique(np.concatenate([start_key, query_key]))  # [R] sorted teacher rows to read
    start_at, query_at = np.searchsorted(keys, start_key), np.searchsorted(keys, query_key)
    order = np.argsort(query_at, kind="stable")
    q = torch.zeros(len(query_key), device=device)
    all_b, all_t, read_at = t(keys // big_m), t(keys % big_m), query_at[order]
    for lo, hi, full, total, values in column_blocks(teacher_logits, all_b, all_t, root_sums,
                                                     max(SPAN_ROWS * v_t, SPAN_MIN_ELEMENTS)):
        key, s = keys[lo:hi], slice(*np.searchsorted(start_at, (lo, hi)))
        read = order[slice(*np.searchsorted(read_at, (lo, hi)))]
        at = t(query_at[read] - lo)  # the block's reads, by row
        q[t(read)] = values(at, t(queries[2][read])) / total[at]
        local = start_at[s] - lo  # each start's row in the block
        final = np.ones(len(key), dtype=bool)
        final[local[is_deep[s]]] = False
        final_t = t(final)
        full, share = spelled_shares(full, total, size, final_t)  # the deep starts' by the whole row
        kept[s.start : s.stop] = torch.where(final_t, share, 0.0)[t(local)]
        deep_s = is_deep[s]
        if deep_s.any():
            copy_rows_(masses, deep_at[s][deep_s], full, local[deep_s])
        # the final starts' log-probs written straight into the target (the deep ones' after the flow, by the caller)
        rows = starts[0][s] * n_student + starts[1][s]
        copy_rows_(flat, rows[~deep_s], full, local[~deep_s], op=floored_log)
        if (empty := (final_t & (share <= 0)).cpu().numpy()[local]).any():  # nothing spelled: no target
            flat[t(rows[empty])] = 0.0
    return out, kept, q, masses

