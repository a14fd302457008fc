"""The shared half of every cross-tokenizer aligner: the teacher reads the student's rollout as text.

`TextAligner.bind` builds both byte tables and the vocabulary map (tokens spelling the same bytes; EOS matched by
role), `teacher_inputs` re-tokenises the rollout (`spans.retokenise`), and the helpers below gather teacher
outputs at the positions an aligner chooses. Subclasses differ only in `project`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from opd_lightning.buffers import scratch, target_buffer
from opd_lightning.rollout import Rollout, position_ids
from opd_lightning.target import PositionRows, row_view

from .base import CHUNK_ROWS, Aligner, BoundaryPairs, TeacherInputs, token_logprobs_chunked
from .bytes import TokenBytes
from .spans import TextView, prompt_boundaries, retokenise, span_lasts
from .trie import prefixless_encoder

__all__ = [
    "LOG_FLOOR",
    "TextAligner",
    "block_topk",
    "chunk_rows",
    "copy_rows_",
    "exp_rows",
    "exp_safe",
    "fused_softmax_",
    "gather_columns",
    "gather_rows",
    "log_normaliser_",
    "log_totals",
    "mass_to_logits",
    "project_chunks",
    "put_rows_",
    "runs",
    "scratch",
    "softmax_",
    "softmax_rows",
    "span_logprobs",
    "target_rows",
    "top_logprobs",
    "topk_to_logits",
    "vocab_pairs",
]


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
# Values per run of rows below which reading the rows run by run costs more in calls than copying them (`_row_runs`).
RUN_ELEMENTS = 2**16

def target_rows(shape: tuple[int, int, int], batch: Tensor, pos: Tensor) -> Tensor:
    """The `[B, N, W]` fp32 tensor a projection writes its target into (`buffers.target_buffer`: kept memory on the
    CPU when nothing holds it): zeros at every position but `(batch, pos)`, whose rows the caller writes (undefined
    until then). Zeroing only the other rows saves a pass over the whole target."""
    out = target_buffer(shape, batch.device)
    others = torch.ones(shape[0] * shape[1], dtype=torch.bool, device=batch.device)
    others[batch * shape[1] + pos] = False
    out.view(-1, shape[-1]).index_fill_(0, others.nonzero().squeeze(-1), 0.0)
    return out


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
    this returns None too (on the synthetic 10% pair of `benchmarks/alignment.py`, `mined` spent 2 of its 3 seconds
    in per-run `logsumexp` calls of a row or two each)."""
    if not (isinstance(values, Tensor) and values.device.type == "cpu" and len(batch)):
        return None
    if (view := row_view(values)) is None:
        return None
    rows, index = view[0], (batch * view[1] + pos).numpy()
    spans = runs(index)
    if len(batch) * rows.shape[-1] < RUN_ELEMENTS * len(spans):
        return None
    return [(lo, hi, rows[int(index[lo]) : int(index[lo]) + hi - lo]) for lo, hi in spans]


def gather_columns(values: Tensor, batch: Tensor, pos: Tensor, columns: Tensor, out: Tensor) -> Tensor:
    """`values[batch, pos][:, columns]` of `[B, M, V]` values, `[n, K]` fp32 written into `out[:n]`: each run of
    consecutive rows read straight from `values` (only the K columns of each row are touched), else through a copy of
    the rows."""
    runs = _row_runs(values, batch, pos) if values.dtype == out.dtype else None
    if runs is None:
        rows = gather_rows(values, batch, pos)
        return torch.gather(rows, 1, columns.expand(len(rows), -1), out=out[: len(batch)])
    for lo, hi, rows in runs:  # gather with an expanded index: several times faster than index_select on dim 1
        torch.gather(rows, 1, columns.expand(hi - lo, -1), out=out[lo:hi])
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


def exp_rows(values: Tensor, batch: Tensor, pos: Tensor, out: Tensor) -> Tensor:
    """`exp(values[batch, pos])` of `[B, M, V]` values, unnormalised, `[n, V]` fp32 written into `out[:n]`: a
    softmax without its max and scaling passes, for a caller that sums (or scatters) the values and normalises the
    smaller result. Rows too large or too small for that (see `exp_safe`) are for the caller to redo with
    `softmax_rows`. Straight from `values`, a run of consecutive rows at a time, where it is a tensor; else from a copy.

    `softmax_` subtracts each row's max so that its largest value is 1; these values are exact as they are wherever
    that max is at least log(tiny) - LOG_FLOOR (about -7.3): every entry within exp(LOG_FLOOR) of it is then a
    normal float. A row's sum bounds its max from below (sum <= V * exp(max)), which is what `exp_safe` checks."""
    runs = _row_runs(values, batch, pos) if values.dtype == out.dtype else None
    if runs is None:
        return gather_rows(values, batch, pos, out).exp_()
    for lo, hi, rows in runs:
        torch.exp(rows, out=out[lo:hi])
    return out[: len(batch)]


def exp_safe(totals: Tensor, width: int) -> Tensor:
    """Which rows of `exp_rows`, `width` values wide, can be normalised by their sums `totals` `[c]`: finite (no value
    overflowed) and large enough that the row's largest logit is at least log(tiny) - LOG_FLOOR, so that no
    probability above exp(LOG_FLOOR) underflowed."""
    bound = width * torch.finfo(torch.float32).tiny * math.exp(-LOG_FLOOR)  # sum <= width * exp(max)
    return torch.isfinite(totals) & (totals >= bound)


def log_totals(values: Tensor, batch: Tensor, pos: Tensor, out: Tensor) -> Tensor:
    """`logsumexp(values[batch, pos], -1)` of `[B, M, V]` values, `[n]`: one exp pass into `out` (`[n, V]` scratch,
    overwritten) read straight from `values` (`exp_rows`) and a sum; rows `exp_safe` rejects are redone with their max
    subtracted. Two passes over each row, where `logsumexp` of a copy takes five."""
    totals = exp_rows(values, batch, pos, out).sum(-1)
    logs = totals.log()
    unsafe = (~exp_safe(totals, out.shape[-1])).nonzero().squeeze(-1)
    if len(unsafe):
        logs[unsafe] = torch.logsumexp(gather_rows(values, batch[unsafe], pos[unsafe]), -1)
    return logs


def copy_rows_(dst: Tensor, dst_rows: np.ndarray, src: Tensor, src_rows: np.ndarray, op=None) -> None:
    """`dst[dst_rows] = src[src_rows]` for `[R, W]` and `[c, W]` tensors, one slice copy per run of rows consecutive on
    both sides: no gathered copy of the source rows first (a projection writes a chunk's rows in order, a few runs).
    With `op` (an elementwise torch function taking `out=`, e.g. `torch.log`), `dst[dst_rows] = op(src[src_rows])`
    in the same single pass."""
    for lo, hi in runs(dst_rows, src_rows):
        d, s = int(dst_rows[lo]), int(src_rows[lo])
        if op is None:
            dst[d : d + hi - lo].copy_(src[s : s + hi - lo])
        else:
            op(src[s : s + hi - lo], out=dst[d : d + hi - lo])


def put_rows_(out: Tensor, batch: Tensor, pos: Tensor, rows: Tensor) -> None:
    """`out[batch, pos] = rows` for a contiguous `[B, N, W]` `out`, as one `index_copy_` over its rows."""
    out.view(-1, out.shape[-1]).index_copy_(0, batch * out.shape[1] + pos, rows.to(out.dtype))


def project_chunks(teacher_logits: Tensor, index: Tensor, width: int,
                   fn: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
                   native: bool = False, copy: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Project the teacher's rows at the valid positions of `index` a chunk at a time.

    Copying every aligned row out of `[B, M, V_teacher]` logits at once, then soft-maxing the copy, would allocate
    (and page in) two more tensors of the logits' size; one chunk of rows at a time (`chunk_rows`) keeps the extra
    memory small and the work the same. Rows without a target are zeros (`target_rows`).

    Args:
        teacher_logits: `[B, M, V_teacher]`.
        index: `[B, N]` teacher position serving each student position, -1 for none.
        width: size of each projected row.
        fn: `(rows [c, V_teacher] fp32 copy, may be modified; batch [c]; student pos [c]; teacher pos [c])` ->
            (projected log-probs `[c, width]`, probability mass kept `[c]`: a row that kept none has no target; NaN:
            not measured, the row has a target).
        native: also return the teacher's own logits at `index` (`PositionRows`, read when indexed).
        copy: False: `fn` gets `teacher_logits` itself in place of the copied rows, and reads the chunk's rows
            (`[batch, teacher pos]`) its own way (e.g. `exp_rows`, straight from the logits).

    Returns:
        (projected `[B, N, width]`, positions with a target `[B, N]`, mass kept `[n]`, native logits or None).
    """
    batch, pos = (index >= 0).nonzero(as_tuple=True)
    teacher_pos = index[batch, pos]
    out = target_rows((*index.shape, width), batch, pos)  # [B, N, width]
    kept, step = [], chunk_rows(max(teacher_logits.shape[-1], width))
    buffer = scratch(min(step, len(batch)), teacher_logits.shape[-1], teacher_logits.device) if copy else None
    for start in range(0, len(batch), step):
        b, i, t = (x[start : start + step] for x in (batch, pos, teacher_pos))
        rows = gather_rows(teacher_logits, b, t, buffer) if copy else teacher_logits  # [c, V_teacher] a copy
        logp, mass = fn(rows, b, i, t)
        put_rows_(out, b, i, logp)
        kept.append(mass)
    kept_all = torch.cat(kept) if kept else out.new_zeros(0)
    valid = torch.zeros(index.shape, dtype=torch.bool, device=index.device)
    valid[batch, pos] = ~(kept_all <= 0)  # NaN: not measured, a target all the same
    return out, valid, kept_all, PositionRows(teacher_logits, index) if native else None


def span_logprobs(teacher_logits: Tensor, view: TextView, n_student: int) -> Tensor:
    """The teacher's log-likelihood of each aligned span's text, placed on the span's last student token: `[B, N]`,
    zero on the other tokens."""
    ids, t_span, s_span = view.teacher_ids, view.teacher_span, view.student_span
    logp = token_logprobs_chunked(teacher_logits, ids)  # [B, M]
    n_spans = int(max(t_span.max(), s_span.max(), 0)) + 1
    totals = logp.new_zeros(ids.shape[0], n_spans + 1)  # column n_spans collects tokens without a span
    totals.scatter_add_(1, torch.where(t_span >= 0, t_span, n_spans), logp.masked_fill(~view.teacher_mask, 0))
    nxt = torch.nn.functional.pad(s_span[:, 1:], (0, 1), value=-1)
    last = (s_span >= 0) & (s_span != nxt)  # [B, N] last student token of its span
    out = totals.gather(1, s_span.clamp_min(0)).masked_fill(~last, 0)
    return out[:, :n_student]


class TextAligner(Aligner):
    """Base of the aligners whose teacher re-tokenises the student's text."""

    def __init__(self) -> None:
        self.student_bytes: TokenBytes | None = None
        self.teacher_bytes: TokenBytes | None = None
        self.teacher_tokenizer = self.teacher_encoder = None
        self.student_tokenizer = None
        self.pairs: tuple[Tensor, Tensor] = (torch.zeros(0, dtype=torch.long),) * 2
        self.student_vocab_size = self.teacher_vocab_size = 0

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        if not getattr(teacher_tokenizer, "is_fast", False):
            raise ValueError(f"{self.registry_name} needs the teacher's tokenizer offsets, which only fast tokenizers "
                             "give: load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        self.student_bytes = TokenBytes.from_tokenizer(student_tokenizer, student_vocab_size)
        self.teacher_bytes = TokenBytes.from_tokenizer(teacher_tokenizer, teacher_vocab_size)
        self.student_bytes.check(student_tokenizer)
        self.teacher_bytes.check(teacher_tokenizer)
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.teacher_encoder = prefixless_encoder(teacher_tokenizer)
        self.student_vocab_size, self.teacher_vocab_size = student_vocab_size, teacher_vocab_size
        self.pairs = vocab_pairs(self.student_bytes, self.teacher_bytes)

    def teacher_inputs(self, rollout: Rollout) -> TeacherInputs:
        p = rollout.prompt_length
        mask = rollout.attention_mask.cpu().numpy()
        seq = rollout.sequences.cpu().numpy()
        view = retokenise(self.student_bytes, self.teacher_tokenizer, self.teacher_encoder, seq[:, :p], mask[:, :p], seq[:, p:], mask[:, p:],
                          self.teacher_tokenizer.eos_token_id, self.teacher_bytes)
        device = rollout.sequences.device
        for name in ("input_ids", "attention_mask", "teacher_ids", "teacher_mask", "student_span", "teacher_span",
                     "teacher_at_start", "containing", "path_start"):
            setattr(view, name, getattr(view, name).to(device))
        if view.input_ids.shape[1] == view.teacher_ids.shape[1]:
            raise ValueError("the teacher's prompts are empty (no text and no BOS): it has no position from which to "
                             "predict the first completion token; give the prompts some text")
        return TeacherInputs(view.input_ids, view.attention_mask, position_ids(view.attention_mask),
                             view.teacher_ids.shape[1], alignment=view)

    def boundary_pairs(self, inputs: TeacherInputs, rollout: Rollout) -> BoundaryPairs:
        """The prompt's common token ends (`spans.prompt_boundaries`), then the completion's: the last token of each
        span of the alignment `teacher_inputs` made (the EOS pair included)."""
        view = inputs.alignment
        p, p_t = rollout.prompt_length, view.input_ids.shape[1] - view.teacher_ids.shape[1]
        seq, mask = rollout.sequences.cpu().numpy(), rollout.attention_mask.cpu().numpy().astype(bool)
        t_ids, t_mask = view.input_ids.cpu().numpy(), view.attention_mask.cpu().numpy().astype(bool)
        prompt = prompt_boundaries(self.student_bytes, self.teacher_tokenizer, self.teacher_bytes, seq[:, :p],
                                   mask[:, :p], t_ids[:, :p_t], t_mask[:, :p_t])
        s_span, t_span = view.student_span.cpu().numpy(), view.teacher_span.cpu().numpy()
        parts = []
        for b, (s_prompt, t_prompt) in enumerate(prompt):
            s_at, t_at = span_lasts(s_span[b], t_span[b])
            parts.append((np.full(len(s_prompt) + len(s_at), b), np.concatenate([s_prompt, p + s_at]),
                          np.concatenate([t_prompt, p_t + t_at]), np.arange(len(s_prompt) + len(s_at)) < len(s_prompt)))
        batch, student, teacher, in_prompt = (torch.from_numpy(np.concatenate(x)) for x in zip(*parts, strict=True))
        device = rollout.sequences.device
        return BoundaryPairs(batch.long().to(device), student.long().to(device), teacher.long().to(device),
                             in_prompt.to(device))

    def coverage(self, has_target: Tensor, rollout: Rollout) -> float:
        """Share of the rollout's valid completion tokens with a target."""
        mask = rollout.completion_mask
        return float((has_target & mask).sum() / mask.sum().clamp_min(1))


def vocab_pairs(student: TokenBytes, teacher: TokenBytes) -> tuple[Tensor, Tensor]:
    """Token ids spelling the same bytes in both vocabularies, plus EOS with EOS: `(student [K], teacher [K])`.

    Each id appears at most once on each side (a vocabulary may spell one text twice, e.g. `A` and `<0x41>`; the
    lower id wins), so gathering with the pairs never counts a probability twice.
    """
    pairs = [(student.eos_id, teacher.eos_id)] if student.eos_id >= 0 and teacher.eos_id >= 0 else []
    index = {b: i for i, b in reversed(list(enumerate(student.table))) if b}
    pairs += [(index[b], v) for v, b in enumerate(teacher.table) if b and b in index]
    seen: set[int] = set()
    unique = [p for p in pairs if not (p[0] in seen or seen.add(p[0]))]
    arr = np.array(unique, dtype=np.int64).reshape(-1, 2)
    return torch.from_numpy(arr[:, 0].copy()), torch.from_numpy(arr[:, 1].copy())


LOG_FLOOR = -80.0  # log-probability given to student tokens a projected teacher distribution cannot reach


def mass_to_logits(mass: Tensor) -> tuple[Tensor, Tensor]:
    """Renormalise projected probability masses `[n, V]` to log-probs floored at `LOG_FLOOR`.

    Returns (log-probs `[n, V]`, the mass each row kept `[n]`). Rows that kept no mass come back as uniform logits
    (the caller masks them). Works in place on `mass`. Masses are raised to the smallest normal float before the log:
    the floor is above its log, so nothing changes, and the log of zeros and subnormals, several times slower, is
    never taken.
    """
    kept = mass.sum(-1)  # [n]
    tiny = torch.finfo(mass.dtype).tiny
    logp = mass.div_(kept.clamp_min(tiny).unsqueeze(-1)).clamp_min_(tiny).log_().clamp_min_(LOG_FLOOR)
    empty = kept <= 0
    if mass.device.type != "cpu" or empty.any():  # a pass over `[n, V]` saved on the CPU when every row kept mass
        logp.masked_fill_(empty.unsqueeze(-1), 0.0)
    return logp, kept


def topk_to_logits(values: Tensor, ids: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """`mass_to_logits` of masses `values` `[c, k]` scattered onto the columns `ids` `[c, k]` (-1: nowhere, dropped)
    of `width`-wide rows, without a pass over the rows per operation: every column is `LOG_FLOOR` but the k written,
    ids repeated within a row share their summed mass. Returns (log-probs `[c, width]`, the mass each row kept `[c]`;
    a row that kept none is all zeros, uniform logits for the caller to mask)."""
    keep = ids >= 0
    values = values * keep
    kept = values.sum(-1)  # [c]
    same = (ids[:, :, None] == ids[:, None, :]) & keep[:, None, :]  # [c, k, k] the entries each id collects
    summed = (same.to(values.dtype) @ values[:, :, None]).squeeze(-1)  # [c, k]
    tiny = torch.finfo(values.dtype).tiny
    logp = (summed / kept.clamp_min(tiny)[:, None]).clamp_min_(tiny).log_().clamp_min_(LOG_FLOOR)
    out = values.new_full((values.shape[0], width + 1), LOG_FLOOR)  # the last column takes the dropped entries
    out.scatter_(1, ids.where(keep, width), logp)
    out = out[:, :width]
    if (empty := kept <= 0).any():
        out[empty] = 0.0
    return out, kept


def top_logprobs(values: Tensor, batch: Tensor, pos: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest probabilities of `softmax(values[batch, pos])` and their ids, `[n, k]` each, from `[B, M, V]`
    values: a top-k (`block_topk`) read from each row where it is (`_row_runs`) and a log-normaliser from one exp pass
    into kept memory (`log_totals`); no softmax is written over the rows. Values that are no such fp32 tensor (or whose
    runs are too short, `_row_runs`) are copied first into kept memory (`gather_rows`: hidden states through an output
    layer are computed there), and both read the copy."""
    width, device = values.shape[-1], values.device
    runs = _row_runs(values, batch, pos) if values.dtype == torch.float32 else None
    if runs is None:
        rows = gather_rows(values, batch, pos, scratch(len(batch), width, device, slot="top"))
        values, batch, pos = rows.unsqueeze(1), torch.arange(len(rows), device=device), torch.zeros_like(pos)
        runs = [(0, len(rows), rows)]
    top, ids = torch.empty(len(batch), k, device=device), torch.empty(len(batch), k, dtype=torch.long, device=device)
    for lo, hi, rows in runs:
        top[lo:hi], ids[lo:hi] = block_topk(rows, k)
    totals = log_totals(values, batch, pos, scratch(len(batch), width, device, slot="top_exp"))  # [n]
    return top.sub_(totals[:, None]).exp_(), ids


def block_topk(rows: Tensor, k: int, block: int = 256) -> tuple[Tensor, Tensor]:
    """`torch.topk(rows, k, -1)` of `[r, V]` rows in about one pass over them: each block of `block` columns' max,
    the k blocks with the largest, then the top k among those blocks' columns (and the last, partial block's).

    Exact: a block holding one of a row's k largest values has a max at least the k-th largest value, and at most k
    blocks do, so the k blocks kept hold all of them (with ties at the k-th value, another of the tied columns may be
    returned; the values are the same). At a 262k vocabulary it takes a quarter of `torch.topk`'s time on this
    machine; rows of fewer than `4 * k` blocks go to `torch.topk` itself."""
    r, width = rows.shape
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
