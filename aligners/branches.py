"""Branch queries: the teacher's next-token distributions after token paths the rollout did not take.

An aligner that needs the teacher's likelihood of text off the realised path (`exact_spans`) asks for distributions
at the nodes of a tree of alternatives hanging off the rollout. Running one forward per branch would repeat the whole
prefix each time; instead the main teacher pass keeps its KV cache and each tree level is one more forward over it:
every node contributes a single token (the last of its path) that attends to the row's prefix up to the node's
anchor, to the realised tokens its path shares, to its off-path ancestors (earlier levels, already in the cache) and
to itself, through a custom 4D attention mask. A level of n nodes costs one forward of n tokens per batch, however
deep the tree has grown. Works with any Hugging Face causal LM that accepts a 4D attention mask and a KV cache
(the `cache` argument).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Branch", "BranchQueries"]


@dataclass
class Branch:
    """One node to query: its last path token, where it sits, and which cached keys it may read."""

    row: int  # batch row
    keys_end: int  # it reads the row's main-pass slots [0, keys_end) (padding excluded): prefix and realised tokens
    ancestors: tuple[int, ...]  # cache slots of its off-path ancestors (from earlier levels)
    token: int  # the teacher token fed at this node
    position: int  # its position id


class BranchQueries:
    """Tree-level forwards of a frozen teacher over the KV cache of its main pass."""

    def __init__(self, model: nn.Module, cache, attention_mask: Tensor, position_ids: Tensor) -> None:
        """
        Args:
            model: the teacher (a Hugging Face causal LM).
            cache: the main pass's KV cache (the teacher's `cache` output with `use_cache=True`); grown in place.
            attention_mask: `[B, K]` the main pass's 2D mask (which of its slots hold tokens).
            position_ids: `[B, K]` the main pass's position ids.
        """
        self.model, self.cache = model, cache
        self.main = attention_mask.bool()  # [B, K]
        self.position_ids = position_ids
        self.length = attention_mask.shape[1]  # slots in the cache so far
        self.tokens = 0  # tokens queried so far, for cost reports

    @torch.no_grad()
    def query(self, branches: list[Branch]) -> tuple[Tensor, list[int]]:
        """Logits after each branch `[n, V]` (one forward for all) and the cache slot each one now occupies."""
        if not branches:
            return torch.zeros(0), []
        device, rows = self.main.device, self.main.shape[0]
        counts = [0] * rows
        column = []
        for b in branches:
            column.append(counts[b.row])
            counts[b.row] += 1
        q = max(counts)
        ids = torch.zeros(rows, q, dtype=torch.long)
        pos = torch.zeros(rows, q, dtype=torch.long)
        row_t = torch.tensor([b.row for b in branches])
        col_t = torch.tensor(column)
        ids[row_t, col_t] = torch.tensor([b.token for b in branches])
        pos[row_t, col_t] = torch.tensor([b.position for b in branches])
        k_main, total = self.main.shape[1], self.length + q
        allowed = torch.zeros(rows, q, total, dtype=torch.bool)
        ends = torch.zeros(rows, q, dtype=torch.long)
        ends[row_t, col_t] = torch.tensor([b.keys_end for b in branches])
        allowed[..., :k_main] = (torch.arange(k_main) < ends.unsqueeze(-1)) & self.main.cpu().unsqueeze(1)
        anc = [(r, c, s) for r, c, b in zip(row_t.tolist(), column, branches, strict=True) for s in b.ancestors]
        if anc:
            ar, ac, slot = (torch.tensor(x) for x in zip(*anc, strict=True))
            allowed[ar, ac, slot] = True
        allowed[:, torch.arange(q), self.length + torch.arange(q)] = True  # itself (padding queries too: no NaN)
        dtype = self.model.get_input_embeddings().weight.dtype  # the attention's dtype (quantized layers included)
        dtype = dtype if dtype.is_floating_point else torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self.model(input_ids=ids.to(device), attention_mask=mask.unsqueeze(1).to(device),
                         position_ids=pos.to(device), cache=self.cache, use_cache=True)
        slots = [self.length + c for c in column]
        self.length = total
        self.tokens += len(branches)
        return out.logits[row_t.to(device), col_t.to(device)], slots
