"""Cross-model attention (CMA): DSKD's learned alignment between two tokenizations of one completion.

Span alignments need exact token boundaries; CMA (Zhang et al. 2024, "Dual-Space Knowledge Distillation for Large
Language Models", EMNLP, §3.3) learns instead where each student token should read from the teacher's sequence. A
student position is described by its input and target tokens, a teacher position by its own pair, and a trainable
query projection lets the first attend over the second. The aligner therefore holds parameters: it is an
`nn.Module` as well as an aligner, so the training module trains and saves them. The value projections of the paper
are DSKD's two projectors, which live in the loss (`losses/dskd.py`); this file returns the attended teacher
states before that projection and the transposed attention as a map from student to teacher positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opd_lightning.rollout import Rollout
from opd_lightning.target import HIDDEN_STATES, TeacherSequence, TeacherTarget

from .base import ALIGNERS, TeacherHidden, TeacherInputs
from .text import TextAligner

__all__ = ["DskdCmaAligner", "attention_scores", "pair_embeddings", "std_scaled"]


def pair_embeddings(table: Tensor, inputs: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """[e(x_i); e(y_i)] for each position's input and target token: ids `[B, L]` -> `[B, L, 2H]` fp32.

    Invalid positions read id 0; they are masked wherever the result is used.
    """
    ids = torch.stack([inputs, targets], dim=-1).masked_fill(~valid.unsqueeze(-1), 0)  # [B, L, 2]
    return F.embedding(ids, table.detach()).flatten(-2).float()


def std_scaled(values: Tensor, valid: Tensor) -> Tensor:
    """`values` `[B, L, D]` divided, row by row, by the standard deviation of that row's valid entries (the paper's
    N(·)).

    The paper's code takes one deviation over its whole padded batch. Per row and over valid entries only, a row's
    result depends neither on padding nor on which rows share its batch, micro-batch or data-parallel rank.
    """
    weights = valid.to(values.dtype)[..., None].expand_as(values)  # [B, L, D]
    count = weights.sum((1, 2))  # [B]
    mean = (values * weights).sum((1, 2)) / count.clamp_min(1)
    var = (((values - mean[:, None, None]) ** 2) * weights).sum((1, 2)) / (count - 1).clamp_min(1)
    scale = torch.where(count > 1, var.sqrt().clamp_min(torch.finfo(values.dtype).tiny), torch.ones_like(var))
    return values / scale[:, None, None]


def attention_scores(query: Tensor, key: Tensor, student_valid: Tensor, teacher_valid: Tensor) -> Tensor:
    """Scaled dot-product scores `[B, N, M]` of student queries `[B, N, D]` against teacher keys `[B, M, D]`.

    Pairs with an invalid side hold the dtype's lowest value: a softmax along either axis gives them exactly zero
    weight (and a row with no valid partner a uniform, masked-out one, not NaN).
    """
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    allowed = student_valid.unsqueeze(-1) & teacher_valid.unsqueeze(1)
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)


@ALIGNERS.register("dskd_cma")
class DskdCmaAligner(TextAligner, nn.Module):
    """The teacher re-reads the student's text; each student position attends over the teacher's completion.

    With e^S, e^T the input embedding tables, (x_i, y_i) a student position's input and target tokens,
    (x'_j, y'_j) a teacher position's, h^T_j the teacher's last hidden state and N(·) division by the standard
    deviation over the sequence's valid entries:

        q_i = P_q([e^S(x_i); e^S(y_i)]),   k_j = N([e^T(x'_j); e^T(y'_j)]),   v_j = N(h^T) _j + N(e^T(y')) _j
        a = q kᵀ / sqrt(2 H_T),   h̃^T_i = Σ_j softmax_j(a_i·) v_j,   (s→t)_j(h) = Σ_i softmax_i(a_·j) h_i

    P_q is a trainable linear map 2 H_S -> 2 H_T; keys are the teacher's frozen embeddings; pairs with padding on
    either side are masked. `hidden` is h̃^T at each student position, and `sequence` keeps the
    teacher's logits at its own positions with s→t as the map from student positions.
    """

    provides = frozenset({HIDDEN_STATES})

    def __init__(self) -> None:
        """Takes no options: the query projection is created by `setup` from the two hidden sizes."""
        nn.Module.__init__(self)  # first: nn.Module must exist before any attribute is set
        TextAligner.__init__(self)
        self.query: nn.Linear | None = None

    def setup(self, student_hidden: int, teacher_hidden: int) -> None:
        if self.query is None or (self.query.in_features, self.query.out_features) != (2 * student_hidden,
                                                                                       2 * teacher_hidden):
            self.query = nn.Linear(2 * student_hidden, 2 * teacher_hidden)

    def project(self, teacher_logits: Tensor, inputs: TeacherInputs, rollout: Rollout,
                needs: frozenset[str]) -> TeacherTarget:
        # Every valid student token attends to the teacher's completion, when it has one.
        has_teacher = inputs.alignment.teacher_mask.any(-1, keepdim=True) & rollout.completion_mask  # [B, N]
        return TeacherTarget(coverage=self.coverage(has_teacher, rollout), mask=has_teacher)

    def project_hidden(self, target: TeacherTarget, states: TeacherHidden, inputs: TeacherInputs,
                       rollout: Rollout) -> None:
        if self.query is None:
            raise ValueError("dskd_cma has no query projection yet: call setup(student_hidden, teacher_hidden) first "
                             "(the training module does so when it loads both models)")
        view = inputs.alignment
        s_valid, t_valid = rollout.completion_mask, view.teacher_mask  # [B, N], [B, M]
        p, m = rollout.prompt_length, view.teacher_ids.shape[1]
        seq = rollout.sequences
        s_pairs = pair_embeddings(states.student_embeddings, seq[:, p - 1 : -1], seq[:, p:], s_valid)  # [B, N, 2H_S]
        t_inputs = inputs.input_ids[:, -m - 1 : -1]  # [B, M] the token before each teacher completion token
        t_pairs = pair_embeddings(states.teacher_embeddings, t_inputs, view.teacher_ids, t_valid)  # [B, M, 2H_T]
        t_target = t_pairs[..., t_pairs.shape[-1] // 2 :]  # [B, M, H_T] e^T(y'_j)
        values = std_scaled(states.hidden.float(), t_valid) + std_scaled(t_target, t_valid)  # [B, M, H_T]
        query = self.query(s_pairs.to(self.query.weight.dtype)).float()  # [B, N, 2H_T]
        scores = attention_scores(query, std_scaled(t_pairs, t_valid), s_valid, t_valid)  # [B, N, M]
        target.hidden = torch.softmax(scores, -1) @ values  # [B, N, H_T]
        to_teacher = torch.softmax(scores.transpose(1, 2), -1)  # [B, M, N]
        target.sequence = TeacherSequence(states.logits, t_valid, lambda hidden: to_teacher @ hidden.to(to_teacher.dtype))
