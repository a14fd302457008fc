"""Hidden-state matching along whole sequences, across tokenizers: the student's layers learn to carry what the
teacher's layers carry at the same text.

A divergence on the next-token distributions teaches only what the teacher would write next. Where the two models
split the text differently, the teacher's *states* say more: a character-level teacher holds each digit of "37" apart
at the "7", where a student with one token for "37" must discover the digit structure from the answers alone. This
loss regresses, at every position where both tokenizations end a token on the same byte (`aligners.BoundaryPairs`:
the prompt's and the completion's; with one tokenizer every token), a learned affine map of the student's hidden
state onto the teacher's, layer pair by layer pair:

    L = (1 / |P|) Σ_{(s, t) ∈ P} (1 / |I|) Σ_{(i, j) ∈ I} mean_h ( W_ij h^S_i(s) + b_ij − LN(h^T_j(t)) )²

with h_i the hidden state `output_hidden_states` numbers i (0 the embeddings, the last one after the final norm),
LN a layer norm without weights (each teacher state scaled to mean 0 and variance 1 over its features, so the loss
does not depend on the teacher's activation scale), and (i, j) the layer pairs (by default each student layer with
the teacher layer at the same relative depth), I. This is the feature ("hint") distillation of FitNets (Romero et al.,
arXiv 1412.6550) and TinyBERT (arXiv 1909.10351), taken across tokenizers at the shared token boundaries as
approximate likelihood matching does for its hidden-state term (Minixhofer et al., arXiv 2503.20083).

The maps W_ij, b_ij are trainable parameters of the loss (created by `setup` once both models are loaded, saved in
checkpoints, optimised with the student or at `model.extra_lr`); they are not part of the exported student. The
teacher gives no gradient. Normalisation: the sum over pairs is divided by the micro-batch's pair count and weighted
by its share of the step's completion tokens (`num_items`), so one micro-batch gives the mean over its pairs and
several give their token-weighted mean.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .base import LOSSES, DistillationLoss, LossInputs, LossOutput

__all__ = ["HiddenMatch", "default_layer_pairs", "hidden_match"]

Positions = Literal["all", "prompt", "completion"]


def default_layer_pairs(student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """Each student layer i = 1..L_S with the teacher layer at the same relative depth, round(i · L_T / L_S)."""
    return [(i, max(1, min(teacher_depth, round(i * teacher_depth / student_depth)))) for i in range(1, student_depth + 1)]


def hidden_match(student: list[Tensor], teacher: list[Tensor], maps: list[nn.Module], select: Tensor,
                 weight: Tensor | float = 1.0) -> Tensor:
    """The mean over the selected pairs (`select` `[K]` bool) and over the layer pairs of the per-feature mean squared
    error between `maps[k](student[k])` (`[K, H_S]` -> `[K, H_T]`) and the layer-normed `teacher[k]` (`[K, H_T]`),
    times `weight`; 0 (with the graph) where nothing is selected."""
    total = 0.0
    for h_s, h_t, proj in zip(student, teacher, maps, strict=True):
        target = nn.functional.layer_norm(h_t[select].float(), h_t.shape[-1:])
        error = (proj(h_s[select].float()) - target).pow(2).mean(-1)  # [K']
        total = total + error.sum()
    return total / (select.sum().clamp_min(1) * len(maps)) * weight


@LOSSES.register("hidden_match")
class HiddenMatch(DistillationLoss):
    """Regress the student's hidden states onto the teacher's at the shared token boundaries, through learned maps."""

    reads_layers = True
    fuses = True  # reads no logits: a fused batch suits it

    def __init__(self, layers: list[list[int]] | None = None, positions: Positions = "all") -> None:
        """
        Args:
            layers: pairs `[student_index, teacher_index]` of hidden states to match, numbered as transformers'
                `output_hidden_states` numbers them (0 the embeddings' output, the last one the final layer's output
                after the final norm). None: every student layer with the teacher's layer at the same relative depth
                (`default_layer_pairs`).
            positions: the pairs matched: "all" (prompt and completion), "prompt" or "completion" (from the prompt's
                last token on, which predicts the completion's first).
        """
        super().__init__()
        if positions not in ("all", "prompt", "completion"):
            raise ValueError(f"positions must be 'all', 'prompt' or 'completion', got {positions!r}")
        self.positions, self.layers = positions, None if layers is None else [tuple(map(int, p)) for p in layers]
        if self.layers is not None and (not self.layers or any(len(p) != 2 for p in self.layers)):
            raise ValueError(f"layers is a list of [student_index, teacher_index] pairs, got {layers!r}")
        self.maps = nn.ModuleList()

    def setup_layers(self, student_depth: int, teacher_depth: int) -> None:
        """Fix the layer pairs for two models of these depths; refuse an index neither model has."""
        pairs = self.layers or default_layer_pairs(student_depth, teacher_depth)
        for s, t in pairs:
            if not (0 <= s <= student_depth and 0 <= t <= teacher_depth):
                raise ValueError(f"hidden_match layers: pair [{s}, {t}] is outside the student's hidden states 0-"
                                 f"{student_depth} or the teacher's 0-{teacher_depth}")
        self.layers = pairs

    def setup(self, student_hidden: int, teacher_hidden: int) -> None:
        """One affine map (student width -> teacher width) per layer pair, created once."""
        if self.layers is None:
            raise ValueError("hidden_match: setup_layers must fix the layer pairs before setup")
        shape = (student_hidden, teacher_hidden)
        if len(self.maps) != len(self.layers) or any((m.in_features, m.out_features) != shape for m in self.maps):
            self.maps = nn.ModuleList(nn.Linear(*shape) for _ in self.layers)

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.layers or []]

    @property
    def teacher_layers(self) -> list[int]:
        return [t for _, t in self.layers or []]

    def forward(self, inputs: LossInputs) -> LossOutput:
        states = inputs.layers
        if states is None or not len(self.maps):
            raise ValueError("loss 'hidden_match' needs both models' layer states (LossInputs.layers) and its maps: "
                             "the training module fills them for losses that set `reads_layers`")
        select = {"all": torch.ones_like(states.in_prompt), "prompt": states.in_prompt,
                  "completion": ~states.in_prompt}[self.positions]
        if self.positions == "completion":  # the prompt's last pair predicts the completion's first token
            last = torch.zeros_like(select)
            rows = states.rows[states.in_prompt]
            if rows.numel():
                index = torch.nonzero(states.in_prompt).squeeze(1)
                final = torch.ones_like(rows, dtype=torch.bool)
                final[:-1] = rows[1:] != rows[:-1]  # pairs are in row order, the prompt's before the completion's
                last[index[final]] = True
            select = select | last
        tokens = inputs.mask.sum()
        share = tokens / torch.as_tensor(inputs.num_items if inputs.num_items is not None else tokens,
                                         device=tokens.device).clamp_min(1)
        loss = hidden_match([states.student[s] for s in self.student_layers],
                            [states.teacher[t] for t in self.teacher_layers], list(self.maps), select, share)
        return LossOutput(loss, {"pairs": select.sum().float()})
