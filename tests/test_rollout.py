"""Rollout masking: EOS mid-batch, padding, left-padded prompts, stop strings, off-policy completions."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd_lightning.rollout import (
    SamplingConfig,
    completion_mask,
    generate_rollout,
    rollout_from_texts,
    rollout_from_token_lists,
    stop_positions,
)

EOS, PAD = 1, 0


def test_mask_covers_tokens_up_to_and_including_first_eos():
    ids = torch.tensor([[5, 6, EOS, PAD, PAD], [5, EOS, 7, EOS, PAD], [5, 6, 7, 8, 9], [EOS, PAD, PAD, PAD, PAD]])
    mask, truncated = completion_mask(ids, [EOS])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]


def test_mask_with_several_eos_ids_and_without_stopping():
    ids = torch.tensor([[5, 9, 6, EOS]])
    assert completion_mask(ids, [EOS, 9])[0].tolist() == [[1, 1, 0, 0]]
    mask, truncated = completion_mask(ids, [EOS], stop_at_eos=False)
    assert mask.all() and not truncated.any()


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def test_left_padded_prompts_generate_as_if_alone():
    model = _tiny_model()
    sampling = SamplingConfig(do_sample=False, max_new_tokens=6)
    short, long = [7, 8, 9], [4, 5, 6, 7, 8, 9]
    batch = torch.tensor([[PAD] * 3 + short, long])
    attn = torch.tensor([[0] * 3 + [1] * 3, [1] * 6])
    out = generate_rollout(model, batch, attn, sampling, eos_token_ids=[EOS], pad_token_id=PAD)
    alone = generate_rollout(model, torch.tensor([short]), torch.ones(1, 3, dtype=torch.long), sampling,
                             eos_token_ids=[EOS], pad_token_id=PAD)
    n = alone.completion_mask[0].sum()
    assert out.prompt_length == 6 and torch.equal(out.sequences[:, :6], batch)
    assert torch.equal(out.completion_ids[0, :n], alone.completion_ids[0, :n])
    assert out.attention_mask[:, :6].tolist() == attn.tolist()
    assert torch.equal(out.attention_mask[:, 6:].bool(), out.completion_mask)


def test_generated_padding_after_eos_is_masked():
    model = _tiny_model()
    sampling = SamplingConfig(do_sample=False, max_new_tokens=4)
    prompts = torch.tensor([[3, 9], [3, 4]])

    def fake_generate(input_ids, attention_mask, generation_config, synced_gpus):  # HF pads finished rows
        completion = torch.tensor([[EOS, PAD, PAD, PAD], [5, 6, 7, 8]])
        return torch.cat([input_ids, completion], 1)

    model.generate = fake_generate
    out = generate_rollout(model, prompts, torch.ones_like(prompts), sampling, eos_token_ids=[EOS], pad_token_id=PAD)
    assert out.completion_mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]
    assert out.truncated.tolist() == [False, True]
    assert out.on_policy


def test_sampling_respects_settings_and_restores_train_mode():
    model = _tiny_model().train()
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=5)
    prompts = torch.tensor([[3, 4, 5]] * 4)
    torch.manual_seed(0)
    out = generate_rollout(model, prompts, torch.ones_like(prompts), sampling, eos_token_ids=[EOS], pad_token_id=PAD)
    assert model.training
    assert out.completion_ids.shape[1] <= 5
    assert ((out.completion_ids == PAD) | out.completion_mask).all()


def test_right_padded_prompts_are_refused():
    model = _tiny_model()
    prompts = torch.tensor([[3, 4, PAD]])
    try:
        generate_rollout(model, prompts, torch.tensor([[1, 1, 0]]), SamplingConfig(), eos_token_ids=[EOS],
                         pad_token_id=PAD)
    except ValueError as err:
        assert "left-padded" in str(err)
    else:
        raise AssertionError("right padding was accepted")


def test_off_policy_completions_are_padded_and_truncated():
    prompts = torch.tensor([[PAD, 3], [4, 5]])
    out = rollout_from_token_lists(prompts, torch.tensor([[0, 1], [1, 1]]), [[7, EOS], [7, 8, 9, 10, EOS]],
                                   max_new_tokens=3, pad_token_id=PAD)
    assert out.completion_ids.tolist() == [[7, EOS, PAD], [7, 8, 9]]
    assert out.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert out.truncated.tolist() == [False, True] and not out.on_policy


def _char_ids(tok, rows: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tok.encode(r, add_special_tokens=False) for r in rows]
    width = max(map(len, ids))
    mask = torch.tensor([[i < len(r) for i in range(width)] for r in ids])
    return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids]), mask


def test_stop_positions_find_the_token_that_completes_a_stop_string(char_tok):
    ids, mask = _char_ids(char_tok, ["12\n3+4", "3+45=8", "7\n\n", "99+1"])
    assert stop_positions(char_tok, ids, mask, ["\n", "5="]).tolist() == [2, 4, 1, -1]
    mask[0, 2:] = False  # the newline lies past the completion's end: no stop
    assert stop_positions(char_tok, ids, mask, ["\n"]).tolist() == [-1, -1, 1, -1]


def test_generation_ends_at_stop_strings(char_tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(char_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=char_tok.pad_token_id, eos_token_id=char_tok.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.tensor([char_tok.encode("12+34=", add_special_tokens=False)])
    ends = {"eos_token_ids": [char_tok.eos_token_id], "pad_token_id": char_tok.pad_token_id, "tokenizer": char_tok}
    free = generate_rollout(model, prompt, torch.ones_like(prompt), SamplingConfig(do_sample=False, max_new_tokens=8,
                                                                                   stop_at_eos=False), **ends)
    text = char_tok.decode(free.completion_ids[0], skip_special_tokens=False)
    assert len(text) == 8 and free.truncated.tolist() == [False], text  # one character per token, no specials
    for stop, last in ((text[:2], 1), (text[0], 0)):
        sampling = SamplingConfig(do_sample=False, max_new_tokens=8, stop_at_eos=False, stop=[stop])
        out = generate_rollout(model, prompt, torch.ones_like(prompt), sampling, **ends)
        assert out.completion_mask.tolist() == [[True] * (last + 1) + [False] * (out.completion_mask.shape[1] - last - 1)]
        assert out.completion_ids.shape[1] == last + 1  # generation itself stopped there
        assert torch.equal(out.completion_ids[0, : last + 1], free.completion_ids[0, : last + 1])
        assert out.truncated.tolist() == [False]
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        generate_rollout(model, prompt, torch.ones_like(prompt), SamplingConfig(stop=["\n"]),
                         eos_token_ids=[char_tok.eos_token_id], pad_token_id=char_tok.pad_token_id)
    with pytest.raises(ValueError, match="empty string"):
        SamplingConfig(stop=[""])


def test_text_completions_end_with_eos_a_stop_string_or_the_length_limit(char_tok):
    prompts = torch.tensor([[5, 6]] * 3)
    out = rollout_from_texts(char_tok, prompts, torch.ones_like(prompts), ["12", "34\n", "5"], max_new_tokens=4,
                             ends=["eos", "stop", "length"])
    eos, newline = char_tok.eos_token_id, char_tok.convert_tokens_to_ids("\n")
    rows = [ids[mask].tolist() for ids, mask in zip(out.completion_ids, out.completion_mask, strict=True)]
    assert rows == [char_tok.encode("12", add_special_tokens=False) + [eos],
                    char_tok.encode("34", add_special_tokens=False) + [newline],
                    char_tok.encode("5", add_special_tokens=False)]
    assert out.truncated.tolist() == [False, False, True]  # cut by the limit, though shorter than the widest row
    with pytest.raises(ValueError, match="unknown completion ends"):
        rollout_from_texts(char_tok, prompts[:1], torch.ones_like(prompts[:1]), ["1"], max_new_tokens=4, ends=["done"])


def test_dataset_completions_cut_by_the_length_limit_warn_and_say_how_to_keep_them(char_tok):
    """A dataset's completion longer than `max_new_tokens` loses its end and its EOS: training on it would teach a
    model that never sees when to stop, so the cut is said, with the fix; completions that fit, or a rollout's own
    ends, say nothing."""
    import warnings

    prompts = torch.tensor([[5, 6]] * 2)
    with pytest.warns(UserWarning, match=r"longer than sampling.max_new_tokens=4 are cut \(the longest in this batch "
                                         r"has 6 tokens with its EOS\).*Raise sampling.max_new_tokens"):
        out = rollout_from_texts(char_tok, prompts, torch.ones_like(prompts), ["12345", "1"], max_new_tokens=4)
    assert out.truncated.tolist() == [True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rollout_from_texts(char_tok, prompts, torch.ones_like(prompts), ["123", "1"], max_new_tokens=4)
        rollout_from_texts(char_tok, prompts, torch.ones_like(prompts), ["12345", "1"], max_new_tokens=4,
                           ends=["length", "eos"])


def test_seeds_come_from_a_documented_function_with_pinned_values():
    """`derive_seed` is NumPy's SeedSequence (stable across versions and platforms), not Python's `hash()`: its values
    are pinned here, so a change of function (or of its key order) is caught."""
    import numpy as np

    from opd_lightning.seeding import BRANCH, SAMPLE_TRAIN, derive_seed, uniform

    state = np.random.SeedSequence([0, SAMPLE_TRAIN, 3, 7]).generate_state(2, np.uint32)
    assert derive_seed(0, SAMPLE_TRAIN, 3, 7) == (int(state[0]) << 31) ^ int(state[1])
    assert derive_seed(0, SAMPLE_TRAIN, 3, 7) == 3785146406930564232
    assert round(uniform(0, BRANCH, 5), 12) == round(float(np.random.default_rng(
        np.random.SeedSequence([0, BRANCH, 5])).random()), 12)
    assert len({derive_seed(0, SAMPLE_TRAIN, step, row) for step in range(20) for row in range(20)}) == 400
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(-1, 2)


def test_the_on_off_policy_draw_depends_on_the_step_only():
    from opd_lightning.rollout_source import RolloutPolicy, RolloutSource

    source = RolloutSource(None, None, RolloutPolicy(on_policy_fraction=0.5), SamplingConfig(), same_tokenizer=True,
                           gold=False, max_length=None, seed=4)
    draws = [source.on_policy(step, train=True) for step in range(200)]
    assert draws == [source.on_policy(step, train=True) for step in range(200)]  # no hidden state between calls
    assert 70 < sum(draws) < 130
    assert all(source.on_policy(step, train=False) for step in range(20))  # evaluation is always on-policy


def test_row_noise_sampling_draws_from_the_warped_distribution_and_per_row():
    """Gumbel-max with per-row generators: the tokens' frequencies match softmax(logits / T) after top-k, and a row's
    tokens do not depend on which other rows share its batch."""
    from opd_lightning.rollout import RowNoiseSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    sampling = SamplingConfig(temperature=1.5, top_k=4)
    n = 20000
    sampler = RowNoiseSampler(sampling, list(range(n)), torch.device("cpu"))
    picks = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)
    want = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -float("inf"), 3.0]) / 1.5, -1)
    freq = torch.bincount(picks, minlength=5).double() / n
    assert freq[3] == 0  # outside the top-k
    torch.testing.assert_close(freq, want.double(), atol=0.015, rtol=0)  # ~4 standard errors
    alone = RowNoiseSampler(sampling, [11], torch.device("cpu"))(torch.zeros(1, 1, dtype=torch.long), logits.clone())
    batch = RowNoiseSampler(sampling, [5, 11], torch.device("cpu"))(torch.zeros(2, 1, dtype=torch.long),
                                                                   logits.expand(2, -1).clone())
    assert torch.equal(alone[0], batch[1])
