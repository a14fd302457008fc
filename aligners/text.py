"""The shared half of every cross-tokenizer aligner: the teacher reads the student's rollout as text.

`TextAligner.bind` builds both byte tables and the vocabulary map (tokens spelling the same bytes; EOS matched by
role), `teacher_inputs` re-tokenises the rollout (`spans.retokenise`), and the helpers below write the targets a
projection makes from the teacher's rows (read through `rows`). Subclasses differ only in `project`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from opd_lightning.buffers import scratch, target_buffer
from opd_lightning.rollout import Rollout, position_ids
from opd_lightning.target import PositionRows

from .base import Aligner, BoundaryPairs, TeacherInputs, token_logprobs_chunked
from .bytes import TokenBytes
from .rows import LOG_FLOOR, chunk_rows, gather_rows, put_rows_
from .spans import TextView, prompt_boundaries, retokenise, span_lasts
from .trie import prefixless_encoder

__all__ = [
    "TextAligner",
    "mass_to_logits",
    "project_chunks",
    "span_logprobs",
    "target_rows",
    "topk_to_logits",
    "vocab_pairs",
]


def target_rows(shape: tuple[int, int, int], batch: Tensor, pos: Tensor) -> Tensor:
    """The `[B, N, W]` fp32 tensor a projection writes its target into (`buffers.target_buffer`: kept memory on the
    CPU when nothing holds it): zeros at every position but `(batch, pos)`, whose rows the caller writes (undefined
    until then). Zeroing only the other rows saves a pass over the whole target."""
    out = target_buffer(shape, batch.device)
    others = torch.ones(shape[0] * shape[1], dtype=torch.bool, device=batch.device)
    others[batch * shape[1] + pos] = False
    out.view(-1, shape[-1]).index_fill_(0, others.nonzero().squeeze(-1), 0.0)
    return out


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


def topk_to_logits(values: Tensor, ids: Tensor, width: int, out: Tensor | None = None,
                   rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`mass_to_logits` of masses `values` `[c, k]` scattered onto the columns `ids` `[c, k]` (-1: nowhere, dropped)
    of `width`-wide rows, without a pass over the rows per operation: every column is `LOG_FLOOR` but the k written,
    ids repeated within a row share their summed mass. Returns (log-probs `[c, width]`, or `out` `[R, width]` with
    them written into its rows `rows` `[c]` when given (a target, written once); the mass each row kept `[c]`). A row
    that kept none is all zeros, uniform logits for the caller to mask."""
    keep = ids >= 0
    values = values * keep
    kept = values.sum(-1)  # [c]
    same = (ids[:, :, None] == ids[:, None, :]) & keep[:, None, :]  # [c, k, k] the entries each id collects
    summed = (same.to(values.dtype) @ values[:, :, None]).squeeze(-1)  # [c, k]
    tiny = torch.finfo(values.dtype).tiny
    logp = (summed / kept.clamp_min(tiny)[:, None]).clamp_min_(tiny).log_().clamp_min_(LOG_FLOOR)
    if out is None:
        out, rows = values.new_empty(values.shape[0], width), torch.arange(values.shape[0], device=values.device)
    out.index_fill_(0, rows, LOG_FLOOR)
    out.index_put_((rows[:, None].expand_as(ids)[keep], ids[keep]), logp[keep].to(out.dtype))  # repeats: one value
    if (empty := kept <= 0).any():
        out.index_fill_(0, rows[empty], 0.0)
    return out, kept


