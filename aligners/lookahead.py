"""Lookahead: the teacher's probability of the student's next token when student tokens span several teacher tokens.

Where the student's token is longer than the teacher's (a BPE student with multi-digit numbers against a
character-level teacher, or SmolLM2 against Gemma on many words), one teacher distribution cannot say how likely a
student token is: "46" needs p(4) and p(6 | 4). The teacher has already scored every position of the rollout, so
along the realised text those later distributions exist. Each student token w is spelled in teacher tokens, E(w),
and the student tokens form a trie over teacher-token paths. From a position where both models start a token, the
teacher's mass flows down that trie along the realised path:
- at depth m (the teacher distribution q_m after the realised teacher tokens r_0..r_{m-1}), a teacher token x that
  starts a deeper student token carries mass·q_m(x) to the shortest student token in its subtree, unless x is the
  realised r_m, whose mass continues one level down (where q_{m+1} is known);
- teacher tokens that extend no student token stop the walk: their mass goes to the student token spelled by the
  path so far (the student's longest match), or, where the path itself is no student token, to the student's first
  token of its text.
Mass is conserved, and along the realised path every student token gets exactly the teacher's likelihood of its
text; off the path, longer student tokens are approximated by their first teacher token (one teacher call there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .bytes import TokenBytes
from .trie import decompose, prefixless_encoder, sum_columns

__all__ = ["Lookahead"]


@dataclass
class _Node:
    default: int  # student token for text that stops extending this path (-1: none)
    children: dict[int, _Node] = field(default_factory=dict)
    child_ids: Tensor | None = None  # [c] teacher ids of the children
    child_reps: Tensor | None = None  # [c] shortest student token in each child's subtree


class Lookahead:
    """Student tokens as a trie over teacher-token paths, walked along the realised teacher tokens."""

    def __init__(self, student: TokenBytes, teacher: TokenBytes, teacher_tokenizer, student_tokenizer,
                 first_student: Tensor) -> None:
        """
        Args:
            student, teacher: the two byte tables.
            teacher_tokenizer: spells student tokens in teacher tokens.
            student_tokenizer: gives the first student token of a path's text where the path is no student token.
            first_student: `[V_t]` first student token of each teacher token's spelling (`TokenTrie.first`).
        """
        spelled = decompose(student, teacher, teacher_tokenizer)  # E(w) for each student id
        self.root = _Node(-1)
        for w in sorted((w for w, e in enumerate(spelled) if e), key=lambda w: (len(spelled[w]), w)):
            node = self.root
            for x in spelled[w]:
                node = node.children.setdefault(x, _Node(-1))
            if node.default < 0:
                node.default = w
        encoder = prefixless_encoder(student_tokenizer)
        self._finish(self.root, (), teacher, encoder)
        self.root_map = first_student.clone()  # [V_t] where each teacher token's mass goes at the root
        for x, child in self.root.children.items():
            self.root_map[x] = child.default if child.default >= 0 else self._rep(child)

    def _finish(self, node: _Node, path: tuple[int, ...], teacher: TokenBytes, encoder) -> None:
        if node.default < 0 and path:
            ids = encoder.encode(teacher.join(torch.tensor(path).numpy()).decode("utf-8", "replace"),
                                 add_special_tokens=False).ids
            node.default = ids[0] if ids else -1
        for x, child in node.children.items():
            self._finish(child, (*path, x), teacher, encoder)
        if node.children:
            node.child_ids = torch.tensor(list(node.children))
            node.child_reps = torch.tensor([self._rep(c) for c in node.children.values()])

    def _rep(self, node: _Node) -> int:
        while node.default < 0 and node.children:
            node = next(iter(node.children.values()))
        return node.default

    def project(self, probs: Tensor, starts: list[tuple[int, int]], realised: list[list[int]], lengths: list[int],
                probs_at: Callable[[int, int, Tensor], Tensor], size: int) -> Tensor:
        """Student-token masses `[c, size]` at teacher positions where a student token starts too.

        Args:
            probs: `[c, V_t]` the teacher's next-token distributions at those positions.
            starts: (row, teacher completion position) of each of the c positions.
            realised: per row, the teacher tokens of the completion.
            lengths: per row, its number of valid teacher completion positions.
            probs_at: `(row, position, ids [k]) -> [k]` the teacher's probabilities of some tokens at a later
                position, read only when the walk goes below the first level.
            size: the student's vocabulary size.
        """
        out = sum_columns(probs, self.root_map, size)
        for k, (b, c) in enumerate(starts):
            token = realised[b][c]
            node = self.root.children.get(token)
            if node is None or not node.children:
                continue
            mass = probs[k, token]
            out[k, self.root_map[token]] -= mass  # continues below instead
            self._walk(out[k], lambda pos, ids, b=b: probs_at(b, pos, ids), realised[b], c + 1, lengths[b], node, mass)
        return out.clamp_min_(0)

    def _walk(self, out: Tensor, probs_at: Callable[[int, Tensor], Tensor], realised: list[int], pos: int,
              length: int, node: _Node, mass: Tensor) -> None:
        while node.children and pos < length:
            ids = torch.cat([node.child_ids, torch.tensor([realised[pos]])]).to(out.device)
            q = probs_at(pos, ids)  # [c + 1]: the children, then the realised token
            qc = q[:-1] * mass
            out.index_add_(0, node.child_reps.to(out.device), qc)
            if node.default >= 0:
                out[node.default] += mass - qc.sum()
            child = node.children.get(realised[pos])
            if child is None:
                return
            out[self._rep(child)] -= mass * q[-1]
            mass, node, pos = mass * q[-1], child, pos + 1
        if node.default >= 0:
            out[node.default] += mass
