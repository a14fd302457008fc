"""Aligners: how a teacher with the same or another tokenizer scores a student's rollout.

`ALIGNERS` maps names to classes; build one by name with `ALIGNERS.build(name, **kwargs)`. Importing this package
registers every aligner below.
"""

from opd_lightning import numerics  # noqa: F401  (first: settles the vector math kernels on import)

from .base import ALIGNERS, Aligner, TeacherHidden, TeacherInputs, dense_token_logprobs, fit_vocab
from .bpe_subset import BpeSubsetAligner, bpe_subset_problem, keep_merges
from .byte_spans import ByteSpanAligner
from .bytes import TokenBytes, byte_level_alphabet, char_byte_offsets
from .char_level import BYTE_CLASSES, CharLevelAligner, byte_class_ids, to_byte_logprobs
from .dskd_cma import DskdCmaAligner
from .exact_spans import ExactSpanAligner
from .identity import IdentityAligner
from .mined import MinEdAligner, edit_distances, min_edit_pairs
from .spans import SpanAlignment, TextView, align_ends, retokenise
from .text import TextAligner, vocab_pairs
from .trie import TokenTrie, prefixless_encoder
from .vocab_map import VocabMapAligner
from .xtoken import XTokenAligner, piece_weights, projection_entries

__all__ = [
    "ALIGNERS",
    "BYTE_CLASSES",
    "Aligner",
    "BpeSubsetAligner",
    "ByteSpanAligner",
    "CharLevelAligner",
    "DskdCmaAligner",
    "ExactSpanAligner",
    "IdentityAligner",
    "MinEdAligner",
    "SpanAlignment",
    "TeacherHidden",
    "TeacherInputs",
    "TextAligner",
    "TextView",
    "TokenBytes",
    "TokenTrie",
    "VocabMapAligner",
    "XTokenAligner",
    "align_ends",
    "bpe_subset_problem",
    "byte_class_ids",
    "byte_level_alphabet",
    "char_byte_offsets",
    "dense_token_logprobs",
    "edit_distances",
    "fit_vocab",
    "keep_merges",
    "min_edit_pairs",
    "piece_weights",
    "prefixless_encoder",
    "projection_entries",
    "retokenise",
    "to_byte_logprobs",
    "vocab_pairs",
]
