"""Reading a teacher's `[B, M, V]` rows at the positions a projection chooses, and the few passes over them every
projection is made of: exponentials, normalisers, top-k, copies into and out of chunks.

Rows are read where they lie when they come in runs of consecutive positions (`_row_runs`: one kernel call per run,
no copy), else from one copy; logits given as hidden states and an output layer (`losses.fused.HiddenRows`) have only
the rows read computed. Buffers a projection writes into are kept between calls (`opd_lightning.buffers`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from opd_lightning.buffers import scratch
from opd_lightning.target import row_view

from .base import CHUNK_ROWS

__all__ = [
    "BLOCK_ELEMENTS",
    "CHUNK_ELEMENTS",
    "LOG_FLOOR",
    "RUN_ELEMENTS",
    "WIDE_ROW",
    "block_rows",
    "block_topk",
    "chunk_rows",
    "copy_rows_",
    "exp_blocks",
    "exp_safe",
    "floored_log",
    "fused_softmax_",
    "gather_columns",
    "gather_rows",
    "index_pieces",
    "log_normaliser_",
    "log_totals",
    "put_rows_",
    "runs",
    "softmax_",
    "softmax_rows",
    "top_logprobs",
]

LOG_FLOOR = -80.0  # log-probability given to student tokens a projected teacher distribution cannot reach


def floored_log(probs: Tensor, out: Tensor) -> Tensor:
    """`log(max(probs, exp(LOG_FLOOR)))` written into `out` (`probs` raised to the floor in place): probabilities
    as log-probs floored at `LOG_FLOOR`, never the log of a zero or subnormal (several times slower). An `op` for
    `copy_rows_`."""
    return torch.log(probs.clamp_min_(math.exp(LOG_FLOOR)), out=out)


def softmax_(rows: Tensor) -> Tensor:
    """Softmax over the last axis, in place (the rows are the caller's own copy): no second `[c, V]` tensor."""
    rows.sub_(rows.amax(-1, keepdim=True)).exp_()
    return rows.div_(rows.sum(-1, keepdim=True))


def fused_softmax_(rows: Tensor) -> Tensor:
    """Softmax over the last axis of rows that are the caller's own copy: one fused kernel (a max pass, an
    exp-and-sum pass, a scaling pass), about half of `softmax_`'s five passes over a 262k vocabulary. On the CPU it
    writes over `rows` (the kernel reads each element before writing it).

    Its sum runs sequentially in fp32 and is off by up to ~2e-5 at a 262k vocabulary; a caller needing an exact
    normalisation divides what it derives from the rows by their pairwise sum (`probs.sum(-1)`), often on a smaller
    tensor.
    """
    return torch.softmax(rows, -1, out=rows) if rows.device.type == "cpu" else torch.softmax(rows, -1)


# Teacher logits read at a time: 2**25 fp32 values (128 MB, 128 rows of a 262k vocabulary). Per chunk the projection
# makes a dozen tensor calls; on two shared cores each parallel call can wait on a descheduled thread, and chunks of
# 16 rows (base.CHUNK_ROWS) made `vocab_map` six times slower than chunks of 128 on the real pair; larger chunks
# gained little more. The memory is small beside the `[B, N, V_s]` target.
CHUNK_ELEMENTS = 2**25


# Values exponentiated at a time by `exp_blocks`: 2**22 fp32 values (16 rows of a 262k vocabulary, 16 MB), read again
# by the caller while still in cache. Exp and a scatter-sum into 258 columns of 128 such rows (`torch.utils.benchmark`,
# 2 threads) took 27-28 ms in blocks of 8 or 16 rows, 31 ms in blocks of 32, 36 ms in one block of 128, 45-53 in
# blocks of 1-2 (call overhead).
BLOCK_ELEMENTS = 2**22


# Values per run of rows below which reading (`_row_runs`) or writing (`copy_rows_`) rows run by run costs more in
# calls than copying them.
RUN_ELEMENTS = 2**16

# Rows at least this wide are written run by run by `copy_rows_` however short the runs: through one buffer each row
# is read and written three times more (a gather, the op, an `index_copy_`), which at these widths costs more than a
# call per row: `byte_spans` writes the SmolLM2/Gemma-3 pair's 49,153-wide rows in runs of 1.7 rows on average on the
# batch of `benchmarks/alignment.py`, and those of its calls whose runs were shorter than 65,536 values went through
# the buffer (`benchmarks/RESULTS.md`, run G and after).
WIDE_ROW = 2**15


# An index is read or added by slices where it steps by one for at least this many entries (a student vocabulary
# that keeps the teacher's ids for the tokens they share, as a subset of its merges or an extended vocabulary does),
# and only where such stretches hold at least half its entries in at most `MAX_PIECES` pieces; elsewhere (two
# unrelated vocabularies) it is used whole, by one gather or `index_add_`.
STRETCH, MAX_PIECES = 256, 64


def index_pieces(index: Tensor) -> list[tuple[int, int, int]] | None:
    """`index` `[W]` cut into pieces `(lo, hi, first)` covering `0..W` in order: `index[lo:hi] == first + arange(hi -
    lo)` for a stretch of at least `STRETCH` non-negative entries, `first = -1` for the entries between (used through
    the index). None where the stretches hold less than half of the entries or the pieces are more than
    `MAX_PIECES`: the index is then better used whole."""
    values = index.cpu().numpy()
    if len(values) < STRETCH:
        return None
    steps = (np.diff(values) == 1) & (values[:-1] >= 0)
    if 2 * int(steps.sum()) < len(values):  # fewer than half the entries step by one: no stretches worth it
        return None
    cuts = np.flatnonzero(~steps) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(values)]])
    long = (ends - starts >= STRETCH) & (values[starts] >= 0)
    if (ends - starts)[long].sum() * 2 < len(values):
        return None
    pieces, at = [], 0
    for lo, hi in zip(starts[long].tolist(), ends[long].tolist(), strict=True):
        if lo > at:
            pieces.append((at, lo, -1))
        pieces.append((lo, hi, int(values[lo])))
        at = hi
    if at < len(values):
        pieces.append((at, len(values), -1))
    return pieces if len(pieces) <= MAX_PIECES else None


def block_rows(width: int, elements: int | None = None) -> int:
    """Rows per block of `exp_blocks` for rows `width` wide: `elements` values (`BLOCK_ELEMENTS` if None), and at
    least one row."""
    return max(1, (BLOCK_ELEMENTS if elements is None else elements) // max(width, 1))


def chunk_rows(width: int) -> int:
    """Rows per chunk for rows `width` wide: `CHUNK_ELEMENTS` values, and at least `CHUNK_ROWS` rows."""
    return max(CHUNK_ROWS, CHUNK_ELEMENTS // max(width, 1))


def gather_rows(values: Tensor, batch: Tensor, pos: Tensor, out: Tensor | None = None) -> Tensor:
    """`values[batch, pos]` of `[B, M, V]` values in fp32, `[n, V]`: a copy, written into `out[:n]` when given. Values
    given as hidden states through an output layer (`HiddenRows`) have those rows' logits computed, and no others.

    One `index_select` over the rows of `row_view` where the layout allows it. Projections call this chunk after chunk
    with one `out` buffer: a fresh 128 MB tensor per chunk costs more in page faults than the copy.
    """
    if not isinstance(values, Tensor):  # the teacher's hidden states and output layer (`HiddenRows`): computed here
        return values.gather(batch, pos, out)
    if (view := row_view(values)) is not None:
        rows, index = view[0], batch * view[1] + pos
        if out is not None and values.dtype == out.dtype:
            return torch.index_select(rows, 0, index, out=out[: len(index)])
        picked = rows.index_select(0, index)
    else:
        picked = values[batch, pos]
    return picked.float() if out is None else out[: len(picked)].copy_(picked)


def runs(*indices: np.ndarray) -> list[tuple[int, int]]:
    """`(lo, hi)` of each run of positions over which every one of the (equally long) index arrays steps by one."""
    n = len(indices[0])
    if not n:
        return []
    breaks = np.zeros(n - 1, dtype=bool)
    for index in indices:
        breaks |= np.diff(index) != 1
    cut = (np.flatnonzero(breaks) + 1).tolist()
    return list(zip([0, *cut], [*cut, n], strict=True))


def _row_runs(values: Tensor, batch: Tensor, pos: Tensor) -> list[tuple[int, int, Tensor]] | None:
    """`values[batch, pos]` of `[B, M, V]` values as slices of the tensor they were sliced from: `(lo, hi, rows)`
    with `rows` the values' rows `lo:hi`, one per run of consecutive rows; None where `values` is no such tensor.

    A kernel run per slice reads the rows where they are: at a large vocabulary even single-row runs cost less in
    call overhead (microseconds) than copying the rows first (about a tenth of a millisecond per 262k-wide row). Where
    the runs hold fewer than `RUN_ELEMENTS` values on average (short runs of narrow rows: an 8,000-token teacher whose
    tokens each span several student tokens), the callers' calls per run cost more than one copy of the rows, and
    this returns None too (a profile of `mined` on the synthetic 10% pair of `benchmarks/alignment.py`, with the two
    cores shared with a training run, found two thirds of its time in per-run calls on a row or two each)."""
    if not (isinstance(values, Tensor) and values.device.type == "cpu" and len(batch)):
        return None
    if (view := row_view(values)) is None:
        return None
    rows, index = view[0], (batch * view[1] + pos).numpy()
    spans = runs(index)
    if len(batch) * rows.shape[-1] < RUN_ELEMENTS * len(spans):
        return None
    return [(lo, hi, rows[int(index[lo]) : int(index[lo]) + hi - lo]) for lo, hi in spans]


def gather_columns(values: Tensor, batch: Tensor, pos: Tensor, columns: Tensor, out: Tensor,
                   pieces: list[tuple[int, int, int]] | None = None) -> Tensor:
    """`values[batch, pos][:, columns]` of `[B, M, V]` values, `[n, K]` fp32 written into `out[:n]`: each run of
    consecutive rows read straight from `values` (only the K columns of each row are touched), else through a copy of
    the rows. With `pieces` (`index_pieces(columns)`), the stretches of consecutive columns are copied as slices and
    only the columns between them gathered: a student vocabulary keeping the teacher's ids (the synthetic 90% pair of
    `benchmarks/alignment.py`, one stretch of 7,224 of 7,225 columns: 1.5 -> 0.74 ms per 524 rows, 2 threads)."""
    runs = _row_runs(values, batch, pos) if values.dtype == out.dtype else None
    if runs is None:
        runs = [(0, len(batch), gather_rows(values, batch, pos))]
    for lo, hi, rows in runs:  # gather with an expanded index: several times faster than index_select on dim 1
        if pieces is None:
            torch.gather(rows, 1, columns.expand(hi - lo, -1), out=out[lo:hi])
            continue
        for a, b, first in pieces:
            if first >= 0:
                out[lo:hi, a:b].copy_(rows[:, first : first + b - a])
            else:
                out[lo:hi, a:b] = torch.gather(rows, 1, columns[a:b].expand(hi - lo, -1))
    return out[: len(batch)]


def softmax_rows(values: Tensor, batch: Tensor, pos: Tensor, out: Tensor) -> Tensor:
    """`softmax(values[batch, pos])` of `[B, M, V]` values, `[n, V]` fp32, written into `out[:n]`.

    Each run of consecutive rows of the tensor `values` was sliced from (a projection reads a row's positions in
    order) is soft-maxed straight from `values` into `out`: one fused kernel, no copy of the rows first. Values that
    are no such tensor (the teacher's hidden states and output layer) are copied (`gather_rows`) and soft-maxed in
    place.
    """
    runs = _row_runs(values, batch, pos) if values.dtype == out.dtype else None
    if runs is None:
        return fused_softmax_(gather_rows(values, batch, pos, out))
    for lo, hi, rows in runs:
        torch.softmax(rows, -1, out=out[lo:hi])
    return out[: len(batch)]


def exp_blocks(values: Tensor, batch: Tensor, pos: Tensor,
               elements: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
    """`exp(values[batch, pos])` of `[B, M, V]` values, unnormalised, `elements` values (`BLOCK_ELEMENTS` if None) at a
    time: yields `(lo, hi, rows)` with `rows` `[hi - lo, V]` fp32 the exps of rows `lo:hi`, in order, in one small
    buffer reused for each block (valid until the next step), so that what the caller does with a block (a
    scatter-sum, a sum, a few reads) finds it in cache. Rows are read where they lie, run by run (`_row_runs`), a block
    filled from as many runs as it takes; else copied a block at a time (`gather_rows`: hidden states through an
    output layer are computed there).

    A softmax without its max and scaling passes, for a caller that sums (or scatters) the values and normalises the
    smaller result. `softmax_` subtracts each row's max so that its largest value is 1; these values are exact as
    they are wherever that max is at least log(tiny) - LOG_FLOOR (about -7.3): every entry within exp(LOG_FLOOR) of it
    is then a normal float. A row's sum bounds its max from below (sum <= V * exp(max)), which is what `exp_safe`
    checks; rows it rejects are for the caller to redo with `softmax_rows`."""
    n, width = len(batch), values.shape[-1]
    step = block_rows(width, elements)
    if not n:
        return
    buffer = scratch(min(step, n), width, values.device, slot="block")
    runs = _row_runs(values, batch, pos) if values.dtype == torch.float32 else None
    if runs is None:
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            yield lo, hi, gather_rows(values, batch[lo:hi], pos[lo:hi], buffer).exp_()
        return
    start = filled = 0
    for lo, hi, rows in runs:
        at = 0
        while at < hi - lo:
            take = min(step - filled, hi - lo - at)
            torch.exp(rows[at : at + take], out=buffer[filled : filled + take])
            filled, at = filled + take, at + take
            if filled == step or start + filled == n:
                yield start, start + filled, buffer[:filled]
                start, filled = start + filled, 0


def exp_safe(totals: Tensor, width: int) -> Tensor:
    """Which rows of `exp_blocks`, `width` values wide, can be normalised by their sums `totals` `[c]`: finite (no value
    overflowed) and large enough that the row's largest logit is at least log(tiny) - LOG_FLOOR, so that no
    probability above exp(LOG_FLOOR) underflowed."""
    bound = width * torch.finfo(torch.float32).tiny * math.exp(-LOG_FLOOR)  # sum <= width * exp(max)
    return torch.isfinite(totals) & (totals >= bound)


def log_totals(values: Tensor, batch: Tensor, pos: Tensor) -> Tensor:
    """`logsumexp(values[batch, pos], -1)` of `[B, M, V]` values, `[n]`: one exp pass a block at a time (`exp_blocks`,
    straight from `values`), each block summed while in cache; rows `exp_safe` rejects are redone with their max
    subtracted. Two passes over each row, where `logsumexp` of a copy takes five."""
    totals = torch.empty(len(batch), device=values.device)
    for lo, hi, probs in exp_blocks(values, batch, pos):
        torch.sum(probs, -1, out=totals[lo:hi])
    logs = totals.log()
    unsafe = (~exp_safe(totals, values.shape[-1])).nonzero().squeeze(-1)
    if len(unsafe):
        logs[unsafe] = torch.logsumexp(gather_rows(values, batch[unsafe], pos[unsafe]), -1)
    return logs


def copy_rows_(dst: Tensor, dst_rows: np.ndarray, src: Tensor, src_rows: np.ndarray, op=None) -> None:
    """`dst[dst_rows] = src[src_rows]` for `[R, W]` and `[c, W]` tensors, one slice copy per run of rows consecutive on
    both sides: no gathered copy of the source rows first (a projection writes a chunk's rows in order, a few runs).
    With `op` (an elementwise torch function taking `out=`, e.g. `torch.log`), `dst[dst_rows] = op(src[src_rows])`
    in the same single pass. Where the runs hold fewer than `RUN_ELEMENTS` values on average (short runs of narrow
    rows: positions with and without a target interleaved in a small vocabulary), the calls per run cost more than a
    copy, and the rows go through one buffer and one `index_copy_` (on the synthetic pairs of
    `benchmarks/alignment.py`, 2 threads: `vocab_map` 4.9 -> 4.6 and 14.5 -> 13.6 ms per 1,000 tokens, `byte_spans`
    10.3 -> 9.2 on the 10% pair). Rows `WIDE_ROW` wide or wider are always written run by run."""
    spans = runs(dst_rows, src_rows)
    if len(spans) > 1 and dst.shape[1] < WIDE_ROW and len(dst_rows) * dst.shape[1] < RUN_ELEMENTS * len(spans):
        picked = src.index_select(0, torch.from_numpy(np.ascontiguousarray(src_rows)).to(src.device))
        if op is not None:
            picked = op(picked, out=scratch(len(dst_rows), dst.shape[1], dst.device, dst.dtype, slot="rows_out"))
        dst.index_copy_(0, torch.from_numpy(np.ascontiguousarray(dst_rows)).to(dst.device), picked)
        return
    for lo, hi in spans:
        d, s = int(dst_rows[lo]), int(src_rows[lo])
        if op is None:
            dst[d : d + hi - lo].copy_(src[s : s + hi - lo])
        else:
            op(src[s : s + hi - lo], out=dst[d : d + hi - lo])


def put_rows_(out: Tensor, batch: Tensor, pos: Tensor, rows: Tensor) -> None:
    """`out[batch, pos] = rows` for a contiguous `[B, N, W]` `out`, as one `index_copy_` over its rows."""
    out.view(-1, out.shape[-1]).index_copy_(0, batch * out.shape[1] + pos, rows.to(out.dtype))


def top_logprobs(values: Tensor, batch: Tensor, pos: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest probabilities of `softmax(values[batch, pos])` and their ids, `[n, k]` each, from `[B, M, V]`
    values, in one pass over the rows: each block of exps (`exp_blocks`, straight from the logits, or computed from
    hidden states and an output layer) gives its top-k (`block_topk`; exp keeps the order) and its sums while in
    cache, and the top-k is divided by the sums; rows `exp_safe` rejects are soft-maxed and read again. No softmax is
    written over the rows."""
    device = values.device
    top, ids = torch.empty(len(batch), k, device=device), torch.empty(len(batch), k, dtype=torch.long, device=device)
    totals = torch.empty(len(batch), device=device)
    for lo, hi, probs in exp_blocks(values, batch, pos):
        top[lo:hi], ids[lo:hi] = block_topk(probs, k)
        torch.sum(probs, -1, out=totals[lo:hi])
    unsafe = (~exp_safe(totals, values.shape[-1])).nonzero().squeeze(-1)
    if len(unsafe):  # a logit too large, or all too small, for exp without the max
        probs = softmax_rows(values, batch[unsafe], pos[unsafe], scratch(len(unsafe), values.shape[-1], device,
                                                                        slot="safe"))
        top[unsafe], ids[unsafe] = block_topk(probs, k)
        totals[unsafe] = probs.sum(-1)
    return top.div_(totals[:, None]), ids


def block_topk(rows: Tensor, k: int, block: int | None = None) -> tuple[Tensor, Tensor]:
    """`torch.topk(rows, k, -1)` of `[r, V]` rows in about one pass over them: each block of `block` columns' max,
    the k blocks with the largest, then the top k among those blocks' columns (and the last, partial block's).

    Exact: a block holding one of a row's k largest values has a max at least the k-th largest value, and at most k
    blocks do, so the k blocks kept hold all of them (with ties at the k-th value, another of the tied columns may be
    returned; the values are the same). One pass of block maxima over a 262k-wide row, then a selection among
    `k * block` columns, in place of a selection over all of them; rows of fewer than `4 * k` blocks go to
    `torch.topk` itself. Blocks (if not given) of 256 columns from 2**17 columns up, else 64: k = 10 over 524 rows of
    8,000 columns, 1.8 ms in blocks of 64, 3.3 in blocks of 256 and by `torch.topk`; 85 rows of 49,152, 0.73, 0.94
    and 2.8 ms; 128 rows of 262,144, 8.6, 7.3 and (blocks of 512) 8.1 ms (`torch.utils.benchmark`, 2 threads)."""
    r, width = rows.shape
    block = block or (256 if width >= 2**17 else 64)
    blocks = width // block
    if blocks < 4 * k:
        return torch.topk(rows, k, -1)
    best = rows[:, : blocks * block].unflatten(-1, (blocks, block)).amax(-1).topk(k, -1).indices  # [r, k]
    columns = (best[:, :, None] * block + torch.arange(block, device=rows.device)).flatten(1)  # [r, k * block]
    if blocks * block < width:  # the partial block: always a candidate
        columns = torch.cat([columns, torch.arange(blocks * block, width, device=rows.device).expand(r, -1)], 1)
    values, at = rows.gather(1, columns).topk(k, -1)
    return values, columns.gather(1, at)


def log_normaliser_(rows: Tensor) -> Tensor:
    """log Σ exp over the last axis, `[c]`, of rows that are the caller's own copy (overwritten with their softmax).

    Half the time of `logsumexp` at a 262k vocabulary: one fused softmax, whose largest probability is exactly
    1 / (its own sum) and whose pairwise sum corrects that sum's rounding, plus three cheap reductions.
    """
    top = rows.amax(-1)
    probs = fused_softmax_(rows)
    return top - probs.amax(-1).log() + probs.sum(-1).log()
