"""Token bytes: the UTF-8 bytes each token id contributes to the text, for any of the common tokenizer families.

Every cross-tokenizer aligner compares the two models in one currency: bytes of text. A student token's bytes are
read from a table built once per tokenizer, so the bytes of a whole batch of completions, and their byte offsets,
come from array lookups with no per-token decode calls. Three spellings cover the tokenizers people distil between:
- byte-level BPE (GPT-2, Llama-3, SmolLM, Qwen): each byte is one printable character (`Ġ` is a space, `Ċ` a
  newline); the decoder is `ByteLevel`;
- SentencePiece (Llama-2, Gemma, Mistral, T5), as BPE or Unigram: `▁` is a space and `<0xNN>` a raw byte
  (byte fallback); the decoder is `Metaspace`, or `Replace("▁", " ")` plus `ByteFallback`;
- plain tokens spelled as their text (character or word-level vocabularies with a `Fuse` decoder).
Special tokens (BOS, EOS, PAD, UNK, chat markers) contribute no bytes and are `None` in the table.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = ["TokenBytes", "byte_level_alphabet", "char_byte_offsets"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "\u2581"  # ▁


@cache
def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2): printable character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_types(config: dict | None) -> set[str]:
    if not config:
        return set()
    found = {config.get("type", "")}
    for child in config.get("decoders", []) or []:
        found |= _decoder_types(child)
    return found


def _spelling(backend: dict) -> str:
    decoders = _decoder_types(backend.get("decoder"))
    if "ByteLevel" in decoders:
        return "byte_level"
    if "Metaspace" in decoders or "ByteFallback" in decoders or "Replace" in decoders:
        return "sentencepiece"
    if "WordPiece" in decoders or "BPEDecoder" in decoders or "CTC" in decoders:
        raise ValueError(f"tokenizers with a {sorted(decoders)} decoder mark word boundaries in ways this project "
                         "does not map to bytes yet; cross-tokenizer aligners support byte-level BPE, SentencePiece "
                         "(BPE or Unigram) and plain (character/word) vocabularies")
    return "plain"


def _token_bytes(token: str, spelling: str, alphabet: dict[str, int]) -> bytes | None:
    if spelling == "byte_level":
        if all(ch in alphabet for ch in token):
            return bytes(alphabet[ch] for ch in token)
        return token.encode()  # an added (non-special) token spelled as text
    if spelling == "sentencepiece":
        match = _BYTE_FALLBACK.match(token)
        if match:
            return bytes([int(match.group(1), 16)])
        return token.replace(_SPIECE_SPACE, " ").encode()
    return token.encode()


@dataclass
class TokenBytes:
    """The bytes of every token id of one tokenizer, packed for vectorised lookups.

    Attributes:
        table: id -> bytes, `None` for special tokens and ids past the tokenizer (model padding rows).
        lengths: `[V]` int64, byte length per id (0 for `None`).
        spelling: "byte_level", "sentencepiece" or "plain".
        eos_id: the tokenizer's EOS id (or -1).
    """

    table: list[bytes | None]
    lengths: np.ndarray
    spelling: str
    eos_id: int
    _flat: np.ndarray
    _starts: np.ndarray

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> TokenBytes:
        """Build the table of a Hugging Face fast tokenizer; `vocab_size` pads it to a model's logit count."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer: cross-tokenizer alignment needs "
                             "a fast tokenizer with offsets; load it with AutoTokenizer.from_pretrained(..., "
                             "use_fast=True) or convert it with transformers' convert_slow_tokenizer")
        spelling = _spelling(json.loads(backend.to_str()))
        size = max(len(tokenizer), vocab_size or 0)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        alphabet = byte_level_alphabet()
        table = [None if (i in special or tok is None) else _token_bytes(tok, spelling, alphabet)
                 for i, tok in enumerate(tokens)] + [None] * (size - len(tokens))
        lengths = np.array([0 if b is None else len(b) for b in table], dtype=np.int64)
        flat = np.frombuffer(b"".join(b for b in table if b is not None), dtype=np.uint8)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        eos = tokenizer.eos_token_id
        return cls(table, lengths, spelling, -1 if eos is None else eos, flat, starts)

    def __len__(self) -> int:
        return len(self.table)

    def join(self, ids: np.ndarray) -> bytes:
        """The bytes of a token sequence `[n]` (special tokens contribute nothing), by one gather."""
        lengths = self.lengths[ids]  # [n]
        total = int(lengths.sum())
        if total == 0:
            return b""
        first = np.repeat(self._starts[ids] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)  # [total]
        return self._flat[first + np.arange(total)].tobytes()

    def ends(self, ids: np.ndarray) -> np.ndarray:
        """Byte offset where each token of a sequence `[n]` ends."""
        return np.cumsum(self.lengths[ids])

    def check(self, tokenizer) -> None:
        """Raise if the table does not spell `tokenizer`'s own encoding of probe texts (a wrong spelling rule).

        Probes the tokenizer cannot represent (an UNK appears) are skipped; a prefix space added by the tokenizer
        (SentencePiece's dummy prefix) is allowed.
        """
        for text in ("hello world 12+3=15", "Hello  world\n\tx = 1 # caf\u00e9 \u65e5\u672c 2+2=4"):
            ids = np.array(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            if tokenizer.unk_token_id is not None and (ids == tokenizer.unk_token_id).any():
                continue
            spelled = self.join(ids)
            if text.encode() not in (spelled, spelled[1:]):
                raise ValueError(f"the {self.spelling} byte table of {type(tokenizer).__name__} spells {spelled!r} for "
                                 f"{text!r}: its tokens cannot be mapped to text bytes. Cross-tokenizer aligners need "
                                 "tokens that spell their text (no normalizer that rewrites characters, e.g. "
                                 "lowercasing or NFKC)")


def char_byte_offsets(text: str) -> np.ndarray:
    """Byte offset of every character boundary of `text`: `[len(text) + 1]`, from one encode and no Python loop."""
    data = np.frombuffer(text.encode(), dtype=np.uint8)
    starts = np.flatnonzero((data & 0xC0) != 0x80)  # UTF-8 lead bytes: one per character
    return np.concatenate([starts, [len(data)]]).astype(np.int64)
