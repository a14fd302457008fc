"""GOLD: generalized JSD on the tokens both vocabularies share, ULD's sorted-probability L1 on the rest.

ULD throws away token identity everywhere, even for the many tokens whose text is the same in both
vocabularies. GOLD keeps a real divergence on those shared tokens (`vocab_pairs`, built once by an aligner from
the two tokenizers) and falls back to ULD's sorted comparison only for the tokens that have no partner. Both
parts reuse the one implementation each of the generalized JSD (`mixture.py`) and the sorted L1 (`uld.py`).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from opd_lightning.target import TEACHER_NATIVE_LOGITS, VOCAB_PAIRS

from .base import LOSSES, DistillationLoss, LossInputs, LossOutput, normalise, on_student_support
from .fused import dense_parts
from .mixture import generalized_jsd_per_token
from .uld import sorted_l1_per_token, valid_teacher_rows

__all__ = ["GOLD", "gold", "gold_per_token", "gold_weights"]


def gold_per_token(s_logp: Tensor, t_logp: Tensor, pairs: tuple[Tensor, Tensor], rest: tuple[Tensor, Tensor],
                   beta: float) -> Tensor:
    """Matched JSD, unmatched sorted L1 and the teacher's matched mass per row: `[n, V_s]`, `[n, V_t]` -> `[n, 3]`.

    `pairs` are the matched ids (student `[K]`, teacher `[K]`), `rest` the unmatched ids of each vocabulary.
    """
    s_matched, t_matched = s_logp[:, pairs[0]], t_logp[:, pairs[1]]  # [n, K] each, column j is one shared token
    matched = generalized_jsd_per_token(*on_student_support(s_matched.log_softmax(-1), t_matched), beta)  # [n]
    unmatched = sorted_l1_per_token(s_logp[:, rest[0]], t_logp[:, rest[1]])  # [n]
    teacher_mass = t_matched.logsumexp(-1).exp()  # [n], no gradient: the teacher is detached
    return torch.stack([matched, unmatched, teacher_mass], dim=-1)


def _unmatched_ids(ids: Tensor, vocab: int, side: str) -> Tensor:
    """The ids of a `vocab`-sized vocabulary not in `ids` (`[K]`, unique and in range), ascending."""
    if ids.ndim != 1 or ids.dtype != torch.long or ids.numel() == 0:
        raise ValueError(f"vocab_pairs {side} ids must be a non-empty 1-D long tensor, got {tuple(ids.shape)} {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab or torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"vocab_pairs {side} ids must be unique and lie in [0, {vocab}): each token has at most one "
                         "partner with the same text.")
    keep = torch.ones(vocab, dtype=torch.bool, device=ids.device).index_fill_(0, ids, False)  # [V]
    return keep.nonzero().squeeze(-1)


def _check_weights(matched_weight: float | None, unmatched_weight: float | None) -> None:
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError("set matched_weight and unmatched_weight together, or leave both None for the vocabulary-"
                         f"overlap weights; got {matched_weight} and {unmatched_weight}")
    if matched_weight is not None and (matched_weight < 0 or unmatched_weight < 0):
        raise ValueError(f"matched_weight and unmatched_weight must be ≥ 0, got {matched_weight}, {unmatched_weight}")


def gold_weights(matched_weight: float | None, unmatched_weight: float | None, num_pairs: int,
                 teacher_vocab: int) -> tuple[float, float]:
    """The two part weights: as given, or, both None, TRL's vocabulary-overlap rule (K / V_T, 1 − K / V_T)."""
    if matched_weight is None:
        overlap = num_pairs / teacher_vocab
        return overlap, 1.0 - overlap
    return matched_weight, unmatched_weight


def gold(student_logits: Tensor, teacher_native_logits: Tensor, mask: Tensor, vocab_pairs: tuple[Tensor, Tensor], *,
         num_items: Tensor | float | None = None, **hyperparameters) -> LossOutput:
    """GOLD loss over the valid positions, normalised once; see `GOLD` for the formula and its `__init__` for
    `hyperparameters`.

    Shapes: student logits `[B, N, V_s]`, teacher native logits `[B, N, V_t]`, mask `[B, N]`, `vocab_pairs` =
    (student ids `[K]`, teacher ids `[K]`). Metrics "matched_jsd" and "unmatched_l1" are the two parts unweighted and
    normalised like the loss (loss = w_m · matched_jsd + w_u · unmatched_l1); "teacher_matched_mass" is the mean over
    valid positions of the teacher's probability on matched tokens.
    """
    return GOLD(**hyperparameters).compute(student_logits, teacher_native_logits, mask, vocab_pairs, num_items)


@LOSSES.register("gold")
class GOLD(DistillationLoss):
    """GOLD, the hybrid cross-tokenizer loss of TRL's GOLD trainer (Patiño et al. 2025, Hugging Face, "Unlocking
    On-Policy Distillation for Any Model Family"). With M_S, M_T the paired ids of the K tokens whose text is the
    same in both vocabularies, U_S, U_T the remaining ids of each, p = softmax(z / τ) in each model's own
    vocabulary, p̃(v) = p(v) / Σ_{u∈M} p(u) the distribution renormalised on the matched tokens, and σ a sort in
    descending order (zero-padding the shorter vector):

        ℓ_t = w_m · JSD_β(p̃_T,t, p̃_S,t) + w_u · Σ_i |σ(p_S,t[U_S])_i − σ(p_T,t[U_T])_i|,   L = Σ_t valid ℓ_t / num_items,

    with JSD_β the generalized JSD of `GeneralizedJSD` (β = 0 forward KL, β = 1 reverse KL). The unmatched part
    uses the raw probabilities, exactly as TRL does. The matched part differs from TRL on purpose: TRL feeds the
    raw matched probabilities (a sub-probability vector, clamped at 1e-8 before the log) to its JSD, which at β = 0
    or 1 is a KL between unnormalised measures and can be negative. Renormalising keeps it a divergence between
    two distributions at every β: zero exactly when the two are proportional on the matched tokens (equal
    conditionals), and, with all tokens matched, exactly the full-vocabulary generalized JSD. The split of mass between matched and unmatched tokens is
    carried by the unmatched part (its L1 is at least the difference of the unmatched masses), so for w_u > 0 the
    loss is zero only when the distributions agree on every matched token and as sorted unmatched vectors.
    (A K + 1-th "unmatched" bucket would also be proper, but its forward KL is infinite as soon as one side has
    no unmatched token and the other has, e.g. a teacher with padded vocabulary rows.)
    """

    requires = frozenset({TEACHER_NATIVE_LOGITS, VOCAB_PAIRS})
    fuses = True  # both parts are sums over positions: the student may come fused (`dense_parts`)

    def __init__(self, beta: float = 0.5, matched_weight: float | None = None, unmatched_weight: float | None = None,
                 temperature: float = 1.0, chunk_size: int | None = None) -> None:
        """
        Args:
            beta: mixture weight of the teacher in the matched-token generalized JSD, in [0, 1]; 0 = forward KL,
                1 = reverse KL. Default 0.5, the `beta` default of TRL's GOLD config.
            matched_weight: weight w_m ≥ 0 of the matched part. Set together with `unmatched_weight`, or leave both
                None for TRL's default: w_m = K / V_T and w_u = 1 − w_m, the share of the teacher's vocabulary that
                is matched. These weights are fixed by the two vocabularies; they do not follow the probability
                mass that falls on matched tokens at each position.
            unmatched_weight: weight w_u ≥ 0 of the unmatched sorted-L1 part; see `matched_weight`.
            temperature: softmax temperature τ > 0 applied to both models' logits before either part.
            chunk_size: valid positions computed at a time (memory bound for large vocabularies); None = all at once.
        """
        super().__init__()
        if not 0 <= beta <= 1 or temperature <= 0:
            raise ValueError(f"need beta in [0, 1] and temperature > 0; got {beta}, {temperature}")
        _check_weights(matched_weight, unmatched_weight)
        self.beta, self.matched_weight, self.unmatched_weight = beta, matched_weight, unmatched_weight
        self.temperature, self.chunk_size = temperature, chunk_size

    def compute(self, student_logits: Tensor, teacher_native_logits: Tensor, mask: Tensor,
                vocab_pairs: tuple[Tensor, Tensor], num_items: Tensor | float | None) -> LossOutput:
        """The loss on tensors; arguments as `gold`."""
        mask = mask.bool()
        t_rows = valid_teacher_rows(student_logits, teacher_native_logits, mask)
        s_ids, t_ids = (ids.to(t_rows.device) for ids in vocab_pairs)
        if s_ids.shape != t_ids.shape:
            raise ValueError(f"vocab_pairs must pair ids one to one, got shapes {tuple(s_ids.shape)}, "
                             f"{tuple(t_ids.shape)}")
        rest = (_unmatched_ids(s_ids, student_logits.shape[-1], "student"),
                _unmatched_ids(t_ids, t_rows.shape[-1], "teacher"))
        w_matched, w_unmatched = gold_weights(self.matched_weight, self.unmatched_weight, s_ids.numel(),
                                              t_rows.shape[-1])
        per_token = partial(gold_per_token, pairs=(s_ids, t_ids), rest=rest, beta=self.beta)
        weights = torch.tensor([w_matched, w_unmatched, 0.0], device=t_rows.device)  # the mass is a metric only
        total, parts = dense_parts(per_token, student_logits, t_rows, mask, weights=weights,
                                   temperature=self.temperature, chunk_size=self.chunk_size)
        matched, unmatched, mass = parts.unbind()
        matched, unmatched = normalise(matched, mask, num_items), normalise(unmatched, mask, num_items)
        loss = normalise(total, mask, num_items)
        metrics = {"matched_jsd": matched, "unmatched_l1": unmatched,
                   "teacher_matched_mass": mass / mask.sum().clamp_min(1)}
        return LossOutput(loss, {key: value.detach() for key, value in metrics.items()})

    def forward(self, inputs: LossInputs) -> LossOutput:
        target = inputs.require(self.registry_name, TEACHER_NATIVE_LOGITS, VOCAB_PAIRS)
        return self.compute(inputs.student, target.native_logits, inputs.valid, target.vocab_pairs, inputs.num_items)
