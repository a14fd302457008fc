"""Sums of a teacher's rows into columns: each teacher token's probability carried to the column it belongs to (a
student token, a byte class), the one step every projection carrying the teacher's whole distribution into another
space takes, prepared once per index (`ColumnSums`) and run a block of rows at a time while the block is in cache
(`column_blocks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from opd_lightning.buffers import scratch

from .rows import block_rows, exp_blocks, exp_safe, index_pieces, runs, softmax_rows

__all__ = ["ColumnSums", "column_blocks", "spelled_shares", "sum_columns"]

MANY_COLUMNS = 2048  # columns beyond which `ColumnSums` adds into one copy of them


class ColumnSums:
    """Sums of the last axis of `[..., V]` values into `size` columns by a fixed index `[V]` (column `index[v]`,
    skipped where -1), prepared once for the `index_add_` that does it.

    Skipped entries go to one extra column (`size`), cheaper than selecting the others first. Where there are few
    columns beside the width (`char_level`'s 257 byte classes of a 262k vocabulary, half of whose tokens start with
    the same byte), consecutive entries of one column make each add wait on the one before; `lanes` interleaved copies
    of the columns (entry v adds into copy `v % lanes`), summed at the end, break those chains: 1.7x faster at 262k
    wide into 258 columns (8 copies), 1.4x at 8,000 wide (2 copies: 2.3 -> 1.6 ms per 524 rows of the synthetic 90%
    pair's teacher, whose most common first byte starts 39% of its tokens), no gain where the columns are many
    (more than `MANY_COLUMNS`: `lanes` is then 1). Where the index steps by one over long stretches
    (`rows.index_pieces`: a student keeping the teacher's ids for the tokens they share), those are copied or added
    as slices and only the entries between them scattered: `byte_spans`' first level on the synthetic 90% pair, 262
    rows of 8,000 into 7,225 columns, 0.94 -> 0.50 ms (2 threads).
    """

    def __init__(self, index: Tensor, size: int, stretches: bool = True) -> None:
        """`stretches=False` skips looking for them (a pass over the index on the host: 0.4 ms at 262k entries), for
        a sum made once."""
        width, self.size = len(index), size
        # Stretches of consecutive columns are added as slices, the entries between by `index_add_`; a stretch whose
        # columns no other stretch adds into is copied, and only the columns no such copy writes are zeroed first.
        self.pieces = index_pieces(index) if stretches else None
        few = self.pieces is None and size + 1 <= MANY_COLUMNS  # stretches: no column collects a long chain
        self.lanes = min(8, max(2, width // (32 * (size + 1)))) if few else 1
        target = index.where(index >= 0, size)
        if self.lanes > 1:
            target = target + (torch.arange(width) % self.lanes) * (size + 1)
        self.target, self.width = target, width
        self.copied, self.blank = [], [(0, size + 1)]
        if self.pieces:
            count = np.zeros(size + 1, dtype=np.int64)
            for lo, hi, first in self.pieces:
                count[first : first + hi - lo] += first >= 0
            self.copied = [first >= 0 and bool((count[first : first + hi - lo] == 1).all())
                           for lo, hi, first in self.pieces]
            written = np.zeros(size + 1, dtype=bool)
            for (lo, hi, first), copy in zip(self.pieces, self.copied, strict=True):
                written[first : first + hi - lo] |= copy
            columns = np.flatnonzero(~written)
            self.blank = [(int(columns[lo]), int(columns[hi - 1]) + 1) for lo, hi in runs(columns)]

    def __call__(self, values: Tensor, keep_skipped: bool = False, out: Tensor | None = None) -> Tensor:
        """`[..., size]` column sums of `values` `[..., V]` (`[..., size + 1]` with the skipped column when
        `keep_skipped`, so that the columns sum to the whole of each row), written into `out` (`[..., size + 1]`,
        overwritten) when given; differentiable."""
        if self.target.device != values.device:  # moved once, not per call (a block of rows at a time on a GPU)
            self.target = self.target.to(values.device)
        target = self.target[: values.shape[-1]]
        if self.lanes > 1:
            lanes = values.new_zeros(*values.shape[:-1], self.lanes * (self.size + 1)).index_add_(-1, target, values)
            lanes = lanes.unflatten(-1, (self.lanes, self.size + 1))
            out = lanes.sum(-2) if out is None else torch.sum(lanes, -2, out=out)
        elif self.pieces is None:
            out = values.new_zeros(*values.shape[:-1], self.size + 1) if out is None else out.zero_()
            out.index_add_(-1, target, values)
        else:
            out = self._by_pieces(values, target, out)
        return out if keep_skipped else out[..., : self.size]

    def _by_pieces(self, values: Tensor, target: Tensor, out: Tensor | None) -> Tensor:
        whole = values.shape[-1] == self.width  # else (fewer teacher columns than the index): everything added
        if out is None:
            out = values.new_zeros(*values.shape[:-1], self.size + 1)
        elif whole:
            for a, b in self.blank:
                out[..., a:b] = 0.0
        else:
            out.zero_()
        copied = self.copied if whole else [False] * len(self.pieces)
        for (lo, hi, first), copy in zip(self.pieces, copied, strict=True):  # the copies before any add
            if copy:
                out[..., first : first + hi - lo] = values[..., lo:hi]
        for (lo, hi, first), copy in zip(self.pieces, copied, strict=True):
            if copy or (hi := min(hi, values.shape[-1])) <= lo:
                continue
            if first >= 0:
                out[..., first : first + hi - lo] += values[..., lo:hi]
            else:
                out.index_add_(-1, target[lo:hi], values[..., lo:hi])
        return out


def sum_columns(values: Tensor, index: Tensor, size: int, keep_skipped: bool = False,
                out: Tensor | None = None) -> Tensor:
    """`ColumnSums(index, size, stretches=False)(values, keep_skipped, out)`, for a one-off sum (a fixed index used
    call after call is better prepared once as a `ColumnSums`, stretches looked for once)."""
    return ColumnSums(index[: values.shape[-1]], size, stretches=False)(values, keep_skipped, out)


def column_blocks(values: Tensor, batch: Tensor, pos: Tensor, sums: ColumnSums,
                  elements: int | None = None) -> Iterator[tuple[int, int, Tensor, Tensor, Callable]]:
    """`exp_blocks` (`elements` values at a time) with each block's column sums: yields `(lo, hi, full, total, read)`
    for rows `lo:hi` of `values[batch, pos]` (`[B, M, V]`): `full` `[c, size + 1]` the rows' `sums` with the skipped
    column, `total` `[c]` their sums (the rows' whole mass), and `read(rows, ids)` the block's values at (local row,
    id) on the same scale. Rows `exp_safe` rejects are soft-maxed (`softmax_rows`): their `full`, `total` and reads
    are then of the softmax. All valid until the next step (`full` is a buffer reused block after block)."""
    width = values.shape[-1]
    rows = min(block_rows(width, elements), len(batch))
    columns = scratch(rows, sums.size + 1, values.device, slot="columns")
    for lo, hi, probs in exp_blocks(values, batch, pos, elements):
        full = sums(probs, keep_skipped=True, out=columns[: hi - lo])  # [c, size + 1]
        total = full.sum(-1)  # pairwise, so exact
        unsafe = (~exp_safe(total, width)).nonzero().squeeze(-1)
        if not len(unsafe):
            yield lo, hi, full, total, lambda rows, ids, probs=probs: probs[rows, ids]
            continue
        # a logit too large or all too small for exp without the max: those rows soft-maxed
        safe = softmax_rows(values, batch[lo + unsafe], pos[lo + unsafe],
                            scratch(len(unsafe), width, values.device, slot="safe"))
        full[unsafe] = sums(safe, keep_skipped=True)
        total[unsafe] = full[unsafe].sum(-1)
        row_of = torch.full((hi - lo,), -1, dtype=torch.long, device=values.device)
        row_of[unsafe] = torch.arange(len(unsafe), device=values.device)

        def read(rows: Tensor, ids: Tensor, probs=probs, safe=safe, row_of=row_of) -> Tensor:
            redo = row_of[rows]
            return torch.where(redo >= 0, safe[redo.clamp_min(0), ids], probs[rows, ids])

        yield lo, hi, full, total, read


def spelled_shares(full: Tensor, total: Tensor, size: int, spelled_only: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A block of `column_blocks` as the student's next-token probabilities: (`full[:, :size]` `[c, size]`, divided in
    place by the mass the student's vocabulary can spell (the row's `total` less its skipped column), or by `total`
    itself where `spelled_only` `[c]` is False; the share of each row's mass the student can spell `[c]`). A row that
    can spell nothing is left at zero."""
    spelled = total - full[:, size]
    scale = spelled if spelled_only is None else torch.where(spelled_only, spelled, total)
    return full[:, :size].div_(scale.clamp_min(torch.finfo(full.dtype).tiny)[:, None]), spelled / total
