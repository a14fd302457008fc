"""Where the student and teacher come from: a Hugging Face id or local path, a GGUF file, or a config.

`HFModel` is a small typed description that LightningCLI fills from YAML; loading happens when the training
module is built. Tokenizers come with the model unless named separately (`builtin:char` is the character-level
tokenizer of the embedded arithmetic task). Quantized (bitsandbytes 8/4-bit) loading is offered for frozen
teachers; LoRA is applied to students through peft.

A model or tokenizer source is checked when it is loaded (not when the config is parsed, which also happens where
the files do not exist yet, e.g. `--print_config`): a missing run directory, or one without the files
`save_pretrained` writes, fails with a message naming the path and what was expected, instead of transformers'
complaint that the path is not a valid hub repo id. Each load logs one line saying what was loaded.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from opd_lightning.served import ServedTeacher, TeacherServer

__all__ = ["HFModel", "LoraOptions", "apply_lora", "freeze", "keep_decoder_layers"]

log = logging.getLogger(__name__)

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
            task's character tokenizer, `builtin:arithmetic_bpe` a byte-level BPE trained on the same task, `builtin:arithmetic_bpe_<percent>`
            that BPE keeping only the first `percent`% of its merges (e.g. `builtin:arithmetic_bpe_10`).
        dtype: weights' dtype: float32, bfloat16 or float16.
        quantization: bitsandbytes weight quantization for frozen models: 8bit, nf4 or fp4; None for none.
        gguf_file: name of a GGUF file inside `path` to load (dequantized to `dtype`).
        seed: seed for the initial weights of a `config` model (same seed, same weights).
        keep_layers: with `path` only: keep just these decoder layers (strictly increasing indices into the
            pretrained model's layers), e.g. `[0, 2, 4, ...]` for a half-depth student initialised from the
            teacher. Embeddings, final norm and head are kept whole; `config.num_hidden_layers` (and a per-layer
            `config.layer_types`) follow, and each kept layer's `layer_idx` is renumbered so that the KV cache
            used in generation indexes the new layers. None keeps every layer.
        remap_vocab: with `path` and a `tokenizer` other than the model's own: rebuild the input embeddings and
            output layer for `tokenizer`, each of its tokens taking the model's row of the token with the same text
            (the same string, else the same UTF-8 bytes; the model's tokenizer is read from `path`), the rest the
            mean row. A student with a smaller or another vocabulary, initialised from a pretrained model, e.g. one
            keeping a share of its BPE merges.
        kwargs: extra keyword arguments for `from_pretrained` (e.g. `attn_implementation`).
        server: instead of `path` or `config`, for a teacher: an inference server's OpenAI-compatible completions
            endpoint that scores rollouts with prompt log-probs (`url`, `model`, `top_k`, ...; see
            `opd_lightning.served`); `tokenizer` names the served model's tokenizer.
    """

    path: str | None = None
    config: dict | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    quantization: Quantization | None = None
    gguf_file: str | None = None
    seed: int = 0
    keep_layers: list[int] | None = None
    remap_vocab: bool = False
    kwargs: dict = field(default_factory=dict)
    server: TeacherServer | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.path, self.config, self.server)) != 1:
            raise ValueError("give exactly one of `path` (a pretrained model), `config` (a fresh model) or `server` "
                             "(a served teacher)")
        if self.server is not None:
            if isinstance(self.server, dict):
                self.server = TeacherServer(**self.server)
            if self.tokenizer is None:
                raise ValueError("a served teacher needs `tokenizer`: the served model's tokenizer (a directory or "
                                 "id), which turns rollouts into its token ids")
            if self.quantization or self.gguf_file or self.keep_layers is not None or self.remap_vocab:
                raise ValueError("quantization, gguf_file, keep_layers and remap_vocab shape a model loaded here; a "
                                 "served teacher is loaded by its server (e.g. `opd serve-teacher --quantization`)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if self.quantization is not None and self.path is None:
            raise ValueError("quantization needs a pretrained `path`: save the model with save_pretrained first")
        if self.remap_vocab and (self.path is None or self.tokenizer is None):
            raise ValueError("remap_vocab rebuilds a pretrained model's embeddings for another tokenizer: it needs "
                             "both `path` and `tokenizer`")
        if self.keep_layers is not None:
            if self.path is None:
                raise ValueError("keep_layers selects layers of a pretrained model: it needs `path`, not `config`")
            if not self.keep_layers or any(b <= a for a, b in zip(self.keep_layers, self.keep_layers[1:])) or \
                    self.keep_layers[0] < 0:
                raise ValueError(f"keep_layers must be a non-empty, strictly increasing list of layer indices, got "
                                 f"{self.keep_layers}")

    def load_tokenizer(self):
        """The tokenizer, with a pad token (EOS when the tokenizer has none) and left padding for prompts.

        Raises:
            FileNotFoundError: when `tokenizer` (or `path`) is neither a directory holding a saved tokenizer (or
                `gguf_file`) nor, with the hub reachable or the id in the local cache, a Hugging Face hub id.
        """
        name = self.tokenizer or self.path
        if name is None:
            raise ValueError("a model built from `config` needs `tokenizer` (an id, a directory or builtin:char)")
        from opd_lightning.tasks.arithmetic import builtin_tokenizer

        tok = builtin_tokenizer(name) if name.startswith("builtin:") else None
        if tok is not None:
            log.info("built tokenizer %s (%s, vocabulary %d)", name, type(tok).__name__, len(tok))
        else:
            from transformers import AutoTokenizer

            gguf_file = self.gguf_file if not self.tokenizer else None
            source = _Source(name, "tokenizer" if self.tokenizer else "path", "tokenizer", gguf_file)
            hub = source.check()
            tok = source.load(AutoTokenizer.from_pretrained, hub, **({"gguf_file": gguf_file} if gguf_file else {}))
            log.info("loaded tokenizer from %s (%s%s, vocabulary %d)", name, type(tok).__name__,
                     f", gguf {gguf_file}" if gguf_file else "", len(tok))
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ValueError(f"tokenizer {name!r} has neither a pad nor an EOS token; add one before distilling")
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return tok

    def load_model(self, tokenizer=None):
        """Load (or build) the model in `dtype`, quantized if asked.

        Raises:
            FileNotFoundError: when `path` is neither a directory written by `save_pretrained` (or holding
                `gguf_file`) nor, with the hub reachable or the id in the local cache, a Hugging Face hub id.
        """
        if self.server is not None:
            return ServedTeacher(self.server, tokenizer if tokenizer is not None else self.load_tokenizer())
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
            hidden = getattr(model.config.get_text_config(), "hidden_size", "?")
            log.info("built model from config (%s, hidden %s, %s, %s, seed %d)", _layers(model), hidden,
                     _parameters(model), self.dtype, self.seed)
            return model
        source = _Source(self.path, "path", "model", self.gguf_file, self.kwargs)
        hub = source.check()
        kwargs = dict(self.kwargs)
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.quantization is not None:
            kwargs["quantization_config"] = _bnb_config(self.quantization, dtype)
            kwargs.setdefault("device_map", "cpu" if not torch.cuda.is_available() else {"": 0})
            _bnb_cast_warning_once()
        model = source.load(AutoModelForCausalLM.from_pretrained, hub, dtype=dtype, **kwargs)
        if self.keep_layers is not None:
            model = keep_decoder_layers(model, self.keep_layers)
        if self.remap_vocab:
            own = HFModel(path=self.path, gguf_file=self.gguf_file, kwargs=self.kwargs).load_tokenizer()
            found = remap_vocabulary(model, own, tokenizer if tokenizer is not None else self.load_tokenizer())
        details = [f"gguf {self.gguf_file}"] if self.gguf_file else []
        details += [_layers(model), _parameters(model), self.dtype]
        details += [self.quantization] if self.quantization else []
        details += [f"keep_layers {self.keep_layers}"] if self.keep_layers is not None else []
        details += [f"vocabulary remapped to {self.tokenizer}, {found} tokens found"] if self.remap_vocab else []
        log.info("loaded model from %s (%s)", self.path, ", ".join(details))
        return model


_MODEL_FILES = "a directory with config.json written by save_pretrained"
_TOKENIZER_FILES = "a directory with tokenizer.json or tokenizer_config.json written by save_pretrained"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass
class _Source:
    """Where `from_pretrained` is about to read a model or tokenizer from, checked before it does.

    Args:
        name: the path or hub id.
        option: the `HFModel` field that gave it (`path` or `tokenizer`), for messages.
        kind: `model` or `tokenizer`: which files a local directory must hold.
        gguf_file: name of a GGUF file inside `name` that stands in for those files.
        kwargs: `from_pretrained` options; `cache_dir` and `revision` say where a hub id is cached.
    """

    name: str
    option: str
    kind: Literal["model", "tokenizer"]
    gguf_file: str | None = None
    kwargs: dict = field(default_factory=dict)

    def expected(self) -> str:
        """What `name` should be, as the end of an error message."""
        files = _MODEL_FILES if self.kind == "model" else _TOKENIZER_FILES
        builtin = "builtin:char, builtin:arithmetic_bpe(_<percent>), " if self.option == "tokenizer" else ""
        gguf = ", a GGUF file inside `path` given with `gguf_file`" if self.option == "path" else ""
        return f"expected {files}{gguf}, {builtin}or a Hugging Face hub id when online"

    def fail(self, problem: str) -> FileNotFoundError:
        return FileNotFoundError(f"cannot load the {self.kind}: `{self.option}` {self.name!r} {problem}; "
                                 f"{self.expected()}")

    def check(self) -> bool:
        """Raise `FileNotFoundError` when `name` cannot be what is loaded; True when it is left to the hub.

        A local path must be a directory holding the `kind`'s files (or `gguf_file`). A name that does not exist
        locally passes only when it reads as a hub id (`name` or `org/name`) and the hub is online or the id is in
        the local cache.
        """
        path = Path(self.name)
        if path.exists():
            if not path.is_dir():
                gguf = " (a GGUF file is given as its directory in `path` and its file name in `gguf_file`)"
                raise self.fail("is a file, not a directory" + (gguf if path.suffix == ".gguf" else ""))
            if self.gguf_file:
                if not (path / self.gguf_file).is_file():
                    found = sorted(p.name for p in path.glob("*.gguf"))
                    raise self.fail(f"holds no GGUF file {self.gguf_file!r} (GGUF files there: "
                                    f"{', '.join(found) or 'none'})")
                return False
            names = ("config.json",) if self.kind == "model" else ("tokenizer.json", "tokenizer_config.json")
            if not any((path / n).is_file() for n in names):
                hint = " (name a tokenizer with `tokenizer`, or save one there)" if self.option == "path" and \
                    self.kind == "tokenizer" else ""
                raise self.fail(f"holds no {' or '.join(names)}{hint}")
            return False
        if not _looks_like_hub_id(self.name):
            raise self.fail("does not exist: run the step that writes it first")
        if _hub_offline() and not self._cached():
            raise self.fail("does not exist locally, and as a hub id it is not in the local cache while the hub "
                            "is offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)")
        return True

    def load(self, from_pretrained, hub: bool, **kwargs):
        """`from_pretrained(name, **kwargs)`; with `hub` (what `check` returned) an `OSError` comes back with what
        was expected appended."""
        try:
            return from_pretrained(self.name, **kwargs)
        except OSError as err:
            if not hub:
                raise
            raise OSError(f"{err}\ncannot load the {self.kind}: `{self.option}` {self.name!r} could not be loaded from "
                          f"the Hugging Face hub; {self.expected()}") from err

    def _cached(self) -> bool:
        from huggingface_hub import try_to_load_from_cache

        if self.gguf_file:
            names = (self.gguf_file,)
        else:
            names = ("config.json",) if self.kind == "model" else ("tokenizer_config.json", "tokenizer.json")
        options = {k: self.kwargs[k] for k in ("cache_dir", "revision") if self.kwargs.get(k) is not None}
        try:
            return any(isinstance(try_to_load_from_cache(self.name, n, **options), str) for n in names)
        except ValueError:  # not a valid repo id after all
            return False


def _looks_like_hub_id(name: str) -> bool:
    """`name` or `org/name`: not `./x`, `/x`, `~/x`, `../x` or `a/b/c`, which can only be local paths."""
    return _HUB_ID.fullmatch(name) is not None and ".." not in name


def _hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off for this process (the environment as read now, or at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _layers(model) -> str:
    """`llama, 3 layers`: the model type and depth, for a log line."""
    return f"{model.config.model_type}, {getattr(model.config.get_text_config(), 'num_hidden_layers', '?')} layers"


def _parameters(model) -> str:
    """`0.61M parameters` (or `1.24B parameters`), counting 4-bit packed weights as their unpacked size."""
    count = model.num_parameters()
    return f"{count / 1e9:.2f}B parameters" if count >= 1e9 else f"{count / 1e6:.2f}M parameters"


_BNB_CAST = "MatMul8bitLt: inputs will be cast"


class _FirstOnly(logging.Filter):
    """Let through the first record whose message starts with `prefix`, drop the later ones; others pass."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _bnb_cast_warning_once() -> None:
    """Show bitsandbytes' "inputs will be cast to float16" notice once per process, not on every 8-bit matmul.

    Recent bitsandbytes logs it through `logging`, older releases through `warnings`: both are limited.
    """
    warnings.filterwarnings("once", message=_BNB_CAST, category=UserWarning)
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOnly) and f.prefix == _BNB_CAST for f in logger.filters):
        logger.addFilter(_FirstOnly(_BNB_CAST))


def remap_vocabulary(model, own_tokenizer, tokenizer) -> int:
    """Give `model` (in place) input embeddings and an output layer for `tokenizer`, initialised from its rows for
    `own_tokenizer`: each token takes the row of the token with the same string, else the same UTF-8 bytes, else the
    mean row. The config's vocabulary size and special-token ids follow `tokenizer`. Returns how many tokens found
    a row.
    """
    from opd_lightning.aligners.bytes import TokenBytes

    own_vocab = own_tokenizer.get_vocab()
    own_bytes = TokenBytes.from_tokenizer(own_tokenizer)
    by_bytes = {data: i for i, data in reversed(list(enumerate(own_bytes.table))) if data}
    new_bytes = TokenBytes.from_tokenizer(tokenizer)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    rows = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for token, i in vocab:
        j = own_vocab.get(token, -1)
        if j < 0 and i < len(new_bytes) and new_bytes.table[i]:
            j = by_bytes.get(new_bytes.table[i], -1)
        rows[i] = j
    found = rows >= 0

    def rebuilt(weight: torch.Tensor) -> torch.Tensor:  # [V_own, H] -> [V_new, H]
        out = weight.detach().mean(0, keepdim=True).expand(len(rows), -1).clone()
        out[found] = weight.detach()[rows[found]]
        return out

    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embeddings = torch.nn.Embedding(len(rows), model.get_input_embeddings().weight.shape[1],
                                    dtype=model.get_input_embeddings().weight.dtype)
    embeddings.weight.data.copy_(rebuilt(model.get_input_embeddings().weight))
    head = model.get_output_embeddings()
    model.set_input_embeddings(embeddings)
    if head is not None:
        new_head = torch.nn.Linear(head.in_features, len(rows), bias=head.bias is not None, dtype=head.weight.dtype)
        new_head.weight = embeddings.weight if tied else torch.nn.Parameter(rebuilt(head.weight))
        if head.bias is not None:
            new_head.bias.data.copy_(rebuilt(head.bias.unsqueeze(-1)).squeeze(-1))
        model.set_output_embeddings(new_head)
    config = model.config.get_text_config()
    config.vocab_size = len(rows)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(config, name, getattr(tokenizer, name))
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, name, getattr(tokenizer, name))
    return int(found.sum())


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
