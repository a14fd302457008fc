"""Teacher tokens spelled in student tokens: the map that carries a teacher distribution into the student's vocabulary.

Every teacher token v is decomposed into the student tokens that spell its bytes, D(v) (the student tokenizer run
on v's text, with its dummy prefix and special tokens switched off). Two projections follow, both mass-conserving
and computed from one teacher call per position:
- at a position where both models start a token (the teacher's next token is the student's next text), the
  teacher's probability of the next *student* token u is the mass of every teacher token whose decomposition
  starts with u: p(u) = Σ_{v : D(v)[0] = u} p_T(v);
- inside a teacher token, after the student tokens P already emitted since it began, the next student token u gets
  p(u | P) = Σ_{v : D(v) starts with P·u} p_T(v) / Σ_{v : D(v) starts with P, D(v) ≠ P}.
  (The branch where the teacher token ends exactly after P needs the teacher's next call, which the student's
  path does not contain; it is dropped and the rest renormalised. When the student's vocabulary is a BPE subset
  of the teacher's, Phan, Khisti & Ullrich, ICLR 2026, show this is the teacher's likelihood of the student's
  tokens under its canonical tokenization.)
Teacher tokens whose bytes the student cannot spell exactly carry no mass into the student vocabulary; the lost
share is reported as the projection's mass coverage.
"""

from __future__ import annotations

import json
import weakref

import numpy as np
import torch
from torch import Tensor

from .bytes import TokenBytes, byte_level_alphabet
from .columns import sum_columns

__all__ = ["TokenTrie", "decompose", "prefixless_encoder"]


def _without_prefix(node):
    """A tokenizers JSON component with SentencePiece dummy prefixes switched off (recursively)."""
    if isinstance(node, dict):
        if node.get("type") == "Metaspace":
            node = {**node, "prepend_scheme": "never", "add_prefix_space": False}
        if node.get("type") == "Sequence":
            key = "normalizers" if "normalizers" in node else "pretokenizers"
            node = {**node, key: [_without_prefix(c) for c in node.get(key, []) if c.get("type") != "Prepend"]}
        if node.get("type") == "ByteLevel":
            node = {**node, "add_prefix_space": False}
    return None if isinstance(node, dict) and node.get("type") == "Prepend" else node


_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prefixless_encoder(tokenizer):
    """A copy of `tokenizer`'s backend that adds nothing: no dummy-prefix space, no BOS/EOS, no truncation.

    Built once per tokenizer object (rebuilding from JSON takes ~0.4 s for a 49k vocabulary) and cached while the
    tokenizer lives; a tokenizer changed in place after the first call keeps its first encoder.
    """
    if tokenizer in _ENCODERS:
        return _ENCODERS[tokenizer]
    from tokenizers import Tokenizer

    config = json.loads(tokenizer.backend_tokenizer.to_str())
    config["normalizer"] = _without_prefix(config.get("normalizer"))
    config["pre_tokenizer"] = _without_prefix(config.get("pre_tokenizer"))
    config["post_processor"], config["truncation"], config["padding"] = None, None, None
    _ENCODERS[tokenizer] = encoder = Tokenizer.from_str(json.dumps(config))
    return encoder


def decompose(teacher: TokenBytes, student: TokenBytes, student_tokenizer) -> list[tuple[int, ...] | None]:
    """D(v) for every id of the `teacher` table: ids of `student_tokenizer` spelling exactly its bytes, or None.

    Symmetric in use: swap the roles to spell student tokens in teacher tokens. EOS maps to EOS.
    """
    encoder = prefixless_encoder(student_tokenizer)
    texts, where = [], []
    out: list[tuple[int, ...] | None] = [None] * len(teacher)
    fallback = {b: student_tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    alphabet = {b: ch for ch, b in byte_level_alphabet().items()}
    for v, data in enumerate(teacher.table):
        if not data:
            continue
        try:
            texts.append(data.decode())
            where.append(v)
        except UnicodeDecodeError:  # a lone byte of a multi-byte character
            if student.spelling == "byte_level":
                out[v] = tuple(encoder.model.token_to_id(t.value) for t in
                               encoder.model.tokenize("".join(alphabet[b] for b in data)))
            elif all(fallback[b] not in (None, student_tokenizer.unk_token_id) for b in data):
                out[v] = tuple(fallback[b] for b in data)
    for v, enc in zip(where, encoder.encode_batch(texts, add_special_tokens=False), strict=True):
        out[v] = tuple(enc.ids)
    for v, ids in enumerate(out):  # keep only exact spellings
        if ids is not None and (not ids or None in ids or student.join(np.array(ids)) != teacher.table[v]):
            out[v] = None
    if teacher.eos_id >= 0 and student.eos_id >= 0:
        out[teacher.eos_id] = (student.eos_id,)
    return out


class TokenTrie:
    """Decompositions of the teacher vocabulary into student tokens, sorted for range queries.

    Teacher ids are sorted by their decomposition, so the tokens whose decomposition starts with a path P form one
    contiguous range, and each child P·u a contiguous sub-range: masses are differences of a cumulative sum. The
    ranges of many paths are found at once, one depth at a time: at depth d the sorted rows are numbered by their
    prefix of length d (`groups`), so (group, next id) is a sorted key that `searchsorted` narrows each range by.
    """

    def __init__(self, teacher: TokenBytes, student: TokenBytes, student_tokenizer, student_vocab_size: int) -> None:
        decomps = decompose(teacher, student, student_tokenizer)
        mappable = [v for v, d in enumerate(decomps) if d is not None]
        mappable.sort(key=lambda v: decomps[v])
        self.decomps = decomps
        self.sorted_paths = [decomps[v] for v in mappable]
        self.order = torch.tensor(mappable, dtype=torch.long)  # [K] teacher ids in decomposition order
        width = max((len(p) for p in self.sorted_paths), default=1)
        self.table = np.full((len(mappable), width + 1), -1, dtype=np.int64)  # [K, L + 1] -1 padded
        for row, path in enumerate(self.sorted_paths):
            self.table[row, : len(path)] = path
        self.first = torch.tensor([-1 if d is None else d[0] for d in decomps], dtype=torch.long)  # [V_t]
        self.student_vocab_size = student_vocab_size
        self.groups, self.group_starts = _prefix_groups(self.table)
        self.keys = self.groups[: width + 1] * (student_vocab_size + 1) + self.table.T + 1  # [L + 1, K] sorted rows

    def marginal(self, probs: Tensor) -> Tensor:
        """First-student-token masses `[n, V_s]` of teacher distributions `probs` `[n, V_t]` (rows sum to ≤ 1)."""
        return sum_columns(probs, self.first, self.student_vocab_size)

    def children(self, paths: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
        """Children of many paths (`[n, L]` -1 padded, `[n]` lengths): (path index, student id, range start, range
        end), each `[e]`, in sorted order. A path longer than every decomposition (a student spelling of a teacher
        token in more pieces than its own tokenizer makes) continues none: it has no children."""
        size, n = len(self.table), len(paths)
        if not size:
            return (np.zeros(0, dtype=np.int64),) * 4
        width = self.table.shape[1] - 1  # the longest decomposition
        lo, hi = np.zeros(n, dtype=np.int64), np.where(lengths <= width, size, 0).astype(np.int64)
        for d in range(min(int(lengths.max(initial=0)), width)):  # narrow each range to the rows continuing the path
            on = np.flatnonzero((lengths > d) & (hi > lo))  # at depth d
            key = self.groups[d, lo[on]] * (self.student_vocab_size + 1) + paths[on, d] + 1
            lo[on], hi[on] = np.searchsorted(self.keys[d], key, "left"), np.searchsorted(self.keys[d], key, "right")
        found = hi > lo
        below = np.minimum(lengths, width) + 1  # children are the groups one level below a path, inside its range
        first = np.where(found, self.groups[below, np.minimum(lo, size - 1)], 0)
        count = np.where(found, self.groups[below, np.maximum(hi - 1, 0)] - first + 1, 0)
        path = np.repeat(np.arange(len(lo)), count)
        group = first[path] + np.arange(len(path)) - (np.cumsum(count) - count)[path]
        starts, ends = (self.group_starts[below[path], group + k] for k in (0, 1))
        ids = self.table[starts, lengths[path]]
        keep = ids >= 0  # the row where D(v) == P has no next student token
        return path[keep], ids[keep], starts[keep], ends[keep]

    def conditional(self, probs: Tensor, paths: list[tuple[int, ...]]) -> Tensor:
        """Next-student-token distributions `[n, V_s]` given the student tokens `paths[r]` already inside the teacher
        token predicted by row r of `probs` (`[n, V_t]`). Rows with an empty path are `marginal`."""
        lengths = np.array([len(p) for p in paths], dtype=np.int64)
        padded = np.full((len(paths), int(lengths.max(initial=0)) + 1), -1, dtype=np.int64)  # [n, L]
        for r, p in enumerate(paths):
            padded[r, : len(p)] = p
        return self.conditional_padded(probs, padded, lengths)

    def conditional_padded(self, probs: Tensor, padded: np.ndarray, lengths: np.ndarray) -> Tensor:
        """`conditional` with the paths given as rows of `padded` `[n, L]` (row r's first `lengths[r]` entries).

        A child's mass is the sum of the teacher probabilities over its range of the trie's sorted rows: only the
        entries of those ranges are read (`entries`; a few per child, the rows' whole vocabularies are not sorted or
        summed), and shared out in float64 (`shares`)."""
        out = self.marginal(probs)
        deep = np.flatnonzero(lengths > 0)
        if not len(deep):
            return out
        local, ids, child, teacher_ids = self.entries(padded[deep], lengths[deep])
        t = lambda a: torch.from_numpy(a).to(probs.device)
        share, _ = self.shares(probs[t(deep[local[child]]), t(teacher_ids)], t(local), t(child), len(deep))
        deep_t = t(deep)
        out.index_fill_(0, deep_t, 0.0)  # the deep rows: their children's shares only
        out.index_put_((deep_t[t(local)], t(ids)), share.to(out.dtype))  # a path's children have distinct ids
        return out

    def entries(self, paths: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
        """The children of many paths (`children`) and the teacher tokens whose probabilities make up their masses:
        (each child's path index `[e]`, its student id `[e]`, each entry's child `[E]`, its teacher id `[E]`), entries
        in the order of their paths."""
        local, ids, lo, hi = self.children(paths, lengths)
        size = hi - lo
        child = np.repeat(np.arange(len(lo)), size)  # each read entry's child
        entry = lo[child] + np.arange(len(child)) - (np.cumsum(size) - size)[child]  # its sorted row
        return local, ids, child, self.order.numpy()[entry]

    @staticmethod
    def shares(read: Tensor, local: Tensor, child: Tensor, n_paths: int) -> tuple[Tensor, Tensor]:
        """Each child's share of its path's mass, `[e]` float64, from the probabilities `read` `[E]` at `entries`'
        teacher ids (on any one scale per path: normalised, or a row's unnormalised exps), accumulated in float64 so
        that the shares are exact to fp32; and the sum of each path's shares `[n_paths]` (1, or 0 where its children
        have no mass)."""
        mass = read.new_zeros(len(local), dtype=torch.float64).index_add_(0, child, read.double())  # [e]
        totals = mass.new_zeros(n_paths).index_add_(0, local, mass)  # [n_paths]
        share = mass / totals[local].clamp_min(torch.finfo(torch.float64).tiny)
        return share, mass.new_zeros(n_paths).index_add_(0, local, share)


def _prefix_groups(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Number the sorted rows of `table` `[K, W]` by their prefix of each length d = 0..W+1: (`groups[d, row]`
    `[W + 2, K]`, `starts[d, g]`: first row of group g, then K, padded with K, `[W + 2, K + 1]`)."""
    k, w = table.shape
    new = np.zeros((w + 2, k), dtype=bool)  # new[d, r]: row r's prefix of length d differs from row r - 1's
    if k:
        new[:, 0] = True
        for d in range(1, w + 2):
            new[d, 1:] = new[d - 1, 1:] | (table[1:, min(d, w) - 1] != table[:-1, min(d, w) - 1])
    groups = np.cumsum(new, axis=1) - 1
    starts = np.full((w + 2, k + 1), k, dtype=np.int64)
    for d in range(w + 2):
        at = np.flatnonzero(new[d])
        starts[d, : len(at)] = at
    return groups, starts
