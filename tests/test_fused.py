"""The fused output layer (`losses/fused.py`) against the unfused dense path, in float64: values and gradients."""

import pytest
import torch
from opd_lightning.losses import LOSSES, DenseDivergence
from opd_lightning.losses import fused as fused_lib
from opd_lightning.losses.base import dense_divergence, dense_sum
from opd_lightning.losses.fused import HiddenRows, fused_dense_divergence, fused_dense_sum

from opd_lightning.target import TopK

DENSE = sorted(name for name, cls in LOSSES.items() if issubclass(cls, DenseDivergence))


def _inputs(b=2, n=5, h=6, v=11, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    b_ = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    teacher = 2 * torch.randn(b, n, v, generator=g, dtype=torch.float64)
    mask = torch.rand(b, n, generator=g) > 0.3
    return hidden, weight, b_, teacher, mask


@pytest.fixture(params=[None, 2], ids=["whole_chunk", "two_rows_a_step"])
def sub_rows(request, monkeypatch):
    """Rows whose loss and gradient are taken at a time inside a chunk: the default (the whole chunk, at these tiny
    vocabularies) or two (with 11 or 64 columns), so that the fused path's inner steps are exercised."""
    if request.param is not None:
        monkeypatch.setattr(fused_lib, "SUB_ELEMENTS", request.param * 11)
    return request.param


def _grads(value, *xs):
    return torch.autograd.grad(value, [x for x in xs if x is not None])


def test_the_dense_losses_are_listed():
    assert {"forward_kl", "reverse_kl", "tvd", "generalized_jsd", "skew_kl", "skew_reverse_kl",
            "topk_reverse_kl"} <= set(DENSE)


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_fused_equals_unfused_in_value_and_gradient(name, chunk, form, sub_rows):
    loss = LOSSES.build(name, temperature=1.5)
    hidden, weight, bias, teacher_logits, mask = _inputs(seed=chunk)
    teacher = teacher_logits
    if form == "topk":
        teacher = TopK.from_logits(teacher_logits, 3, temperature=1.5)
    fn = loss.per_bucket if form == "topk" else loss.per_token
    want = dense_divergence(fn, hidden @ weight.T + bias, teacher, mask, temperature=1.5, num_items=7.0)
    got = fused_dense_divergence(fn, hidden, weight, teacher, mask, bias=bias, temperature=1.5, num_items=7.0,
                                 chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(_grads(3.0 * got, hidden, weight, bias), _grads(3.0 * want, hidden, weight, bias), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_frozen_or_tied_output_layers_and_empty_rows(sub_rows):
    loss = LOSSES.build("forward_kl")
    hidden, weight, _, _, _ = _inputs(v=11, bias=False)
    rows = hidden.reshape(-1, hidden.shape[-1])
    teacher = torch.randn(rows.shape[0], 11, dtype=torch.float64)
    want = dense_sum(loss.per_token, rows @ weight.T, teacher)
    got = fused_dense_sum(loss.per_token, rows, weight, teacher, chunk_size=4)
    torch.testing.assert_close(got, want)
    for g, w in zip(_grads(got, rows, weight), _grads(want, rows, weight), strict=True):
        torch.testing.assert_close(g, w)
    frozen = weight.detach()  # a frozen output layer: the hidden states still get their gradient
    got = fused_dense_sum(loss.per_token, rows, frozen, teacher, chunk_size=4)
    torch.testing.assert_close(_grads(got, rows)[0], _grads(dense_sum(loss.per_token, rows @ frozen.T, teacher), rows)[0])
    embed = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)  # tied: the weight is computed from a leaf
    ids = torch.tensor([1, 4, 7])
    h = embed[ids] * 2
    got = fused_dense_sum(loss.per_token, h, embed, teacher[:3], chunk_size=2)
    want = dense_sum(loss.per_token, (embed[ids] * 2) @ embed.T, teacher[:3])
    torch.testing.assert_close(_grads(got, embed)[0], _grads(want, embed)[0])
    empty = fused_dense_sum(loss.per_token, rows[:0], weight, teacher[:0])
    assert empty.item() == 0.0
    empty.backward()  # an exact zero that still carries a graph
    assert weight.grad is not None and not weight.grad.any()


def test_low_precision_inputs_match_within_their_rounding(sub_rows):
    loss = LOSSES.build("reverse_kl")
    hidden, weight, bias, teacher, mask = _inputs(n=8, v=64, h=16)
    h16, w16, b16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight, bias))
    want = dense_divergence(loss.per_token, (h16 @ w16.T + b16), teacher.float(), mask)
    got = fused_dense_divergence(loss.per_token, h16, w16, teacher.float(), mask, bias=b16, chunk_size=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    gw_got, gw_want = _grads(got, w16)[0], _grads(want, w16)[0]
    assert gw_got.dtype == torch.bfloat16
    torch.testing.assert_close(gw_got.float(), gw_want.float(), rtol=5e-2, atol=5e-3)


def test_bad_inputs_are_refused():
    loss = LOSSES.build("forward_kl")
    hidden, weight, _, teacher, mask = _inputs()
    with pytest.raises(ValueError, match="do not fit an output layer"):
        fused_dense_sum(loss.per_token, hidden[mask][:, :4], weight, teacher[mask])
    with pytest.raises(ValueError, match="chunk size must be at least 1"):
        fused_dense_sum(loss.per_token, hidden[mask], weight, teacher[mask], chunk_size=-2)
    with pytest.raises(ValueError, match="NaN or inf"):
        fused_dense_divergence(loss.per_token, hidden, weight, teacher.masked_fill(mask.unsqueeze(-1), float("nan")),
                               mask)
    got = fused_dense_sum(loss.per_token, hidden[mask], weight, teacher[mask])
    got.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        got.backward()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_a_teacher_given_as_hidden_states_equals_its_logits(name, sub_rows):
    loss = LOSSES.build(name)
    hidden, weight, bias, _, mask = _inputs(seed=5)
    g = torch.Generator().manual_seed(9)
    t_hidden, t_weight, t_bias = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 5, 4), (11, 4), (11,)))
    want = dense_divergence(loss.per_token, hidden @ weight.T + bias, t_hidden @ t_weight.T + t_bias, mask)
    teacher = HiddenRows(t_hidden, t_weight, t_bias)
    assert teacher.shape == (2, 5, 11)
    got = fused_dense_divergence(loss.per_token, hidden, weight, teacher, mask, bias=bias, chunk_size=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(got, hidden, weight, bias), _grads(want, hidden, weight, bias), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    broken = HiddenRows(t_hidden.masked_fill(mask.unsqueeze(-1), float("inf")), t_weight, t_bias)
    with pytest.raises(ValueError, match="NaN or inf"):
        fused_dense_divergence(loss.per_token, hidden, weight, broken, mask, bias=bias, chunk_size=2)


def test_the_default_chunk_is_bounded_by_elements():
    from opd_lightning.losses.fused import CHUNK_ELEMENTS, default_chunk

    assert default_chunk(262144) == 32 and default_chunk(32768) == 256
    assert default_chunk(CHUNK_ELEMENTS * 4) == 1  # at least one position
    hidden, weight, _, teacher, mask = _inputs()
    loss = LOSSES.build("forward_kl")
    torch.testing.assert_close(fused_dense_sum(loss.per_token, hidden[mask], weight, teacher[mask]),
                               dense_sum(loss.per_token, hidden[mask] @ weight.T, teacher[mask]))
    with pytest.raises(ValueError, match="chunk size must be at least 1"):
        fused_dense_sum(loss.per_token, hidden[mask], weight, teacher[mask], chunk_size=0)


@pytest.mark.parametrize("name", ["uld", "gold"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_losses_of_several_parts_fuse_equal_to_their_logits(name, chunk, sub_rows):
    """`uld` and `gold` sum two parts over positions (`dense_parts`): fused, the same value, parts and gradients."""
    hidden, weight, bias, _, mask = _inputs(seed=chunk)
    g = torch.Generator().manual_seed(5)
    native = 2 * torch.randn(2, 5, 13, generator=g, dtype=torch.float64)  # the teacher's own vocabulary, 13 wide
    target = torch.randint(11, (2, 5), generator=g)
    loss = LOSSES.build(name, temperature=1.5, **({"matched_weight": 0.7, "unmatched_weight": 0.2} if name == "gold"
                                                  else {}))
    args = ((native, mask, target) if name == "uld" else
            (native, mask, (torch.tensor([0, 2, 3, 7]), torch.tensor([1, 2, 9, 4]))))
    want = loss.compute(hidden @ weight.T + bias, *args, 7.0)
    got = loss.compute(HiddenRows(hidden, weight, bias, chunk), *args, 7.0)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    assert got.metrics.keys() == want.metrics.keys()
    for key in want.metrics:
        torch.testing.assert_close(got.metrics[key], want.metrics[key], rtol=1e-12, atol=1e-12, msg=key)
    for a, b in zip(_grads(3.0 * got.loss, hidden, weight, bias), _grads(3.0 * want.loss, hidden, weight, bias),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_loss_of_several_parts_needs_its_weights():
    hidden, weight, bias, teacher, mask = _inputs()
    parts = lambda s, t: torch.stack([(s.exp() * (s - t)).sum(-1), -s[:, 0]], -1)  # [n, 2]
    with pytest.raises(ValueError, match="part_weights"):
        fused_dense_sum(parts, hidden[mask], weight, teacher[mask], bias=bias)
