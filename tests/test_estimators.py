"""The policy-gradient estimators beyond sums of rewards, checked against values computed by hand: GAE-OPD (with the
closed-form values and with supplied ones), MiniLLM's length-normalised returns, IW-OPD's prefix weights, and
counterfactual routing (`cr_opd`)."""

from __future__ import annotations

import math

import pytest
import torch
from opd_lightning.losses import (
    LOSSES,
    LossInputs,
    TeacherTarget,
    TopK,
    assign_credit,
    gae_advantages,
    iw_opd_weights,
    length_normalised_returns,
    sampled_token,
)

# The batch of test_losses_parity's "credit by hand": B = 1, N = 4, V = 2, the last position masked; p_S = (½, ½),
# p_T = (0.8, 0.2), sampled y = (0, 1, 0, 1): a_t = (ln 1.6, ln 0.4, ln 1.6), every step's KL(p_S ‖ p_T) = ln 1.25.
L16, L04, L2 = math.log(1.6), math.log(0.4), math.log(2.0)
T = math.log(6.4)  # Σ|a_t| = ln 1.6 + ln 2.5 + ln 1.6
HAND = {
    # γ = λ = 0.5. V_t = −Σ_{s≥t} 0.5^(s−t) ln 1.25, so δ_t = a_t + 0.5 V_{t+1} − V_t = a_t + ln 1.25 = (ln 2, −ln 2,
    # ln 2), and A_t = Σ_l 0.25^l δ_{t+l}: A_2 = ln 2, A_1 = −ln 2 + ¼ ln 2, A_0 = ln 2 − ¼ ln 2 + ¹⁄₁₆ ln 2.
    "gae": [0.8125 * L2, -0.75 * L2, L2, 0.0],
    # a_t plus the mean of the later log-ratios: ln 1.6 + ½ (ln 0.4 + ln 1.6), ln 0.4 + ln 1.6, ln 1.6.
    "length_normalised": [L16 + 0.5 * (L04 + L16), L04 + L16, L16, 0.0],
    # w_t = 1 + ½ (1 − P_t / T), P = (0, ln 1.6, ln 1.6 + ln 2.5 = ln 4).
    "iw_opd": [1.5 * L16, (1 + 0.5 * (1 - L16 / T)) * L04, (1 + 0.5 * (1 - math.log(4) / T)) * L16, 0.0],
}


@pytest.mark.parametrize("credit", sorted(HAND))
def test_new_credits_by_hand(credit):
    student = torch.zeros(1, 4, 2, requires_grad=True)
    teacher = torch.log(torch.tensor([0.8, 0.2])).expand(1, 4, 2).clone()
    target = torch.tensor([[0, 1, 0, 1]])
    mask = torch.tensor([[True, True, True, False]])
    token = torch.log(torch.tensor([[0.8, 0.2, 0.8, 0.2]]))
    loss = LOSSES.build("sampled_token", credit=credit, gamma=0.5, lam=0.5, iw_gamma=0.5)
    assert ("teacher_logits" in loss.requires) == (credit == "gae")
    out = loss(LossInputs(student, target, mask, teacher=TeacherTarget(logits=teacher, token_logprobs=token)))
    (grad,) = torch.autograd.grad(out.loss, student)
    advantages = torch.tensor(HAND[credit])
    dlogp = torch.nn.functional.one_hot(target, 2).float() - 0.5  # ∇_logits log p_S(y) = onehot(y) − p_S
    torch.testing.assert_close(grad, -(advantages.view(1, 4, 1) * dlogp) / 3, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.metrics["advantage"], advantages[:3].mean(), rtol=1e-6, atol=1e-7)


def test_gae_with_supplied_values_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0]])
    mask = torch.tensor([[True, True, True, False]])  # the masked reward and value are never read
    # λ = 1, γ = 1: the return minus the value, (6 − 0.5, 5 − 1, 3 − 1.5)
    torch.testing.assert_close(gae_advantages(rewards, values, mask, 1.0, 1.0), torch.tensor([[5.5, 4.0, 1.5, 0.0]]))
    # λ = 0, γ = ½: δ_t alone, (1 + ½·1 − 0.5, 2 + ½·1.5 − 1, 3 + 0 − 1.5)
    torch.testing.assert_close(gae_advantages(rewards, values, mask, 0.5, 0.0), torch.tensor([[1.0, 1.75, 1.5, 0.0]]))
    # through assign_credit, supplied values override the closed form (no reverse KL needed)
    torch.testing.assert_close(assign_credit(rewards, mask, "gae", gamma=0.5, lam=0.0, values=values),
                               torch.tensor([[1.0, 1.75, 1.5, 0.0]]))
    with pytest.raises(ValueError, match="reverse KL"):
        assign_credit(rewards, mask, "gae")


def test_gae_at_its_limits_on_random_batches():
    """λ = 0 with the closed-form values is the 'baseline' credit; λ = 1 is the discounted return minus the value."""
    g = torch.Generator().manual_seed(3)
    a, kl = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.rand(3, 9, generator=g, dtype=torch.float64)
    mask = torch.arange(9) < torch.tensor([[9], [5], [1]])
    base = assign_credit(a, mask, "baseline", reverse_kl=kl)
    torch.testing.assert_close(assign_credit(a, mask, "gae", gamma=0.7, lam=0.0, reverse_kl=kl), base)
    values = torch.randn(3, 9, generator=g, dtype=torch.float64)
    returns = assign_credit(a, mask, "discounted", gamma=0.7)
    torch.testing.assert_close(gae_advantages(a, values, mask, 0.7, 1.0), torch.where(mask, returns - values, 0.0))


def test_length_normalised_and_iw_opd_weights_on_a_ragged_batch():
    a = torch.tensor([[1.0, -2.0, 4.0], [3.0, 5.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    torch.testing.assert_close(length_normalised_returns(a, mask), torch.tensor([[2.0, 2.0, 4.0], [3.0, 0.0, 0.0]]))
    # row 0: Σ|a| = 7, P = (0, 1, 3); row 1: a single token keeps the full weight 1 + γ
    torch.testing.assert_close(iw_opd_weights(a, mask, 2.0),
                               torch.tensor([[3.0, 1 + 2 * 6 / 7, 1 + 2 * 4 / 7], [3.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="iw_gamma"):
        LOSSES.build("sampled_token", credit="iw_opd", iw_gamma=-1.0)
    with pytest.raises(ValueError, match="lam"):
        LOSSES.build("sampled_token", credit="gae", lam=1.5)


# ------------------------------------------------------------------------------------- counterfactual routing
def _routing_case(route_k=2, floor=1e-3, student=None, teacher_probs=(0.1, 0.5, 0.3, 0.1), topk=False):
    student = torch.zeros(1, 1, 4) if student is None else student
    student = student.clone().requires_grad_()
    teacher = torch.log(torch.tensor(teacher_probs)).view(1, 1, 4)
    target, mask = torch.tensor([[0]]), torch.tensor([[True]])
    logits = TopK.from_logits(teacher, 3) if topk else teacher
    loss = LOSSES.build("cr_opd", route_k=route_k, floor=floor)
    out = loss(LossInputs(student, target, mask, teacher=TeacherTarget(logits=logits, token_logprobs=teacher[..., 0])))
    (grad,) = torch.autograd.grad(out.loss, student)
    return out, grad.view(4)


@pytest.mark.parametrize("topk", [False, True])
def test_cr_opd_routes_the_penalised_mass_to_the_teachers_alternatives_by_hand(topk):
    # p_S uniform (¼ each), y = 0 with p_T(y) = 0.1: A = a = ln(0.1 / 0.25) = ln 0.4 < 0. The teacher's top-2 are
    # tokens 1 and 2 (0.5, 0.3), both above the floor: w = (0, ⅝, ⅜, 0). The logits' gradient is |A| (e_y − w),
    # where the plain sampled-token loss gives |A| (e_y − p_S).
    out, grad = _routing_case(topk=topk)
    size = -math.log(0.4)
    torch.testing.assert_close(grad, size * torch.tensor([1.0, -0.625, -0.375, 0.0]))
    # value: −r·A = |A| for the policy term, plus |A| · CE(w, p_S) = |A| · ln 4
    torch.testing.assert_close(out.loss, torch.tensor(size * (1 + math.log(4))))
    assert out.metrics["routed_frac"] == 1.0


def test_cr_opd_falls_back_to_the_sampled_token_update():
    # positive advantage (p_T(y) = 0.7 > ¼): no routing, the sampled-token gradient
    out, grad = _routing_case(teacher_probs=(0.7, 0.1, 0.1, 0.1))
    student = torch.zeros(1, 1, 4, requires_grad=True)
    plain = sampled_token(student, torch.tensor([[0]]), torch.tensor([[True]]),
                          teacher_token_logprobs=torch.tensor([[math.log(0.7)]]))
    torch.testing.assert_close(grad, torch.autograd.grad(plain.loss, student)[0].view(4))
    assert out.metrics["routed_frac"] == 0.0
    # negative advantage, route_k = 1: the teacher's top-1 (token 1) is below the student's floor, nothing is routed
    low = torch.tensor([[[0.0, -20.0, 0.0, 0.0]]])
    out, grad = _routing_case(route_k=1, student=low)
    p = torch.softmax(low.view(4), -1)
    a = math.log(0.1) - math.log(float(p[0]))
    torch.testing.assert_close(grad, -a * (torch.nn.functional.one_hot(torch.tensor(0), 4) - p))
    assert out.metrics["routed_frac"] == 0.0
    # with route_k = 2 the floor drops token 1 and routes everything to token 2: w = (0, 0, 1, 0)
    out, grad = _routing_case(route_k=2, student=low)
    torch.testing.assert_close(grad, -a * torch.tensor([1.0, 0.0, -1.0, 0.0]), atol=1e-6, rtol=1e-5)
    # the sampled token among the teacher's top-2 (tokens 1 and 0) is never a route: w = (0, 1, 0, 0)
    sure = torch.tensor([[[3.0, 0.0, 0.0, 0.0]]])
    out, grad = _routing_case(student=sure, teacher_probs=(0.4, 0.5, 0.05, 0.05))
    a = math.log(0.4) - float(torch.log_softmax(sure.view(4), -1)[0])
    assert a < 0
    torch.testing.assert_close(grad, -a * torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-6, rtol=1e-5)


def test_cr_opd_refuses_what_it_cannot_route():
    with pytest.raises(ValueError, match="route_k"):
        LOSSES.build("cr_opd", route_k=0)
    with pytest.raises(ValueError, match="floor"):
        LOSSES.build("cr_opd", floor=1.5)
    assert "teacher_logits" in LOSSES.build("cr_opd").requires
    loss = LOSSES.build("cr_opd")
    with pytest.raises(ValueError, match="teacher_logits"):
        loss.compute(torch.zeros(1, 1, 4), torch.tensor([[0]]), torch.tensor([[True]]),
                     torch.tensor([[math.log(0.1)]]), None, None, None, None)


# ------------------------------------------------------------------------------------- GAE with a value head
def test_gae_with_a_value_head_by_hand():
    # The batch of the hand table (γ = λ = ½). Hidden states h_t = (t, 1) with a head V = 0.1·h₀ + 0.2·h₁ + 0 gives
    # V(c_t) = (0.2, 0.3, 0.4) on the valid positions; δ_t = a_t + ½ V_{t+1} − V_t, A_t = Σ_l ¼^l δ_{t+l}.
    loss = LOSSES.build("sampled_token", credit="gae", gamma=0.5, lam=0.5, value="head", value_coef=2.0)
    assert loss.reads_student_hidden and "teacher_logits" not in loss.requires  # the head replaces the closed form
    loss.setup(2, 7)
    with torch.no_grad():
        loss.value_head.weight.copy_(torch.tensor([[0.1, 0.2]]))
        loss.value_head.bias.zero_()
    student = torch.zeros(1, 4, 2, requires_grad=True)
    hidden = torch.stack([torch.arange(4.0), torch.ones(4)], -1).unsqueeze(0).requires_grad_()  # [1, 4, 2]
    target, mask = torch.tensor([[0, 1, 0, 1]]), torch.tensor([[True, True, True, False]])
    token = torch.log(torch.tensor([[0.8, 0.2, 0.8, 0.2]]))
    inputs = LossInputs(student, target, mask, teacher=TeacherTarget(token_logprobs=token), student_hidden=hidden)
    out = loss(inputs)
    a, v = [L16, L04, L16], [0.2, 0.3, 0.4]
    delta = [a[0] + 0.5 * v[1] - v[0], a[1] + 0.5 * v[2] - v[1], a[2] - v[2]]
    adv = [delta[0] + 0.25 * delta[1] + 0.0625 * delta[2], delta[1] + 0.25 * delta[2], delta[2]]
    returns = [a[0] + 0.5 * a[1] + 0.25 * a[2], a[1] + 0.5 * a[2], a[2]]  # the head's regression targets
    squared = [(v[t] - returns[t]) ** 2 for t in range(3)]
    torch.testing.assert_close(out.metrics["advantage"], torch.tensor(sum(adv) / 3))
    torch.testing.assert_close(out.metrics["value_loss"], torch.tensor(sum(squared) / 3))
    torch.testing.assert_close(out.loss, torch.tensor(-sum(adv) / 3 + 2.0 * sum(squared) / 3))
    student_grad, head_grad, hidden_grad = torch.autograd.grad(out.loss, [student, loss.value_head.weight, hidden],
                                                               allow_unused=True)
    dlogp = torch.nn.functional.one_hot(target, 2).float() - 0.5
    torch.testing.assert_close(student_grad, -(torch.tensor(adv + [0.0]).view(1, 4, 1) * dlogp) / 3)
    # d/dw of 2·Σ(V_t − R_t)²/3 = (4/3) Σ (V_t − R_t) h_t
    expected = [4 / 3 * sum((v[t] - returns[t]) * h for t, h in enumerate(hs)) for hs in ([0, 1, 2], [1, 1, 1])]
    torch.testing.assert_close(head_grad, torch.tensor([expected]))
    assert hidden_grad is None  # the head reads detached states: the value regression does not move the student


def test_value_head_options_are_checked():
    with pytest.raises(ValueError, match="credit 'gae' only"):
        LOSSES.build("sampled_token", credit="baseline", value="head")
    with pytest.raises(ValueError, match="value must be"):
        LOSSES.build("sampled_token", credit="gae", value="critic")
    loss = LOSSES.build("sampled_token", credit="gae", value="head")
    inputs = LossInputs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool),
                        teacher=TeacherTarget(token_logprobs=torch.zeros(1, 2)), student_hidden=torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="setup"):
        loss(inputs)


@pytest.mark.parametrize("loss_name", ["sampled_token", "cr_opd"])
def test_value_head_is_trained_saved_and_restored_by_the_module(teacher_dir, loss_name):
    from conftest import TINY

    from opd_lightning.models import HFModel
    from opd_lightning.module import DistillationModule
    from opd_lightning.rollout import SamplingConfig

    def make():
        module = DistillationModule(student=HFModel(config=TINY, tokenizer="builtin:char", seed=0),
                                    teacher=HFModel(path=teacher_dir), sampling=SamplingConfig(max_new_tokens=6),
                                    loss={"name": loss_name, "credit": "gae", "value": "head"},
                                    optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
        module.manual_backward = lambda loss: loss.backward()  # one step without a Trainer
        return module

    module = make()
    own = {k: p for k, p in module.named_parameters() if not k.startswith("student.")}
    assert set(own) == {"terms.0.loss.value_head.weight", "terms.0.loss.value_head.bias"}
    assert own["terms.0.loss.value_head.weight"].shape == (1, 32)  # the tiny student's hidden size
    optimized = {id(p) for p in module.configure_optimizers().param_groups[0]["params"]}
    assert {id(p) for p in own.values()} <= optimized
    batch = {"prompt": ["12+34=", "7-3=", "5+5=", "81-9="], "completion": ["46", "4", "10", "72"]}
    total, metrics = module._run_step(batch, train=True)
    assert torch.isfinite(total) and f"{loss_name}/value_loss" in metrics
    for name, params in (("student", list(module.student.parameters())), ("head", list(own.values()))):
        assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0, name
    fresh = make()
    fresh.load_state_dict(module.state_dict())  # strict: the checkpoint holds the head
    assert all(torch.equal(p, fresh.state_dict()[k]) for k, p in own.items())
