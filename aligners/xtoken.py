"""X-Token's vocabulary projection: a sparse matrix W that spreads each student token over the teacher tokens that
spell it, built once from the two tokenizers, and the teacher read at shared token starts.

Turuvekere Sreenivas et al., "X-Token: Projection-Guided Cross-Tokenizer Knowledge Distillation" (arXiv 2605.21699,
2026), compare the two models through W [V_s, V_t] "initialised from tokenizer-level string rules". The paper's body
was not readable from here (only its abstract); the rules below follow the authors' release in NVIDIA NeMo-RL
(`tools/x_token`: multi-token mapping with a reverse pass, exact-match pinning, sort-and-cut to the runtime top-k),
re-derived on this project's byte spellings, not copied. With D_T(s) the teacher tokens spelling student token s's
bytes exactly (`trie.decompose`), D_S(t) the student tokens spelling teacher token t, both cut to their first
`max_pieces` tokens, and ω_i(m) = δ^(i−1) / Σ_{j<m} δ^j the weight of the i-th of m pieces (δ = `decay`; NeMo-RL's
0.9·0.1^(i−1), normalised, is δ = 0.1):

    A[s, t] = Σ_{i: D_T(s)_i = t} ω_i(|D_T(s)|)  +  Σ_{i: D_S(t)_i = s} ω_i(|D_S(t)|)        (forward + reverse pass)
    A[s, ·] = e_t where D_T(s) = (t,), i.e. t spells s's text alone (EOS: EOS)       (exact match pinned, `pin_exact`)
    W[s, ·] = the `topk` largest entries of A[s, ·] (ties to the lower teacher id), divided by their sum.

The release pins tokens with equal strings; equal bytes and the teacher's own tokenization are used here, so where
a vocabulary spells one text twice (Gemma's `2` and its byte token `<0x32>`) the pin goes to the token the teacher's
tokenizer writes. Rows that nothing spells stay empty (special tokens other than EOS). W is fixed, not trained: the
release keeps it frozen (the authors mention learning it as an option, not implemented here), so it is held in
non-persistent buffers: they follow the module's device, stay out of checkpoints, and are rebuilt at `bind`. Left
out from the release: matching special tokens by string similarity, token canonicalisation (the byte spellings
subsume it), and its "scale trick" (a fixed 0.2 weight on the last top-k slot). Positions are aligned as in
`vocab_map`: the teacher is read where both models start a token on the same byte (its next token and the student's
begin at the same text), one teacher position per student position; the release averages over aligned chunks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from opd_lightning.rollout import Rollout
from opd_lightning.target import TEACHER_NATIVE_LOGITS, VOCAB_PAIRS, VOCAB_PROJECTION, PositionRows, TeacherTarget

from .base import ALIGNERS, TeacherInputs
from .text import TextAligner
from .trie import decompose

__all__ = ["XTokenAligner", "piece_weights", "projection_entries"]

Decompositions = list[tuple[int, ...] | None]


def piece_weights(m: int, decay: float) -> np.ndarray:
    """ω_i(m) = decay^(i−1) / Σ_j decay^(j−1), i = 1..m: the first piece of a split token carries most of it; `[m]`."""
    w = decay ** np.arange(m, dtype=np.float64)
    return w / w.sum()


def _split(decomps: Decompositions, max_pieces: int, decay: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source ids, piece ids, weights) of every piece of every decomposition, each cut to `max_pieces`."""
    src, dst, w = [], [], []
    for v, pieces in enumerate(decomps):
        if pieces:
            pieces = pieces[:max_pieces]
            src += [v] * len(pieces)
            dst += pieces
            w.append(piece_weights(len(pieces), decay))
    return (np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64),
            np.concatenate(w) if w else np.zeros(0))


def projection_entries(forward: Decompositions, backward: Decompositions | None, exact: tuple[Tensor, Tensor],
                       n_student: int, n_teacher: int, *, topk: int = 4, max_pieces: int = 4, decay: float = 0.1,
                       pin_exact: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """W's nonzero entries from the string rules (module docstring): (student ids, teacher ids, weights), `[E]` each.

    Args:
        forward: D_T(s) for every student id (teacher ids spelling it), or None.
        backward: D_S(t) for every teacher id (student ids spelling it), or None; None skips the reverse pass.
        exact: (student ids [K], teacher ids [K]) to pin: student tokens the teacher spells as one token.
        n_student, n_teacher: the two vocabulary sizes (ids must lie below them).
        topk, max_pieces, decay, pin_exact: as `XTokenAligner`.

    Entries come sorted by student id, then by decreasing weight (ties: increasing teacher id).
    """
    rows, cols, w = _split(forward, max_pieces, decay)
    if backward is not None:
        cols_b, rows_b, w_b = _split(backward, max_pieces, decay)  # W[D_S(t)_i, t] += ω_i
        rows, cols, w = np.concatenate([rows, rows_b]), np.concatenate([cols, cols_b]), np.concatenate([w, w_b])
    if pin_exact:
        s_exact, t_exact = (ids.numpy() for ids in exact)
        pinned = np.zeros(n_student, dtype=bool)
        pinned[s_exact] = True
        keep = ~pinned[rows]
        rows = np.concatenate([rows[keep], s_exact])
        cols = np.concatenate([cols[keep], t_exact])
        w = np.concatenate([w[keep], np.ones(len(s_exact))])
    keys, inverse = np.unique(rows * n_teacher + cols, return_inverse=True)  # coalesce repeated (s, t)
    w = np.bincount(inverse, weights=w)
    rows, cols = keys // n_teacher, keys % n_teacher
    order = np.lexsort((cols, -w, rows))  # by row, then weight descending, then teacher id
    rows, cols, w = rows[order], cols[order], w[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
    keep = rank < topk
    rows, cols, w = rows[keep], cols[keep], w[keep]
    w = w / np.bincount(rows, weights=w, minlength=n_student)[rows]
    return torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(w).float()


@ALIGNERS.register("xtoken")
class XTokenAligner(TextAligner, nn.Module):
    """X-Token's sparse projection W between the vocabularies; the teacher's own logits at shared token starts."""

    provides = frozenset({TEACHER_NATIVE_LOGITS, VOCAB_PAIRS, VOCAB_PROJECTION})

    def __init__(self, topk: int = 4, max_pieces: int = 4, decay: float = 0.1, reverse: bool = True,
                 pin_exact: bool = True) -> None:
        """
        Args:
            topk: entries kept in each row of W (NeMo-RL's runtime default, 4).
            max_pieces: a token split into more pieces than this keeps its first `max_pieces` (NeMo-RL's 4).
            decay: ratio δ in (0, 1] of consecutive piece weights; 0.1 gives a two-piece split (10/11, 1/11).
            reverse: also spell every teacher token in student tokens (the release's "reverse pass"), so a teacher
                token longer than the student's gets mass from the student tokens that begin it.
            pin_exact: the row of a student token that the teacher spells as one token becomes that one-hot row
                (the release's exact-map step). It also drops the reverse pass from those rows, so False keeps teacher
                tokens such as multi-digit numbers reachable from a character-level student.
        """
        nn.Module.__init__(self)  # first: nn.Module must exist before any attribute is set
        TextAligner.__init__(self)
        if topk < 1 or max_pieces < 1 or not 0 < decay <= 1:
            raise ValueError(f"need topk ≥ 1, max_pieces ≥ 1 and decay in (0, 1]; got {topk}, {max_pieces}, {decay}")
        self.topk, self.max_pieces, self.decay = topk, max_pieces, decay
        self.reverse, self.pin_exact = reverse, pin_exact
        for name in ("student_ids", "teacher_ids", "weights"):
            self.register_buffer(name, torch.zeros(0), persistent=False)

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        super().bind(student_tokenizer, teacher_tokenizer, student_vocab_size, teacher_vocab_size)
        forward = decompose(self.student_bytes, self.teacher_bytes, teacher_tokenizer)  # D_T(s)
        backward = decompose(self.teacher_bytes, self.student_bytes, student_tokenizer) if self.reverse else None
        single = [(v, pieces[0]) for v, pieces in enumerate(forward) if pieces is not None and len(pieces) == 1]
        exact = tuple(torch.tensor([p[i] for p in single], dtype=torch.long) for i in (0, 1))
        entries = projection_entries(forward, backward, exact, len(self.student_bytes), len(self.teacher_bytes),
                                     topk=self.topk, max_pieces=self.max_pieces, decay=self.decay,
                                     pin_exact=self.pin_exact)
        for name, value in zip(("student_ids", "teacher_ids", "weights"), entries, strict=True):
            setattr(self, name, value.to(self.weights.device))  # a registered buffer stays one when reassigned

    @property
    def projection(self) -> tuple[Tensor, Tensor, Tensor]:
        """W as (student ids `[E]`, teacher ids `[E]`, weights `[E]`)."""
        return self.student_ids, self.teacher_ids, self.weights

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        at = inputs.alignment.teacher_at_start.masked_fill(~rollout.completion_mask, -1)  # [B, N]
        valid = at >= 0
        native = PositionRows(teacher_logits, at) if TEACHER_NATIVE_LOGITS in needs else None  # read when indexed
        device = teacher_logits.device
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, native_logits=native,
                             vocab_pairs=tuple(p.to(device) for p in self.pairs),
                             vocab_projection=tuple(x.to(device) for x in self.projection))
