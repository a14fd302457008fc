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
from .text import LOG_FLOOR, TextAligner, log_normaliser_, project_chunks

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

        def matched(rows: Tensor, _batch: Tensor, pos: Tensor, _t: Tensor) -> tuple[Tensor, Tensor]:
            n = len(rows)  # gather and scatter with expanded indices: several times faster than `rows[:, t_ids]`
            same = rows.gather(1, t_ids.expand(n, -1))  # [c, K] logits of the tokens both vocabularies spell
            lse = log_normaliser_(same.clone()).unsqueeze(-1)  # [c, 1]
            out = rows.new_full((n, self.student_vocab_size), LOG_FLOOR)
            out.scatter_(1, s_ids.expand(n, -1), (same - lse).clamp_min_(LOG_FLOOR))
            kept = rows.new_full((n,), math.nan)  # NaN: not measured (the position has a target all the same)
            measured = (pos % self.coverage_every == 0).nonzero().squeeze(-1)
            if len(measured):
                kept[measured] = (lse[measured, 0] - log_normaliser_(rows[measured])).exp()
            return out, kept

        logp, valid, kept, native = project_chunks(teacher_logits, at, self.student_vocab_size, matched,
                                                   native=TEACHER_NATIVE_LOGITS in needs)
        tokens = dense_token_logprobs(logp, rollout, valid) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=logp, native_logits=native,
                             vocab_pairs=(s_ids, t_ids), token_logprobs=tokens,
                             mass_coverage=float(kept.nanmean()) if bool((~kept.isnan()).any()) else None)
