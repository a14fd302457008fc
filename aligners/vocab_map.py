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
    PositionRows,
    TeacherTarget,
)

from .base import ALIGNERS, TeacherInputs, dense_token_logprobs
from .text import (
    LOG_FLOOR,
    TextAligner,
    chunk_rows,
    gather_columns,
    gather_rows,
    log_normaliser_,
    log_totals,
    runs,
    scratch,
)

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

    def _matched_columns(self, logits: Tensor, at: Tensor, s_ids: Tensor, t_ids: Tensor,
                         native: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The target from the matched columns of the teacher's rows: (log-probs `[B, N, V_s]`, positions with a
        target `[B, N]`, mass kept `[n]`, NaN where not measured, the teacher's own logits at `at` (`PositionRows`,
        read when indexed) or None).

        The matched columns are read straight from the teacher's logits where they are a tensor (whole rows are then
        copied only where `mass_coverage` is measured); otherwise each chunk's whole rows are computed first, from the
        teacher's hidden states and output layer."""
        size, device = self.student_vocab_size, logits.device
        batch, pos = (at >= 0).nonzero(as_tuple=True)
        t_pos = at[batch, pos]
        out = torch.zeros((*at.shape, size), device=device)  # no target: zeros, as every aligner leaves them
        flat = out.view(-1, size)
        dst = batch * at.shape[1] + pos
        copies = not isinstance(logits, Tensor)
        kept = torch.full((len(batch),), math.nan, device=device)
        step = chunk_rows(logits.shape[-1] if copies else len(t_ids))
        whole_rows = scratch(min(step, len(batch)), logits.shape[-1], device) if copies else None
        same_rows = scratch(min(step, len(batch)), len(t_ids), device, slot="matched")
        work = scratch(min(step, len(batch)), len(t_ids), device, slot="matched_work")
        dst_host = dst.cpu().numpy()
        for lo in range(0, len(batch), step):
            b, i, t = batch[lo : lo + step], pos[lo : lo + step], t_pos[lo : lo + step]
            if copies:
                rows = gather_rows(logits, b, t, whole_rows)  # [c, V_t] a copy
                same = torch.gather(rows, 1, t_ids.expand(len(b), -1), out=same_rows[: len(b)])
            else:
                same = gather_columns(logits, b, t, t_ids, same_rows)  # [c, K] logits of the tokens both spell
            lse = log_normaliser_(work[: len(b)].copy_(same))  # [c]
            same.sub_(lse[:, None]).clamp_min_(LOG_FLOOR)
            rows_out = dst_host[lo : lo + step]
            for a, z in runs(rows_out):  # each run of consecutive target rows: the floor where no matched token
                rows_at = flat[int(rows_out[a]) : int(rows_out[a]) + z - a]  # writes, then one scatter
                rows_at.fill_(LOG_FLOOR).scatter_(1, s_ids.expand(z - a, -1), same[a:z])
            measured = (i % self.coverage_every == 0).nonzero().squeeze(-1)
            if len(measured):  # the share of the whole row's mass the matched columns hold
                if copies:
                    whole = log_normaliser_(rows[measured])
                else:
                    whole = log_totals(logits, b[measured], t[measured], scratch(len(measured), logits.shape[-1],
                                                                                 device, slot="coverage"))
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
        logp, valid, kept, native = self._matched_columns(teacher_logits, at, s_ids, t_ids,
                                                          TEACHER_NATIVE_LOGITS in needs)
        tokens = dense_token_logprobs(logp, rollout, valid) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=logp, native_logits=native,
                             vocab_pairs=(s_ids, t_ids), token_logprobs=tokens,
                             mass_coverage=float(kept.nanmean()) if bool((~kept.isnan()).any()) else None)
