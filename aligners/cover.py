"""Which student token a teacher continuation decides: the relative cover behind `exact_spans`' trees.

A node of the continuation tree is a state: the bytes the teacher must still spell (the part of the student token's
text written inside the teacher token the tree starts at; empty at a shared token start) and the student-side text
since the student token began. A teacher token x moves a state to a child state, decides the student's next token,
or is dropped:
- the text after x is a proper prefix of some student token: still undecided, a child node (a longer student token
  may follow);
- otherwise the student's next token is the first token of the student tokenizer's encoding of that text (the
  relative cover of Lossless Vocabulary Reduction, arXiv 2510.08102: the student token that text begins with);
- EOS ends the text: the first token of the text so far, or the student's EOS when there is none;
- x cannot spell the bytes still needed, or spells text the student cannot: dropped (the target is renormalised).
`Cover.table` builds this split for every teacher token of a state once, and keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .bytes import TokenBytes, byte_level_alphabet
from .trie import prefixless_encoder

__all__ = ["Cover", "CoverTable", "State"]

State = tuple[bytes, bytes]  # (bytes the teacher must still spell, student-side text since the student token began)


@dataclass
class CoverTable:
    """How a node's teacher distribution splits: leaves `[V_t]` (student id, -1: no leaf) and open children."""

    leaf: Tensor  # [V_t] student token decided by each teacher token, -1 for open children and dropped tokens
    open_ids: Tensor  # [o] teacher tokens leading to a node still undecided
    fallback: Tensor  # [o] where each one's mass goes when it is not expanded (-1: dropped)
    states: list[State]  # [o] the child's state



class Cover:
    """The split of a teacher distribution at every tree state, for one (student, teacher) pair."""

    def __init__(self, student: TokenBytes, teacher: TokenBytes, student_tokenizer) -> None:
        self.student, self.teacher = student, teacher
        self.encoder = prefixless_encoder(student_tokenizer)
        self.open = {data[:k] for data in student.table if data for k in range(len(data))}  # proper prefixes
        self._first: dict[bytes, int] = {}
        self._tables: dict[State, CoverTable] = {}

    def first_tokens(self, texts: list[bytes]) -> list[int]:
        """First student token of each text's encoding (-1 when it has none), cached."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._first]
        valid, broken = [], []
        for t in todo:
            try:
                valid.append((t, t.decode()))
            except UnicodeDecodeError:
                broken.append(t)
        for (t, _), enc in zip(valid, self.encoder.encode_batch([s for _, s in valid],
                                                                         add_special_tokens=False), strict=True):
            self._first[t] = enc.ids[0] if enc.ids else -1
        alphabet = {b: ch for ch, b in byte_level_alphabet().items()}
        model = self.encoder.model
        for t in broken:  # a character cut by a byte token: byte-level students spell the bytes, others cannot
            ids = [model.token_to_id(x.value) for x in model.tokenize("".join(alphabet[b] for b in t))] \
                if self.student.spelling == "byte_level" else []
            self._first[t] = ids[0] if ids and ids[0] is not None else -1
        return [self._first[t] for t in texts]

    def table(self, state: State) -> CoverTable:
        """The split of a teacher distribution at a node in `state`, built once per state."""
        if state in self._tables:
            return self._tables[state]
        need, text = state
        teacher = self.teacher
        leaf = np.full(len(teacher), -1, dtype=np.int64)
        opened: list[tuple[int, State, bytes | None]] = []  # (teacher id, child state, text deciding its fallback)
        deciding: list[tuple[int, bytes]] = []
        for x, data in enumerate(teacher.table):
            if not data:
                continue
            if need:
                if need.startswith(data):
                    opened.append((x, (need[len(data):], b""), None))
                    continue
                if not data.startswith(need):
                    continue
                rest = data[len(need):]
            else:
                rest = text + data
            if rest == b"" or rest in self.open:
                opened.append((x, (b"", rest), rest or None))
            else:
                deciding.append((x, rest))
        firsts = self.first_tokens([t for _, t in deciding])
        for (x, _), u in zip(deciding, firsts, strict=True):
            leaf[x] = u
        if teacher.eos_id >= 0 and not need:  # the teacher stops: the text so far is the rest of the completion
            leaf[teacher.eos_id] = self.first_tokens([text])[0] if text else self.student.eos_id
        fallback = self.first_tokens([t or b"" for _, _, t in opened])
        fallback = [u if t else -1 for u, (_, _, t) in zip(fallback, opened, strict=True)]
        table = CoverTable(torch.from_numpy(leaf), torch.tensor([x for x, _, _ in opened], dtype=torch.long),
                       torch.tensor(fallback, dtype=torch.long), [s for _, s, _ in opened])
        self._tables[state] = table
        return table

