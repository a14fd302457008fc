"""Exact teacher likelihood of every student token when the student's BPE is a subset of the teacher's.

If the student's merges are a subset of the teacher's, in the same order, every teacher token is a concatenation
of the student tokens BPE would give its bytes, and the teacher's tokenization of a text is a coarsening of the
student's. Then the teacher's probability of the student's next token, even one that starts inside a teacher
token, follows from the one teacher distribution at that teacher token's start (`trie.TokenTrie.conditional`;
Phan, Khisti & Ullrich, "Cross-Tokenizer Likelihood Scoring Algorithms for LM Distillation", ICLR 2026): O(1)
teacher calls, a dense target at every student position, and each student token's exact log-likelihood.

`bind` checks the pair qualifies (both BPE, same pre-tokenization and normalization, student merges an ordered
subset of the teacher's) and refuses otherwise, naming `byte_spans` and `char_level`, which serve any pair.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
from torch import Tensor

from opd_lightning.rollout import Rollout
from opd_lightning.target import TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TeacherTarget

from .base import ALIGNERS, TeacherInputs, dense_token_logprobs
from .rows import softmax_
from .text import TextAligner, mass_to_logits, project_chunks
from .trie import TokenTrie

__all__ = ["BpeSubsetAligner", "bpe_subset_problem", "keep_merges"]


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def keep_merges(tokenizer, share: float):
    """A copy of a BPE tokenizer that keeps only the first `share` of its merges: a student vocabulary that is an
    ordered BPE subset of `tokenizer`'s (special tokens and the base alphabet stay, with their ids)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    config = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = config["model"]["merges"][: int(len(config["model"]["merges"]) * share)]
    merged = {"".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges}
    ordered = [t for t, _ in sorted(config["model"]["vocab"].items(), key=lambda kv: kv[1])]
    produced = {"".join(m) if isinstance(m, list) else m.replace(" ", "") for m in config["model"]["merges"]}
    kept = [t for t in ordered if t not in produced or t in merged]  # the alphabet and specials, then kept merges
    config["model"]["merges"], config["model"]["vocab"] = merges, {t: i for i, t in enumerate(kept)}
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(tokenizer, k) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(config)), **special)


def bpe_subset_problem(student_tokenizer, teacher_tokenizer) -> str | None:
    """Why the student's BPE is not an ordered subset of the teacher's, or None when it is."""
    student = json.loads(student_tokenizer.backend_tokenizer.to_str())
    teacher = json.loads(teacher_tokenizer.backend_tokenizer.to_str())
    kinds = (student["model"].get("type"), teacher["model"].get("type"))
    if kinds != ("BPE", "BPE"):
        return f"both tokenizers must be BPE (student {kinds[0]}, teacher {kinds[1]})"
    for part in ("normalizer", "pre_tokenizer"):
        if student.get(part) != teacher.get(part):
            return f"their {part.replace('_', '-')}s differ, so the same text is split differently before BPE"
    rank = {m: r for r, m in enumerate(_merges(teacher["model"]))}
    ranks = [rank.get(m, -1) for m in _merges(student["model"])]
    missing = sum(r < 0 for r in ranks)
    if missing:
        return f"{missing} of the student's {len(ranks)} merges are not teacher merges"
    if any(b <= a for a, b in itertools.pairwise(ranks)):
        return "the student applies shared merges in a different order than the teacher"
    return None


@ALIGNERS.register("bpe_subset")
class BpeSubsetAligner(TextAligner):
    """Exact per-token teacher likelihoods for BPE-subset pairs; a dense target at every student position."""

    # Each token's exact log-prob is read from the dense target (at temperature 1).
    provides = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS})
    reads_rows = True  # through `gather_rows` and `token_logprobs_chunked` only

    def __init__(self) -> None:
        """Takes no options: qualification is checked and the trie built when the aligner is bound."""
        super().__init__()
        self.trie: TokenTrie | None = None

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        problem = bpe_subset_problem(student_tokenizer, teacher_tokenizer)
        if problem:
            raise ValueError(f"bpe_subset cannot serve this pair: {problem}. Use aligner 'byte_spans' (span "
                             "likelihoods and dense targets for any pair) or 'char_level' (next-byte distributions).")
        super().bind(student_tokenizer, teacher_tokenizer, student_vocab_size, teacher_vocab_size)
        self.trie = TokenTrie(self.teacher_bytes, self.student_bytes, student_tokenizer, student_vocab_size)

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        view = inputs.alignment
        ok = (view.path_start >= 0) & rollout.completion_mask
        index = view.containing.masked_fill(~ok, -1)
        ids, starts = rollout.completion_ids.cpu().numpy(), view.path_start.cpu().numpy()

        def condition(rows: Tensor, batch: Tensor, pos: Tensor, _: Tensor) -> tuple[Tensor, Tensor]:
            b, i = batch.cpu().numpy(), pos.cpu().numpy()
            first, lengths = starts[b, i], i - starts[b, i]  # each path: the student tokens ids[b, first:i]
            at = first[:, None] + np.arange(int(lengths.max(initial=0)) + 1)  # [c, L]
            padded = np.where(at < i[:, None], ids[b[:, None], np.minimum(at, ids.shape[1] - 1)], -1)
            return mass_to_logits(self.trie.conditional_padded(softmax_(rows), padded, lengths))  # [c, V_s]

        logp, valid, kept, _ = project_chunks(teacher_logits, index, self.student_vocab_size, condition)
        tokens = dense_token_logprobs(logp, rollout, valid) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=logp, token_logprobs=tokens,
                             mass_coverage=float(kept.mean()) if len(kept) else 0.0)
