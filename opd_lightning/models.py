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

__all__ = ["HFModel", "LoraOptions", "apply_lora", "freeze", "keep_decoder_layers"]

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
            task's character tokenizer, `builtin:arithmetic_bpe` a byte-level BPE trained on the same task.
        dtype: weights' dtype: float32, bfloat16 or float16.
        quantization: bitsandbytes weight quantization for frozen models: 8bit, nf4 or fp4; None for none.
        gguf_file: name of a GGUF file inside `path` to load (dequantized to `dtype`).
        seed: seed for the initial weights of a `config` model (same seed, same weights).
        keep_layers: with `path` only: keep just these decoder layers (strictly increasing indices into the
            pretrained model's layers), e.g. `[0, 2, 4, ...]` for a half-depth student initialised from the
            teacher. Embeddings, final norm and head are kept whole; `config.num_hidden_layers` (and a per-layer
            `config.layer_types`) follow, and each kept layer's `layer_idx` is renumbered so that the KV cache
            used in generation indexes the new layers. None keeps every layer.
        kwargs: extra keyword arguments for `from_pretrained` (e.g. `attn_implementation`).
    """

    path: str | None = None
    config: dict | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    quantization: Quantization | None = None
    gguf_file: str | None = None
    seed: int = 0
    keep_layers: list[int] | None = None
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (a pretrained model) or `config` (a fresh model)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if self.quantization is not None and self.path is None:
            raise ValueError("quantization needs a pretrained `path`: save the model with save_pretrained first")
        if self.keep_layers is not None:
            if self.path is None:
                raise ValueError("keep_layers selects layers of a pretrained model: it needs `path`, not `config`")
            if not self.keep_layers or any(b <= a for a, b in zip(self.keep_layers, self.keep_layers[1:])) or \
                    self.keep_layers[0] < 0:
                raise ValueError(f"keep_layers must be a non-empty, strictly increasing list of layer indices, got "
                                 f"{self.keep_layers}")

    def load_tokenizer(self):
        """The tokenizer, with a pad token (EOS when the tokenizer has none) and left padding for prompts."""
        name = self.tokenizer or self.path
        if name is None:
            raise ValueError("a model built from `config` needs `tokenizer` (an id, a directory or builtin:char)")
        if name in ("builtin:char", "builtin:arithmetic_bpe"):
            from opd_lightning.tasks.arithmetic import bpe_tokenizer, char_tokenizer

            tok = char_tokenizer() if name == "builtin:char" else bpe_tokenizer()
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
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, **kwargs)
        return model if self.keep_layers is None else keep_decoder_layers(model, self.keep_layers)


def keep_decoder_layers(model, keep: list[int]):
    """Drop every decoder layer of `model` but those at indices `keep` (in place; the model is returned).

    The config follows (`num_hidden_layers`, and `layer_types` where the config has that per-layer list), and
    every `layer_idx` attribute inside a kept layer (its attention's, which addresses the KV cache) becomes the
    layer's new index.
    """
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"keep_layers: {type(model).__name__} has no `layers` list in its decoder")
    if keep[-1] >= len(layers):
        raise ValueError(f"keep_layers {keep} names a layer beyond the model's {len(layers)} layers")
    kept = torch.nn.ModuleList(layers[i] for i in keep)
    model.get_decoder().layers = kept
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list | tuple):
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


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
