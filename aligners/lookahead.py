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

Vectorised: the trie is a node table built once (`_TrieTable`: each node's default and representative student
token, its children as sorted (node, teacher id) keys), and the path a walk takes depends on the realised teacher
ids alone, not on probabilities. So `plan` walks every start of a batch at once, one trie level per step (a loop
over depth, at most the longest student token's length in teacher tokens, never over positions), and lists the
teacher probabilities the walks read; `flow` turns those probabilities into sparse mass updates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .bytes import TokenBytes
from .columns import sum_columns
from .trie import decompose, prefixless_encoder

__all__ = ["Lookahead", "Walks"]


class _TrieTable:
    """Student tokens as a trie over teacher-token paths, as numpy arrays (node 0 is the root)."""

    def __init__(self, spelled: list[tuple[int, ...] | None], teacher: TokenBytes, encoder) -> None:
        children: list[dict[int, int]] = [{}]
        default, parent, token = [-1], [-1], [-1]
        for w in sorted((w for w, e in enumerate(spelled) if e), key=lambda w: (len(spelled[w]), w)):
            node = 0
            for x in spelled[w]:
                if x not in children[node]:
                    children[node][x] = len(children)
                    children.append({})
                    default.append(-1), parent.append(node), token.append(x)
                node = children[node][x]
            if default[node] < 0:
                default[node] = w
        # A path that is no student token sends stopping mass to the student's first token of its text.
        missing = [n for n in range(1, len(children)) if default[n] < 0]
        texts = [teacher.join(np.array(_path(n, parent, token))).decode("utf-8", "replace") for n in missing]
        for n, enc in zip(missing, encoder.encode_batch(texts, add_special_tokens=False) if texts else [], strict=True):
            default[n] = enc.ids[0] if enc.ids else -1
        rep = list(default)  # the shortest student token below a node: first children down to a token
        for n in reversed(range(len(children))):  # children are numbered after their parents
            if rep[n] < 0 and children[n]:
                rep[n] = rep[next(iter(children[n].values()))]
        edges = np.array(sorted((n, x, c) for n, kids in enumerate(children) for x, c in kids.items()),
                         dtype=np.int64).reshape(-1, 3)  # [E, 3] (node, teacher id, child), sorted
        self.width = int(edges[:, 1].max(initial=0)) + 1  # teacher ids from here on start no edge
        self.keys = edges[:, 0] * self.width + edges[:, 1]  # [E] sorted (node, teacher id) keys
        self.tid, self.child = edges[:, 1], edges[:, 2]  # [E]
        self.first = np.searchsorted(self.keys, np.arange(len(children) + 1) * self.width)  # [S + 1] CSR offsets
        self.default, self.rep = np.array(default), np.array(rep)  # [S]
        self.root_children = children[0]

    def edge(self, node: np.ndarray, tid: np.ndarray) -> np.ndarray:
        """Edge index of child `tid` of each `node` `[k]`, -1 where there is none."""
        if not len(self.keys):
            return np.full(len(node), -1)
        key = node * self.width + np.minimum(tid, self.width - 1)
        at = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        return np.where((tid < self.width) & (self.keys[at] == key), at, -1)


def _path(node: int, parent: list[int], token: list[int]) -> list[int]:
    path = []
    while node > 0:
        path.append(token[node])
        node = parent[node]
    return path[::-1]


@dataclass
class _Level:
    """One trie level of the walks still going: which stop, which read their node's children, which go on."""

    done: Tensor  # [f] walks (of this level) that stop here on a node with a default
    done_cols: Tensor  # [f] that default
    alive: Tensor  # [a] walks that read this level's teacher distribution
    edge_walk: Tensor  # [e] index into `alive` of each child read
    edge_cols: Tensor  # [e] the child's representative student token
    with_default: Tensor  # [d] index into `alive` of walks whose node has a default (text stopping there goes to it)
    defaults: Tensor  # [d] those defaults
    cont: Tensor  # [c] index into `alive` of walks going one level down the realised token
    cont_edge: Tensor  # [c] which of this level's children that is (index into the level's edges)
    cont_cols: Tensor  # [c] the realised child's representative
    walk: Tensor  # [w] start of each walk of this level
    query0: int  # index of this level's first query


@dataclass
class Walks:
    """The walks of a batch of starts, planned from the realised teacher ids alone."""

    queries: tuple[np.ndarray, ...]  # (row [Q], teacher position [Q], teacher id [Q]) probabilities to read, on the host
    deep: Tensor  # [n] starts whose realised token begins a longer student token (the first n queries)
    root_cols: Tensor  # [n] the column their realised token's mass leaves
    levels: list[_Level]


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
        self.table = _TrieTable(spelled, teacher, prefixless_encoder(student_tokenizer))
        self.root_map = first_student.clone()  # [V_t] where each teacher token's mass goes at the root
        for x, child in self.table.root_children.items():
            self.root_map[x] = int(self.table.rep[child])
        self._root_map = self.root_map.numpy()

    def plan(self, realised: np.ndarray, lengths: np.ndarray, batch: np.ndarray, pos: np.ndarray,
             device: torch.device | str = "cpu") -> Walks:
        """The walks from teacher positions where a student token starts too, one trie level at a time (numpy:
        integer bookkeeping on the realised ids, cheap on the host), as tensors on `device`.

        Args:
            realised: `[B, M]` the teacher tokens of the completions.
            lengths: `[B]` valid teacher completion positions per row.
            batch, pos: `[n]` row and teacher completion position of each start.
        """
        table = self.table
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
        token = realised[batch, pos]  # [n]
        edge = table.edge(np.zeros_like(token), token)
        node = table.child[np.maximum(edge, 0)] if len(table.child) else np.zeros_like(token)
        deep = np.flatnonzero((edge >= 0) & (table.first[node + 1] > table.first[node]))
        queries, levels, query0 = [(batch[deep], pos[deep], token[deep])], [], len(deep)
        walk, node, at = deep, node[deep], pos[deep] + 1
        while len(walk):
            n_kids = table.first[node + 1] - table.first[node]
            reads = (n_kids > 0) & (at < lengths[batch[walk]])
            done = np.flatnonzero(~reads)
            done = done[table.default[node[done]] >= 0]
            alive = np.flatnonzero(reads)
            node_a, row_a, at_a, counts = node[alive], batch[walk[alive]], at[alive], n_kids[alive]
            edge_walk = np.repeat(np.arange(len(alive)), counts)  # [e]
            offsets = np.cumsum(counts) - counts  # [a] first of each walk's edges
            edges = table.first[node_a][edge_walk] + np.arange(len(edge_walk)) - offsets[edge_walk]
            queries.append((row_a[edge_walk], at_a[edge_walk], table.tid[edges]))
            real = table.edge(node_a, realised[row_a, at_a])  # [a] the realised child's edge
            cont = np.flatnonzero(real >= 0)
            child, defaults = table.child[real[cont]], table.default[node_a]
            levels.append(_Level(*map(t, (
                done, table.default[node[done]], alive, edge_walk, table.rep[table.child[edges]],
                np.flatnonzero(defaults >= 0), defaults[defaults >= 0], cont,
                offsets[cont] + real[cont] - table.first[node_a[cont]], table.rep[child], walk)), query0))
            query0 += len(edges)
            walk, node, at = walk[alive][cont], child, at_a[cont] + 1
        return Walks(tuple(np.concatenate(q) for q in zip(*queries, strict=True)), t(deep),
                     t(self._root_map[token[deep]]), levels)

    @staticmethod
    def flow(walks: Walks, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mass updates `(start [u], student id [u], mass [u])` from the probabilities `q` `[Q]` of `walks.queries`,
        to be added (ids repeat) to the first-level student-token masses of the starts."""
        mass = q[: len(walks.deep)]  # [n] the realised token's mass continues below instead
        parts = [(walks.deep, walks.root_cols, -mass)]
        for lv in walks.levels:
            parts.append((lv.walk[lv.done], lv.done_cols, mass[lv.done]))
            live, owner = mass[lv.alive], lv.walk[lv.alive]  # [a]
            q_kids = q[lv.query0 : lv.query0 + len(lv.edge_walk)]  # [e]
            kids = q_kids * live[lv.edge_walk]
            parts.append((owner[lv.edge_walk], lv.edge_cols, kids))
            rest = live - torch.zeros_like(live).index_add_(0, lv.edge_walk, kids)  # text stopping at this node
            parts.append((owner[lv.with_default], lv.defaults, rest[lv.with_default]))
            mass = live[lv.cont] * q_kids[lv.cont_edge]
            parts.append((owner[lv.cont], lv.cont_cols, -mass))
        start, column, value = (torch.cat(x) for x in zip(*parts, strict=True))
        return start, column, value

    def project(self, probs: Tensor, starts, realised, lengths, probs_at: Callable[[Tensor, Tensor, Tensor], Tensor],
                size: int) -> Tensor:
        """Student-token masses `[c, size]` at teacher positions where a student token starts too.

        Args:
            probs: `[c, V_t]` the teacher's next-token distributions at those positions.
            starts: `[c, 2]` (row, teacher completion position) of each of the c positions (a tensor or pairs).
            realised: `[B, M]` the teacher tokens of the completions (a tensor, or one list per row).
            lengths: `[B]` valid teacher completion positions per row.
            probs_at: `(rows [k], positions [k], ids [k]) -> [k]` the teacher's probabilities of some tokens at
                later positions, read where a walk goes below the first level.
            size: the student's vocabulary size.
        """
        starts = np.asarray(torch.as_tensor(starts).cpu(), dtype=np.int64).reshape(-1, 2)
        if not isinstance(realised, Tensor):
            realised = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(r) for r in realised], batch_first=True)
        walks = self.plan(realised.cpu().numpy(), np.asarray(torch.as_tensor(lengths).cpu()), starts[:, 0],
                          starts[:, 1], probs.device)
        n = len(walks.deep)
        rows, at, ids = (torch.from_numpy(x).to(probs.device) for x in walks.queries)
        q = torch.cat([probs[walks.deep, ids[:n]], probs_at(rows[n:], at[n:], ids[n:]).to(probs.dtype)])
        start, column, value = self.flow(walks, q)
        out = sum_columns(probs, self.root_map, size).contiguous()  # [c, size]
        out.view(-1).index_add_(0, start * size + column, value)
        return out.clamp_min_(0)
