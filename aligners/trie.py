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

import bisect
import json
import weakref

import numpy as np
import torch
from torch import Tensor

from .bytes import TokenBytes, byte_level_alphabet

__all__ = ["TokenTrie", "decompose", "prefixless_encoder", "sum_columns"]


def sum_columns(values: Tensor, index: Tensor, size: int) -> Tensor:
    """Sum the last axis of `values` `[..., V]` into `size` columns: column `index[v]` `[V]`, skipped where -1.

    Skipped entries go to one extra column that is dropped, cheaper than selecting the others first.
    """
    index = index[: values.shape[-1]].to(values.device)
    out = values.new_zeros(*values.shape[:-1], size + 1).index_add_(-1, index.where(index >= 0, size), values)
    return out[..., :size]


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
    contiguous range, and each child P·u a contiguous sub-range: masses are differences of a cumulative sum.
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

    def marginal(self, probs: Tensor) -> Tensor:
        """First-student-token masses `[n, V_s]` of teacher distributions `probs` `[n, V_t]` (rows sum to ≤ 1)."""
        return sum_columns(probs, self.first, self.student_vocab_size)

    def children(self, path: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Children of `path`: (student ids, range starts, range ends) in sorted order."""
        lo = bisect.bisect_left(self.sorted_paths, path)
        hi = bisect.bisect_left(self.sorted_paths, (*path[:-1], path[-1] + 1)) if path else len(self.sorted_paths)
        column = self.table[lo:hi, len(path)]  # next student id of each token in range; -1 when D(v) == path
        starts = np.flatnonzero(np.diff(column, prepend=-2)) + lo
        ids = self.table[starts, len(path)]
        ends = np.append(starts[1:], hi)
        keep = ids >= 0
        return ids[keep], starts[keep], ends[keep]

    def conditional(self, probs: Tensor, paths: list[tuple[int, ...]]) -> Tensor:
        """Next-student-token distributions `[n, V_s]` given the student tokens `paths[r]` already inside the teacher
        token predicted by row r of `probs` (`[n, V_t]`). Rows with an empty path are `marginal`."""
        out = self.marginal(probs)
        deep = [r for r, p in enumerate(paths) if p]
        if not deep:
            return out
        rows, ids, lo, hi = [], [], [], []
        for r in deep:
            c_ids, c_lo, c_hi = self.children(paths[r])
            rows.append(np.full(len(c_ids), r))
            ids.append(c_ids)
            lo.append(c_lo)
            hi.append(c_hi)
        rows_t, ids_t = (torch.from_numpy(np.concatenate(x)).to(probs.device) for x in (rows, ids))
        lo_t, hi_t = (torch.from_numpy(np.concatenate(x)).to(probs.device) for x in (lo, hi))
        deep_t = torch.tensor(deep, device=probs.device)
        sorted_probs = probs[deep_t][:, self.order.to(probs.device)]  # [d, K]
        cs = torch.nn.functional.pad(sorted_probs.double().cumsum(-1), (1, 0))  # [d, K + 1]
        local = torch.searchsorted(deep_t, rows_t)  # row of cs for each child
        mass = (cs[local, hi_t] - cs[local, lo_t]).to(probs.dtype)  # [children]
        out[deep_t] = 0
        out.index_put_((rows_t, ids_t), mass, accumulate=True)
        total = out[deep_t].sum(-1, keepdim=True)
        out[deep_t] = out[deep_t] / total.clamp_min(torch.finfo(probs.dtype).tiny)
        return out
