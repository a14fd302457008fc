"""Rollouts: prompts in, completions with a completion mask out.

A rollout is the unit every later stage reads: the teacher scores it, the aligner maps it, the loss masks it.
Prompts are left-padded to a common length P so that every completion starts at column P; the completion mask
covers generated tokens up to and including the first EOS, never the prompt or the padding after EOS.
Completions come from the student (on-policy), or from text (a dataset's or the teacher's: off-policy).

Sampling with `row_seeds` draws each row's noise from a generator of its own (Gumbel-max: the argmax of the tempered,
filtered logits plus Gumbel noise is an exact sample of the same distribution), so a row samples the same tokens
whatever else shares its batch, micro-batch or rank.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "Rollout",
    "RowNoiseSampler",
    "SamplingConfig",
    "completion_mask",
    "encode_prompts",
    "generate_rollout",
    "position_ids",
    "rollout_from_texts",
    "rollout_from_token_lists",
    "stop_positions",
]


@dataclass
class SamplingConfig:
    """How completions are sampled; the same settings are logged with the run.

    Args:
        temperature: sampling temperature (ignored when `do_sample` is false).
        top_p: nucleus sampling mass; 1.0 keeps the whole distribution.
        top_k: keep only the k most likely tokens; 0 disables.
        max_new_tokens: the most tokens a completion may have.
        stop_at_eos: end a completion at its first EOS (included in the mask); if false, always generate
            `max_new_tokens` tokens.
        do_sample: sample (true) or decode greedily (false).
        stop: stop strings: a completion also ends with the token that completes the first of these in its text
            (that token is kept and scored; no EOS follows it, and the row does not count as truncated). With
            few-shot prompts, `["\\n"]` ends each answer where lm-eval's `until` cuts it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_at_eos: bool = True
    do_sample: bool = True
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop holds an empty string: every stop string needs at least one character")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be positive, got {self.temperature}; use do_sample: false "
                             "for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be at least 1, got {self.max_new_tokens}")


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as `generate` numbers them: `[B, T]`."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class Rollout:
    """Prompt plus completion tokens, in the student's vocabulary."""

    sequences: Tensor  # [B, P + N] left-padded prompt, then completion, then right padding
    attention_mask: Tensor  # [B, P + N] 1 on prompt and completion tokens
    completion_mask: Tensor  # [B, N] bool: completion tokens up to and including the first EOS
    prompt_length: int  # P
    truncated: Tensor  # [B] bool: stopped by the length limit rather than EOS
    on_policy: bool
    rows: Tensor | None = None  # [B] the dataset rows of the prompts, where known
    source: str = "student"  # who wrote the completions: "student", "dataset" or "teacher"

    @property
    def completion_ids(self) -> Tensor:
        return self.sequences[:, self.prompt_length :]  # [B, N]

    @property
    def position_ids(self) -> Tensor:
        return position_ids(self.attention_mask)  # [B, P + N]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: slice) -> Rollout:
        """Rows `index` of this rollout (micro-batching)."""
        return Rollout(self.sequences[index], self.attention_mask[index], self.completion_mask[index],
                       self.prompt_length, self.truncated[index], self.on_policy,
                       None if self.rows is None else self.rows[index], self.source)


def completion_mask(completion_ids: Tensor, eos_token_ids: list[int], stop_at_eos: bool = True) -> tuple[Tensor, Tensor]:
    """Mask of the completion tokens up to and including the first EOS, and which rows never reached EOS.

    Args:
        completion_ids: generated tokens, `[B, N]`.
        eos_token_ids: the ids that end a completion.
        stop_at_eos: if false every position is valid and nothing counts as truncated.

    Returns:
        `(mask [B, N] bool, truncated [B] bool)`.
    """
    if not stop_at_eos:
        return torch.ones_like(completion_ids, dtype=torch.bool), torch.zeros(len(completion_ids), dtype=torch.bool,
                                                                               device=completion_ids.device)
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))  # [B, N]
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before each position
    return eos_before == 0, ~is_eos.any(-1)


class RowNoiseSampler:
    """A logits processor that turns greedy decoding into sampling with one noise stream per row.

    Each step it applies the sampling warpers (temperature, top-k, top-p, in Hugging Face's order) and adds Gumbel
    noise drawn, row by row, from a `torch.Generator` seeded with that row's seed; the greedy argmax of the result
    is a sample from the warped distribution. A row draws exactly `V` numbers per step, so its tokens depend only on
    its own seed and logits.
    """

    def __init__(self, sampling: SamplingConfig, row_seeds: list[int], device: torch.device) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_k > 0:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in row_seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows to sample but {len(self.generators)} row seeds")
        noise = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device, dtype=torch.float32)
                             for g in self.generators])  # [B, V] uniform
        tiny = torch.finfo(torch.float32).tiny
        gumbel = -torch.log(-torch.log(noise.clamp(tiny, 1 - 2**-24)))
        return scores + gumbel.to(scores.dtype)


@torch.no_grad()
def generate_rollout(model, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, *, eos_token_ids: list[int],
                     pad_token_id: int, synced_gpus: bool = False, tokenizer=None,
                     row_seeds: list[int] | None = None) -> Rollout:
    """Sample completions from `model` (a Hugging Face causal LM) for left-padded prompts.

    The model is put in eval mode while sampling and restored afterwards. Set `synced_gpus` under sharded
    strategies (FSDP), where every rank must keep calling forward until all ranks finish. `tokenizer` (the
    model's) is needed only for `sampling.stop`. With `row_seeds` (one per row) each row samples from its own noise
    stream (`RowNoiseSampler`); without, from torch's global generator.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if (prompt_mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded (the last column is padding for some rows); set the "
                         "tokenizer's padding_side='left'")
    if sampling.stop and tokenizer is None:
        raise ValueError("sampling.stop needs the model's tokenizer: pass tokenizer= to generate_rollout")
    own_noise = sampling.do_sample and row_seeds is not None
    config = GenerationConfig(
        do_sample=sampling.do_sample and not own_noise, max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_token_id, eos_token_id=list(eos_token_ids) if sampling.stop_at_eos else None,
        stop_strings=list(sampling.stop) or None,
        **({"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
           if sampling.do_sample and not own_noise else {}),
    )
    extra = {"tokenizer": tokenizer} if sampling.stop else {}
    if own_noise:
        extra["logits_processor"] = LogitsProcessorList([RowNoiseSampler(sampling, row_seeds, prompt_ids.device)])
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                             synced_gpus=synced_gpus, **extra)
    finally:
        model.train(was_training)
    prompt_length = prompt_ids.shape[1]
    completion = out[:, prompt_length:]  # [B, N]
    mask, truncated = completion_mask(completion, eos_token_ids, sampling.stop_at_eos)
    if sampling.stop:
        last = stop_positions(tokenizer, completion, mask, sampling.stop)  # [B], -1: no stop string
        stopped = last >= 0
        mask &= ~stopped[:, None] | (torch.arange(completion.shape[1], device=completion.device) <= last[:, None])
        truncated &= ~stopped
    completion = completion.masked_fill(~mask, pad_token_id)
    attention = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    return Rollout(torch.cat([prompt_ids, completion], 1), attention, mask, prompt_length, truncated, True)


def stop_positions(tokenizer, completion_ids: Tensor, mask: Tensor, stop: list[str]) -> Tensor:
    """Index of the token that completes the first stop string in each row's text, or -1: `[B]` long.

    Only the masked tokens of a row are read. The text of a prefix only grows with the prefix, so the shortest
    prefix whose decoded text holds a stop string is found by bisection (log2 N decodes per row).
    """
    result = torch.full((len(completion_ids),), -1, dtype=torch.long)

    def holds(ids: list[int]) -> bool:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        return any(s in text for s in stop)

    for row, (ids, valid) in enumerate(zip(completion_ids.tolist(), mask.sum(1).tolist(), strict=True)):
        if not valid or not holds(ids[:valid]):
            continue
        low, high = 1, valid  # the prefix of `high` tokens holds a stop string; find the shortest that does
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if holds(ids[:middle]) else (middle + 1, high)
        result[row] = high - 1
    return result.to(completion_ids.device)


def rollout_from_token_lists(prompt_ids: Tensor, prompt_mask: Tensor, completions: list[list[int]], *,
                             max_new_tokens: int, pad_token_id: int, cut: list[bool] | None = None) -> Rollout:
    """Build an off-policy rollout from given completion tokens (a dataset's or the teacher's).

    Each completion should already end (with EOS, or a stop string); those longer than `max_new_tokens` are cut
    and marked truncated, as are the rows `cut` marks (already stopped by a length limit).
    """
    if any(len(c) == 0 for c in completions):
        raise ValueError("a completion is empty (not even an EOS token): drop empty completions from the data")
    width = min(max(len(c) for c in completions), max_new_tokens)
    completion = torch.full((len(completions), width), pad_token_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    mask = torch.zeros(len(completions), width, dtype=torch.bool, device=prompt_ids.device)
    for row, tokens in enumerate(completions):
        tokens = tokens[:width]
        completion[row, : len(tokens)] = torch.tensor(tokens, dtype=prompt_ids.dtype)
        mask[row, : len(tokens)] = True
    cut = cut or [False] * len(completions)
    truncated = torch.tensor([len(c) > width or was_cut for c, was_cut in zip(completions, cut, strict=True)],
                             device=prompt_ids.device)
    attention = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    return Rollout(torch.cat([prompt_ids, completion], 1), attention, mask, prompt_ids.shape[1], truncated, False)


def encode_prompts(tokenizer, prompts: list[str], *, chat_template: bool, max_new_tokens: int,
                   max_length: int | None) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and mask `[B, P]`; empty prompts and prompts that leave no room are refused.

    Args:
        tokenizer: a Hugging Face tokenizer with left padding.
        prompts: prompt texts.
        chat_template: wrap each prompt as a user turn with the tokenizer's chat template.
        max_new_tokens: completion budget that must still fit after the longest prompt.
        max_length: the model's context in tokens (None: unchecked).
    """
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} of the batch is empty: remove empty prompts from the data")
    if chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=not chat_template)
    longest = int(enc["attention_mask"].sum(1).max())
    if max_length is not None and longest + max_new_tokens > max_length:
        raise ValueError(f"a prompt of {longest} tokens plus sampling.max_new_tokens={max_new_tokens} exceeds the "
                         f"context of {max_length} tokens: shorten or drop long prompts, lower max_new_tokens, or "
                         "raise model.max_length if the model supports it")
    return enc["input_ids"], enc["attention_mask"]


def rollout_from_texts(tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, texts: list[str], *,
                       max_new_tokens: int, ends: list[str] | None = None) -> Rollout:
    """Off-policy rollout from completion texts, each tokenized as the continuation of its prompt.

    Texts are encoded without special tokens and without a SentencePiece dummy-prefix space (the text continues
    the prompt, it does not start a document).

    Args:
        tokenizer: the student's fast tokenizer.
        prompt_ids, prompt_mask: `[B, P]` the encoded prompts.
        texts: one completion per row.
        max_new_tokens: longer completions are cut and marked truncated.
        ends: per row, how the completion ended: `"eos"` (EOS is appended; an empty text is then EOS alone),
            `"stop"` (it ends with a stop string; nothing is appended) or `"length"` (cut by a length limit: nothing
            is appended and the row is truncated). None: every text is a finished, non-empty completion (a
            dataset's), closed with EOS.
    """
    from opd_lightning.aligners.trie import prefixless_encoder

    for i, text in enumerate(texts):
        if not text and ends is None:
            raise ValueError(f"completion {i} of the batch is empty: drop rows without a completion, or set "
                             "on_policy_fraction: 1.0")
    ids = [e.ids for e in prefixless_encoder(tokenizer).encode_batch(texts, add_special_tokens=False)]
    dataset, ends = ends is None, ["eos"] * len(texts) if ends is None else ends
    if unknown := set(ends) - {"eos", "stop", "length"}:
        raise ValueError(f"unknown completion ends {sorted(unknown)}: use 'eos', 'stop' or 'length'")
    completions = [t + [tokenizer.eos_token_id] if end == "eos" else t for t, end in zip(ids, ends, strict=True)]
    if dataset and (longest := max(map(len, completions), default=0)) > max_new_tokens:
        warnings.warn(f"dataset completions longer than sampling.max_new_tokens={max_new_tokens} are cut (the "
                      f"longest in this batch has {longest} tokens with its EOS): the student never sees their ends "
                      "or when to stop. Raise sampling.max_new_tokens to the longest completion, or drop long rows",
                      stacklevel=2)
    if any(not c for c in completions):
        raise ValueError("a completion cut by the length limit is empty: raise sampling.max_new_tokens")
    return rollout_from_token_lists(prompt_ids, prompt_mask, completions, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id, cut=[end == "length" for end in ends])
