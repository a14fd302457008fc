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
    capture_layers,
    check_bypassed,
    output_layer,
    output_layer_bypassed,
    output_layer_input,
    teacher_hidden,
    vocab_size,
)
from opd_lightning.losses import HiddenRows, default_chunk
from opd_lightning.losses.fused import CHUNK_ELEMENTS
from opd_lightning.rollout import Rollout
from opd_lightning.target import (
    HIDDEN_STATES,
    TEACHER_LOGITS,
    TEACHER_TOKEN_LOGPROBS,
    TEACHER_TOPK,
    TeacherTarget,
    TopK,
)

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


def chunked_topk(rows: HiddenRows, k: int) -> TopK:
    """`TopK.from_logits` of the logits `rows` stands for, computed a chunk of positions at a time (its
    `chunk_size`, else `default_chunk(V)`), so that `[B, N, V]` logits are never held whole."""
    b, n, vocab = rows.shape
    flat = HiddenRows(rows.hidden.reshape(b * n, -1), rows.weight, rows.bias)
    step = rows.chunk_size or default_chunk(vocab)
    parts = [TopK.from_logits(flat[lo : lo + step], k) for lo in range(0, b * n, step)] or [
        TopK.from_logits(flat[0:0], k)]
    ids, logprobs, tail = (torch.cat([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "tail"))
    return TopK(ids.reshape(b, n, -1), logprobs.reshape(b, n, -1), tail.reshape(b, n))


def join_rows(parts: list[TeacherTarget], masks: list[Tensor]) -> TeacherTarget:
    """Top-k targets of consecutive groups of rows (each scored on its own, `masks` their completion masks) as one:
    their forms concatenated along the rows, coverage weighted by each group's valid tokens, the vocabulary tables
    (the same for every row) taken once."""
    def cat(name: str) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    extra = {n for p in parts for n in ("logits", "native_logits", "hidden", "sequence", "student_projection")
             if getattr(p, n) is not None}
    if extra:
        raise ValueError(f"rows scored apart carry {sorted(extra)}, which cannot be joined; this is a bug")
    counts = [float(m.sum()) for m in masks]
    total = max(sum(counts), 1.0)
    mean = lambda name: (None if any(getattr(p, name) is None for p in parts)
                         else sum(getattr(p, name) * c for p, c in zip(parts, counts, strict=True)) / total)
    mask = None if all(p.mask is None for p in parts) else torch.cat(
        [p.mask if p.mask is not None else torch.ones_like(m) for p, m in zip(parts, masks, strict=True)])
    topk = TopK(*(torch.cat([getattr(p.topk, f) for p in parts]) for f in ("ids", "logprobs", "tail")),
                parts[0].topk.temperature)
    return TeacherTarget(coverage=mean("coverage"), mask=mask, topk=topk, token_logprobs=cat("token_logprobs"),
                         token_spans=cat("token_spans"), mass_coverage=mean("mass_coverage"),
                         vocab_pairs=parts[0].vocab_pairs, vocab_projection=parts[0].vocab_projection)  # tables


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
                       fused: int | None = None, layers: dict[int, Tensor | None] | None = None) -> TeacherTarget:
        """The teacher's target on `rollout`, with every capability in `needs` filled. With `fused` (the module's
        `logits_chunk_size`, on batches whose losses all read the student fused), a teacher sharing the student's
        tokenizer hands its hidden states and output layer (`HiddenRows`) instead of `[B, N, V]` logits, where only
        dense logits are needed and its output layer can be applied as a plain linear layer.

        `layers`, keyed by hidden-state index (`hidden.capture_layers`' numbering): filled with the teacher's hidden
        states `[B, T, H]` on `aligner.teacher_inputs(rollout)` (prompt included) where the target comes from one
        forward pass over those inputs, so that a loss reading them (`hidden_match`) needs no forward of its own;
        left None where it does not (a fused target with one tokenizer, rows taken in groups)."""
        if fused is not None:
            target = self._fused_teacher_target(rollout, needs, student, fused)
            if target is None and self._keeps_topk_only(needs):
                target = self._grouped_teacher_target(rollout, needs, student, fused)
            if target is not None:
                return target
        grad = torch.is_grad_enabled()  # for an aligner's own parameters (hidden states only)
        asked = self.needs_from_aligner(needs)
        with torch.no_grad():
            inputs = self.aligner.teacher_inputs(rollout)
            hidden, captured = [] if HIDDEN_STATES in needs else None, {}
            with capture_layers(self.teacher, layers or (), captured):  # the one forward below, not branch queries
                logits = self._teacher_rows(inputs, needs, fused)
                if logits is None:
                    with output_layer_input(self.teacher, hidden):
                        logits = completion_logits(self.teacher, inputs.input_ids, inputs.attention_mask,
                                                   inputs.position_ids, inputs.completion_length,
                                                   keep_cache=self.aligner.queries_teacher)
            if layers is not None:
                layers.update(captured)
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

    def rows_per_group(self, rollout: Rollout, student: nn.Module) -> int:
        """Rows of `rollout` whose teacher logits and aligned target hold at most `CHUNK_ELEMENTS` values each (their
        completion width times the wider vocabulary), at least one."""
        width = rollout.completion_mask.shape[1] * max(vocab_size(student), vocab_size(self.teacher))
        return max(1, CHUNK_ELEMENTS // max(width, 1))

    def projects_dense(self, needs: frozenset[str]) -> bool:
        """Whether the teacher's target for `needs` is the aligner's dense `[B, N, V]` projection across tokenizers,
        held whole for the rows it is built on (the top-k form alone is reduced a group of rows at a time)."""
        return (not self.aligner.same_tokenizer and TEACHER_LOGITS in self.needs_from_aligner(needs)
                and not self._keeps_topk_only(needs))

    def _keeps_topk_only(self, needs: frozenset[str]) -> bool:
        """Whether the losses read the top-k form (and token log-probs) only, so that the aligner's dense target is
        reduced to it as soon as it is built."""
        return TEACHER_TOPK in needs and needs <= {TEACHER_TOPK, TEACHER_TOKEN_LOGPROBS}

    def _teacher_rows(self, inputs, needs: frozenset[str], fused: int | None) -> HiddenRows | None:
        """In a fused step across tokenizers, for an aligner that reads the teacher's logits a set of positions at a
        time (`reads_rows`): the teacher's hidden states and output layer, so that only the positions the projection
        reads have logits, a chunk at a time, and `[B, M, V_T]` logits never exist. None where the logits are built:
        unfused, one tokenizer (`_fused_teacher_target`), hidden-state losses, branch queries, or an output layer a
        plain linear form does not reproduce (a soft-cap, a quantized weight, a served teacher)."""
        if fused is None or self.aligner.same_tokenizer or not self.aligner.reads_rows or HIDDEN_STATES in needs:
            return None
        return self._hidden_rows(inputs.input_ids, inputs.attention_mask, inputs.position_ids, inputs.completion_length,
                                 fused)

    def _hidden_rows(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, length: int, chunk: int,
                     size: int | None = None) -> HiddenRows | None:
        """The teacher's hidden states at the positions predicting the last `length` tokens, with its output layer
        (its first `size` rows; all with None) as `HiddenRows`. None where a plain `hidden @ weightᵀ + bias` does not
        reproduce its logits: a soft-cap, an adapter with dropout, no output layer here (a served teacher), a
        quantized weight, or fewer than `size` rows (fit_vocab pads those per position)."""
        try:
            weight, bias = output_layer(self.teacher)
        except ValueError:
            return None
        size = weight.shape[0] if size is None else size
        if not torch.is_floating_point(weight) or weight.shape[0] < size:
            return None
        hidden = completion_hidden(self.teacher, weight, input_ids, attention_mask, position_ids, length)
        return HiddenRows(hidden, weight[:size].detach(), None if bias is None else bias[:size].detach(), chunk)

    def _grouped_teacher_target(self, rollout: Rollout, needs: frozenset[str], student: nn.Module,
                                fused: int | None = None) -> TeacherTarget | None:
        """The top-k target of a fused batch through a projecting aligner, a group of rows at a time: the teacher's
        `[g, M, V_T]` logits and the aligner's dense `[g, N, V]` target exist for `g` rows only, at most
        `CHUNK_ELEMENTS` values each (one row when a row is larger), and are reduced to the top-k form before the
        next group. None when the batch fits in one group."""
        group = self.rows_per_group(rollout, student)
        if group >= len(rollout):
            return None
        parts = [self.teacher_target(rollout.select(slice(lo, lo + group)), needs, student, fused)
                 for lo in range(0, len(rollout), group)]
        return join_rows(parts, [rollout.completion_mask[lo : lo + group] for lo in range(0, len(rollout), group)])

    @torch.no_grad()
    def _fused_teacher_target(self, rollout: Rollout, needs: frozenset[str], student: nn.Module,
                              chunk: int) -> TeacherTarget | None:
        if not self.aligner.same_tokenizer or self.needs_from_aligner(needs) != {TEACHER_LOGITS}:
            return None  # the aligner projects, or a loss reads another form: the teacher's logits are built
        rows = self._hidden_rows(rollout.sequences, rollout.attention_mask, rollout.position_ids,
                                 rollout.completion_mask.shape[1], chunk, vocab_size(student))
        if rows is None:
            return None
        if TEACHER_TOPK in needs:  # only the top-k form is kept: [B, N, k], never [B, N, V]
            return TeacherTarget(coverage=1.0, topk=chunked_topk(rows, self.teacher_topk), mass_coverage=1.0)
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
