"""Where a step's completions come from: the student's samples, the dataset's, or the teacher's.

`RolloutSource` is a mixin of `DistillationModule`, kept apart because it is one concept: prompt encoding,
seeded sampling (a resumed run draws what the original would), the on/off-policy choice, teacher-written text across
tokenizers, gold completions and special-token masking. It reads the module's `student`, `teacher`,
`student_tokenizer`, `teacher_tokenizer`, `aligner`, `terms`, `sampling`, `on_policy_fraction`,
`off_policy_source`, `use_chat_template`, `mask_special_tokens`, `max_length`, `seed` and `_draws`.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from opd_lightning.rollout import Rollout, encode_prompts, generate_rollout, rollout_from_texts

__all__ = ["RolloutSource"]


class RolloutSource:
    """The rollout methods of `DistillationModule` (a LightningModule: `device`, `trainer` and steps come from it)."""

    def _encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = encode_prompts(self.student_tokenizer, prompts, chat_template=self.use_chat_template,
                                   max_new_tokens=self.sampling.max_new_tokens, max_length=self.max_length)
        return ids.to(self.device), mask.to(self.device)

    def _text_rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, texts: list[str],
                      ends: list[str] | None = None) -> Rollout:
        return rollout_from_texts(self.student_tokenizer, prompt_ids, prompt_mask, texts,
                                  max_new_tokens=self.sampling.max_new_tokens, ends=ends)

    def _generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor) -> Rollout:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        tok = self.student_tokenizer
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy | ModelParallelStrategy)
        with self._seeded():
            return generate_rollout(model, prompt_ids, prompt_mask, self.sampling, eos_token_ids=[tok.eos_token_id],
                                    pad_token_id=tok.pad_token_id, synced_gpus=sharded, tokenizer=tok)

    @contextmanager
    def _seeded(self):
        """Sample with a seed derived from (seed, step, rank, batch): a resumed run draws what the original would."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._draw_seed())
            yield

    def _draw_seed(self) -> int:
        step = self.global_step if self._trainer is not None else 0
        rank = self.global_rank if self._trainer is not None else 0
        self._draws += 1
        return hash((self.seed, step, rank, self._draws)) % (2**63)

    def _teacher_rollout(self, prompts: list[str], prompt_ids: Tensor, prompt_mask: Tensor) -> Rollout:
        if self.aligner.same_tokenizer:
            rollout = self._generate(self.teacher, prompt_ids, prompt_mask)
            rollout.on_policy = False
            return rollout
        t_tok = self.teacher_tokenizer
        enc = t_tok(prompts, padding=True, return_tensors="pt").to(self.device)
        with self._seeded():
            out = generate_rollout(self.teacher, enc["input_ids"], enc["attention_mask"], self.sampling,
                                   eos_token_ids=[t_tok.eos_token_id], pad_token_id=t_tok.pad_token_id, tokenizer=t_tok)
        ids = out.completion_ids.masked_fill(~out.completion_mask, t_tok.pad_token_id)
        last = ids.gather(1, (out.completion_mask.sum(1, keepdim=True) - 1).clamp(min=0))[:, 0]
        ends = ["length" if cut else "eos" if end == t_tok.eos_token_id else "stop"
                for cut, end in zip(out.truncated.tolist(), last.tolist(), strict=True)]
        texts = t_tok.batch_decode(ids, skip_special_tokens=True)
        return self._text_rollout(prompt_ids, prompt_mask, texts, ends=ends)

    def _rollouts(self, batch: dict, train: bool) -> dict[str, Rollout]:
        prompt_ids, prompt_mask = self._encode_prompts(batch["prompt"])
        rollouts: dict[str, Rollout] = {}
        if not train or random.Random(self._draw_seed()).random() < self.on_policy_fraction:
            rollouts["rollout"] = self._generate(self.student, prompt_ids, prompt_mask)
        elif self.off_policy_source == "teacher":
            rollouts["rollout"] = self._teacher_rollout(batch["prompt"], prompt_ids, prompt_mask)
        else:
            rollouts["rollout"] = self._text_rollout(prompt_ids, prompt_mask, self._completions(batch))
        if any(t.completions == "gold" for t in self.terms):
            rollouts["gold"] = self._text_rollout(prompt_ids, prompt_mask, self._completions(batch))
        if self.mask_special_tokens:
            tok = self.student_tokenizer
            special = torch.tensor(sorted(set(tok.all_special_ids) - {tok.eos_token_id}), device=self.device)
            for rollout in rollouts.values():
                rollout.completion_mask &= ~torch.isin(rollout.completion_ids, special)
        return rollouts

    @staticmethod
    def _completions(batch: dict) -> list[str]:
        if batch.get("completion") is None:
            raise ValueError("off-policy or gold terms need a `completion` field in the data; add it, or use "
                             "on_policy_fraction: 1.0 without gold terms")
        return batch["completion"]
