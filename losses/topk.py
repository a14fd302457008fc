"""Reverse KL restricted to the teacher's top-k tokens, renormalised on both sides.

The full reverse KL spends most of its signal on the vocabulary's long tail, where a teacher's probabilities
are least reliable (and, after a cross-tokenizer projection, least exact). Restricting both distributions to
the teacher's k most likely tokens and renormalising there matches the student on the teacher's local
support only. The restriction helper is public: the entropy-aware loss uses it for its top-k forward KL.
"""

from __future__ import annotations

from torch import Tensor

from opd_lightning.target import TopK

from .base import LOSSES, DenseDivergence
from .kl import reverse_kl_per_token

__all__ = ["TopKReverseKL", "check_k", "restrict_to_teacher_topk", "topk_reverse_kl", "topk_reverse_kl_per_token"]


def check_k(k: int) -> None:
    """Raise unless `k` is a positive integer."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def restrict_to_teacher_topk(s_logp: Tensor, t_logp: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Both log-prob rows `[n, V]` gathered at the teacher's top-k ids and renormalised there: `[n, k]` each.

    Ties in the teacher's k-th value are broken by `torch.topk`; with k ≥ V the rows come back unchanged.
    """
    if k >= t_logp.shape[-1]:
        return s_logp, t_logp
    ids = t_logp.topk(k, dim=-1).indices  # [n, k]
    s_k = s_logp.gather(-1, ids).log_softmax(-1)  # [n, k]
    t_k = t_logp.gather(-1, ids).log_softmax(-1)  # [n, k]
    return s_k, t_k


def topk_reverse_kl_per_token(s_logp: Tensor, t_logp: Tensor, k: int) -> Tensor:
    """KL(p̃_S ‖ p̃_T) over the teacher's top-k ids, both renormalised there; `[n, V]` -> `[n]`."""
    return reverse_kl_per_token(*restrict_to_teacher_topk(s_logp, t_logp, k))



@LOSSES.register("topk_reverse_kl")
class TopKReverseKL(DenseDivergence):
    """Reverse KL on the teacher's top-k support (Fu et al. 2026, "Revisiting On-Policy Distillation: Empirical
    Failure Modes and Simple Fixes", teacher top-k local support matching). With S_k the k ids of largest
    teacher probability at a position, p̃(v) = p(v) / Σ_{u∈S_k} p(u) for both models, and

        L = Σ_{v∈S_k} p̃_S(v) (log p̃_S(v) − log p̃_T(v)).

    The top-k set is the teacher's, never the student's; k ≥ V is exactly the full reverse KL. With the teacher's
    top-k form (k' ≥ k tokens kept) the tail bucket is dropped and the first k of the teacher's tokens renormalised:
    exactly the loss on dense logits, since only the support enters it.
    """

    def __init__(self, k: int = 16, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        """
        Args:
            k: number of the teacher's most likely tokens kept at each position (≥ 1).
            temperature: softmax temperature applied to both models' logits before the top-k and the divergence.
            chunk_size: valid positions computed at a time (memory bound for large vocabularies); None = all at once.
        """
        super().__init__(temperature, chunk_size)
        check_k(k)
        self.k = k

    def per_token(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return topk_reverse_kl_per_token(s_logp, t_logp, self.k)

    def per_bucket(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        # the teacher's tokens only (no tail), renormalised before the top k of them are taken
        return topk_reverse_kl_per_token(s_logp[:, :-1].log_softmax(-1), t_logp[:, :-1].log_softmax(-1), self.k)

    def divergence(self, student_logits: Tensor, teacher: Tensor | TopK, mask: Tensor,
                   num_items: Tensor | float | None = None) -> Tensor:
        if isinstance(teacher, TopK) and teacher.k < self.k:
            raise ValueError(f"topk_reverse_kl with k={self.k} needs at least {self.k} of the teacher's tokens, but its "
                             f"top-k form keeps {teacher.k}: keep more, or lower the loss's k")
        return super().divergence(student_logits, teacher, mask, num_items)


topk_reverse_kl = TopKReverseKL.as_function()
