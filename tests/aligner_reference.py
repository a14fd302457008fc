"""Brute-force references for the aligners: one token at a time, no tries, tables or vectorised tricks.

The tests compare the aligners with these, and `benchmarks/alignment.py` measures exactness against the same code.
"""

from __future__ import annotations

import torch

__all__ = ["brute_force_next_token", "first_byte_distribution", "spell_with_model", "subset_conditional"]


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


def brute_force_next_token(teacher, prefix_ids: list[int], need: bytes, teacher_table, student_table, student_encode,
                           student_size: int, lead_topk: int | None = None) -> torch.Tensor:
    """The teacher's distribution over the student's next token `[V_s]` (float64) by enumeration, one full teacher
    forward per node of the continuation tree.

    `prefix_ids` are the teacher's tokens before the tree's root; the continuation must first spell `need` (the bytes
    written since that teacher token began; empty at a shared token start). A continuation's text decides the
    student's next token once it is no proper prefix of any student token: the first id of `student_encode(text)`;
    when the teacher stops first, the first token of the text so far (the student's EOS when there is none). Mass
    of continuations that cannot spell `need` is left out, and the result renormalised. `lead_topk`: at a root on a
    teacher token boundary (`need` empty), only the teacher's k most likely first tokens are walked, their
    probabilities renormalised among them.
    """
    prefixes = {data[:k] for data in student_table.table if data for k in range(len(data))}
    out = torch.zeros(student_size + 1, dtype=torch.float64)  # last: text the student cannot spell

    def first(text: bytes) -> int:
        ids = student_encode(text)
        return ids[0] if ids else student_size

    def walk(ids: list[int], mass: float, need: bytes, text: bytes) -> None:
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        probs = torch.softmax(logits.double(), -1)
        if lead_topk is not None and len(ids) == len(prefix_ids) and not need:
            order = sorted(range(len(probs)), key=lambda x: -float(probs[x]))
            keep = set(order[:lead_topk])
            total = sum(float(probs[x]) for x in keep)
            probs = torch.tensor([float(probs[x]) / total if x in keep else 0.0 for x in range(len(probs))],
                                 dtype=torch.float64)
        for x in range(len(probs)):
            p = mass * float(probs[x])
            if p == 0.0:
                continue
            if x == teacher_table.eos_id:
                if not need:
                    out[first(text) if text else student_table.eos_id] += p
                continue
            data = teacher_table.table[x] if x < len(teacher_table.table) else None
            if not data:
                continue
            if need and need.startswith(data):
                walk([*ids, x], p, need[len(data):], b"")
                continue
            if need and not data.startswith(need):
                continue
            rest = data[len(need):] if need else text + data
            if rest == b"" or rest in prefixes:
                walk([*ids, x], p, b"", rest)
            else:
                out[first(rest)] += p

    walk(list(prefix_ids), 1.0, need, b"")
    out = out[:student_size]
    return out / out.sum()
