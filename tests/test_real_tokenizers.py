"""SmolLM2's and Gemma-3's real tokenizers: the pair that cross-tokenizer alignment has to bridge."""

from __future__ import annotations

TEXT = "Hello  world\n  x = 1 # 日本語 😀 café"


def test_real_tokenizers_load_with_offsets_and_their_vocabularies(real_tokenizers):
    smollm2, gemma3 = real_tokenizers
    assert 49_000 <= len(smollm2) <= 50_000 and 260_000 <= len(gemma3) <= 263_000
    for tok in real_tokenizers:
        assert tok.is_fast
        enc = tok(TEXT, return_offsets_mapping=True, add_special_tokens=False)
        assert len(enc["offset_mapping"]) == len(enc["input_ids"]) > 0
        assert enc["offset_mapping"][0][0] == 0 and enc["offset_mapping"][-1][1] == len(TEXT)
        assert tok.decode(enc["input_ids"]) == TEXT
    assert gemma3("x")["input_ids"][0] == gemma3.bos_token_id  # Gemma adds BOS; SmolLM2 adds nothing
    assert smollm2("x")["input_ids"] == smollm2("x", add_special_tokens=False)["input_ids"]


def test_smollm2_isolates_digits_as_its_own_tokenizer_does(real_tokenizers):
    smollm2, _ = real_tokenizers
    assert smollm2.tokenize("x  12") == ["x", "ĠĠ", "1", "2"]  # plain byte-level splitting gives x Ġ Ġ 1 2
