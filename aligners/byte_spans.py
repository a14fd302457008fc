"""Byte spans: the two tokenizations grouped into the minimal spans that end on the same byte, with all of the
teacher's probability mass carried into the student's vocabulary.

At every student token that starts where a teacher token starts, the teacher's distributions become one over the
student's next token: a teacher token longer than student tokens gives its mass to the first student token of its
spelling (`trie.TokenTrie`), and student tokens longer than teacher tokens get the teacher's likelihood of their
text by walking the teacher's later distributions along the realised text (`lookahead.Lookahead`). Mass is
conserved up to tokens the other side cannot spell. Student tokens inside a teacher token get no dense target here
(`bpe_subset` gives them one when the pair qualifies). For the sampled-token
loss the aligner scores whole spans: the teacher's log-likelihood of a span's text is the sum of its tokens'
log-probs, exact for the teacher's own tokenization of the text, and sits on the span's last student token. When a
loss needs the dense target and token log-probs together, the token log-probs are read from the dense target (one
per student token, no spans), so that both describe the same distribution.
"""

from __future__ import annotations

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
from .lookahead import Lookahead
from .text import TextAligner, mass_to_logits, project_chunks, softmax_, span_logprobs
from .trie import TokenTrie

__all__ = ["ByteSpanAligner"]


@ALIGNERS.register("byte_spans")
class ByteSpanAligner(TextAligner):
    """Span alignment on UTF-8 bytes; dense targets at shared token starts, span log-likelihoods everywhere."""

    provides = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TEACHER_NATIVE_LOGITS, VOCAB_PAIRS})

    def __init__(self) -> None:
        """Takes no options: spellings and the decomposition trie are built when the aligner is bound."""
        super().__init__()
        self.lookahead: Lookahead | None = None

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        super().bind(student_tokenizer, teacher_tokenizer, student_vocab_size, teacher_vocab_size)
        trie = TokenTrie(self.teacher_bytes, self.student_bytes, student_tokenizer, student_vocab_size)
        self.lookahead = Lookahead(self.student_bytes, self.teacher_bytes, teacher_tokenizer, student_tokenizer,
                                   trie.first)

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        view = inputs.alignment
        completion = rollout.completion_mask
        if needs & {TEACHER_LOGITS, TEACHER_NATIVE_LOGITS, VOCAB_PAIRS}:
            return self._dense(teacher_logits, view, rollout, needs)
        logp = span_logprobs(teacher_logits, view, completion.shape[1])
        in_span = (view.student_span >= 0) & completion
        spans = view.student_span.masked_fill(~in_span, -1)
        return TeacherTarget(coverage=self.coverage(in_span, rollout), mask=in_span, token_logprobs=logp,
                             token_spans=spans)

    def _dense(self, teacher_logits: Tensor, view, rollout: Rollout, needs: frozenset[str]) -> TeacherTarget:
        at = view.teacher_at_start.masked_fill(~rollout.completion_mask, -1)
        realised, lengths = view.teacher_ids.tolist(), view.teacher_mask.sum(-1).tolist()

        normalisers: dict[tuple[int, int], Tensor] = {}

        def spread(rows: Tensor, batch: Tensor, _: Tensor, teacher_pos: Tensor) -> tuple[Tensor, Tensor]:
            starts = list(zip(batch.tolist(), teacher_pos.tolist(), strict=True))
            probs = softmax_(rows)  # [c, V_t]
            in_chunk = {start: k for k, start in enumerate(starts)}

            def probs_at(b: int, pos: int, ids: Tensor) -> Tensor:  # a few tokens at a later position of row b
                if (b, pos) in in_chunk:  # usually the next row of this chunk, already normalised
                    return probs[in_chunk[b, pos], ids]
                if (b, pos) not in normalisers:
                    normalisers[b, pos] = teacher_logits[b, pos].float().logsumexp(-1)
                return (teacher_logits[b, pos, ids].float() - normalisers[b, pos]).exp()

            mass = self.lookahead.project(probs, starts, realised, lengths, probs_at, self.student_vocab_size)
            return mass_to_logits(mass)  # [c, V_s]

        logp, valid, kept, native = project_chunks(teacher_logits, at, self.student_vocab_size, spread,
                                                   native=TEACHER_NATIVE_LOGITS in needs)
        tokens = dense_token_logprobs(logp, rollout, valid) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=logp, native_logits=native,
                             vocab_pairs=tuple(p.to(logp.device) for p in self.pairs), token_logprobs=tokens,
                             mass_coverage=float(kept.mean()) if len(kept) else 0.0)
