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
import torch
from torch import Tensor

from opd_lightning.rollout import Rollout
from opd_lightning.target import TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TeacherTarget

from .base import ALIGNERS, TeacherInputs, dense_token_logprobs
from .columns import ColumnSums, column_blocks, spelled_shares
from .rows import LOG_FLOOR, floored_log
from .text import TextAligner, target_rows
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
        self.first_sums = ColumnSums(self.trie.first[:teacher_vocab_size], student_vocab_size)

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        view = inputs.alignment
        ok = (view.path_start >= 0) & rollout.completion_mask
        batch, pos = ok.nonzero(as_tuple=True)
        logp, kept = self._conditionals(teacher_logits, view, rollout.completion_ids, batch, pos)  # [B, N, V_s], [n]
        valid = torch.zeros_like(ok)
        valid[batch, pos] = kept > 0
        tokens = dense_token_logprobs(logp, rollout, valid) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=logp, token_logprobs=tokens,
                             mass_coverage=float(kept.mean()) if len(kept) else 0.0)

    def _conditionals(self, teacher_logits: Tensor, view, completion_ids: Tensor, batch: Tensor,
                      pos: Tensor) -> tuple[Tensor, Tensor]:
        """Every aligned position's next-student-token log-probs, written into a `[B, N, V_s]` target, and the mass
        each kept `[n]`, from one pass over the teacher rows the positions read (each teacher token's row once,
        however many student tokens it holds: `columns.column_blocks`).

        A position at a teacher token's start (an empty path) gets the first-student-token marginal: its row's column
        sums renormalised over the mass the student can spell. A position inside a teacher token gets its children's
        shares (`TokenTrie.entries`, `shares`), read from the same row while its block is in cache, and `LOG_FLOOR`
        at every other token."""
        device, big_m, size = teacher_logits.device, teacher_logits.shape[1], self.student_vocab_size
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        b, i, n_student = batch.cpu().numpy(), pos.cpu().numpy(), completion_ids.shape[1]
        first = view.path_start.cpu().numpy()[b, i]  # each path: the student tokens ids[b, first:i]
        keys, row = np.unique(b * big_m + view.containing.cpu().numpy()[b, i], return_inverse=True)  # [R], [n]
        start, deep = np.flatnonzero(i == first), np.flatnonzero(i > first)  # row is ascending along both
        lengths = i[deep] - first[deep]
        at = first[deep, None] + np.arange(int(lengths.max(initial=0)) + 1)  # [d, L]
        ids = completion_ids.cpu().numpy()
        paths = np.where(at < i[deep, None], ids[b[deep, None], np.minimum(at, n_student - 1)], -1)
        local, child_ids, child, teacher_ids = self.trie.entries(paths, lengths)
        entry_row = row[deep][local[child]]  # [E] ascending
        out = target_rows((*completion_ids.shape, size), batch, pos)
        flat, dst = out.view(-1, size), b * n_student + i
        kept, read = torch.zeros(len(b), device=device), torch.empty(len(child), device=device)
        tiny = torch.finfo(torch.float32).tiny
        for lo, hi, full, total, values in column_blocks(teacher_logits, t(keys // big_m), t(keys % big_m),
                                                         self.first_sums):
            s = start[slice(*np.searchsorted(row[start], (lo, hi)))]  # the block's start positions
            e = slice(*np.searchsorted(entry_row, (lo, hi)))  # and entries
            read[e] = values(t(entry_row[e] - lo), t(teacher_ids[e]))
            if not len(s):
                continue
            probs, share = spelled_shares(full, total, size)
            kept[t(s)] = share[t(row[s] - lo)]
            logs = floored_log(probs, out=probs)
            flat.index_copy_(0, t(dst[s]), logs if len(s) == hi - lo else logs[t(row[s] - lo)])  # one start a row
        share, kept_deep = self.trie.shares(read, t(local), t(child), len(deep))
        kept[t(deep)] = kept_deep.to(kept.dtype)
        flat.index_fill_(0, t(dst[deep]), LOG_FLOOR)
        flat.index_put_((t(dst[deep][local]), t(child_ids)), share.clamp_min(tiny).log().clamp_min(LOG_FLOOR).float())
        flat.index_fill_(0, t(dst[kept.cpu().numpy() <= 0]), 0.0)  # no mass kept: no target
        return out, kept
