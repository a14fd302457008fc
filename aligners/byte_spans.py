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

import math

import numpy as np
import torch
from torch import Tensor

from opd_lightning.rollout import Rollout
from opd_lightning.target import (
    TEACHER_LOGITS,
    TEACHER_NATIVE_LOGITS,
    TEACHER_TOKEN_LOGPROBS,
    VOCAB_PAIRS,
    TeacherTarget,
)

from .base import ALIGNERS, TeacherInputs, dense_token_logprobs
from .lookahead import Lookahead
from .text import (
    LOG_FLOOR,
    TextAligner,
    chunk_rows,
    fused_softmax_,
    gather_rows,
    mass_to_logits,
    put_rows_,
    scratch,
    softmax_rows,
    span_logprobs,
)
from .trie import TokenTrie, sum_columns

__all__ = ["ByteSpanAligner"]


@ALIGNERS.register("byte_spans")
class ByteSpanAligner(TextAligner):
    """Span alignment on UTF-8 bytes; dense targets at shared token starts, span log-likelihoods everywhere."""

    provides = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TEACHER_NATIVE_LOGITS, VOCAB_PAIRS})
    reads_rows = True  # through `gather_rows` and `token_logprobs_chunked` only

    def __init__(self) -> None:
        """Takes no options: spellings and the decomposition trie are built when the aligner is bound."""
        super().__init__()
        self.lookahead: Lookahead | None = None

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        super().bind(student_tokenizer, teacher_tokenizer, student_vocab_size, teacher_vocab_size)
        trie = TokenTrie(self.teacher_bytes, self.student_bytes, student_tokenizer, student_vocab_size)
        self.lookahead = Lookahead(self.student_bytes, self.teacher_bytes, teacher_tokenizer, student_tokenizer,
                                   trie.first)

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
        logp, kept, q, native = first_level(teacher_logits, starts, at.shape[1], walks.queries,
                                            self.lookahead.root_map, self.student_vocab_size, walks.deep.cpu().numpy(),
                                            TEACHER_NATIVE_LOGITS in needs)  # [B, N, V_s]
        if len(walks.deep):  # the starts the walks below the first level move mass in: still masses here
            start, column, value = self.lookahead.flow(walks, q)
            deep = walks.deep.to(batch.device)
            order = torch.empty(len(batch), dtype=torch.long, device=batch.device)
            order[deep] = torch.arange(len(deep), device=batch.device)  # start -> its row among the deep ones
            flat = logp.view(-1, self.student_vocab_size)
            rows = batch[deep] * at.shape[1] + pos[deep]
            mass = flat[rows].index_put_((order[start], column.to(batch.device)), value.to(flat.dtype),
                                         accumulate=True).clamp_min_(0)  # rounding in the subtractions
            logp_deep, kept_deep = mass_to_logits(mass)
            flat[rows] = logp_deep
            kept[deep] = kept_deep.to(kept.dtype)
        valid = torch.zeros(at.shape, dtype=torch.bool, device=at.device)
        valid[batch, pos] = kept > 0
        tokens = dense_token_logprobs(logp, rollout, valid) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=logp, native_logits=native,
                             vocab_pairs=tuple(p.to(logp.device) for p in self.pairs), token_logprobs=tokens,
                             mass_coverage=float(kept.mean()) if len(kept) else 0.0)


def first_level(teacher_logits: Tensor, starts: tuple[np.ndarray, ...], n_student: int,
                queries: tuple[np.ndarray, ...], root_map: Tensor, size: int, deep: np.ndarray,
                native: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One pass over the teacher rows the projection reads: the first-level student-token distributions at the
    starts, and the probabilities the lookahead's walks read (at the starts and at the later positions the walks
    reach).

    Each row is soft-maxed once, a chunk of rows at a time, whether a start, a walk position or both; the row
    bookkeeping is done on the host. A start no walk goes below (most of them) is final at the first level: its row
    is renormalised over the mass the student can spell and written as log-probs (floored at `LOG_FLOOR`) while the
    chunk is at hand. The `deep` starts are left as masses normalised by the teacher's whole row, for the walks' flow
    to move mass within them first.

    Args:
        teacher_logits: `[B, M, V_t]`.
        starts: (row [n], student position [n], teacher position [n]) of each start, in (row, position) order.
        n_student: N, the student's completion length.
        queries: (row [Q], teacher position [Q], teacher id [Q]) probabilities to read (`Walks.queries`).
        root_map: `[V_t]` where each teacher token's mass goes at the first level (-1: nowhere).
        size: the student's vocabulary size.
        deep: indices of the starts the walks go below (`Walks.deep`).
        native: also return the teacher's own logits at the starts.

    Returns:
        (`[B, N, size]`: log-probs at the final starts, masses at the deep ones, zero off the starts; the share of
        the teacher's mass each start keeps `[n]` (the deep ones' to be recomputed after the flow); probabilities
        `[Q]`; native logits `[B, N, V_t]` or None).
    """
    device, (big_b, big_m, v_t) = teacher_logits.device, teacher_logits.shape
    out = torch.empty(big_b, n_student, size, device=device)  # every start's row is written below; the rest zeroed
    is_start = torch.zeros(big_b * n_student, dtype=torch.bool, device=device)
    is_start[torch.from_numpy(starts[0] * n_student + starts[1]).to(device)] = True
    out.view(-1, size)[~is_start] = 0.0
    own = torch.zeros(big_b, n_student, v_t, device=device) if native else None
    final = np.ones(len(starts[0]), dtype=bool)
    final[deep] = False
    kept = torch.zeros(len(starts[0]), device=device)
    start_key, query_key = starts[0] * big_m + starts[2], queries[0] * big_m + queries[1]
    keys = np.unique(np.concatenate([start_key, query_key]))  # [R] sorted teacher rows to read
    start_at, query_at = np.searchsorted(keys, start_key), np.searchsorted(keys, query_key)
    order = np.argsort(query_at, kind="stable")
    q = torch.zeros(len(query_key), device=device)
    step = chunk_rows(v_t)
    bounds = np.arange(0, len(keys) + step, step)
    s_lo, q_lo = np.searchsorted(start_at, bounds), np.searchsorted(query_at[order], bounds)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    buffer = scratch(min(step, len(keys)), v_t, device)
    columns = scratch(min(step, len(keys)), size + 1, device, slot="columns")  # sum_columns' output, reused
    floor = math.exp(LOG_FLOOR)
    for c in range(len(bounds) - 1):
        lo, key, s = bounds[c], keys[bounds[c] : bounds[c + 1]], slice(s_lo[c], s_lo[c + 1])
        rows_b, rows_t = t(key // big_m), t(key % big_m)
        if own is not None:
            probs = fused_softmax_(put_native(own, teacher_logits, rows_b, rows_t, buffer, starts, s, start_at, lo, t))
        else:
            probs = softmax_rows(teacher_logits, rows_b, rows_t, buffer)  # [c, V_t]
        local = start_at[s] - lo
        same = len(local) == len(key) and (local == np.arange(len(key))).all()  # every row a start, once
        b, i, local_t = t(starts[0][s]), t(starts[1][s]), t(local)
        # [c, size + 1]: the columns sum to the row
        full = sum_columns(probs, root_map, size, keep_skipped=True, out=columns[: len(key)])
        total = full.sum(-1, keepdim=True)  # exact row sums (the fused softmax's own are fp32-sequential)
        read = order[q_lo[c] : q_lo[c + 1]]
        at = t(query_at[read] - lo)
        q[t(read)] = probs[at, t(queries[2][read])] / total[at, 0]
        rows = full if same else full[local_t]  # [k, size + 1] one per start of the chunk
        totals = total if same else total[local_t]
        spelled = totals[:, 0] - rows[:, size]  # the mass the student's vocabulary can spell
        fin = t(final[s])
        kept[t(np.arange(s.start, s.stop))] = torch.where(fin, spelled / totals[:, 0], 0.0)
        scale = torch.where(fin, spelled, totals[:, 0]).clamp_min_(torch.finfo(rows.dtype).tiny)
        rows = rows[:, :size].div_(scale[:, None])
        if bool(fin.all()):
            rows.clamp_min_(floor).log_()
        elif bool(fin.any()):
            f = fin.nonzero().squeeze(-1)
            rows[f] = rows[f].clamp_min_(floor).log_()
        rows.masked_fill_((fin & (spelled <= 0))[:, None], 0.0)  # nothing spelled: no target (masked by the caller)
        put_rows_(out, b, i, rows)
    return out, kept, q, own


def put_native(own: Tensor, teacher_logits: Tensor, rows_b: Tensor, rows_t: Tensor, buffer: Tensor,
               starts: tuple[np.ndarray, ...], s: slice, start_at: np.ndarray, lo: int, t) -> Tensor:
    """Copy a chunk's teacher rows into `buffer` and its starts' rows into `own` (the teacher's own logits);
    the copy, for the caller to soft-max in place."""
    rows = gather_rows(teacher_logits, rows_b, rows_t, buffer)  # [c, V_t] a copy
    put_rows_(own, t(starts[0][s]), t(starts[1][s]), rows[t(start_at[s] - lo)])
    return rows
