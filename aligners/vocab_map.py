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
from .rows import LOG_FLOOR, chunk_rows, copy_rows_, exp_safe, gather_columns, gather_rows, log_totals
from .text import TextAligner, target_rows

__all__ = ["VocabMapAligner"]


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
        self.read = torch.zeros(0, dtype=torch.long)  # [V_s] the teacher id each student id reads, 0 where none
        self.unread = torch.zeros(0, dtype=torch.long)  # [U] the student ids with no teacher token

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        super().bind(student_tokenizer, teacher_tokenizer, student_vocab_size, teacher_vocab_size)
        s_ids, t_ids = self.pairs
        self.read = torch.zeros(student_vocab_size, dtype=torch.long)
        self.read[s_ids] = t_ids
        none = torch.ones(student_vocab_size, dtype=torch.bool)
        none[s_ids] = False
        self.unread = none.nonzero().squeeze(-1)

    def _matched_columns(self, logits: Tensor, at: Tensor, native: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The target from the matched columns of the teacher's rows: (log-probs `[B, N, V_s]`, positions with a
        target `[B, N]`, mass kept `[n]`, NaN where not measured, the teacher's own logits at `at` (`PositionRows`,
        read when indexed) or None).

        Each chunk of rows is read in the student's column order (a gather through the table `read`, straight from
        the logits where they are a tensor: only the matched columns of each row are touched), the columns with no
        teacher token set to -inf, normalised by one exp-and-sum pass, and written into the target as log-probs
        floored at `LOG_FLOOR` (the -inf columns land on the floor); whole rows are read only where `mass_coverage`
        is measured. Teacher logits given as hidden states and an output layer have each chunk's rows computed first.
        """
        size, device = self.student_vocab_size, logits.device
        read, unmatched = self.read.to(device), self.unread.to(device)
        batch, pos = (at >= 0).nonzero(as_tuple=True)
        t_pos = at[batch, pos]
        out = target_rows((*at.shape, size), batch, pos)  # no target: zeros, as every aligner leaves them
        flat = out.view(-1, size)
        dst = (batch * at.shape[1] + pos).cpu().numpy()
        kept = torch.full((len(batch),), math.nan, device=device)
        copies = not isinstance(logits, Tensor)  # hidden states and an output layer: whole rows computed per chunk
        step = chunk_rows(logits.shape[-1] if copies else size)
        c_max = min(step, len(batch))
        whole_rows = scratch(c_max, logits.shape[-1], device) if copies else None
        rows_buffer, work = (scratch(c_max, size, device, slot=slot) for slot in ("matched", "matched_work"))
        for lo in range(0, len(batch), step):
            b, i, t = batch[lo : lo + step], pos[lo : lo + step], t_pos[lo : lo + step]
            values = logits
            if copies:  # the chunk's rows computed once, read below as a [c, 1, V_t] tensor
                values = gather_rows(logits, b, t, whole_rows).unsqueeze(1)
                b, t = torch.arange(len(b), device=device), torch.zeros_like(t)
            rows = gather_columns(values, b, t, read, rows_buffer)  # [c, V_s] in the student's column order
            rows.index_fill_(1, unmatched, -math.inf)
            totals = torch.exp(rows, out=work[: len(b)]).sum(-1)  # [c] the matched columns' mass, unnormalised
            lse = totals.log()
            if len(unsafe := (~exp_safe(totals, size)).nonzero().squeeze(-1)):  # exp overflowed or underflowed
                lse[unsafe] = torch.logsumexp(rows[unsafe], -1)
            copy_rows_(flat, dst[lo : lo + step], rows.sub_(lse[:, None]).clamp_min_(LOG_FLOOR), np.arange(len(b)))
            measured = (i % self.coverage_every == 0).nonzero().squeeze(-1)
            if len(measured):  # the share of the whole row's mass the matched columns hold
                whole = log_totals(values, b[measured], t[measured], scratch(len(measured), logits.shape[-1], device,
                                                                              slot="coverage"))
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
