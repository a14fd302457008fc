"""The shared half of every cross-tokenizer aligner: the teacher reads the student's rollout as text.

`TextAligner.bind` builds both byte tables and the vocabulary map (tokens spelling the same bytes; EOS matched by
role), `teacher_inputs` re-tokenises the rollout (`spans.retokenise`), and the helpers below gather teacher
outputs at the positions an aligner chooses. Subclasses differ only in `project`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from opd_lightning.rollout import Rollout, position_ids

from .base import Aligner, TeacherInputs
from .bytes import TokenBytes
from .spans import TextView, retokenise
from .trie import prefixless_encoder

__all__ = ["LOG_FLOOR", "TextAligner", "gather_rows", "keep_rows", "mass_to_logits", "scatter_rows", "span_logprobs",
           "vocab_pairs"]


def gather_rows(values: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of `values` `[B, M, ...]` at per-student-token teacher positions `index` `[B, N]` (-1: none).

    Returns (valid `[B, N]` bool, rows `[n, ...]` for the valid positions in row-major order).
    """
    valid = index >= 0
    batch = torch.arange(index.shape[0], device=index.device).unsqueeze(1).expand_as(index)
    return valid, values[batch[valid], index[valid]]


def keep_rows(valid: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Narrow a position mask `[B, N]` to the valid positions whose row (`[n]`, row-major order) is kept.

    Returns (the narrowed mask `[B, N]`, `keep` itself, to select the kept rows).
    """
    narrowed = torch.zeros_like(valid)
    narrowed[valid] = keep
    return narrowed, keep


def span_logprobs(teacher_logits: Tensor, view: TextView, n_student: int) -> tuple[Tensor, Tensor]:
    """The teacher's log-likelihood of each aligned span's text, placed on the span's last student token.

    Returns (log-probs `[B, N]`, zero off span ends; span ends `[B, N]` bool).
    """
    ids, t_span, s_span = view.teacher_ids, view.teacher_span, view.student_span
    logp = torch.log_softmax(teacher_logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, M]
    n_spans = int(max(t_span.max(), s_span.max(), 0)) + 1
    totals = logp.new_zeros(ids.shape[0], n_spans + 1)  # column n_spans collects tokens without a span
    totals.scatter_add_(1, torch.where(t_span >= 0, t_span, n_spans), logp.masked_fill(~view.teacher_mask, 0))
    nxt = torch.nn.functional.pad(s_span[:, 1:], (0, 1), value=-1)
    last = (s_span >= 0) & (s_span != nxt)  # [B, N] last student token of its span
    out = totals.gather(1, s_span.clamp_min(0)).masked_fill(~last, 0)
    return out[:, :n_student], last[:, :n_student]


class TextAligner(Aligner):
    """Base of the aligners whose teacher re-tokenises the student's text."""

    def __init__(self) -> None:
        self.student_bytes: TokenBytes | None = None
        self.teacher_bytes: TokenBytes | None = None
        self.teacher_tokenizer = self.teacher_encoder = None
        self.student_tokenizer = None
        self.pairs: tuple[Tensor, Tensor] = (torch.zeros(0, dtype=torch.long),) * 2
        self.student_vocab_size = self.teacher_vocab_size = 0

    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        if not getattr(teacher_tokenizer, "is_fast", False):
            raise ValueError(f"{self.registry_name} needs the teacher's tokenizer offsets, which only fast tokenizers "
                             "give: load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        self.student_bytes = TokenBytes.from_tokenizer(student_tokenizer, student_vocab_size)
        self.teacher_bytes = TokenBytes.from_tokenizer(teacher_tokenizer, teacher_vocab_size)
        self.student_bytes.check(student_tokenizer)
        self.teacher_bytes.check(teacher_tokenizer)
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.teacher_encoder = prefixless_encoder(teacher_tokenizer)
        self.student_vocab_size, self.teacher_vocab_size = student_vocab_size, teacher_vocab_size
        self.pairs = vocab_pairs(self.student_bytes, self.teacher_bytes)

    def teacher_inputs(self, rollout: Rollout) -> TeacherInputs:
        p = rollout.prompt_length
        mask = rollout.attention_mask.cpu().numpy()
        seq = rollout.sequences.cpu().numpy()
        view = retokenise(self.student_bytes, self.teacher_tokenizer, self.teacher_encoder, seq[:, :p], mask[:, :p], seq[:, p:], mask[:, p:],
                          self.teacher_tokenizer.eos_token_id, self.teacher_bytes)
        device = rollout.sequences.device
        for name in ("input_ids", "attention_mask", "teacher_ids", "teacher_mask", "student_span", "teacher_span",
                     "teacher_at_start", "containing", "path_start"):
            setattr(view, name, getattr(view, name).to(device))
        if view.input_ids.shape[1] == view.teacher_ids.shape[1]:
            raise ValueError("the teacher's prompts are empty (no text and no BOS): it has no position from which to "
                             "predict the first completion token; give the prompts some text")
        return TeacherInputs(view.input_ids, view.attention_mask, position_ids(view.attention_mask),
                             view.teacher_ids.shape[1], alignment=view)

    def coverage(self, has_target: Tensor, rollout: Rollout) -> float:
        """Share of the rollout's valid completion tokens with a target."""
        mask = rollout.completion_mask
        return float((has_target & mask).sum() / mask.sum().clamp_min(1))


def vocab_pairs(student: TokenBytes, teacher: TokenBytes) -> tuple[Tensor, Tensor]:
    """Token ids spelling the same bytes in both vocabularies, plus EOS with EOS: `(student [K], teacher [K])`.

    Each id appears at most once on each side (a vocabulary may spell one text twice, e.g. `A` and `<0x41>`; the
    lower id wins), so gathering with the pairs never counts a probability twice.
    """
    pairs = [(student.eos_id, teacher.eos_id)] if student.eos_id >= 0 and teacher.eos_id >= 0 else []
    index = {b: i for i, b in reversed(list(enumerate(student.table))) if b}
    pairs += [(index[b], v) for v, b in enumerate(teacher.table) if b and b in index]
    seen: set[int] = set()
    unique = [p for p in pairs if not (p[0] in seen or seen.add(p[0]))]
    arr = np.array(unique, dtype=np.int64).reshape(-1, 2)
    return torch.from_numpy(arr[:, 0].copy()), torch.from_numpy(arr[:, 1].copy())


LOG_FLOOR = -80.0  # log-probability given to student tokens a projected teacher distribution cannot reach


def scatter_rows(rows: Tensor, valid: Tensor, fill: float = 0.0) -> Tensor:
    """Valid-position rows `[n, V]` back into `[B, N, V]`; other positions hold `fill`."""
    out = rows.new_full((*valid.shape, rows.shape[-1]), fill)
    out[valid] = rows
    return out


def mass_to_logits(mass: Tensor) -> tuple[Tensor, Tensor]:
    """Renormalise projected probability masses `[n, V]` to log-probs floored at `LOG_FLOOR`.

    Returns (log-probs `[n, V]`, the mass each row kept `[n]`). Rows that kept no mass come back as uniform logits
    (the caller masks them).
    """
    kept = mass.sum(-1)  # [n]
    logp = torch.log(mass / kept.clamp_min(torch.finfo(mass.dtype).tiny).unsqueeze(-1)).clamp_min(LOG_FLOOR)
    return logp.masked_fill((kept <= 0).unsqueeze(-1), 0.0), kept
