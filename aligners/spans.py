"""Byte spans: how the teacher reads a student rollout, and which tokens of the two tokenizations line up.

The student's completion is spelled in bytes from its token table; the teacher re-tokenises that text (prompt and
completion separately, so every completion byte belongs to the completion on both sides), and the tokenizer's
character offsets become byte offsets. Tokens are then grouped into the minimal spans that end on the same byte on
both sides: a monotone N:M alignment that covers the text exactly. A tokenizer's offsets may trim a leading space
or give two byte-level tokens of one character the same offsets; only token *ends* are used, so both cases merge
into coarser spans instead of breaking the alignment.

Edge cases handled here, once for every aligner:
- EOS: when the student's completion ends with its EOS, the teacher's EOS is appended, and the two form a span of
  their own (a virtual byte past the text), so the teacher's probability of stopping is scored too;
- special tokens inside a completion contribute no bytes and join the span of the text around them;
- SentencePiece writes spaces as `▁`, so a literal `▁` in the text reads as a space to such a teacher; its span
  still ends where the tokenizer's offsets say;
- bytes that are not valid UTF-8 (a completion cut inside a character, a stray byte token) cannot be given to the
  teacher as text: each invalid run reads as U+FFFD, and the student tokens touching it, with the spans holding
  them, get no span (`-1`) and count as uncovered; the rest of the completion aligns as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .bytes import TokenBytes, char_byte_offsets

__all__ = ["SpanAlignment", "TextView", "align_ends", "lossy_decode", "prompt_boundaries", "retokenise", "span_lasts"]


@dataclass
class SpanAlignment:
    """One row's alignment between student tokens `[N]` and teacher tokens `[M]` (numpy, int64).

    Attributes:
        student_span, teacher_span: span id of each token; -1 where a token has no exact counterpart.
        teacher_at_start: per student token, the teacher token that starts on the same byte (both models predict
            the text from there on), or -1 when the teacher has no boundary at the student token's start.
        containing: per student token, the teacher token that contains its first byte (-1 past the teacher's text).
        path_start: per student token, the student token at which `containing` starts, or -1 when the teacher token
            starts inside a student token (the two boundaries cross).
    """

    student_span: np.ndarray
    teacher_span: np.ndarray
    teacher_at_start: np.ndarray
    containing: np.ndarray
    path_start: np.ndarray


def align_ends(student_ends: np.ndarray, teacher_ends: np.ndarray, limit: int) -> SpanAlignment:
    """Align two tokenizations of one byte string from their token end offsets (non-decreasing, `[N]` and `[M]`).

    Spans end where both tokenizations end a token at or before byte `limit`; tokens past the last shared end get
    no span. Vectorised: a handful of `searchsorted` calls, no loop over tokens.
    """
    s_starts = np.concatenate([[0], student_ends[:-1]]) if len(student_ends) else student_ends
    common = np.intersect1d(student_ends, teacher_ends)
    common = common[(common > 0) & (common <= limit)]

    def span_of(ends: np.ndarray) -> np.ndarray:
        span = np.searchsorted(common, ends, side="left")
        span[span >= len(common)] = -1
        return span

    t_bounds = np.concatenate([[0], teacher_ends])
    containing = np.searchsorted(teacher_ends, s_starts, side="right")  # first teacher token ending after the start
    inside = (containing < len(teacher_ends)) & (s_starts < limit)
    t_start = t_bounds[np.minimum(containing, len(teacher_ends))]
    at_start = np.where(inside & (t_start == s_starts), containing, -1)
    path = np.searchsorted(s_starts, t_start, side="left")  # student token starting where the teacher token starts
    aligned = inside & (path < len(s_starts)) & (s_starts[np.minimum(path, max(len(s_starts) - 1, 0))] == t_start)
    return SpanAlignment(span_of(student_ends), span_of(teacher_ends), at_start.astype(np.int64),
                         np.where(inside, containing, -1).astype(np.int64), np.where(aligned, path, -1).astype(np.int64))


def span_lasts(student_span: np.ndarray, teacher_span: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every span on both sides of one row (`[N]`, `[M]` span ids, -1: none), the index of its last student token
    and of its last teacher token: where both tokenizations end on the same byte. Two arrays `[K]`, in span order."""

    def lasts(span: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.flatnonzero((span >= 0) & (span != np.append(span[1:], -1)))
        return span[index], index

    (s_id, s_index), (t_id, t_index) = lasts(student_span), lasts(teacher_span)
    _, s_at, t_at = np.intersect1d(s_id, t_id, assume_unique=True, return_indices=True)
    return s_index[s_at], t_index[t_at]


@dataclass
class TextView:
    """The teacher's view of a batch of student rollouts.

    Shapes: B rows, P_t teacher prompt columns (left-padded), M teacher completion columns (right-padded), N
    student completion columns.
    """

    input_ids: Tensor  # [B, P_t + M]
    attention_mask: Tensor  # [B, P_t + M]
    teacher_ids: Tensor  # [B, M] teacher completion tokens
    teacher_mask: Tensor  # [B, M] bool
    student_span: Tensor  # [B, N] int64, -1: no span
    teacher_span: Tensor  # [B, M] int64, -1: no span
    teacher_at_start: Tensor  # [B, N] int64
    containing: Tensor  # [B, N] int64
    path_start: Tensor  # [B, N] int64
    texts: list[str]  # the completion texts the teacher read


def lossy_decode(data: bytes) -> tuple[str, np.ndarray]:
    """Decode UTF-8, each invalid byte run becoming U+FFFD; returns the text and the runs `[k, 2]` (start, end)."""
    parts, runs, pos = [], [], 0
    while True:
        try:
            parts.append(data[pos:].decode())
            break
        except UnicodeDecodeError as error:
            parts += [data[pos : pos + error.start].decode(), "\ufffd"]
            runs.append((pos + error.start, pos + error.end))
            pos += error.end
    return "".join(parts), np.array(runs, dtype=np.int64).reshape(-1, 2)


def _remap(offsets: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """Byte offsets in the original bytes -> offsets in the decoded text's UTF-8 (each run became 3 bytes)."""
    if not len(runs):
        return offsets
    shift = np.concatenate([[0], np.cumsum(3 - (runs[:, 1] - runs[:, 0]))])
    k = np.searchsorted(runs[:, 1], offsets, side="right")  # runs ending at or before each offset
    out = offsets + shift[k]
    inside = (k < len(runs)) & (runs[np.minimum(k, len(runs) - 1), 0] < offsets)
    out[inside] = runs[k[inside], 0] + shift[k[inside]] + 3  # an end inside a run: the end of its U+FFFD
    return out


def _drop_invalid(a: SpanAlignment, starts: np.ndarray, ends: np.ndarray, runs: np.ndarray) -> None:
    """Take student tokens touching invalid bytes, and the spans holding them, out of the alignment (in place)."""
    k = np.searchsorted(runs[:, 1], starts, side="right")
    bad = (k < len(runs)) & (runs[np.minimum(k, len(runs) - 1), 0] < ends)
    spans = np.unique(a.student_span[bad & (a.student_span >= 0)])
    bad |= np.isin(a.student_span, spans)
    a.teacher_span[np.isin(a.teacher_span, spans)] = -1
    for field in (a.student_span, a.teacher_at_start, a.containing, a.path_start):
        field[bad] = -1


def _teacher_ends(table: TokenBytes | None, ids: np.ndarray, offsets: list[tuple[int, int]], text: str) -> np.ndarray:
    """Byte offset where each teacher token ends.

    Exact from the teacher's byte table when its tokens spell the text (byte-level tokens may end inside a
    character). Otherwise (an UNK, a normalizer) from the tokenizer's character offsets; a token that shares a
    character with the next one ends inside it, a boundary character offsets cannot place, so it is merged with
    the next token that ends cleanly.
    """
    if table is not None and len(ids) and (table.lengths[ids] > 0).all():
        ends = table.ends(ids)
        if ends[-1] == len(text.encode()):
            return ends
    if not offsets:
        return np.zeros(0, dtype=np.int64)
    starts, ends = (np.array(x, dtype=np.int64) for x in zip(*offsets, strict=True))
    clean = np.flatnonzero(np.append(starts[1:] >= ends[:-1], True))  # tokens whose end is a character boundary
    ends = ends[clean[np.searchsorted(clean, np.arange(len(ends)))]]
    return np.maximum.accumulate(char_byte_offsets(text)[ends])


def _pad(rows: list[np.ndarray], fill: int, left: bool = False) -> np.ndarray:
    """Stack rows of different lengths into `[B, width]`, padded with `fill` on the right (or the left)."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row):
            out[i, slice(width - len(row), None) if left else slice(0, len(row))] = row
    return out


def retokenise(student: TokenBytes, teacher_tokenizer, teacher_encoder, prompt_ids: np.ndarray,
               prompt_mask: np.ndarray, completion_ids: np.ndarray, completion_mask: np.ndarray,
               teacher_eos: int | None, teacher_bytes: TokenBytes | None = None) -> TextView:
    """Spell a student batch as text, tokenise it for the teacher (batched) and align the two tokenizations.

    Args:
        student: the student tokenizer's byte table.
        teacher_tokenizer: the teacher's tokenizer; encodes the prompts as it would any text (BOS, dummy prefix).
        teacher_encoder: a `tokenizers.Tokenizer` for the completions, which continue the prompt's text: it must add
            nothing (no special tokens, no dummy-prefix space; see `trie.prefixless_encoder`).
        prompt_ids, prompt_mask: `[B, P]` left-padded student prompt ids and their validity.
        completion_ids, completion_mask: `[B, N]` student completion ids, and which columns hold the completion (a
            prefix of each row: tokens up to and including EOS, before any padding).
        teacher_eos: appended to a teacher completion whose student completion ends with EOS (None: never).
        teacher_bytes: the teacher's byte table, for exact byte ends (else the tokenizer's character offsets).
    """
    prompts = [student.join(ids[m.astype(bool)]).decode("utf-8", errors="replace")
               for ids, m in zip(prompt_ids, prompt_mask, strict=True)]
    rows = [ids[: int(m.sum())] for ids, m in zip(completion_ids, completion_mask, strict=True)]
    raw = [student.join(r) for r in rows]
    decoded = [lossy_decode(b) for b in raw]
    texts = [text for text, _ in decoded]
    enc = teacher_encoder.encode_batch(texts, add_special_tokens=False)
    prompt_enc = teacher_tokenizer(prompts, add_special_tokens=True)["input_ids"]
    n, t_rows, fields = completion_ids.shape[1], [], {k: [] for k in ("ss", "ts", "tas", "con", "ps")}
    for row, (text, runs), encoding in zip(rows, decoded, enc, strict=True):
        t_ids = np.asarray(encoding.ids, dtype=np.int64)
        t_ends = _teacher_ends(teacher_bytes, t_ids, encoding.offsets, text)
        s_raw_ends = student.ends(row)
        s_ends = _remap(s_raw_ends, runs)
        limit = len(text.encode())
        if len(row) > 0 and row[-1] == student.eos_id and teacher_eos is not None:
            # EOS on both sides: a span of one virtual byte past the text
            s_ends = np.concatenate([s_ends[:-1], [limit + 1]])
            t_ends, t_ids = np.append(t_ends, limit + 1), np.append(t_ids, teacher_eos)
            limit += 1
        a = align_ends(s_ends, t_ends, limit)
        if len(runs):
            _drop_invalid(a, s_raw_ends - student.lengths[row], s_raw_ends, runs)
        t_rows.append(t_ids)
        for key, value in zip(fields, (a.student_span, a.teacher_span, a.teacher_at_start, a.containing, a.path_start),
                              strict=True):
            fields[key].append(value)
    m = max((len(r) for r in t_rows), default=0)
    prompt_arr, comp_arr = _pad([np.asarray(p) for p in prompt_enc], 0, left=True), _pad(t_rows, 0)
    p_mask = _pad([np.ones(len(p)) for p in prompt_enc], 0, left=True)
    t_mask = _pad([np.ones(len(r)) for r in t_rows], 0)
    return TextView(
        input_ids=torch.from_numpy(np.concatenate([prompt_arr, comp_arr], axis=1)),
        attention_mask=torch.from_numpy(np.concatenate([p_mask, t_mask], axis=1)),
        teacher_ids=torch.from_numpy(comp_arr), teacher_mask=torch.from_numpy(t_mask).bool(),
        student_span=_expand(fields["ss"], n), teacher_span=_expand(fields["ts"], m),
        teacher_at_start=_expand(fields["tas"], n), containing=_expand(fields["con"], n),
        path_start=_expand(fields["ps"], n), texts=texts)


def prompt_boundaries(student: TokenBytes, teacher_tokenizer, teacher_bytes: TokenBytes | None, prompt_ids: np.ndarray,
                      prompt_mask: np.ndarray, teacher_ids: np.ndarray,
                      teacher_mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, the prompt columns `(student [K], teacher [K])` at which both tokenizations of the prompt end a token on
    the same byte (`span_lasts` of `align_ends`).

    `prompt_ids`/`prompt_mask` are the student's left-padded prompts `[B, P]`, `teacher_ids`/`teacher_mask` the
    teacher's `[B, P_t]` as `retokenise` wrote them (the teacher tokenizer's encoding of each prompt's text, special
    tokens included). A prompt whose bytes are not valid UTF-8, or whose re-encoding differs from the teacher's ids,
    gets no pairs rather than wrong ones.
    """
    s_cols = [np.flatnonzero(m) for m in prompt_mask]
    t_cols = [np.flatnonzero(m) for m in teacher_mask]
    data = [student.join(ids[cols]) for ids, cols in zip(prompt_ids, s_cols, strict=True)]
    texts = [d.decode("utf-8", errors="replace") for d in data]
    enc = teacher_tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    out = []
    for b, (raw, text) in enumerate(zip(data, texts, strict=True)):
        t_ids = teacher_ids[b, t_cols[b]]
        if len(text.encode()) != len(raw) or list(enc["input_ids"][b]) != t_ids.tolist():
            out.append((np.zeros(0, dtype=np.int64),) * 2)
            continue
        s_ends = student.ends(prompt_ids[b, s_cols[b]])
        t_ends = _teacher_ends(teacher_bytes, t_ids, enc["offset_mapping"][b], text)
        a = align_ends(s_ends, t_ends, len(raw))
        s_at, t_at = span_lasts(a.student_span, a.teacher_span)
        out.append((s_cols[b][s_at], t_cols[b][t_at]))
    return out


def _expand(rows: list[np.ndarray], width: int) -> Tensor:
    """Rows of per-token values, right-padded with -1 to `width` columns: `[B, width]`."""
    out = _pad(rows, -1)
    return torch.from_numpy(np.pad(out, ((0, 0), (0, width - out.shape[1])), constant_values=-1))
