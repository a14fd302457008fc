"""Alignment between the real SmolLM2-135M (byte-level BPE, 49k) and Gemma-3-270M (SentencePiece BPE with byte
fallback, 262k) tokenizers, over text with code, CJK, emoji, accents, numbers and whitespace runs.

References are computed token by token (one tokenizer call per token), independently of the aligners' batched
tables and tries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opd_lightning.aligners import ALIGNERS, TokenBytes, TokenTrie, prefixless_encoder, retokenise, to_byte_logprobs
from opd_lightning.aligners.char_level import byte_class_ids

pytestmark = pytest.mark.real_tokenizers

TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "東京は日本の首都です。人口は約1400万人。",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷 — done.",
    "Café, naïve, résumé, Ångström, façade, coöperate, Øresund.",
    "Numbers: 3.14159, 1,000,000, 42nd, 0x1F, 2024-11-27 and 12345678901234567890.",
    "Whitespace   runs\t\tand\n\n\nnewlines    end  ",
    "Mixed: for (int i = 0; i < 10; ++i) { sum += a[i]; } // コメント",
]


@pytest.fixture(scope="module")
def tables(real_tokenizers):
    smollm2, gemma = real_tokenizers
    return {"smollm2": (smollm2, TokenBytes.from_tokenizer(smollm2)), "gemma3": (gemma, TokenBytes.from_tokenizer(gemma))}


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_token_tables_spell_every_text(tables, name):
    tok, table = tables[name]
    table.check(tok)
    for text, enc in zip(TEXTS, prefixless_encoder(tok).encode_batch(TEXTS, add_special_tokens=False), strict=True):
        assert table.join(np.array(enc.ids)) == text.encode(), text


@pytest.mark.parametrize(("student", "teacher"), [("smollm2", "gemma3"), ("gemma3", "smollm2")])
def test_real_spans_cover_the_text_with_equal_bytes(tables, student, teacher):
    s_tok, s_table = tables[student]
    t_tok, t_table = tables[teacher]
    encoder = prefixless_encoder(s_tok)
    rows = [encoder.encode(t, add_special_tokens=False).ids + [s_tok.eos_token_id] for t in TEXTS]
    width = max(map(len, rows))
    comp, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        comp[i, : len(r)], mask[i, : len(r)] = r, 1
    prompt = np.array([encoder.encode("Text:").ids] * len(rows))
    view = retokenise(s_table, t_tok, prefixless_encoder(t_tok), prompt, np.ones_like(prompt), comp, mask,
                      t_tok.eos_token_id, t_table)
    for b, row in enumerate(rows):
        s_span = view.student_span[b, : len(row)].numpy()
        t_ids = view.teacher_ids[b][view.teacher_mask[b]].numpy()
        t_span = view.teacher_span[b, : len(t_ids)].numpy()
        assert (s_span >= 0).all() and (np.diff(s_span) >= 0).all() and (np.diff(t_span) >= 0).all()
        assert (t_span >= 0).all() and s_span[-1] == t_span[-1]
        for span in range(s_span[-1]):
            assert s_table.join(np.array(row)[s_span == span]) == t_table.join(t_ids[t_span == span])
        assert b"".join(s_table.join(np.array(row)[s_span == k]) for k in range(s_span[-1])) == TEXTS[b].encode()


def test_real_first_token_marginal_matches_per_token_reference(tables):
    (s_tok, s_table), (t_tok, t_table) = tables["smollm2"], tables["gemma3"]
    trie = TokenTrie(t_table, s_table, s_tok, len(s_tok))
    rng = np.random.default_rng(0)
    support = [int(v) for v in rng.choice(len(t_tok), size=3000, replace=False) if t_table.table[v]]
    probs = torch.zeros(2, len(t_tok))
    probs[:, support] = torch.softmax(torch.randn(2, len(support), generator=torch.Generator().manual_seed(0)), -1)
    encoder = prefixless_encoder(s_tok)
    want = torch.zeros(2, len(s_tok))
    for v in support:
        data = t_table.table[v]
        try:
            ids = encoder.encode(data.decode(), add_special_tokens=False).ids
        except UnicodeDecodeError:  # a lone byte: spelled by the byte-level symbol of that byte
            ids = [s_tok.convert_tokens_to_ids(s_tok.convert_ids_to_tokens(s_table.table.index(data)))]
        want[:, ids[0]] += probs[:, v]
    torch.testing.assert_close(trie.marginal(probs), want)


def test_real_byte_distribution_matches_first_byte_sums(tables):
    tok, table = tables["gemma3"]
    logits = torch.randn(2, len(tok), generator=torch.Generator().manual_seed(1))
    got = to_byte_logprobs(logits, byte_class_ids(table)).exp()
    probs = torch.softmax(logits, -1)
    first = np.array([b[0] if b else -1 for b in table.table])
    want = torch.zeros(2, 257)
    for byte in range(256):
        want[:, byte] = probs[:, torch.from_numpy(np.flatnonzero(first == byte))].sum(-1)
    want[:, 256] = probs[:, tok.eos_token_id]
    torch.testing.assert_close(got, want / want.sum(-1, keepdim=True), atol=1e-6, rtol=1e-4)


def test_real_pair_is_not_a_bpe_subset_and_the_error_names_the_alternatives(real_tokenizers):
    smollm2, gemma = real_tokenizers
    with pytest.raises(ValueError, match="bpe_subset cannot serve this pair.*'byte_spans'"):
        ALIGNERS.build("bpe_subset").bind(smollm2, gemma, len(smollm2), len(gemma))
