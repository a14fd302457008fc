"""Exact spans: the teacher's probability of every student token's text, off the realised path too.

`byte_spans` walks the teacher's later distributions along the realised text only, so a longer student token that
begins with another teacher token than the realised one gets only that first token's mass ("57" is credited to "5"
when the rollout wrote "46"). Here the walk branches: at an aligned position the teacher's continuations form a tree,
and every branch that can still spell a longer student token is queried one teacher token further
(`branches.BranchQueries`: one forward per tree level over the main pass's KV cache, each node one token), until the
text decides the student's next token; branches less likely than `min_mass` are left unqueried.

The target at a student position is the teacher's distribution over the student's next token, defined by the text
the teacher would write (the relative cover of Lossless Vocabulary Reduction, arXiv 2510.08102, for any pair):
p(u) = Σ over teacher continuations x_1..x_m whose text s first *decides* u, of p_T(x_1..x_m | prefix). A text s
decides the student's next token once it is not a proper prefix of any student token: u is then the first token of
the student tokenizer's encoding of s (of the text up to EOS, when the teacher stops first). Teacher tokenizations of
the same text are summed, so this is the teacher's likelihood of text, not of one tokenization. At a student token
that starts inside a teacher token, the tree starts at that teacher token, keeps only continuations that spell the
bytes already written since it began, and the target is renormalised over them (for a BPE-subset pair this is the
exact scoring of arXiv 2512.14954). With `branches` and `depth` unbounded and `min_mass` 0 the target equals the
brute-force one (tests/aligner_reference.py); a node left unexpanded gives its mass to the first student token of its text, which is
`byte_spans`' rule (a branch still spelling bytes already written is dropped instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opd_lightning.rollout import Rollout
from opd_lightning.target import TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TeacherTarget

from .base import ALIGNERS, TeacherInputs, dense_token_logprobs
from .branches import Branch, BranchQueries
from .columns import sum_columns
from .cover import Cover, CoverTable, State
from .text import TextAligner, mass_to_logits

__all__ = ["ExactSpanAligner"]

@dataclass
class _Node:
    out: int  # output row: which aligned student position's tree it belongs to
    row: int  # batch row
    root: int  # teacher completion position of the tree's root
    depth: int  # teacher tokens below the root
    state: State
    mass: float
    realised: bool  # its path is the rollout's own teacher tokens
    keys_end: int  # main-pass cache slots it reads
    ancestors: tuple[int, ...]  # cache slots of off-path ancestors
    slot: int = -1  # its own cache slot (branch nodes)


@ALIGNERS.register("exact_spans")
class ExactSpanAligner(TextAligner):
    """Byte-span alignment with branch queries: the teacher's likelihood of each student token's text, on or off
    the realised path, at every student position that starts inside or at a teacher token."""

    provides = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS})
    queries_teacher = True

    def __init__(self, branches: int | None = 8, depth: int | None = 4, min_mass: float = 1e-4,
                 lead_topk: int | None = None) -> None:
        """
        Args:
            branches: off-path children expanded per tree node, the most likely first (the realised child is always
                expanded); None: every child that can still spell a longer student token.
            depth: teacher tokens the tree may go below an aligned position; None: until every branch is decided.
            min_mass: off-path children are expanded only where the teacher's probability of their path from the
                aligned position is at least this; the mass of those left out (at most this much each) goes to the
                first student token of their text. 0: no threshold. The default queries about a tenth of the
                branches of an unbounded tree, 0.002 nats from the exact target (benchmarks/RESULTS.md).
            lead_topk: where a student token starts at a teacher token, keep only the teacher's k most likely first
                tokens there (renormalised) and the exact tree below them: the target is then the teacher's
                likelihood of each student token given that its text begins with one of the teacher's top-k next
                tokens. With a character teacher and whole-number student tokens, k = 1 fixes the teacher's leading
                digit and keeps its hedges on the digits after it. None: the exact target. Roots inside a teacher
                token (a student token starting mid-token) are left exact.
        """
        super().__init__()
        for name, value in (("branches", branches), ("depth", depth)):
            if value is not None and value < 0:
                raise ValueError(f"exact_spans: {name} must be >= 0 or null (unbounded), got {value}")
        if not 0.0 <= min_mass < 1.0:
            raise ValueError(f"exact_spans: min_mass must be in [0, 1), got {min_mass}")
        if lead_topk is not None and lead_topk < 1:
            raise ValueError(f"exact_spans: lead_topk must be >= 1 or null (every first token), got {lead_topk}")
        self.branches, self.depth, self.min_mass, self.lead_topk = branches, depth, min_mass, lead_topk
        self.cover: Cover | None = None
        self.last_query_tokens = 0  # teacher tokens queried off the main pass in the last `project`

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        super().bind(student_tokenizer, teacher_tokenizer, student_vocab_size, teacher_vocab_size)
        self.cover = Cover(self.student_bytes, self.teacher_bytes, student_tokenizer)

    # ---- projection -------------------------------------------------------------------------------------------
    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        if inputs.branches is None:
            raise ValueError("exact_spans queries the teacher off the realised path and needs the main pass's KV "
                             "cache (TeacherInputs.branches); the reference scorer provides it")
        view = inputs.alignment
        positions, roots = self._roots(view, rollout)
        mass = self._expand(roots, teacher_logits, inputs, view)  # [n, V_s]
        b_i = torch.tensor(positions, dtype=torch.long).reshape(-1, 2)
        logp, kept = mass_to_logits(mass)
        shape = rollout.completion_mask.shape
        out = torch.zeros((*shape, self.student_vocab_size), device=teacher_logits.device)
        valid = torch.zeros(shape, dtype=torch.bool, device=teacher_logits.device)
        out[b_i[:, 0], b_i[:, 1]] = logp.to(out.device)
        valid[b_i[:, 0], b_i[:, 1]] = (kept > 0).to(valid.device)
        tokens = dense_token_logprobs(out, rollout, valid) if TEACHER_TOKEN_LOGPROBS in needs else None
        return TeacherTarget(coverage=self.coverage(valid, rollout), mask=valid, logits=out, token_logprobs=tokens,
                             mass_coverage=float(kept.mean()) if len(kept) else 0.0)

    def _roots(self, view, rollout: Rollout) -> tuple[list[tuple[int, int]], list[_Node]]:
        """A tree root per student completion token with a teacher token at or around its start, and its (row,
        student position)."""
        prompt = view.input_ids.shape[1] - view.teacher_ids.shape[1]
        completion = rollout.completion_mask.cpu()
        at, containing = view.teacher_at_start.cpu(), view.containing.cpu()
        ids, t_ids = rollout.completion_ids.cpu().numpy(), view.teacher_ids.cpu().numpy()
        t_len = view.teacher_mask.sum(-1).tolist()
        positions, roots = [], []
        for b, i in completion.nonzero().tolist():
            c = int(at[b, i])
            need = b""
            if c < 0:
                c = int(containing[b, i])
                if c < 0:
                    continue
                row = ids[b, : int(completion[b].sum())]
                written = self.student_bytes.join(row[:i])  # the completion's bytes before student token i
                t_lengths = self.teacher_bytes.lengths[t_ids[b, :c]]
                spelled = self.teacher_bytes.join(t_ids[b, :c])
                if t_ids[b, c] != self.teacher_bytes.eos_id and self.teacher_bytes.lengths[t_ids[b, c]] == 0:
                    continue  # a teacher token without bytes (UNK): the text there cannot be followed
                if len(spelled) != int(t_lengths.sum()) or not written.startswith(spelled):
                    continue
                need = written[len(spelled):]
            roots.append(_Node(out=len(roots), row=b, root=c, depth=0, state=(need, b""), mass=1.0,
                               realised=c < t_len[b], keys_end=prompt + c, ancestors=()))
            positions.append((b, i))
        return positions, roots

    def _expand(self, roots: list[_Node], teacher_logits: Tensor, inputs: TeacherInputs, view) -> Tensor:
        """Walk every root's tree level by level; the student-token masses `[n, V_s]`."""
        queries: BranchQueries = inputs.branches
        start_tokens = queries.tokens
        prompt = view.input_ids.shape[1] - view.teacher_ids.shape[1]
        m = view.teacher_ids.shape[1]
        t_ids, t_len = view.teacher_ids.cpu().numpy(), view.teacher_mask.sum(-1).tolist()
        root_pos = inputs.position_ids.cpu().numpy()
        device = teacher_logits.device
        out = torch.zeros(len(roots), self.student_vocab_size + 1, dtype=torch.float64)  # last column: dropped
        level, logits = roots, teacher_logits[[r.row for r in roots], [r.root for r in roots]]
        while level:
            probs = torch.softmax(logits.double().cpu(), -1)  # [n, V_t]
            if level is roots and self.lead_topk is not None:
                probs = self._lead(probs, roots)
            nxt, branch_nodes = [], []
            by_state: dict[State, list[int]] = {}
            for k, node in enumerate(level):
                by_state.setdefault(node.state, []).append(k)
            for state, members in by_state.items():
                table = self.cover.table(state)
                rows = torch.tensor(members)
                weights = torch.tensor([level[k].mass for k in members], dtype=torch.float64)
                p = probs[rows] * weights[:, None]  # [k, V_t] path mass times the node's distribution
                targets = torch.tensor([level[k].out for k in members])
                out.index_add_(0, targets, sum_columns(p, table.leaf, self.student_vocab_size + 1))
                if not len(table.open_ids):
                    continue
                child = p[:, table.open_ids]  # [k, o]
                expand = self._choose(child, members, level, table, t_ids, t_len)
                fallback = table.fallback.where(table.fallback >= 0, self.student_vocab_size)
                out.index_put_((targets[:, None].expand_as(child), fallback.expand_as(child)),
                               child.masked_fill(expand, 0.0), accumulate=True)
                chosen = expand.nonzero().tolist()
                masses = child[expand].tolist()
                open_ids = table.open_ids.tolist()
                for (a, o), mass in zip(chosen, masses, strict=True):
                    parent = level[members[a]]
                    x = open_ids[o]
                    node = _Node(out=parent.out, row=parent.row, root=parent.root, depth=parent.depth + 1,
                                 state=table.states[o], mass=mass,
                                 realised=parent.realised and self._realised_next(parent, t_ids, t_len) == x,
                                 keys_end=parent.keys_end,
                                 ancestors=(*parent.ancestors, parent.slot) if parent.slot >= 0 else parent.ancestors)
                    at = parent.root + node.depth
                    if node.realised and at <= t_len[parent.row] and at < m:  # the main pass already scored it
                        node.keys_end = prompt + at
                    else:
                        node.realised = False
                        position = int(root_pos[parent.row, prompt + parent.root - 1]) + node.depth
                        branch_nodes.append((node, Branch(node.row, node.keys_end, node.ancestors, x, position)))
                    nxt.append(node)
            if branch_nodes:
                found, slots = queries.query([b for _, b in branch_nodes])
                for (node, _), slot in zip(branch_nodes, slots, strict=True):
                    node.slot = slot
            rows = []
            for node in nxt:
                rows.append(teacher_logits[node.row, node.root + node.depth] if node.slot < 0 else None)
            queried = iter(found) if branch_nodes else iter(())
            logits = torch.stack([r if r is not None else next(queried).to(device) for r in rows]) if nxt else None
            level = nxt
        self.last_query_tokens = queries.tokens - start_tokens
        return out[:, : self.student_vocab_size].float()

    def _lead(self, probs: Tensor, roots: list[_Node]) -> Tensor:
        """The roots' distributions restricted to their `lead_topk` most likely tokens and renormalised, at roots on
        a teacher token boundary (nothing written since the teacher token began)."""
        at_start = torch.tensor([not root.state[0] for root in roots])
        top = probs.topk(min(self.lead_topk, probs.shape[-1]), dim=-1).indices
        kept = torch.zeros_like(probs).scatter_(1, top, probs.gather(1, top))
        kept = kept / kept.sum(-1, keepdim=True)
        return torch.where(at_start[:, None], kept, probs)

    def _realised_next(self, node: _Node, t_ids, t_len: list[int]) -> int:
        at = node.root + node.depth
        return int(t_ids[node.row, at]) if at < t_len[node.row] else -1

    def _choose(self, child: Tensor, members: list[int], level: list[_Node], table: CoverTable, t_ids,
                t_len: list[int]) -> Tensor:
        """Which open children `[k, o]` to expand: the realised one, and the `branches` most likely others."""
        expand = torch.zeros(child.shape, dtype=torch.bool)
        if self.depth is not None and level[members[0]].depth >= self.depth:  # one level holds one depth
            return expand
        column = {x: o for o, x in enumerate(table.open_ids.tolist())}
        for a, k in enumerate(members):
            if level[k].realised and (o := column.get(self._realised_next(level[k], t_ids, t_len))) is not None:
                expand[a, o] = True
        others = child.masked_fill(expand | (child < self.min_mass), 0.0)
        if self.branches is None:
            expand |= others > 0
        elif self.branches > 0:
            top = others.topk(min(self.branches, child.shape[1]), dim=-1)
            expand |= torch.zeros_like(expand).scatter_(1, top.indices, top.values > 0)
        return expand & (child > 0)
