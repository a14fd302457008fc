"""Scoring a rollout with a frozen reference: the teacher through the aligner, or the student as it started.

Every loss term reads one reference on one set of completions; `ReferenceScorer` turns a rollout into that
reference's `TeacherTarget` at the student's completion positions, in the forms the terms need, and checks that each
form asked for was filled. It holds the frozen models and the aligner and nothing of the training module's, so the
step can be followed from the module into here.

The teacher runs without gradients; only an aligner's own parameters (the `dskd_cma` attention) see a gradient, when
the hidden-state projection runs in training. With `teacher_topk` the dense form is replaced by the top-k form
before it reaches a loss (the losses that accept it declare `accepts_topk`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from opd_lightning.aligners import Aligner, dense_token_logprobs
from opd_lightning.aligners.branches import BranchQueries
from opd_lightning.hidden import (
    check_bypassed,
    output_layer,
    output_layer_bypassed,
    output_layer_input,
    teacher_hidden,
)
from opd_lightning.losses import HiddenRows
from opd_lightning.rollout import Rollout
from opd_lightning.target import HIDDEN_STATES, TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS, TEACHER_TOPK, TeacherTarget

__all__ = ["ReferenceScorer", "completion_logits"]


def completion_hidden(model: nn.Module, weight: Tensor, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                      completion_length: int) -> Tensor:
    """The hidden states `[B, N, H]` that `model`'s output layer (of weight `weight`) would read at the positions
    predicting the last `completion_length` tokens: `completion_logits` with the output layer bypassed."""
    with output_layer_bypassed(model):
        hidden = completion_logits(model, input_ids, attention_mask, position_ids, completion_length)
    return check_bypassed(hidden, weight, model)


def completion_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                      completion_length: int, keep_cache: bool = False):
    """Logits predicting the last `completion_length` tokens: `[B, N, V]` (the prompt's positions are never
    projected through the output layer); with `keep_cache`, also the pass's KV cache."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=completion_length + 1, use_cache=keep_cache)
    if not keep_cache:
        return out.logits[:, :-1]
    cache = getattr(out, "cache", None)
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no KV cache with use_cache=True; an aligner that queries "
                         "the teacher off the realised path (exact_spans) needs a Hugging Face causal LM teacher")
    return out.logits[:, :-1], cache


class ReferenceScorer:
    """The teacher's and the initial student's targets on a rollout."""

    def __init__(self, aligner: Aligner, teacher: nn.Module | None, initial_student: nn.Module | None,
                 teacher_topk: int | None = None) -> None:
        """
        Args:
            aligner: bound to the (student, teacher) tokenizer pair.
            teacher: the frozen teacher, or None.
            initial_student: a frozen copy of the student before training, or None (with LoRA the reference is the
                student with its adapter disabled, passed at each call).
            teacher_topk: replace the teacher's dense form by its top-k form with this k; None keeps it dense.
        """
        self.aligner, self.teacher, self.initial_student = aligner, teacher, initial_student
        self.teacher_topk = teacher_topk

    def needs_from_aligner(self, needs: frozenset[str]) -> frozenset[str]:
        """What to ask the aligner for: the top-k form is taken from its dense form."""
        return needs - {TEACHER_TOPK} | ({TEACHER_LOGITS} if TEACHER_TOPK in needs else set())

    def teacher_target(self, rollout: Rollout, needs: frozenset[str], student: nn.Module,
                       fused: int | None = None) -> TeacherTarget:
        """The teacher's target on `rollout`, with every capability in `needs` filled. With `fused` (the module's
        `logits_chunk_size`, on batches whose losses all read the student fused), a teacher sharing the student's
        tokenizer hands its hidden states and output layer (`HiddenRows`) instead of `[B, N, V]` logits, where only
        dense logits are needed and its output layer can be applied as a plain linear layer."""
        if fused is not None:
            target = self._fused_teacher_target(rollout, needs, student, fused)
            if target is not None:
                return target
        grad = torch.is_grad_enabled()  # for an aligner's own parameters (hidden states only)
        asked = self.needs_from_aligner(needs)
        with torch.no_grad():
            inputs = self.aligner.teacher_inputs(rollout)
            hidden = [] if HIDDEN_STATES in needs else None
            with output_layer_input(self.teacher, hidden):
                logits = completion_logits(self.teacher, inputs.input_ids, inputs.attention_mask, inputs.position_ids,
                                           inputs.completion_length, keep_cache=self.aligner.queries_teacher)
            if self.aligner.queries_teacher:
                logits, cache = logits
                inputs.branches = BranchQueries(self.teacher, cache, inputs.attention_mask, inputs.position_ids)
            target = self.aligner.project(logits, inputs, rollout, asked)
            if hidden:
                with torch.set_grad_enabled(grad):
                    states = teacher_hidden(hidden[0], logits, student, self.teacher)
                    self.aligner.project_hidden(target, states, inputs, rollout)
                target.head = self.teacher.get_output_embeddings().weight.detach()
        target.check(asked, f"aligner {self.aligner.registry_name!r}")
        if TEACHER_TOPK in needs:
            target = target.with_topk(self.teacher_topk)
        return target

    @torch.no_grad()
    def _fused_teacher_target(self, rollout: Rollout, needs: frozenset[str], student: nn.Module,
                              chunk: int) -> TeacherTarget | None:
        if not self.aligner.same_tokenizer or self.needs_from_aligner(needs) != {TEACHER_LOGITS} or TEACHER_TOPK in needs:
            return None  # the aligner projects, or a loss reads another form: the teacher's logits are built
        try:
            weight, bias = output_layer(self.teacher)
        except ValueError:  # a soft-cap or an adapter the linear form does not reproduce
            return None
        size = student.get_output_embeddings().weight.shape[0]
        if not torch.is_floating_point(weight) or weight.shape[0] < size:
            return None  # a quantized output layer, or one to pad (fit_vocab fills per position)
        hidden = completion_hidden(self.teacher, weight, rollout.sequences, rollout.attention_mask, rollout.position_ids,
                                   rollout.completion_mask.shape[1])
        rows = HiddenRows(hidden, weight[:size].detach(), None if bias is None else bias[:size].detach(), chunk)
        return TeacherTarget(coverage=1.0, logits=rows, mass_coverage=1.0)

    @torch.no_grad()
    def initial_target(self, rollout: Rollout, needs: frozenset[str], student: nn.Module,
                       lora: bool) -> TeacherTarget:
        """The student-before-training's target on `rollout` (same tokenizer: dense, native and token forms)."""
        args = (rollout.sequences, rollout.attention_mask, rollout.position_ids, rollout.completion_mask.shape[1])
        if lora:
            with student.disable_adapter():
                logits = completion_logits(student, *args)
        else:
            logits = completion_logits(self.initial_student, *args)
        ids = torch.arange(logits.shape[-1], device=logits.device)
        tokens = dense_token_logprobs(logits, rollout) if TEACHER_TOKEN_LOGPROBS in needs else None
        target = TeacherTarget(coverage=1.0, logits=logits, native_logits=logits, vocab_pairs=(ids, ids),
                               token_logprobs=tokens)
        if TEACHER_TOPK in needs:
            target = target.with_topk(self.teacher_topk)
        return target
