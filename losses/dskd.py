"""Dual-Space Knowledge Distillation: each model's hidden states scored by the other model's output layer.

Plain KD compares two distributions made by two different output layers. DSKD (Zhang et al., EMNLP 2024) projects
the teacher's last hidden states into the student's space and the student's into the teacher's, so that each
comparison uses one output layer for both sides; with cross-model attention (`aligners/dskd_cma.py`) the two
sequences need not share a tokenizer. The two projectors are the loss's own trainable parameters: they are created
by `setup` once the hidden sizes are known and reach the optimizer and the checkpoint with the loss module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opd_lightning.target import HIDDEN_STATES, TeacherSequence, upcast

from .base import LOSSES, DistillationLoss, LossInputs, LossOutput, check_teacher, dense_sum, normalise
from .kl import forward_kl_per_token, reverse_kl_per_token

__all__ = ["DSKD", "dskd"]

Divergence = Literal["forward_kl", "reverse_kl"]
PER_TOKEN = {"forward_kl": forward_kl_per_token, "reverse_kl": reverse_kl_per_token}


def dskd(student_logits: Tensor, student_hidden: Tensor, teacher_hidden: Tensor, teacher: TeacherSequence,
         mask: Tensor, target_ids: Tensor, student_head: Tensor, teacher_head: Tensor,
         t2s: Callable[[Tensor], Tensor], s2t: Callable[[Tensor], Tensor], *,
         num_items: Tensor | float | None = None, **hyperparameters) -> LossOutput:
    """DSKD over the valid positions, normalised once; see `DSKD` for the formula and its `__init__` for
    `hyperparameters`.

    Shapes: student logits `[B, N, V_s]`, student hidden `[B, N, H_s]`, teacher hidden at the student positions
    `[B, N, H_t]`, `teacher.logits` `[B, M, V_t]` at the teacher's own positions (M = N when `teacher.from_student`
    is None), mask and target ids `[B, N]`, heads `[V_s, H_s]` and `[V_t, H_t]`; `t2s` maps `[n, H_t] -> [n, H_s]`
    and `s2t` `[m, H_s] -> [m, H_t]` (the loss module's own projectors are not used here). Metrics "t2s_kd",
    "t2s_ce", "s2t_kd" and "ce" are the parts unweighted and normalised like the loss; "t2s_acc" is the share of
    valid tokens whose projected-teacher argmax is the target.
    """
    return DSKD(**hyperparameters).compute(student_logits, student_hidden, teacher_hidden, teacher, mask, target_ids,
                                           student_head, teacher_head, t2s, s2t, num_items)


@LOSSES.register("dskd")
class DSKD(DistillationLoss):
    """Dual-Space Knowledge Distillation (Zhang, Zhang, Sun, Chen, Xu 2024, "Dual-Space Knowledge Distillation for
    Large Language Models", EMNLP, arXiv:2406.17328). With h^S_t, h^T_t the two models' last hidden states (what
    their output layers read), W^S, W^T the output layers, P_ts: H_T -> H_S and P_st: H_S -> H_T two trainable linear
    projectors, y_t the completion token, z^S_t the student's logits and sg a stop-gradient:

        p^ts_t = softmax(P_ts(h^T_t) · sg(W^S)ᵀ / τ)      the teacher in the student's space
        q^st_t = softmax(P_st(h^S_t) · sg(W^T)ᵀ / τ)      the student in the teacher's space
        L = α · [ Σ_t D(sg(p^ts_t) ‖ softmax(z^S_t / τ)) − Σ_t log p^ts_t(y_t)|_{τ=1} + Σ_t' KL(p^T_t' ‖ q^st_t') ]
            − β · Σ_t log softmax(z^S_t)(y_t),                            every sum divided once by num_items,

    with D the forward (or reverse) KL, p^T the teacher's own distribution and α, β = `distill_weight`,
    `ce_weight`. The first term distils in the student's space and trains only the student; the cross-entropy trains
    P_ts to make the projected teacher predict the tokens; the third distils in the teacher's space and trains the
    student and P_st. With one tokenizer (the identity aligner) t' = t and h^T_t is the teacher's own state. Across
    tokenizers the `dskd_cma` aligner replaces h^T_t by an attention over the teacher's completion and sums the
    third term over the teacher's tokens t', reading the student's states through the transposed attention; since
    each attention row sums to 1 and the projectors are affine, projecting after the attention equals the paper's
    projecting before it. The sums run over the positions of one micro-batch and are divided by the step's
    student-token count, as the authors' code does (their teacher-space sum also runs over teacher tokens). Their
    recipe gives the projectors a learning rate of their own (1e-3): the training module's `extra_lr`.
    """

    requires = frozenset({HIDDEN_STATES})

    def __init__(self, distill_weight: float = 0.5, ce_weight: float = 0.5, temperature: float = 2.0,
                 divergence: Divergence = "forward_kl", correct_only: bool = False) -> None:
        """
        Args:
            distill_weight: weight α ≥ 0 of the three DSKD terms. The defaults α = β = 0.5 are the paper's
                L = (1 − r)·L_CE + r·L_DSKD with the released recipe's `kd_rate` r = 0.5.
            ce_weight: weight β ≥ 0 of the student's cross-entropy on `target_ids`. The paper trains on given
                answers; on the student's own rollouts this only reinforces what it sampled, so set 0 there.
            temperature: softmax temperature τ > 0 of both KD terms (not of the cross-entropies). Default 2.0, the
                `KD_TEMP` of the authors' released scripts.
            divergence: D of the student-space term, "forward_kl" (the paper's main setting) or "reverse_kl". The
                teacher-space term is always forward KL, as in the authors' code.
            correct_only: distil in the student's space only at tokens where the projected teacher's argmax is the
                target, as the authors' cross-model-attention criterion does (an unreliable projected teacher is
                not imitated); the cross-entropy still trains the projection everywhere.
        """
        super().__init__()
        if distill_weight < 0 or ce_weight < 0 or temperature <= 0:
            raise ValueError(f"need distill_weight ≥ 0, ce_weight ≥ 0 and temperature > 0; got {distill_weight}, "
                             f"{ce_weight}, {temperature}")
        if divergence not in PER_TOKEN:
            raise ValueError(f"divergence must be one of {sorted(PER_TOKEN)}, got {divergence!r}")
        self.distill_weight, self.ce_weight, self.temperature = distill_weight, ce_weight, temperature
        self.divergence, self.correct_only = divergence, correct_only
        self.t2s: nn.Linear | None = None
        self.s2t: nn.Linear | None = None

    def setup(self, student_hidden: int, teacher_hidden: int) -> None:
        """Create the projectors P_ts (teacher -> student hidden size) and P_st (student -> teacher), once."""
        if self.t2s is None or (self.t2s.in_features, self.t2s.out_features) != (teacher_hidden, student_hidden):
            self.t2s = nn.Linear(teacher_hidden, student_hidden)
            self.s2t = nn.Linear(student_hidden, teacher_hidden)

    def compute(self, student_logits: Tensor, student_hidden: Tensor, teacher_hidden: Tensor,
                teacher: TeacherSequence, mask: Tensor, target_ids: Tensor, student_head: Tensor, teacher_head: Tensor,
                t2s: Callable[[Tensor], Tensor], s2t: Callable[[Tensor], Tensor],
                num_items: Tensor | float | None) -> LossOutput:
        """The loss on tensors; arguments as `dskd`."""
        mask = mask.bool()
        y = target_ids[mask]  # [n]
        s_rows = student_logits[mask]  # [n, V_s]
        t_hidden = teacher_hidden[mask]  # [n, H_t]
        check_teacher(t_hidden, "teacher hidden states")
        # Student space: the projected teacher through the student's output layer, which this part does not train.
        t2s_logits = upcast(t2s(t_hidden)) @ upcast(student_head.detach()).T  # [n, V_s]
        t2s_ce = F.cross_entropy(t2s_logits, y, reduction="sum")
        correct = t2s_logits.detach().argmax(-1) == y  # [n]
        keep = correct if self.correct_only else torch.ones_like(correct)
        t2s_kd = dense_sum(PER_TOKEN[self.divergence], s_rows[keep], t2s_logits[keep], temperature=self.temperature)
        # Teacher space: the projected student through the teacher's frozen output layer, at the teacher's positions.
        at_teacher = student_hidden if teacher.from_student is None else teacher.from_student(student_hidden)
        t_mask = mask if teacher.mask is None else teacher.mask.bool()
        t_rows = teacher.logits[t_mask].detach()  # [m, V_t]
        check_teacher(t_rows)
        if teacher_head.shape[0] != t_rows.shape[-1]:
            raise ValueError(f"the teacher's output layer has {teacher_head.shape[0]} rows but its logits "
                             f"{t_rows.shape[-1]} columns: pass the native (unprojected) teacher logits")
        s2t_logits = upcast(s2t(at_teacher[t_mask])) @ upcast(teacher_head.detach()).T  # [m, V_t]
        s2t_kd = dense_sum(forward_kl_per_token, s2t_logits, t_rows, temperature=self.temperature)
        ce = F.cross_entropy(upcast(s_rows), y, reduction="sum")
        parts = {name: normalise(value, mask, num_items)
                 for name, value in (("t2s_kd", t2s_kd), ("t2s_ce", t2s_ce), ("s2t_kd", s2t_kd), ("ce", ce))}
        loss = self.distill_weight * (parts["t2s_kd"] + parts["t2s_ce"] + parts["s2t_kd"]) + self.ce_weight * parts["ce"]
        metrics = {key: value.detach() for key, value in parts.items()}
        metrics["t2s_acc"] = correct.float().sum() / mask.sum().clamp_min(1)
        return LossOutput(loss, metrics)

    def forward(self, inputs: LossInputs) -> LossOutput:
        name = self.registry_name
        if self.t2s is None:
            raise ValueError("the dskd projectors do not exist yet: call setup(student_hidden, teacher_hidden) "
                             "before the first step (the training module does so when it loads both models)")
        target = inputs.require(name, HIDDEN_STATES)
        if target.head is None:
            raise ValueError(f"loss {name!r} needs the teacher's output layer (`head`) in its hidden-state target")
        dtype = self.t2s.weight.dtype
        return self.compute(inputs.student_logits, inputs.require_student("student_hidden", name).to(dtype),
                            target.hidden.to(dtype), target.sequence, inputs.valid, inputs.target_ids,
                            inputs.require_student("student_head", name), target.head, self.t2s, self.s2t,
                            inputs.num_items)
