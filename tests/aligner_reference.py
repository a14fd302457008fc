"""Brute-force references for the aligners: one token at a time, no tries, tables or vectorised tricks.

The tests compare the aligners with these, and `benchmarks/alignment.py` measures exactness against the same code.
"""

from __future__ import annotations

import torch

__all__ = ["first_byte_distribution", "spell_with_model", "subset_conditional"]


def spell_with_model(student_tokenizer, teacher_tokenizer, teacher_table) -> dict[int, tuple[int, ...]]:
    """Each spelled teacher token's student decomposition: the student's BPE model run on that token's symbols;
    EOS is spelled by EOS.

    Valid for pairs sharing pre-tokenization and symbols (a BPE subset pair), where a teacher token lies inside one
    pre-token.
    """
    model = student_tokenizer.backend_tokenizer.model
    spell = {v: tuple(model.token_to_id(t.value) for t in model.tokenize(teacher_tokenizer.convert_ids_to_tokens(v)))
             for v, data in enumerate(teacher_table.table) if data}
    return {**spell, teacher_tokenizer.eos_token_id: (student_tokenizer.eos_token_id,)}


def subset_conditional(probs: torch.Tensor, path: tuple[int, ...], spell: dict[int, tuple[int, ...]],
                       student_size: int) -> torch.Tensor:
    """p(next student token | student tokens `path` inside the current teacher token), `[V_s]`, by enumeration."""
    out = torch.zeros(student_size, dtype=torch.float64)
    for v, ids in spell.items():
        if len(ids) > len(path) and ids[: len(path)] == path:
            out[ids[len(path)]] += float(probs[v])
    return out / out.sum()


def first_byte_distribution(probs: torch.Tensor, table, eos_id: int) -> torch.Tensor:
    """Next-byte distributions `[n, 257]` (256 = EOS) from next-token probabilities `[n, V]`, by enumeration."""
    out = torch.zeros(probs.shape[0], 257, dtype=torch.float64)
    for v, data in enumerate(table.table):
        if data:
            out[:, data[0]] += probs[:, v].double()
    out[:, 256] += probs[:, eos_id].double()
    return out / out.sum(-1, keepdim=True)
