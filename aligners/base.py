"""The aligner contract: how the teacher sees a student rollout, and how its outputs come back.

An aligner is configured in YAML, then bound once to the (student tokenizer, teacher tokenizer) pair with
`bind`, which is where a pair it cannot serve is refused. Per batch it turns a student rollout into teacher
inputs and projects the teacher's logits back to the student's completion positions as a `TeacherTarget`
(`opd_lightning.target`, the contract shared with the losses), filling the forms the loss asks for (a distribution
in the student's vocabulary, the teacher's own logits at aligned positions, the teacher's likelihood of each student
token). Every capability an aligner lists in `provides` must be filled when asked for. It also reports coverage: the
share of student completion tokens that received an exact target. Aligners are pure tensor/tokenizer code: no
Lightning, no losses.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from opd_lightning.registry import Registry
from opd_lightning.target import TeacherTarget, token_logprobs

if TYPE_CHECKING:
    from opd_lightning.rollout import Rollout

__all__ = ["ALIGNERS", "Aligner", "BoundaryPairs", "TeacherHidden", "TeacherInputs", "dense_token_logprobs",
           "fit_vocab", "token_logprobs_chunked"]

ALIGNERS: Registry = Registry("aligner")


@dataclass
class TeacherInputs:
    """What the teacher's forward pass receives, and what the aligner needs again to project its outputs."""

    input_ids: Tensor  # [B, T_teacher]
    attention_mask: Tensor  # [B, T_teacher]
    position_ids: Tensor  # [B, T_teacher]
    completion_length: int  # M: number of trailing positions whose predictions the aligner needs
    alignment: Any = None  # aligner-specific state for `project` (e.g. the byte-span alignment)
    branches: Any = None  # `branches.BranchQueries` over the main pass, for aligners that set `queries_teacher`


@dataclass
class TeacherHidden:
    """What `Aligner.project_hidden` reads: the teacher's outputs on its completion positions, both embedding tables."""

    hidden: Tensor  # [B, M, H_teacher] the input of the teacher's output layer (last hidden state, final norm applied)
    logits: Tensor  # [B, M, V_teacher] the teacher's logits there
    student_embeddings: Tensor  # [V, H_student] the student's input embedding table, detached
    teacher_embeddings: Tensor  # [V_teacher, H_teacher] the teacher's


@dataclass
class BoundaryPairs:
    """Positions of a batch where the student's and the teacher's tokenizations end a token on the same byte, over
    the whole sequence (prompt and completion): the last token of each span of `spans.align_ends` on both sides,
    so both models have read exactly the same text there. One entry per pair, `[K]` each (int64, bool)."""

    batch: Tensor  # row of the batch
    student: Tensor  # column in the rollout's `sequences` [B, P + N]
    teacher: Tensor  # column in the teacher's `input_ids` [B, T_teacher]
    in_prompt: Tensor  # bool: the pair lies in the prompt


class Aligner(abc.ABC):
    """Base class. Subclasses implement `bind`, `teacher_inputs` and `project`, and list what they provide.

    `provides` names the capabilities (`opd_lightning.target`) the aligner fills in its `TeacherTarget`; the module
    refuses a loss that requires anything else, naming the aligners that do provide it.
    """

    registry_name = ""
    provides: frozenset[str] = frozenset()
    #: True when the teacher reads the student's token ids unchanged (its completions can be reused as is).
    same_tokenizer = False
    #: True when `project` queries the teacher beyond its main pass (`TeacherInputs.branches` is then filled).
    queries_teacher = False
    #: True when `project` reads the teacher's logits only a set of positions at a time (`rows.gather_rows`,
    #: `token_logprobs_chunked`), so that a fused step may hand them as hidden states and the output layer
    #: (`HiddenRows`), whose logits are computed for those positions alone.
    reads_rows = False
    #: True when the target compares the student in another space (`TeacherTarget.student_projection`), so a loss
    #: must see the student's logits themselves.
    projects_student = False

    @abc.abstractmethod
    def bind(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int) -> None:
        """Check that this aligner can serve the pair, and precompute what it needs; raise if it cannot."""

    @abc.abstractmethod
    def teacher_inputs(self, rollout: Rollout) -> TeacherInputs:
        """Teacher inputs for a student rollout (prompt ids, then `N` completion columns)."""

    @abc.abstractmethod
    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        """Bring teacher logits for the completion (`[B, M, V_teacher]`) to the student's positions; fill `needs`."""

    def setup(self, student_hidden: int, teacher_hidden: int) -> None:
        """Create parameters whose shapes depend on the models' hidden sizes; called once, before the optimizer is
        built. Default: none (an aligner with parameters is also an `nn.Module`, so they train and are saved)."""

    def project_hidden(self, target: TeacherTarget, states: TeacherHidden, inputs: TeacherInputs,
                       rollout: Rollout) -> None:
        """Fill `target.hidden` and `target.sequence` (aligners that provide HIDDEN_STATES).

        Called after `project`, only when a loss requires hidden states, with gradients enabled in training so
        that an aligner's own parameters learn; the teacher's tensors in `states` carry no gradient.
        """
        raise NotImplementedError(f"aligner {self.registry_name!r} does not provide hidden states")

    def boundary_pairs(self, inputs: TeacherInputs, rollout: Rollout) -> BoundaryPairs:
        """The positions, prompt and completion, at which both tokenizations end a token on the same byte (for losses
        that compare the two models' hidden states along the whole sequence, e.g. `hidden_match`)."""
        raise NotImplementedError(f"aligner {self.registry_name!r} does not pair the two models' positions along the "
                                  "sequence: use identity (one tokenizer) or an aligner that re-tokenises the text "
                                  "(byte_spans, exact_spans, char_level, vocab_map, ...)")

    @staticmethod
    def _known() -> str:
        return ", ".join(sorted(ALIGNERS))


def fit_vocab(teacher_logits: Tensor, student_vocab_size: int) -> Tensor:
    """Resize the vocabulary axis of teacher logits to the student's padded size.

    Rows past the shared tokenizer are padding (models round their embedding tables up). Extra teacher rows are
    dropped; missing ones are filled 30 nats below each position's smallest logit, so the teacher puts
    negligible mass on ids no tokenizer produces.
    """
    v_t = teacher_logits.shape[-1]
    if v_t >= student_vocab_size:
        return teacher_logits[..., :student_vocab_size]
    fill = teacher_logits.amin(-1, keepdim=True) - 30.0
    return torch.cat([teacher_logits, fill.expand(*teacher_logits.shape[:-1], student_vocab_size - v_t)], dim=-1)


CHUNK_ROWS = 16  # teacher rows read at a time: [16, 262k] fp32 is 17 MB, small enough for the allocator to reuse


def token_logprobs_chunked(logits: Tensor, ids: Tensor) -> Tensor:
    """log softmax(logits)[ids] `[B, M]` from `[B, M, V]` logits, about `CHUNK_ROWS` positions at a time: views of
    the logits only, no `[B, M, V]` copy (they are often a non-contiguous slice of a model's output)."""
    dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32
    out = torch.empty(ids.shape, dtype=dtype, device=logits.device)
    rows = max(1, CHUNK_ROWS // max(ids.shape[1], 1))  # batch rows per chunk when completions are short
    for b in range(0, ids.shape[0], rows):
        for start in range(0, ids.shape[1], CHUNK_ROWS):
            at = (slice(b, b + rows), slice(start, start + CHUNK_ROWS))
            out[at] = token_logprobs(logits[at], ids[at])
    return out


def dense_token_logprobs(logp: Tensor, rollout: Rollout, valid: Tensor | None = None) -> Tensor:
    """The log-prob that a dense target `[B, N, V]` gives each completion token: `[B, N]`, zero where `valid` (or the
    completion mask) is False. Exact for the target it is read from; at temperature 1."""
    valid = rollout.completion_mask if valid is None else valid & rollout.completion_mask
    ids = rollout.completion_ids.masked_fill(~valid, 0)
    return token_logprobs_chunked(logp, ids).masked_fill(~valid, 0.0)
