"""Where the student and teacher come from: a Hugging Face id or local path, a GGUF file, or a config.

`HFModel` is a small typed description that LightningCLI fills from YAML; loading happens when the training
module is built. Tokenizers come with the model unless named separately (`builtin:char` is the character-level
tokenizer of the embedded arithmetic task). Quantized (bitsandbytes 8/4-bit) loading is offered for frozen
teachers; LoRA is applied to students through peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["HFModel", "LoraOptions", "apply_lora", "freeze"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Quantization = Literal["8bit", "nf4", "fp4"]


@dataclass
class HFModel:
    """A causal language model to load.

    Args:
        path: Hugging Face id or local directory of a pretrained model (or of a GGUF file with `gguf_file`).
        config: instead of `path`, a config dict for a freshly initialised model, e.g.
            `{model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}`; `vocab_size` defaults to the
            tokenizer's size.
        tokenizer: tokenizer id or directory; defaults to `path`. `builtin:char` is the embedded arithmetic
            task's character tokenizer.
        dtype: weights' dtype: float32, bfloat16 or float16.
        quantization: bitsandbytes weight quantization for frozen models: 8bit, nf4 or fp4; None for none.
        gguf_file: name of a GGUF file inside `path` to load (dequantized to `dtype`).
        seed: seed for the initial weights of a `config` model (same seed, same weights).
        kwargs: extra keyword arguments for `from_pretrained` (e.g. `attn_implementation`).
    """

    path: str | None = None
    config: dict | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    quantization: Quantization | None = None
    gguf_file: str | None = None
    seed: int = 0
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (a pretrained model) or `config` (a fresh model)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if self.quantization is not None and self.path is None:
            raise ValueError("quantization needs a pretrained `path`: save the model with save_pretrained first")

    def load_tokenizer(self):
        """The tokenizer, with a pad token (EOS when the tokenizer has none) and left padding for prompts."""
        name = self.tokenizer or self.path
        if name is None:
            raise ValueError("a model built from `config` needs `tokenizer` (an id, a directory or builtin:char)")
        if name == "builtin:char":
            from opd_lightning.tasks.arithmetic import char_tokenizer

            tok = char_tokenizer()
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name, **({"gguf_file": self.gguf_file} if self.gguf_file and
                                                         not self.tokenizer else {}))
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ValueError(f"tokenizer {name!r} has neither a pad nor an EOS token; add one before distilling")
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return tok

    def load_model(self, tokenizer=None):
        """Load (or build) the model in `dtype`, quantized if asked."""
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = _DTYPES[self.dtype]
        if self.config is not None:
            options = dict(self.config)
            model_type = options.pop("model_type", "llama")
            if tokenizer is not None:
                options.setdefault("vocab_size", len(tokenizer))
                options.setdefault("pad_token_id", tokenizer.pad_token_id)
                options.setdefault("eos_token_id", tokenizer.eos_token_id)
                options.setdefault("bos_token_id", tokenizer.bos_token_id)
            config = AutoConfig.for_model(model_type, **options)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            return model
        kwargs = dict(self.kwargs)
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.quantization is not None:
            kwargs["quantization_config"] = _bnb_config(self.quantization, dtype)
            kwargs.setdefault("device_map", "cpu" if not torch.cuda.is_available() else {"": 0})
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, **kwargs)


def _bnb_config(quantization: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_compute_dtype=compute_dtype)


@dataclass
class LoraOptions:
    """LoRA adapters for the student (peft).

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear".
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


def apply_lora(model, options: LoraOptions):
    """Wrap `model` in a peft LoRA model; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=options.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def freeze(model):
    """Eval mode and no gradients: the teacher's and references' permanent state."""
    model.eval()
    model.requires_grad_(False)
    return model
