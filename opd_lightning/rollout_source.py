"""Where a step's completions come from: the student's samples, the dataset's, or the teacher's.

`RolloutPolicy` is the typed group of options (λ, the off-policy source, micro-batches, the context limit, the chat
template, special-token masking); `RolloutSource` carries them out, given the two tokenizers and the sampling
settings once and the models and the step at each call, so that a reader follows a step from the module into here
without guessing which attributes of the module it reads.

Draws are keyed, not streamed (`seeding`): the on/off-policy choice by (seed, step), the same on every data-parallel
rank, and each row's sampling noise by (seed, step, dataset row), so a resumed run draws what the uninterrupted one
would and a row samples the same tokens on whichever rank it lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from opd_lightning.rollout import Rollout, SamplingConfig, encode_prompts, generate_rollout, rollout_from_texts
from opd_lightning.seeding import BRANCH, SAMPLE_EVAL, SAMPLE_TEACHER, SAMPLE_TRAIN, derive_seed, uniform

__all__ = ["RolloutPolicy", "RolloutSource", "check_ranks_agree", "completions"]


@dataclass
class RolloutPolicy:
    """Which completions each step trains on, and how a step is split.

    Args:
        on_policy_fraction: λ, the probability that a training step is rolled out by the student; otherwise its
            completions come from `off_policy_source`. Drawn per optimizer step, the same on every rank. Validation
            and test are always on-policy.
        off_policy_source: "dataset" (the batch's `completion` texts) or "teacher" (sequence-level KD: the teacher
            samples the completions with the sampling settings).
        micro_batch_size: rows per forward/backward; the batch is one optimizer step (gradient accumulation). None:
            the whole batch at once.
        max_length: context limit for prompt + completion; defaults to the student's `max_position_embeddings`.
            Longer prompts are refused with an error.
        use_chat_template: wrap each prompt as a user turn with the tokenizer's chat template.
        mask_special_tokens: leave completion positions holding special tokens other than EOS (pad, unk, BOS,
            chat-template markers) out of every loss; they stay in the context the models read.
    """

    on_policy_fraction: float = 1.0
    off_policy_source: Literal["dataset", "teacher"] = "dataset"
    micro_batch_size: int | None = None
    max_length: int | None = None
    use_chat_template: bool = False
    mask_special_tokens: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"rollout.on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if self.off_policy_source not in ("dataset", "teacher"):
            raise ValueError(f"rollout.off_policy_source must be 'dataset' or 'teacher', got {self.off_policy_source!r}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"rollout.micro_batch_size must be at least 1, got {self.micro_batch_size}")

    @property
    def mixes(self) -> bool:
        """Whether training steps draw between on- and off-policy (0 < λ < 1)."""
        return 0.0 < self.on_policy_fraction < 1.0

    def reads_completions(self) -> bool:
        """Whether some training steps use the dataset's completions."""
        return self.on_policy_fraction < 1.0 and self.off_policy_source == "dataset"


class RolloutSource:
    """Turns a batch of prompts into the step's rollouts: "rollout" (scored by the loss) and, if asked, "gold"."""

    def __init__(self, student_tokenizer, teacher_tokenizer, policy: RolloutPolicy, sampling: SamplingConfig, *,
                 same_tokenizer: bool, gold: bool, max_length: int | None, seed: int) -> None:
        """
        Args:
            student_tokenizer: the student's tokenizer (left padding); every rollout is in its ids.
            teacher_tokenizer: the teacher's, used when it writes completions in another vocabulary; None without one.
            policy: the rollout options.
            sampling: sampling settings of the student's and the teacher's rollouts.
            same_tokenizer: the teacher reads the student's ids (its completions need no re-tokenising).
            gold: also build the "gold" rollout of the dataset's completions (for terms trained on them).
            max_length: the context limit prompts are checked against.
            seed: the run's rollout seed.
        """
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.policy, self.sampling = policy, sampling
        self.same_tokenizer, self.gold, self.max_length, self.seed = same_tokenizer, gold, max_length, seed
        self.teacher_cache = None  # a `TeacherCache` holding the teacher's completions, read instead of sampling

    def on_policy(self, step: int, train: bool) -> bool:
        """Whether the step rolls out on-policy: keyed by (seed, step) only, so every rank draws the same."""
        if not train:
            return True
        return uniform(self.seed, BRANCH, step) < self.policy.on_policy_fraction

    def row_seeds(self, purpose: int, step: int, rows: list[int]) -> list[int]:
        """One sampling seed per row, keyed by (seed, purpose, step, dataset row)."""
        return [derive_seed(self.seed, purpose, step, row) for row in rows]

    def rollouts(self, batch: dict, *, on_policy: bool, student: nn.Module, teacher: nn.Module | None, step: int,
                 train: bool, device: torch.device, sharded: bool = False, split: str = "train") -> dict[str, Rollout]:
        """The step's rollouts for `batch` (lists of strings; `index`, the dataset rows, keys the sampling noise);
        `on_policy` as `self.on_policy(step, train)` drew it; `split` names the data for a teacher cache."""
        prompt_ids, prompt_mask = self.encode_prompts(batch["prompt"], device)
        rows = batch.get("index") or list(range(len(batch["prompt"])))
        index = torch.tensor(rows, device=device)
        rollouts: dict[str, Rollout] = {}
        if on_policy:
            seeds = self.row_seeds(SAMPLE_TRAIN if train else SAMPLE_EVAL, step, rows)
            rollouts["rollout"] = self.finish(self.generate(student, prompt_ids, prompt_mask, seeds, sharded), index,
                                              "student")
        elif self.policy.off_policy_source == "teacher" and self.teacher_cache is not None:
            pad = self.student_tokenizer.pad_token_id
            rollouts["rollout"] = self.teacher_cache.rollout(split, index, prompt_ids, prompt_mask, pad)
        elif self.policy.off_policy_source == "teacher":
            seeds = self.row_seeds(SAMPLE_TEACHER, step, rows)
            rollout = self.teacher_rollout(teacher, batch["prompt"], prompt_ids, prompt_mask, seeds, sharded)
            rollouts["rollout"] = self.finish(rollout, index, "teacher")
        else:
            rollouts["rollout"] = self.gold_rollout(batch, device, (prompt_ids, prompt_mask), index)
        if self.gold:
            rollouts["gold"] = self.gold_rollout(batch, device, (prompt_ids, prompt_mask), index)
        return rollouts

    def gold_rollout(self, batch: dict, device: torch.device, encoded: tuple[Tensor, Tensor] | None = None,
                     index: Tensor | None = None) -> Rollout:
        """The batch's dataset completions as a rollout (source "dataset"); `encoded` (prompt ids and mask) and `index`
        (the dataset rows) where the caller has them already."""
        prompt_ids, prompt_mask = encoded or self.encode_prompts(batch["prompt"], device)
        if index is None:
            index = torch.tensor(batch.get("index") or list(range(len(batch["prompt"]))), device=device)
        return self.finish(self.text_rollout(prompt_ids, prompt_mask, completions(batch)), index, "dataset")

    def finish(self, rollout: Rollout, rows: Tensor, source: str) -> Rollout:
        """Record the rollout's dataset rows and author, and leave special tokens out of its mask where asked."""
        rollout.rows, rollout.source = rows, source
        if self.policy.mask_special_tokens:
            tok = self.student_tokenizer
            special = torch.tensor(sorted(set(tok.all_special_ids) - {tok.eos_token_id}), device=rows.device)
            rollout.completion_mask &= ~torch.isin(rollout.completion_ids, special)
        return rollout

    def encode_prompts(self, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        ids, mask = encode_prompts(self.student_tokenizer, prompts, chat_template=self.policy.use_chat_template,
                                   max_new_tokens=self.sampling.max_new_tokens, max_length=self.max_length)
        return ids.to(device), mask.to(device)

    def text_rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, texts: list[str],
                     ends: list[str] | None = None) -> Rollout:
        return rollout_from_texts(self.student_tokenizer, prompt_ids, prompt_mask, texts,
                                  max_new_tokens=self.sampling.max_new_tokens, ends=ends)

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, seeds: list[int],
                 sharded: bool = False) -> Rollout:
        tok = self.student_tokenizer
        return generate_rollout(model, prompt_ids, prompt_mask, self.sampling, eos_token_ids=[tok.eos_token_id],
                                pad_token_id=tok.pad_token_id, synced_gpus=sharded, tokenizer=tok, row_seeds=seeds)

    def teacher_rollout(self, teacher: nn.Module, prompts: list[str], prompt_ids: Tensor, prompt_mask: Tensor,
                        seeds: list[int], sharded: bool = False) -> Rollout:
        """Completions written by the teacher (sequence-level KD), as a rollout in the student's ids."""
        if self.same_tokenizer:
            rollout = self.generate(teacher, prompt_ids, prompt_mask, seeds)
            rollout.on_policy = False
            return rollout
        t_tok = self.teacher_tokenizer
        enc = t_tok(prompts, padding=True, return_tensors="pt").to(prompt_ids.device)
        out = generate_rollout(teacher, enc["input_ids"], enc["attention_mask"], self.sampling,
                               eos_token_ids=[t_tok.eos_token_id], pad_token_id=t_tok.pad_token_id, tokenizer=t_tok,
                               row_seeds=seeds)
        ids = out.completion_ids.masked_fill(~out.completion_mask, t_tok.pad_token_id)
        last = ids.gather(1, (out.completion_mask.sum(1, keepdim=True) - 1).clamp(min=0))[:, 0]
        ends = ["length" if cut else "eos" if end == t_tok.eos_token_id else "stop"
                for cut, end in zip(out.truncated.tolist(), last.tolist(), strict=True)]
        texts = t_tok.batch_decode(ids, skip_special_tokens=True)
        return self.text_rollout(prompt_ids, prompt_mask, texts, ends=ends)


def completions(batch: dict) -> list[str]:
    """The batch's dataset completions, or an error naming the fix."""
    if batch.get("completion") is None:
        raise ValueError("off-policy or gold terms need a `completion` field in the data; add it, or use "
                         "rollout.on_policy_fraction: 1.0 without gold terms")
    return batch["completion"]


def check_ranks_agree(strategy, on_policy: bool, step: int, device: torch.device) -> None:
    """Raise, on every rank, if the data-parallel ranks drew different rollout sources for `step` (one all-gather):
    the ranks would otherwise enter different collectives (a sharded generation against none) and wait forever."""
    drawn = strategy.all_gather(torch.tensor([int(on_policy)], device=device)).flatten()
    if not (drawn == drawn[0]).all():
        on = [rank for rank, value in enumerate(drawn.tolist()) if value]
        raise RuntimeError(f"data-parallel ranks disagree on step {step}'s rollout source (on-policy on ranks {on}, "
                           "off-policy on the others): their collectives would no longer pair up. The choice must "
                           "depend on (seed, step) only, as RolloutSource.on_policy draws it.")
