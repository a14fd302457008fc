"""Minimum edit distance alignment (MinED), the token and vocabulary alignment of FuseLLM.

Wan et al., "Knowledge Fusion of Large Language Models" (ICLR 2024), align the two tokenizations of a text by
dynamic programming with the edit distance between token strings as the cost, and carry each of the teacher's top-k
tokens to the student token whose spelling is nearest in edit distance. Here the dynamic programme runs inside each
byte span (`spans`), which already fixes the alignment at every shared token end, so the quadratic search only
covers the few tokens of one span; every student token is paired with one teacher token, even inside N:M spans.
The target is approximate by design: the student token nearest in spelling stands in for a teacher token it does not
have, and teacher mass outside the top-k is dropped (`mass_coverage` says how much was kept).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

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
from .rows import top_logprobs
from .text import TextAligner, target_rows, topk_to_logits

__all__ = ["MinEdAligner", "edit_distances", "min_edit_pairs"]


def edit_distances(query: bytes, candidates: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Levenshtein distance from `query` to every candidate at once.

    Args:
        query: a byte string.
        candidates: `[V, L]` uint8, byte strings right-padded (padding is never read past `lengths`).
        lengths: `[V]` each candidate's length.

    Returns:
        `[V]` int distances; one dynamic programme over (query byte, candidate column), vectorised over candidates.
    """
    v, width = candidates.shape
    row = np.broadcast_to(np.arange(width + 1), (v, width + 1)).copy()  # distances from the empty query prefix
    for i, byte in enumerate(query, start=1):
        new = np.empty_like(row)
        new[:, 0] = i
        substitute = row[:, :-1] + (candidates != byte)  # [V, L]
        for j in range(1, width + 1):
            new[:, j] = np.minimum(np.minimum(row[:, j] + 1, new[:, j - 1] + 1), substitute[:, j - 1])
        row = new
    return row[np.arange(v), lengths]


def min_edit_pairs(student: list[bytes], teacher: list[bytes]) -> list[int]:
    """Monotone alignment of two token sequences minimising the summed edit distance (dynamic time warping).

    Returns, for each student token, the index of its teacher token: the first of those the path pairs it with,
    since that one is predicted from the same text as the student token.
    """
    n, m = len(student), len(teacher)
    cost = np.array([[_distance(a, b) for b in teacher] for a in student], dtype=np.float64)  # [n, m]
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            total[i, j] = cost[i - 1, j - 1] + min(total[i - 1, j - 1], total[i - 1, j], total[i, j - 1])
    pairs, i, j = [0] * n, n, m
    while i > 0 and j > 0:  # walking back, the last pairing written for a student token is its first
        pairs[i - 1] = j - 1
        step = int(np.argmin([total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]]))
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    return pairs


def _distance(a: bytes, b: bytes) -> int:
    row = np.frombuffer(b, dtype=np.uint8)[None, :] if b else np.zeros((1, 0), dtype=np.uint8)
    return int(edit_distances(a, row, np.array([len(b)]))[0])


@ALIGNERS.register("mined")
class MinEdAligner(TextAligner):
    """FuseLLM's minimum-edit-distance token and vocabulary alignment."""

    provides = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TEACHER_NATIVE_LOGITS, VOCAB_PAIRS})
    reads_rows = True  # through `gather_rows` and `token_logprobs_chunked` only

    def __init__(self, topk: int = 10, max_token_bytes: int = 32) -> None:
        """
        Args:
            topk: teacher tokens carried per position (FuseLLM uses 10); the rest of the mass is dropped.
            max_token_bytes: student spellings are compared on at most this many bytes (bounds the search cost).
        """
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        self.topk, self.max_token_bytes = topk, max_token_bytes
        self._nearest: dict[int, int] = {}
        self._table: Tensor | None = None  # nearest student token per teacher id, -2 where not searched yet

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        super().bind(student_tokenizer, teacher_tokenizer, student_vocab_size, teacher_vocab_size)
        spelled = [(i, b[: self.max_token_bytes]) for i, b in enumerate(self.student_bytes.table) if b]
        by_length: dict[int, list[tuple[int, bytes]]] = {}
        for i, data in spelled:
            by_length.setdefault(len(data), []).append((i, data))
        self._buckets = {}  # length -> (student ids [n], spellings [n, length] uint8)
        for length, items in by_length.items():
            matrix = np.frombuffer(b"".join(d for _, d in items), dtype=np.uint8).reshape(len(items), length)
            self._buckets[length] = (np.array([i for i, _ in items]), matrix)
        self._nearest = dict(zip(self.pairs[1].tolist(), self.pairs[0].tolist(), strict=True))  # exact spellings
        self._table = None

    def nearest(self, teacher_id: int) -> int:
        """The student token nearest in edit distance to a teacher token (cached; -1 if it spells nothing).

        Exact search with pruning: the distance between strings is at least the difference of their lengths, so
        student spellings are scanned by growing length difference until no remaining length can do better.
        """
        if teacher_id not in self._nearest:
            data = self.teacher_bytes.table[teacher_id] if teacher_id < len(self.teacher_bytes) else None
            self._nearest[teacher_id] = -1 if not data else self._search(data[: self.max_token_bytes])
        return self._nearest[teacher_id]

    def _search(self, query: bytes) -> int:
        best, best_id = None, -1
        for gap in range(max(len(query), max(self._buckets)) + 1):
            if best is not None and best <= gap:
                break
            for length in {len(query) - gap, len(query) + gap}:
                if length not in self._buckets:
                    continue
                ids, matrix = self._buckets[length]
                dist = edit_distances(query, matrix, np.full(len(ids), length))
                k = int(np.argmin(dist))
                if best is None or dist[k] < best:
                    best, best_id = int(dist[k]), int(ids[k])
        return best_id

    def _aligned_positions(self, view, rollout: Rollout) -> Tensor:
        """Teacher completion index paired with each student token by MinED inside its span (-1: none).

        A span with one token on either side pairs every student token with the span's first teacher token (it
        starts where the span starts), for all spans at once; only spans with several tokens on both sides run the
        dynamic programme, one span at a time.
        """
        s_span, t_span = view.student_span.cpu(), view.teacher_span.cpu()  # [B, N], [B, M]
        rows, width = s_span.shape[0], int(max(s_span.max(), t_span.max(), 0)) + 2  # last column: no span
        s_key, t_key = (torch.where(x >= 0, x, width - 1) for x in (s_span, t_span))
        m = t_span.shape[1]
        first = torch.full((rows, width), m, dtype=torch.long).scatter_reduce_(
            1, t_key, torch.arange(m).expand(rows, -1), "amin")  # [B, spans] first teacher token of each span
        count = lambda key: torch.zeros(rows, width, dtype=torch.long).scatter_add_(1, key, torch.ones_like(key))
        s_count, t_count = count(s_key), count(t_key)
        out = first.gather(1, s_key).masked_fill_((s_span < 0) | (t_count.gather(1, s_key) == 0), -1)  # [B, N]
        many = (s_count > 1) & (t_count > 1)
        many[:, -1] = False
        ids, t_ids = rollout.completion_ids.cpu(), view.teacher_ids.cpu()
        for b, span in many.nonzero().tolist():  # N:M spans only
            s_idx = (s_span[b] == span).nonzero().squeeze(-1)
            t_idx = (t_span[b] == span).nonzero().squeeze(-1)
            s_text = [self.student_bytes.table[i] or b"" for i in ids[b, s_idx].tolist()]
            t_text = [self.teacher_bytes.table[i] or b"" for i in t_ids[b, t_idx].tolist()]
            out[b, s_idx] = t_idx[torch.tensor(min_edit_pairs(s_text, t_text))]
        return out.to(view.student_span.device)

    def nearest_table(self, teacher_ids: Tensor) -> Tensor:
        """`nearest` of each of `teacher_ids` (any shape), searched once per teacher id, gathered from a table."""
        if self._table is None:
            self._table = torch.full((max(self.teacher_vocab_size, 1),), -2, dtype=torch.long)  # -2: not searched
            for v, u in self._nearest.items():
                self._table[v] = u
        flat = teacher_ids.reshape(-1).cpu()
        for v in flat[self._table[flat] == -2].unique().tolist():
            self._table[v] = self.nearest(v)
        return self._table[flat].reshape(teacher_ids.shape).to(teacher_ids.device)

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        at = self._aligned_positions(inputs.alignment, rollout).masked_fill(~rollout.completion_mask, -1)
        batch, pos = (at >= 0).nonzero(as_tuple=True)
        # The teacher's top-k at each teacher row read, from one exp pass over its rows (a block at a time). The
        # student tokens of a span with one teacher token all read that token's row, and the pairs are monotone, so
        # a row read by several positions comes in one run of them and is read once.
        t_pos = at[batch, pos]
        first = torch.ones_like(batch, dtype=torch.bool)  # the first position of each run reading one row
        first[1:] = (batch[1:] != batch[:-1]) | (t_pos[1:] != t_pos[:-1])
        inverse = first.cumsum(0) - 1  # [n] each position's row among those read
        top, ids = top_logprobs(teacher_logits, batch[first], t_pos[first], min(self.topk, teacher_logits.shape[-1]))
        logp = target_rows((*at.shape, self.student_vocab_size), batch, pos)  # [B, N, V_s] zeros off the positions
        _, kept = topk_to_logits(top[inverse], self.nearest_table(ids)[inverse], self.student_vocab_size,
                                 out=logp.view(-1, self.student_vocab_size), rows=batch * at.shape[1] + pos)
        valid = torch.zeros_like(at, dtype=torch.bool)
        valid[batch, pos] = kept > 0
        native = PositionRows(teacher_logits, at) if TEACHER_NATIVE_LOGITS in needs else None  # read when indexed
        tokens = dense_token_logprobs(logp, rollout, valid) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=logp, native_logits=native,
                             vocab_pairs=tuple(p.to(logp.device) for p in self.pairs), token_logprobs=tokens,
                             mass_coverage=float(kept.mean()) if len(kept) else 0.0)
