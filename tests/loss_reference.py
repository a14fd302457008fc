"""Naive float64 references for the losses, written independently of `opd_lightning.losses`.

Each reference loops over valid positions and spells the formula out with probabilities (not log-softmax
tricks), so a shared mistake between library and reference is unlikely. Parity tests compare values and
gradients against these; benchmarks may import them too. Also holds the random-input builder the loss tests
share (this is a plain module, imported as `loss_reference`, not a conftest).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DENSE_REFERENCES", "make_batch", "make_cross_batch", "make_projection", "probs", "ref_bucketed",
           "ref_cross_entropy", "ref_dense", "ref_entropy_aware", "ref_gold", "ref_gold_parts", "ref_sampled_token",
           "ref_sorted_l1", "ref_top_ranked_pairs", "ref_uld", "ref_xtoken_hkl", "ref_xtoken_pkl"]


def make_batch(b: int, n: int, v: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 2.0):
    """Random student/teacher logits `[b, n, v]`, target ids `[b, n]` and a mask with valid and masked positions.

    Every row keeps its first position valid and at least one row ends in masked padding.
    """
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(b, n, v, generator=g)).to(dtype)
    teacher = (scale * torch.randn(b, n, v, generator=g)).to(dtype)
    target = torch.randint(0, v, (b, n), generator=g)
    mask = torch.rand(b, n, generator=g) < 0.7
    mask[:, 0] = True
    mask[0, -1] = False
    return student, teacher, target, mask


def make_cross_batch(b: int, n: int, v_s: int, v_t: int, k: int, *, seed: int = 0, scale: float = 2.0):
    """`make_batch` with a teacher of its own vocabulary size `v_t`, plus `k` random vocabulary pairs.

    Returns student `[b, n, v_s]`, teacher native `[b, n, v_t]`, targets, mask and (student ids `[k]`, teacher ids
    `[k]`): k distinct ids of each vocabulary paired in a random order.
    """
    student, _, target, mask = make_batch(b, n, v_s, seed=seed, scale=scale)
    g = torch.Generator().manual_seed(seed + 1000)
    teacher = scale * torch.randn(b, n, v_t, generator=g)
    pairs = (torch.randperm(v_s, generator=g)[:k], torch.randperm(v_t, generator=g)[:k])
    return student, teacher, target, mask, pairs


def probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Softmax in float64 written out: exp(z − max) / Σ exp(z − max)."""
    z = logits.double() / temperature
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _kl(p: Tensor, q: Tensor) -> Tensor:
    return (p * (torch.log(p) - torch.log(q))).sum()


def _topk_renorm(p_s: Tensor, p_t: Tensor, k: int) -> tuple[Tensor, Tensor]:
    ids = torch.argsort(p_t, descending=True)[:k]
    return p_s[ids] / p_s[ids].sum(), p_t[ids] / p_t[ids].sum()


DENSE_REFERENCES = {
    "forward_kl": lambda ps, pt: _kl(pt, ps),
    "reverse_kl": lambda ps, pt: _kl(ps, pt),
    "tvd": lambda ps, pt: 0.5 * (pt - ps).abs().sum(),
    "generalized_jsd": lambda ps, pt, beta=0.5: (
        beta * _kl(pt, beta * pt + (1 - beta) * ps) + (1 - beta) * _kl(ps, beta * pt + (1 - beta) * ps)),
    "skew_kl": lambda ps, pt, alpha=0.1: _kl(pt, alpha * pt + (1 - alpha) * ps),
    "skew_reverse_kl": lambda ps, pt, alpha=0.1: _kl(ps, alpha * ps + (1 - alpha) * pt),
    "topk_reverse_kl": lambda ps, pt, k=16: _kl(*_topk_renorm(ps, pt, k)),
}


def _valid(mask: Tensor) -> list[tuple[int, int]]:
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def _count(mask: Tensor, num_items) -> float:
    return max(float(mask.sum() if num_items is None else num_items), 1.0)


def ref_dense(name: str, student: Tensor, teacher: Tensor, mask: Tensor, *, temperature: float = 1.0,
              num_items=None, **params) -> Tensor:
    """Σ over valid positions of the named divergence, divided by the count; float64."""
    fn = DENSE_REFERENCES[name]
    total = sum(fn(probs(student[b, t], temperature), probs(teacher[b, t], temperature), **params)
                for b, t in _valid(mask))
    return total / _count(mask, num_items)


def ref_bucketed(name: str, student: Tensor, teacher: Tensor, mask: Tensor, k: int, *, num_items=None,
                 **params) -> Tensor:
    """The named divergence between the k + 1 bucket distributions of the teacher's top-k form (the teacher's k most
    likely tokens, then everything else summed), by loops over positions; float64."""
    fn = DENSE_REFERENCES[name]
    total = 0.0
    for b, t in _valid(mask):
        p_s, p_t = probs(student[b, t]), probs(teacher[b, t])
        ids = torch.argsort(p_t, descending=True)[:k]
        rest = torch.ones_like(p_t, dtype=torch.bool)
        rest[ids] = False
        total = total + fn(torch.cat([p_s[ids], p_s[rest].sum(0, keepdim=True)]),
                           torch.cat([p_t[ids], p_t[rest].sum(0, keepdim=True)]), **params)
    return total / _count(mask, num_items)


def ref_cross_entropy(student: Tensor, target: Tensor, mask: Tensor, num_items=None) -> Tensor:
    total = sum(-torch.log(probs(student[b, t])[target[b, t]]) for b, t in _valid(mask))
    return total / _count(mask, num_items)


def _advantages(a: list[list[float]], mask: Tensor, credit: str, gamma: float, rkl) -> list[list[float]]:
    """Advantages by explicit loops over time, from plain Python floats."""
    out = [[0.0] * len(row) for row in a]
    for b, row in enumerate(a):
        for t in range(len(row)):
            if not mask[b, t]:
                continue
            if credit == "immediate":
                out[b][t] = row[t]
            elif credit == "baseline":
                out[b][t] = row[t] + rkl[b][t]
            else:
                g = 1.0 if credit == "return_to_go" else gamma
                out[b][t] = sum(g ** (s - t) * row[s] for s in range(t, len(row)) if mask[b, s])
    return out


def ref_sampled_token(student: Tensor, teacher: Tensor, target: Tensor, mask: Tensor, *, credit: str = "immediate",
                      gamma: float = 0.99, clip_eps: float = 0.2, old_logprobs: Tensor | None = None,
                      temperature: float = 1.0, num_items=None) -> Tensor:
    """PPO-clipped policy gradient with the log-ratio reward, by loops; teacher token log-probs from `teacher`."""
    b_size, n = mask.shape
    logp = [[None] * n for _ in range(b_size)]
    a = [[0.0] * n for _ in range(b_size)]
    rkl = [[0.0] * n for _ in range(b_size)]
    for b, t in _valid(mask):
        p_s, p_t = probs(student[b, t], temperature), probs(teacher[b, t], temperature)
        y = target[b, t]
        logp[b][t] = torch.log(p_s[y])
        a[b][t] = math.log(p_t[y].item()) - math.log(p_s[y].item())
        rkl[b][t] = _kl(p_s, p_t).item()
    adv = _advantages(a, mask, credit, gamma, rkl)
    total = 0.0
    for b, t in _valid(mask):
        old = logp[b][t].detach() if old_logprobs is None else old_logprobs[b, t].double()
        r = torch.exp(logp[b][t] - old)
        A = adv[b][t]
        total = total - torch.minimum(r * A, torch.clamp(r, 1 - clip_eps, 1 + clip_eps) * A)
    return total / _count(mask, num_items)


def ref_entropy_aware(student: Tensor, teacher: Tensor, target: Tensor, mask: Tensor, *, entropy_threshold: float,
                      k: int, forward_weight: float = 1.0, temperature: float = 1.0) -> Tensor:
    """Fresh-rollout entropy-aware loss by loops: −a_t·(log p_S ratio trick) plus gated top-k forward KL."""
    total = 0.0
    for b, t in _valid(mask):
        p_s, p_t = probs(student[b, t], temperature), probs(teacher[b, t], temperature)
        y = target[b, t]
        logp = torch.log(p_s[y])
        a = math.log(p_t[y].item()) - math.log(p_s[y].item())
        total = total - torch.exp(logp - logp.detach()) * a
        entropy = -(p_t * torch.log(p_t)).sum()
        if entropy > entropy_threshold:
            q_s, q_t = _topk_renorm(p_s, p_t, k)
            total = total + forward_weight * _kl(q_t, q_s)
    return total / _count(mask, None)


def ref_sorted_l1(p: Tensor, q: Tensor, topk: int | None = None) -> Tensor:
    """Σ_i |a_i − b_i| of the two vectors sorted in descending order, cut to `topk`, the shorter padded with zeros."""
    a, b = torch.sort(p, descending=True).values[:topk], torch.sort(q, descending=True).values[:topk]
    width = max(len(a), len(b))
    a = torch.cat([a, a.new_zeros(width - len(a))])
    b = torch.cat([b, b.new_zeros(width - len(b))])
    return (a - b).abs().sum()


def ref_uld(student: Tensor, teacher: Tensor, target: Tensor, mask: Tensor, *, distill_weight: float = 1.5,
            ce_weight: float = 1.0, temperature: float = 1.0, topk: int | None = None, num_items=None) -> Tensor:
    """λ·sorted-L1 − μ·log p_S(target) summed over valid positions, divided by the count; float64."""
    total = 0.0
    for b, t in _valid(mask):
        p_s, p_t = probs(student[b, t], temperature), probs(teacher[b, t], temperature)
        total = total + distill_weight * ref_sorted_l1(p_s, p_t, topk) - ce_weight * torch.log(p_s[target[b, t]])
    return total / _count(mask, num_items)


def ref_gold_parts(p_s: Tensor, p_t: Tensor, pairs: tuple[Tensor, Tensor], beta: float) -> tuple[Tensor, Tensor]:
    """(JSD_β on the matched tokens renormalised there, sorted L1 of the raw unmatched probabilities) at one position."""
    s_ids, t_ids = pairs[0].tolist(), pairs[1].tolist()
    q_s, q_t = p_s[s_ids] / p_s[s_ids].sum(), p_t[t_ids] / p_t[t_ids].sum()
    if beta == 0:
        matched = _kl(q_t, q_s)
    elif beta == 1:
        matched = _kl(q_s, q_t)
    else:
        matched = DENSE_REFERENCES["generalized_jsd"](q_s, q_t, beta)
    rest_s = [v for v in range(len(p_s)) if v not in s_ids]
    rest_t = [v for v in range(len(p_t)) if v not in t_ids]
    return matched, ref_sorted_l1(p_s[rest_s], p_t[rest_t])


def ref_gold(student: Tensor, teacher: Tensor, mask: Tensor, pairs: tuple[Tensor, Tensor], *, beta: float = 0.5,
             matched_weight: float | None = None, unmatched_weight: float | None = None, temperature: float = 1.0,
             num_items=None) -> Tensor:
    """w_m·matched + w_u·unmatched summed over valid positions, divided by the count; default w_m = K / V_T."""
    if matched_weight is None:
        matched_weight = len(pairs[1]) / teacher.shape[-1]
        unmatched_weight = 1 - matched_weight
    total = 0.0
    for b, t in _valid(mask):
        matched, unmatched = ref_gold_parts(probs(student[b, t], temperature), probs(teacher[b, t], temperature),
                                            pairs, beta)
        total = total + matched_weight * matched + unmatched_weight * unmatched
    return total / _count(mask, num_items)


def make_projection(v_s: int, v_t: int, *, seed: int = 0, unreachable: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """A random sparse W [v_s, v_t] as (student ids, teacher ids, float32 weights): each row empty (about 1 in 7),
    one-hot (1 in 7), or 2 to 3 teacher ids with random weights summing to 1; the last `unreachable` teacher ids are
    in no row."""
    g = torch.Generator().manual_seed(seed)
    rows, cols, weights = [], [], []
    for s in range(v_s):
        kind = int(torch.randint(0, 7, (1,), generator=g))
        if kind == 0:
            continue
        width = 1 if kind == 1 else int(torch.randint(2, 4, (1,), generator=g))
        ids = torch.randperm(v_t - unreachable, generator=g)[:width]
        w = torch.rand(width, generator=g) + 0.05
        rows += [s] * width
        cols += ids.tolist()
        weights += (w / w.sum()).tolist()
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(weights, dtype=torch.float32)


def ref_xtoken_pkl(student: Tensor, teacher: Tensor, mask: Tensor, projection: tuple[Tensor, Tensor, Tensor], *,
                   beta: float = 0.0, temperature: float = 1.0, num_items=None) -> Tensor:
    """P-KL by loops: q(t) = Σ over W's entries (s, t, w) of p_S(s)·w, both sides restricted to the reached t and
    renormalised there, then the generalized JSD (β = 0 / 1: forward / reverse KL); float64."""
    entries = list(zip(*(x.tolist() for x in projection), strict=True))
    v_t = teacher.shape[-1]
    total = 0.0
    for b, t in _valid(mask):
        p_s, p_t = probs(student[b, t], temperature), probs(teacher[b, t], temperature)
        q = [sum((p_s[s] * w for s, c, w in entries if c == col), p_s.new_zeros(())) for col in range(v_t)]
        reached = [col for col in range(v_t) if q[col] > 0]
        q_r = torch.stack([q[col] for col in reached])
        q_r, t_r = q_r / q_r.sum(), p_t[reached] / p_t[reached].sum()
        if beta == 0:
            total = total + _kl(t_r, q_r)
        elif beta == 1:
            total = total + _kl(q_r, t_r)
        else:
            total = total + DENSE_REFERENCES["generalized_jsd"](q_r, t_r, beta)
    return total / _count(mask, num_items)


def ref_top_ranked_pairs(projection: tuple[Tensor, Tensor, Tensor], threshold: float) -> tuple[Tensor, Tensor]:
    """H-KL's pairs by brute force: each row's largest weight (ties: lower teacher id) if ≥ threshold, then each
    teacher id kept for the row with the largest such weight (ties: lower student id)."""
    best: dict[int, tuple[float, int]] = {}
    for s, c, w in zip(*(x.tolist() for x in projection), strict=True):
        if s not in best or (w, -c) > (best[s][0], -best[s][1]):
            best[s] = (w, c)
    owner: dict[int, tuple[float, int]] = {}
    for s, (w, c) in sorted(best.items()):
        if w >= threshold and (c not in owner or w > owner[c][0]):
            owner[c] = (w, s)
    pairs = sorted((s, c) for c, (_, s) in owner.items())
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def ref_xtoken_hkl(student: Tensor, teacher: Tensor, mask: Tensor, projection: tuple[Tensor, Tensor, Tensor], *,
                   threshold: float = 0.6, beta: float = 0.0, matched_weight: float = 1.0,
                   unmatched_weight: float = 1.0, temperature: float = 1.0, num_items=None) -> Tensor:
    """H-KL: the GOLD reference on the brute-force pairs."""
    return ref_gold(student, teacher, mask, ref_top_ranked_pairs(projection, threshold), beta=beta,
                    matched_weight=matched_weight, unmatched_weight=unmatched_weight, temperature=temperature,
                    num_items=num_items)
