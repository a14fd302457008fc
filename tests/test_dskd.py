"""Dual-Space KD: the pure loss against a float64 reference, cross-model attention's masking, and training steps.

The loss and the `dskd_cma` aligner hold trainable parameters (projectors, attention query); these tests check that
the parameters exist before the optimizer is built, train, and are saved, while the teacher stays out of both.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY
from loss_reference import probs
from opd_lightning.aligners import ALIGNERS, TeacherHidden, TeacherInputs
from opd_lightning.losses import TeacherSequence, dskd

from opd_lightning.hidden import output_layer_input
from opd_lightning.models import HFModel
from opd_lightning.module import DistillationModule
from opd_lightning.objective import LossTerm, check_pairing
from opd_lightning.rollout import Rollout, SamplingConfig

BATCH = {"prompt": ["12+34=", "7-3=", "5+5=", "81-9="], "completion": ["46", "4", "10", "72"]}


# ------------------------------------------------------------------------------------------- pure loss
def _kl(p, q):
    return (p * (p.log() - q.log())).sum()


def ref_dskd(s_logits, s_hidden, t_hidden, t_logits, t_mask, to_teacher, mask, target, heads, t2s, s2t, *,
             temperature, distill_weight, ce_weight, divergence="forward_kl", correct_only=False):
    """The DSKD formula spelled out position by position in float64 (projectors as (weight, bias) pairs)."""
    w_s, w_t = (h.double() for h in heads)
    (a_ts, b_ts), (a_st, b_st) = ((w.double(), b.double()) for w, b in (t2s, s2t))
    kd_s = ce_t = ce = kd_t = 0.0
    for b, i in mask.nonzero().tolist():
        z = w_s @ (a_ts @ t_hidden[b, i].double() + b_ts)
        p, q = probs(z, temperature), probs(s_logits[b, i], temperature)
        y = target[b, i]
        ce_t = ce_t - probs(z)[y].log()
        ce = ce - probs(s_logits[b, i])[y].log()
        if not correct_only or int(z.argmax()) == int(y):
            kd_s = kd_s + (_kl(p, q) if divergence == "forward_kl" else _kl(q, p))
    for b, j in t_mask.nonzero().tolist():
        h = s_hidden[b, j] if to_teacher is None else to_teacher[b, j].double() @ s_hidden[b]
        q = probs(w_t @ (a_st @ h.double() + b_st), temperature)
        kd_t = kd_t + _kl(probs(t_logits[b, j], temperature), q)
    n = mask.sum().clamp_min(1)
    return (distill_weight * (kd_s + ce_t + kd_t) + ce_weight * ce) / n


def _cross_case(seed=0):
    """Odd shapes: B=3, N=7 student and M=9 teacher positions, V_s=41, V_t=53, H_s=5, H_t=11."""
    g = torch.Generator().manual_seed(seed)
    b, n, m, v_s, v_t, h_s, h_t = 3, 7, 9, 41, 53, 5, 11
    mask = torch.rand(b, n, generator=g) < 0.7
    mask[:, 0], mask[0, -1] = True, False
    t_mask = torch.rand(b, m, generator=g) < 0.8
    t_mask[:, 0] = True
    weights = torch.randn(b, m, n, generator=g).masked_fill(~mask.unsqueeze(1), -torch.inf).softmax(-1)  # [B, M, N]
    return {"s_logits": 2 * torch.randn(b, n, v_s, generator=g), "s_hidden": torch.randn(b, n, h_s, generator=g),
            "t_hidden": torch.randn(b, n, h_t, generator=g), "t_logits": 2 * torch.randn(b, m, v_t, generator=g),
            "t_mask": t_mask, "to_teacher": weights, "mask": mask,
            "target": torch.randint(0, v_s, (b, n), generator=g),
            "heads": (torch.randn(v_s, h_s, generator=g), torch.randn(v_t, h_t, generator=g)),
            "projectors": (torch.nn.Linear(h_t, h_s), torch.nn.Linear(h_s, h_t))}


@pytest.mark.parametrize("options", [{}, {"divergence": "reverse_kl", "correct_only": True, "temperature": 1.0},
                                     {"distill_weight": 1.0, "ce_weight": 0.0, "temperature": 0.7}])
@pytest.mark.parametrize("cross", [True, False])
def test_parity_with_a_float64_reference(options, cross):
    torch.manual_seed(0)
    c = _cross_case()
    if not cross:  # one tokenizer: the teacher's positions are the student's
        c["t_logits"] = 2 * torch.randn(*c["mask"].shape, c["heads"][1].shape[0])
        c["t_mask"], c["to_teacher"] = c["mask"], None
    kwargs = {"temperature": 2.0, "distill_weight": 0.5, "ce_weight": 0.5, **options}
    t2s, s2t = c["projectors"]
    s_logits, s_hidden = (c[k].clone().requires_grad_(True) for k in ("s_logits", "s_hidden"))
    weights = c["to_teacher"]
    teacher = TeacherSequence(c["t_logits"], c["t_mask"] if cross else None,
                              None if weights is None else (lambda h: weights @ h))
    out = dskd(s_logits, s_hidden, c["t_hidden"], teacher, c["mask"], c["target"], *c["heads"], t2s, s2t, **kwargs)
    got = torch.autograd.grad(out.loss, (s_logits, s_hidden))

    s_logits64, s_hidden64 = (c[k].double().requires_grad_(True) for k in ("s_logits", "s_hidden"))
    ref = ref_dskd(s_logits64, s_hidden64, c["t_hidden"], c["t_logits"], c["t_mask"], weights, c["mask"],
                   c["target"], c["heads"], (t2s.weight.detach(), t2s.bias.detach()),
                   (s2t.weight.detach(), s2t.bias.detach()), **kwargs)
    want = torch.autograd.grad(ref, (s_logits64, s_hidden64))
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)


def test_kd_parts_vanish_when_projected_states_reproduce_the_targets():
    g = torch.Generator().manual_seed(1)
    b, n, v, h = 2, 5, 13, 6
    head = torch.randn(v, h, generator=g)
    hidden = torch.randn(b, n, h, generator=g)
    logits = hidden @ head.T  # both models: the same states through the same output layer
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, -2:] = False
    target = torch.randint(0, v, (b, n), generator=g)
    identity = torch.nn.Linear(h, h)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(h))
        identity.bias.zero_()
    out = dskd(logits, hidden, hidden, TeacherSequence(logits), mask, target, head, head, identity, identity)
    torch.testing.assert_close(out.metrics["t2s_kd"], torch.zeros(()), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.metrics["s2t_kd"], torch.zeros(()), atol=1e-6, rtol=0)
    # What remains is the two cross-entropies on the targets, which are equal here.
    torch.testing.assert_close(out.metrics["t2s_ce"], out.metrics["ce"])
    torch.testing.assert_close(out.loss, 0.5 * out.metrics["t2s_ce"] + 0.5 * out.metrics["ce"])


def test_each_part_trains_what_the_paper_says():
    """Student-space KD trains only the student; the projector CE only P_ts; teacher-space KD the student and P_st."""
    c = _cross_case(seed=2)
    t2s, s2t = c["projectors"]
    s_logits, s_hidden = (c[k].clone().requires_grad_(True) for k in ("s_logits", "s_hidden"))
    heads = tuple(h.clone().requires_grad_(True) for h in c["heads"])
    teacher = TeacherSequence(c["t_logits"], c["t_mask"], lambda h: c["to_teacher"] @ h)
    args = (s_logits, s_hidden, c["t_hidden"], teacher, c["mask"], c["target"], *heads, t2s, s2t)
    out = dskd(*args, ce_weight=0.0)
    params = (s_logits, s_hidden, t2s.weight, s2t.weight, *heads)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:4])
    assert grads[4] is None and grads[5] is None  # both output layers are read, never trained, by the loss


# --------------------------------------------------------------------------------- cross-model attention
def _cma_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, n, m, p, p_t, v_s, v_t, h_s, h_t = 2, 5, 7, 3, 4, 11, 13, 4, 6
    completion = torch.ones(b, n, dtype=torch.bool)
    completion[1, 3:] = False
    t_mask = torch.ones(b, m, dtype=torch.bool)
    t_mask[0, 4:] = False
    sequences = torch.randint(1, v_s, (b, p + n), generator=g)
    rollout = Rollout(sequences, torch.ones_like(sequences), completion, p, torch.zeros(b, dtype=torch.bool), True)
    input_ids = torch.randint(1, v_t, (b, p_t + m), generator=g)
    view = SimpleNamespace(teacher_ids=input_ids[:, p_t:].clone(), teacher_mask=t_mask)
    inputs = TeacherInputs(input_ids, torch.ones_like(input_ids), torch.arange(p_t + m).expand(b, -1), m, view)
    states = TeacherHidden(torch.randn(b, m, h_t, generator=g), torch.randn(b, m, v_t, generator=g),
                           torch.randn(v_s, h_s, generator=g), torch.randn(v_t, h_t, generator=g))
    return rollout, inputs, states, torch.randn(b, n, h_s, generator=g)


def _cma(aligner, rollout, inputs, states, student_hidden):
    target = aligner.project(states.logits, inputs, rollout, frozenset({"hidden_states"}))
    aligner.project_hidden(target, states, inputs, rollout)
    return target, target.sequence.from_student(student_hidden)


def test_cma_attention_ignores_padding_on_both_sides():
    torch.manual_seed(0)
    aligner = ALIGNERS.build("dskd_cma")
    aligner.setup(4, 6)
    rollout, inputs, states, s_hidden = _cma_case()
    target, at_teacher = _cma(aligner, rollout, inputs, states, s_hidden)
    s_valid, t_valid = rollout.completion_mask, inputs.alignment.teacher_mask
    assert target.hidden.shape == (2, 5, 6) and at_teacher.shape == (2, 7, 4)
    assert torch.equal(target.mask, s_valid) and target.coverage == 1.0

    # Garbage wherever either side is padding: ids, hidden states, embeddings read there.
    pad_t, pad_s = ~t_valid, ~rollout.completion_mask
    ids = inputs.input_ids.clone()
    ids[:, -7:][pad_t] = 12
    inputs.input_ids, inputs.alignment.teacher_ids = ids, ids[:, -7:].clone()
    states.hidden[pad_t] = 1e4
    rollout.sequences[:, 3:][pad_s] = 10
    s_hidden2 = s_hidden.clone()
    s_hidden2[pad_s] = -1e4
    target2, at_teacher2 = _cma(aligner, rollout, inputs, states, s_hidden2)
    torch.testing.assert_close(target2.hidden[s_valid], target.hidden[s_valid], rtol=0, atol=0)
    torch.testing.assert_close(at_teacher2[t_valid], at_teacher[t_valid], rtol=0, atol=0)


def test_check_pairing_refuses_dskd_without_hidden_states_and_names_the_aligners():
    with pytest.raises(ValueError, match=r"needs \['hidden_states'\].*'byte_spans'.*\['dskd_cma', 'identity'\]"):
        check_pairing([LossTerm("dskd")], ALIGNERS.build("byte_spans"))
    with pytest.raises(ValueError, match="the initial student"):
        check_pairing([LossTerm("dskd", reference="initial_student")], ALIGNERS.build("identity"))
    assert check_pairing([LossTerm("dskd")], ALIGNERS.build("dskd_cma")) == {("teacher", "rollout"): {"hidden_states"}}


def test_output_layer_input_is_the_last_hidden_state_after_the_final_norm():
    model = HFModel(config=TINY, tokenizer="builtin:char", seed=0).load_model(
        HFModel(config=TINY, tokenizer="builtin:char").load_tokenizer())
    ids = torch.randint(0, 40, (2, 9))
    store = []
    with torch.no_grad(), output_layer_input(model, store):
        out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=5)
    torch.testing.assert_close(store[0], out.hidden_states[-1][:, -5:], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- training
def make(teacher: str, student_tokenizer: str, aligner: str, **kwargs) -> DistillationModule:
    module = DistillationModule(student=HFModel(config=TINY, tokenizer=student_tokenizer, seed=0),
                                teacher=HFModel(path=teacher), loss="dskd", aligner=aligner,
                                sampling=SamplingConfig(max_new_tokens=6),
                                optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), **kwargs)
    module.manual_backward = lambda loss: loss.backward()  # one step without a Trainer
    return module


def _own_parameters(module: DistillationModule) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters that are not the student's: DSKD's projectors and the CMA query."""
    return {k: p for k, p in module.named_parameters() if not k.startswith("student.")}


@pytest.mark.parametrize(("aligner", "extra"), [("identity", set()), ("dskd_cma", {"aligner.query.weight",
                                                                                     "aligner.query.bias"})])
def test_projectors_are_optimised_and_saved_and_the_teacher_is_not(teacher_dir, aligner, extra):
    module = make(teacher_dir, "builtin:char" if aligner == "identity" else "builtin:arithmetic_bpe", aligner)
    own = _own_parameters(module)
    assert set(own) == {"terms.0.loss.t2s.weight", "terms.0.loss.t2s.bias", "terms.0.loss.s2t.weight",
                        "terms.0.loss.s2t.bias"} | extra
    assert own["terms.0.loss.t2s.weight"].shape == (32, 64)  # teacher hidden 64 -> student hidden 32
    optimized = {id(p) for p in module.configure_optimizers().param_groups[0]["params"]}
    assert optimized == {id(p) for p in module.student.parameters()} | {id(p) for p in own.values()}
    assert not optimized & {id(p) for p in module.teacher.parameters()}
    state = module.state_dict()
    assert set(own) <= set(state) and all(k.startswith(("student.", "terms.", "aligner.")) for k in state)
    fresh = make(teacher_dir, "builtin:char" if aligner == "identity" else "builtin:arithmetic_bpe", aligner)
    fresh.load_state_dict(state)  # a checkpoint restores the projectors (strict: same keys, same shapes)
    assert all(torch.equal(p, fresh.state_dict()[k]) for k, p in own.items())



def test_extra_lr_gives_the_projectors_and_attention_their_own_learning_rate(teacher_dir):
    module = make(teacher_dir, "builtin:arithmetic_bpe", "dskd_cma", extra_lr=0.05)
    student_group, extra_group = module.configure_optimizers().param_groups
    assert student_group["lr"] == 1e-3 and extra_group["lr"] == 0.05
    assert {id(p) for p in student_group["params"]} == {id(p) for p in module.student.parameters()}
    assert {id(p) for p in extra_group["params"]} == {id(p) for p in _own_parameters(module).values()}
    with pytest.raises(ValueError, match="nothing outside the student trains"):
        DistillationModule(student=HFModel(config=TINY, tokenizer="builtin:char", seed=0),
                           teacher=HFModel(path=teacher_dir), extra_lr=0.05).configure_optimizers()

CASES = [("identity", "teacher_dir", "builtin:char"), ("dskd_cma", "teacher_dir", "builtin:arithmetic_bpe"),
         ("dskd_cma", "bpe_teacher_dir", "builtin:char")]


@pytest.mark.parametrize(("aligner", "teacher", "student_tokenizer"), CASES)
def test_one_step_trains_the_student_and_the_projectors(request, aligner, teacher, student_tokenizer):
    module = make(request.getfixturevalue(teacher), student_tokenizer, aligner)
    total, metrics = module._run_step(BATCH, train=True)
    assert torch.isfinite(total)
    assert {"loss/dskd", "dskd/t2s_kd", "dskd/t2s_ce", "dskd/s2t_kd", "dskd/ce"} <= set(metrics)
    for name, params in (("student", list(module.student.parameters())), *((k, [p]) for k, p in
                                                                         _own_parameters(module).items())):
        assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0, name
    assert not any(p.grad is not None for p in module.teacher.parameters())
    module.zero_grad()
    with torch.no_grad():  # validation: the same path without a graph
        total, _ = module._run_step(BATCH, train=False)
    assert torch.isfinite(total) and not total.requires_grad


def test_std_scaling_is_per_sequence_over_valid_entries():
    from opd_lightning.aligners.dskd_cma import std_scaled

    torch.manual_seed(0)
    values = torch.randn(3, 5, 4) * torch.tensor([1.0, 3.0, 0.5])[:, None, None]
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    scaled = std_scaled(values, valid)
    for row in range(3):
        torch.testing.assert_close(scaled[row], values[row] / values[row][valid[row]].std())
    # a row alone, with more padding, scales exactly as inside the batch
    padded = torch.cat([values[:1], torch.randn(1, 2, 4)], 1)
    alone = std_scaled(padded, torch.cat([valid[:1], torch.zeros(1, 2, dtype=torch.bool)], 1))
    torch.testing.assert_close(alone[0, :5], scaled[0])
