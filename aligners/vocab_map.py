"""The vocabulary map: the teacher's distribution carried over token by token where both vocabularies spell the same
text, at the positions where both models start a token on the same byte.

Tokens are compared by the bytes they spell, so byte-level `Ġ`/`Ċ`, SentencePiece `▁` and byte-fallback `<0xNN>`
spellings of one text match (`bytes.TokenBytes`). Teacher mass on tokens the student cannot spell as one token is
dropped and the rest renormalised; `mass_coverage` reports the share kept (measured at every `coverage_every`-th
student position: it needs a normaliser over the teacher's whole row, which the target itself does not). Positions where the teacher has no token
boundary at the student token's start get no target. This is the matched-vocabulary half of GOLD, and the cheapest
cross-tokenizer target; `byte_spans` keeps all the mass.
"""

from __future__ import annotations

import math

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
from .rows import (
    BLOCK_ELEMENTS,
    LOG_FLOOR,
    chunk_rows,
    copy_rows_,
    exp_safe,
    gather_columns,
    gather_rows,
    index_pieces,
    log_totals,
)
from .text import TextAligner, target_rows

__all__ = ["DIRECT_WIDTH", "VocabMapAligner"]

# The widest teacher row read straight into the student's order. One gather in the student's order against two (the
# matched columns front to back, then permuted), `benchmarks/alignment.py`'s batches, 2 threads: 15.2 against 19.0
# ms per 1,000 tokens for an 8,000-token teacher, 47 against 55 for SmolLM2's 49k; at Gemma-3's 262k the random reads
# over a row from memory cost more, 1,063 against 713 ms per batch.
DIRECT_WIDTH = 2**16


@ALIGNERS.register("vocab_map")
class VocabMapAligner(TextAligner):
    """Same-text tokens matched across vocabularies; the teacher read at shared token starts."""

    # Token log-probs are read from the dense (matched, renormalised) teacher distribution.
    provides = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TEACHER_NATIVE_LOGITS, VOCAB_PAIRS})
    reads_rows = True  # through `gather_rows` and `token_logprobs_chunked` only

    def __init__(self, coverage_every: int = 8) -> None:
        """
        Args:
            coverage_every: `mass_coverage` is measured at the student positions divisible by this (1: at every
                position). The target needs only the matched tokens' logits; the share of the teacher's mass they
                hold needs a normaliser over its whole vocabulary, three quarters of the projection's time at a
                262k vocabulary when taken at every position. The map is built from the two tokenizers at `bind`.
        """
        super().__init__()
        if coverage_every < 1:
            raise ValueError(f"vocab_map: coverage_every must be >= 1, got {coverage_every}")
        self.coverage_every = coverage_every
        self.columns = torch.zeros(1, dtype=torch.long)  # the teacher columns each row is read at
        self.blank = torch.zeros(0, dtype=torch.long)  # the read columns set to -inf: no match
        self.place: Tensor | None = None  # each student id's place among the read columns, None: read in its order
        self.pieces: list[tuple[int, int, int]] | None = None

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        super().bind(student_tokenizer, teacher_tokenizer, student_vocab_size, teacher_vocab_size)
        s_ids, t_ids = self.pairs
        if teacher_vocab_size <= DIRECT_WIDTH:  # [V_s] in the student's order, the unmatched ids blanked
            self.columns = torch.zeros(student_vocab_size, dtype=torch.long)
            self.columns[s_ids] = t_ids
            matched = torch.zeros(student_vocab_size, dtype=torch.bool)
            matched[s_ids] = True
            self.blank, self.place = (~matched).nonzero().squeeze(-1), None
        else:  # [K + 1] the matched columns front to back, then one (any) blanked for the unmatched students
            order = torch.argsort(t_ids)
            self.columns = torch.cat([t_ids[order], t_ids[:1] if len(t_ids) else torch.zeros(1, dtype=torch.long)])
            self.blank = torch.tensor([len(order)])
            self.place = torch.full((student_vocab_size,), len(order), dtype=torch.long)
            self.place[s_ids[order]] = torch.arange(len(order))
        self.pieces = index_pieces(self.columns)  # stretches of consecutive teacher ids, read as slices

    def _matched_columns(self, logits: Tensor, at: Tensor, native: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The target from the matched columns of the teacher's rows: (log-probs `[B, N, V_s]`, positions with a
        target `[B, N]`, mass kept `[n]`, NaN where not measured, the teacher's own logits at `at` (`PositionRows`,
        read when indexed) or None).

        A block of rows at a time (`BLOCK_ELEMENTS` teacher values, read straight from the logits where they are a
        tensor; a chunk of rows computed first where they are hidden states and an output layer): the matched columns
        are read (`columns`), the student tokens with no match set to -inf, normalised by one exp-and-sum pass and
        written into the target as log-probs floored at `LOG_FLOOR` (the -inf columns land on the floor), all while
        the block is in cache; whole rows are read only where `mass_coverage` is measured. A teacher row up to
        `DIRECT_WIDTH` wide is read straight into the student's order; a wider one front to back in its own order
        (random reads over a 262k row cost more), then put in the student's order (`place`) as it is written.
        """
        size, device = self.student_vocab_size, logits.device
        columns, blank = self.columns.to(device), self.blank.to(device)
        place = None if self.place is None else self.place.to(device)
        batch, pos = (at >= 0).nonzero(as_tuple=True)
        t_pos = at[batch, pos]
        out = target_rows((*at.shape, size), batch, pos)  # no target: zeros, as every aligner leaves them
        flat = out.view(-1, size)
        dst = (batch * at.shape[1] + pos).cpu().numpy()
        kept = torch.full((len(batch),), math.nan, device=device)
        copies = not isinstance(logits, Tensor)  # hidden states and an output layer: whole rows computed per chunk
        step = chunk_rows(logits.shape[-1]) if copies else max(1, BLOCK_ELEMENTS // logits.shape[-1])
        c_max = min(step, len(batch))
        whole_rows = scratch(c_max, logits.shape[-1], device) if copies else None
        rows_buffer, work = (scratch(c_max, len(columns), device, slot=slot) for slot in ("matched", "matched_work"))

        def write(rows: Tensor, out: Tensor) -> Tensor:  # log-probs floored, in the student's order
            if place is None:
                return torch.clamp_min(rows, LOG_FLOOR, out=out)
            return torch.gather(rows.clamp_min_(LOG_FLOOR), 1, place.expand(len(rows), -1), out=out)

        for lo in range(0, len(batch), step):
            b, i, t = batch[lo : lo + step], pos[lo : lo + step], t_pos[lo : lo + step]
            values = logits
            if copies:  # the chunk's rows computed once, read below as a [c, 1, V_t] tensor
                values = gather_rows(logits, b, t, whole_rows).unsqueeze(1)
                b, t = torch.arange(len(b), device=device), torch.zeros_like(t)
            rows = gather_columns(values, b, t, columns, rows_buffer, self.pieces)  # [c, len]
            rows.index_fill_(1, blank, -math.inf)
            totals = torch.exp(rows, out=work[: len(b)]).sum(-1)  # [c] the matched columns' mass, unnormalised
            lse = totals.log()
            if len(unsafe := (~exp_safe(totals, size)).nonzero().squeeze(-1)):  # exp overflowed or underflowed
                lse[unsafe] = torch.logsumexp(rows[unsafe], -1)
            copy_rows_(flat, dst[lo : lo + step], rows.sub_(lse[:, None]), np.arange(len(b)), op=write)
            measured = (i % self.coverage_every == 0).nonzero().squeeze(-1)
            if len(measured):  # the share of the whole row's mass the matched columns hold
                whole = log_totals(values, b[measured], t[measured])
                kept[lo + measured] = (lse[measured] - whole).exp()
        valid = torch.zeros(at.shape, dtype=torch.bool, device=device)
        valid[batch, pos] = True
        return out, valid, kept, PositionRows(logits, at) if native else None

    @property
    def matched(self) -> tuple[Tensor, Tensor]:
        """(student ids, teacher ids) spelling the same text."""
        return self.pairs

    def unmatched(self) -> tuple[Tensor, Tensor]:
        """(student ids, teacher ids) of spelled tokens with no same-text counterpart."""
        s_spelled = torch.tensor([b is not None for b in self.student_bytes.table])
        t_spelled = torch.tensor([b is not None for b in self.teacher_bytes.table])
        s_spelled[self.pairs[0]] = False
        t_spelled[self.pairs[1]] = False
        return s_spelled.nonzero().squeeze(-1), t_spelled.nonzero().squeeze(-1)

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        at = inputs.alignment.teacher_at_start.masked_fill(~rollout.completion_mask, -1)
        s_ids, t_ids = (p.to(teacher_logits.device) for p in self.pairs)
        logp, valid, kept, native = self._matched_columns(teacher_logits, at, TEACHER_NATIVE_LOGITS in needs)
        tokens = dense_token_logprobs(logp, rollout, valid) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=logp, native_logits=native,
                             vocab_pairs=(s_ids, t_ids), token_logprobs=tokens,
                             mass_coverage=float(kept.nanmean()) if bool((~kept.isnan()).any()) else None)
