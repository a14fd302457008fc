"""Distillation losses: pure tensor functions plus thin registered modules, free of Lightning and tokenizers.

`LOSSES` maps names to classes; build one by name with `LOSSES.build(name, **kwargs)`. Importing this package
registers every loss below. What a loss reads from the teacher (`TeacherTarget`, its `TopK` form and the capability
names) is defined in `opd_lightning.target`, shared with the aligners, and re-exported here for convenience.
"""

from opd_lightning import numerics  # noqa: F401  (first: settles the vector math kernels on import)
from opd_lightning.target import (
    HIDDEN_STATES,
    TEACHER_LOGITS,
    TEACHER_NATIVE_LOGITS,
    TEACHER_TOKEN_LOGPROBS,
    TEACHER_TOPK,
    VOCAB_PAIRS,
    VOCAB_PROJECTION,
    TeacherSequence,
    TeacherTarget,
    TopK,
    token_logprobs,
)

from .base import (
    LOG_ZERO,
    LOSSES,
    DenseDivergence,
    DistillationLoss,
    LayerStates,
    LossInputs,
    LossOutput,
    check_teacher,
    dense_divergence,
    dense_sum,
    normalise,
    on_student_support,
    topk_buckets,
)
from .cr_opd import CounterfactualRouted, route_targets
from .credit import (
    CREDITS,
    assign_credit,
    discounted_returns,
    gae_advantages,
    iw_opd_weights,
    length_normalised_returns,
    reverse_kl_values,
)
from .cross_entropy import CrossEntropy, cross_entropy
from .dskd import DSKD, dskd
from .entropy_aware import EntropyAware, entropy_aware, teacher_entropy, topk_forward_kl_per_token
from .fused import HiddenRows, default_chunk, fused_dense_divergence, fused_dense_sum
from .gold import GOLD, gold, gold_per_token
from .hidden_match import HiddenMatch, default_layer_pairs, hidden_match
from .kl import (
    ForwardKL,
    ReverseKL,
    TotalVariation,
    forward_kl,
    forward_kl_per_token,
    reverse_kl,
    reverse_kl_per_token,
    tvd,
    tvd_per_token,
)
from .mixture import (
    GeneralizedJSD,
    SkewKL,
    SkewReverseKL,
    generalized_jsd,
    generalized_jsd_per_token,
    skew_kl,
    skew_kl_per_token,
    skew_reverse_kl,
    skew_reverse_kl_per_token,
)
from .sampled_token import SampledToken, clipped_policy_loss, sampled_token
from .topk import TopKReverseKL, restrict_to_teacher_topk, topk_reverse_kl, topk_reverse_kl_per_token
from .uld import ULD, sorted_l1_per_token, uld, uld_per_token
from .xtoken import XTokenHKL, XTokenPKL, pkl_per_token, project_logprobs, top_ranked_pairs, xtoken_hkl, xtoken_pkl

__all__ = [
    "CREDITS",
    "DSKD",
    "GOLD",
    "HIDDEN_STATES",
    "LOG_ZERO",
    "LOSSES",
    "TEACHER_LOGITS",
    "TEACHER_NATIVE_LOGITS",
    "TEACHER_TOKEN_LOGPROBS",
    "TEACHER_TOPK",
    "ULD",
    "VOCAB_PAIRS",
    "VOCAB_PROJECTION",
    "CounterfactualRouted",
    "CrossEntropy",
    "DenseDivergence",
    "DistillationLoss",
    "EntropyAware",
    "ForwardKL",
    "GeneralizedJSD",
    "HiddenMatch",
    "HiddenRows",
    "LayerStates",
    "LossInputs",
    "LossOutput",
    "ReverseKL",
    "SampledToken",
    "SkewKL",
    "SkewReverseKL",
    "TeacherSequence",
    "TeacherTarget",
    "TopK",
    "TopKReverseKL",
    "TotalVariation",
    "XTokenHKL",
    "XTokenPKL",
    "assign_credit",
    "check_teacher",
    "clipped_policy_loss",
    "cross_entropy",
    "default_chunk",
    "default_layer_pairs",
    "dense_divergence",
    "dense_sum",
    "discounted_returns",
    "dskd",
    "entropy_aware",
    "forward_kl",
    "forward_kl_per_token",
    "fused_dense_divergence",
    "fused_dense_sum",
    "gae_advantages",
    "generalized_jsd",
    "generalized_jsd_per_token",
    "gold",
    "gold_per_token",
    "hidden_match",
    "iw_opd_weights",
    "length_normalised_returns",
    "normalise",
    "on_student_support",
    "pkl_per_token",
    "project_logprobs",
    "restrict_to_teacher_topk",
    "reverse_kl",
    "reverse_kl_per_token",
    "reverse_kl_values",
    "route_targets",
    "sampled_token",
    "skew_kl",
    "skew_kl_per_token",
    "skew_reverse_kl",
    "skew_reverse_kl_per_token",
    "sorted_l1_per_token",
    "teacher_entropy",
    "token_logprobs",
    "top_ranked_pairs",
    "topk_buckets",
    "topk_forward_kl_per_token",
    "topk_reverse_kl",
    "topk_reverse_kl_per_token",
    "tvd",
    "tvd_per_token",
    "uld",
    "uld_per_token",
    "xtoken_hkl",
    "xtoken_pkl",
]
