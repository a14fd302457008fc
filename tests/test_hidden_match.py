"""`hidden_match`: the loss against a hand computation, the shared token boundaries against a brute-force spelling
of both tokenizations, the layer hooks against `output_hidden_states`, and the term trained inside the module."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY
from opd_lightning.aligners import ALIGNERS
from opd_lightning.losses import HiddenMatch, LayerStates, LossInputs, default_layer_pairs
from test_aligners import subset_pair

from opd_lightning.hidden import capture_layers
from opd_lightning.models import HFModel
from opd_lightning.module import DistillationModule
from opd_lightning.objective import LossTerm
from opd_lightning.rollout import Rollout, SamplingConfig
from opd_lightning.tasks.arithmetic import builtin_tokenizer

BATCH = {"prompt": ["12+34=", "7-3=", "5+5=", "81-9="], "completion": ["46", "4", "10", "72"]}


# ------------------------------------------------------------------------------------------- the loss by hand
def _layer_norm(row: list[float]) -> list[float]:
    mean = sum(row) / len(row)
    var = sum((x - mean) ** 2 for x in row) / len(row)
    return [(x - mean) / math.sqrt(var + 1e-5) for x in row]


def _by_hand(student, teacher, weight, bias, chosen, share):
    errors = []
    for k in chosen:
        mapped = [sum(w * s for w, s in zip(row, student[k], strict=True)) + b for row, b in zip(weight, bias, strict=True)]
        target = _layer_norm(teacher[k])
        errors.append(sum((m - t) ** 2 for m, t in zip(mapped, target, strict=True)) / len(target))
    return sum(errors) / len(errors) * share


@pytest.mark.parametrize(("positions", "chosen"), [("all", [0, 1, 2, 3]), ("prompt", [0, 1]), ("completion", [1, 2, 3])])
def test_the_loss_equals_a_hand_computation(positions, chosen):
    student = [[1.0, 2.0], [0.0, 1.0], [2.0, 0.0], [-1.0, 0.5]]
    teacher = [[1.0, 2.0, 3.0], [0.0, 0.0, 3.0], [4.0, 1.0, 1.0], [2.0, -1.0, 0.0]]
    weight, bias = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.0, 0.0, 1.0]
    loss = HiddenMatch(layers=[[1, 2]], positions=positions)
    loss.setup_layers(2, 3)
    loss.setup(2, 3)
    with torch.no_grad():
        loss.maps[0].weight.copy_(torch.tensor(weight))
        loss.maps[0].bias.copy_(torch.tensor(bias))
    states = LayerStates({1: torch.tensor(student)}, {2: torch.tensor(teacher)},
                         in_prompt=torch.tensor([True, True, False, False]), rows=torch.zeros(4, dtype=torch.long))
    mask = torch.tensor([[True, True, False]])  # 2 completion tokens in this micro-batch, 4 in the step
    inputs = LossInputs(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), mask, num_items=4, layers=states)
    out = loss(inputs)
    assert out.loss.item() == pytest.approx(_by_hand(student, teacher, weight, bias, chosen, 0.5), rel=1e-5)
    assert out.metrics["pairs"].item() == len(chosen)


def test_layer_pairs_mean_over_pairs_and_default_to_the_same_relative_depth():
    assert default_layer_pairs(2, 3) == [(1, 2), (2, 3)]
    assert default_layer_pairs(4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert default_layer_pairs(3, 3) == [(1, 1), (2, 2), (3, 3)]
    loss = HiddenMatch(layers=[[0, 0], [2, 1]])
    loss.setup_layers(2, 1)
    loss.setup(2, 2)
    s, t = torch.randn(5, 2), torch.randn(5, 2)
    states = LayerStates({0: s, 2: 2 * s}, {0: t, 1: -t}, torch.zeros(5, dtype=torch.bool), torch.zeros(5, dtype=torch.long))
    mask = torch.ones(1, 2, dtype=torch.bool)
    both = loss(LossInputs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), mask, layers=states)).loss
    parts = []
    for k, (i, j) in enumerate(loss.layers):
        one = HiddenMatch(layers=[[i, j]])
        one.setup_layers(2, 1)
        one.setup(2, 2)
        one.maps[0].load_state_dict(loss.maps[k].state_dict())
        parts.append(one(LossInputs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), mask,
                                    layers=states)).loss)
    torch.testing.assert_close(both, (parts[0] + parts[1]) / 2)
    with pytest.raises(ValueError, match="outside the student's hidden states 0-2"):
        HiddenMatch(layers=[[3, 1]]).setup_layers(2, 1)
    with pytest.raises(ValueError, match="positions must be"):
        HiddenMatch(positions="answer")


def test_capture_layers_numbers_states_as_output_hidden_states():
    model = HFModel(config=TINY, tokenizer="builtin:char", seed=0).load_model(builtin_tokenizer("builtin:char"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    store = {}
    with torch.no_grad(), capture_layers(model, [0, 1, 2], store):
        out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    assert sorted(store) == [0, 1, 2]
    for i in range(3):
        torch.testing.assert_close(store[i], out.hidden_states[i], rtol=0, atol=0)
    with pytest.raises(ValueError, match="numbers its hidden states 0 to 2"), capture_layers(model, [3], {}):
        pass


# ------------------------------------------------------------------------------------------- boundaries
def _rollout(tokenizer, prompts: list[str], completions: list[str]) -> Rollout:
    p_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    c_ids = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for c in completions]
    p, n = max(map(len, p_ids)), max(map(len, c_ids))
    pad = tokenizer.pad_token_id
    seq = torch.tensor([[pad] * (p - len(a)) + a + b + [pad] * (n - len(b)) for a, b in zip(p_ids, c_ids, strict=True)])
    mask = torch.tensor([[0] * (p - len(a)) + [1] * (len(a) + len(b)) + [0] * (n - len(b))
                         for a, b in zip(p_ids, c_ids, strict=True)])
    return Rollout(seq, mask, mask[:, p:].bool(), p, torch.zeros(len(prompts), dtype=torch.bool), True)


def _ends(tokenizer, ids: list[int], start: int) -> list[int]:
    """Where each token ends, in characters from `start`, by decoding the tokens one at a time (ASCII text)."""
    out, pos = [], start
    for i in ids:
        pos += len(tokenizer.decode([i], skip_special_tokens=True))
        out.append(pos)
    return out


def _brute_force_pairs(student_tok, teacher_tok, rollout: Rollout, prompts, completions, teacher_prompt_width):
    """Every (row, student column, teacher column) at which both spellings end a token at the same character (EOS a
    virtual character past the text), the last of the tokens ending there on each side."""
    pairs = set()
    p = rollout.prompt_length
    for b, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        s_prompt = student_tok(prompt, add_special_tokens=False).input_ids
        s_comp = student_tok(completion, add_special_tokens=False).input_ids
        t_prompt = teacher_tok(prompt).input_ids
        t_comp = teacher_tok(completion, add_special_tokens=False).input_ids
        end = len(prompt) + len(completion) + 1
        s_ends = _ends(student_tok, s_prompt, 0) + _ends(student_tok, s_comp, len(prompt)) + [end]
        t_ends = _ends(teacher_tok, t_prompt, 0) + _ends(teacher_tok, t_comp, len(prompt)) + [end]
        s_cols = list(range(p - len(s_prompt), p + len(s_comp) + 1))
        t_cols = list(range(teacher_prompt_width - len(t_prompt), teacher_prompt_width + len(t_comp) + 1))
        for e in set(s_ends) & set(t_ends) - {0}:
            s_at = max(i for i, x in enumerate(s_ends) if x == e)
            t_at = max(i for i, x in enumerate(t_ends) if x == e)
            pairs.add((b, s_cols[s_at], t_cols[t_at], s_at < len(s_prompt)))
    return pairs


PROMPTS = {"arithmetic": (["55+81=", "4-3=", "12+7="], ["136", "1", "19"]),
           "text": (["hello world, ", "the quick "], ["hello again", "brown fox jumps"])}


@pytest.mark.parametrize(("pair", "text", "aligner"), [("char_bpe", "arithmetic", "exact_spans"),
                                                       ("char_bpe", "arithmetic", "byte_spans"),
                                                       ("subset", "arithmetic", "byte_spans"),
                                                       ("subset", "text", "char_level"),
                                                       ("subset_reversed", "text", "vocab_map")])
def test_boundary_pairs_equal_a_brute_force_spelling(pair, text, aligner):
    if pair == "char_bpe":
        student_tok, teacher_tok = builtin_tokenizer("builtin:arithmetic_bpe"), builtin_tokenizer("builtin:char")
    else:
        student_tok, teacher_tok = subset_pair(0.3)
        if pair == "subset_reversed":
            student_tok, teacher_tok = teacher_tok, student_tok
    prompts, completions = PROMPTS[text]
    al = ALIGNERS.build(aligner)
    al.bind(student_tok, teacher_tok, len(student_tok), len(teacher_tok))
    rollout = _rollout(student_tok, prompts, completions)
    inputs = al.teacher_inputs(rollout)
    got = al.boundary_pairs(inputs, rollout)
    found = set(zip(*(x.tolist() for x in (got.batch, got.student, got.teacher, got.in_prompt)), strict=True))
    width = inputs.input_ids.shape[1] - inputs.alignment.teacher_ids.shape[1]
    expected = _brute_force_pairs(student_tok, teacher_tok, rollout, prompts, completions, width)
    assert found == expected
    assert len(found) >= sum(len(p) // 3 for p in prompts)  # not vacuous: most of each prompt pairs
    if pair == "char_bpe":  # a character teacher ends a token wherever the student does
        assert len(found) == int(rollout.attention_mask.sum())


def test_identity_pairs_every_token_with_itself(char_tok):
    al = ALIGNERS.build("identity")
    al.bind(char_tok, char_tok, len(char_tok), len(char_tok))
    rollout = _rollout(char_tok, ["12+3=", "7-3="], ["15", "4"])
    got = al.boundary_pairs(al.teacher_inputs(rollout), rollout)
    assert torch.equal(got.student, got.teacher)
    assert len(got.batch) == int(rollout.attention_mask.sum())
    assert torch.equal(got.in_prompt, got.student < rollout.prompt_length)


# ------------------------------------------------------------------------------------------- in the module
def make(teacher: str, student_tokenizer: str, aligner: str, completions: str = "gold", **kwargs) -> DistillationModule:
    module = DistillationModule(student=HFModel(config=TINY, tokenizer=student_tokenizer, seed=0),
                                teacher=HFModel(path=teacher), loss="forward_kl", aligner=aligner,
                                extra_terms=[LossTerm("hidden_match", weight=1.0, completions=completions)],
                                sampling=SamplingConfig(max_new_tokens=4),
                                optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), **kwargs)
    module.manual_backward = lambda loss: loss.backward()  # one step without a Trainer
    return module


@pytest.mark.parametrize(("aligner", "student_tokenizer"), [("exact_spans", "builtin:arithmetic_bpe"),
                                                            ("identity", "builtin:char")])
def test_the_term_reads_both_models_states_at_the_pairs_and_trains_its_maps(teacher_dir, aligner, student_tokenizer):
    module = make(teacher_dir, student_tokenizer, aligner)
    term = module.terms[1].loss
    assert term.layers == [(1, 1), (2, 2)]  # two layers each (the tiny teacher is as deep as the student)
    seen = []
    original = module._layer_states

    def spy(loss, rollout, student, taken):
        assert not taken  # on the gold completions, which no other term scores: the teacher runs a forward of its own
        states = original(loss, rollout, student, taken)
        seen.append((rollout, states))
        return states

    module._layer_states = spy
    total, metrics = module._run_step(BATCH, train=True)
    assert torch.isfinite(total) and metrics["loss/hidden_match@gold"] > 0
    rollout, states = seen[0]
    # the states handed to the loss are the models' own `output_hidden_states` at the paired columns
    inputs = module.aligner.teacher_inputs(rollout)
    pairs = module.aligner.boundary_pairs(inputs, rollout)
    with torch.no_grad():
        t_all = module.teacher(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                               position_ids=inputs.position_ids, output_hidden_states=True).hidden_states
        s_all = module.student(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                               position_ids=rollout.position_ids, output_hidden_states=True).hidden_states
    for i, j in term.layers:
        torch.testing.assert_close(states.teacher[j], t_all[j][pairs.batch, pairs.teacher])
        torch.testing.assert_close(states.student[i].detach(), s_all[i][pairs.batch, pairs.student])
    assert len(pairs.batch) == int(rollout.attention_mask.sum())  # char teacher or one tokenizer: every token
    own = {k: p for k, p in module.named_parameters() if k.startswith("terms.1.loss.maps.")}
    assert set(own) == {"terms.1.loss.maps.0.weight", "terms.1.loss.maps.0.bias", "terms.1.loss.maps.1.weight",
                        "terms.1.loss.maps.1.bias"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own.values())
    assert not any(p.grad is not None for p in module.teacher.parameters())
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert {id(p) for p in own.values()} <= optimized
    fresh = make(teacher_dir, student_tokenizer, aligner)
    fresh.load_state_dict(module.state_dict())  # a checkpoint restores the maps (strict: same keys and shapes)
    assert all(torch.equal(p, fresh.state_dict()[k]) for k, p in own.items())


@pytest.mark.parametrize(("aligner", "student_tokenizer", "chunk"), [("exact_spans", "builtin:arithmetic_bpe", None),
                                                                     ("byte_spans", "builtin:arithmetic_bpe", 4),
                                                                     ("identity", "builtin:char", None)])
def test_on_the_completions_the_teacher_scores_the_term_reads_that_forwards_states(teacher_dir, aligner,
                                                                                   student_tokenizer, chunk):
    """With the distribution term on the same completions, the teacher's layers come from the forward that scored
    them (plain logits, hidden states through the output layer when fused, `exact_spans`' branch queries after it):
    no forward of the teacher inside `_layer_states`, and the states equal its `output_hidden_states` at the pairs."""
    from opd_lightning.hidden import _decoder_layers

    module = make(teacher_dir, student_tokenizer, aligner, completions="rollout", logits_chunk_size=chunk)
    embed = _decoder_layers(module.teacher)[0].embed_tokens
    forwards, seen = [], []
    embed.register_forward_hook(lambda *args: forwards.append(1))
    original = module._layer_states

    def spy(loss, rollout, student, taken):
        before = len(forwards)
        states = original(loss, rollout, student, taken)
        seen.append((rollout, states, len(forwards) - before))
        return states

    module._layer_states = spy
    total, metrics = module._run_step(BATCH, train=True)
    assert torch.isfinite(total) and metrics["loss/hidden_match"] > 0
    (rollout, states, own_forwards), = seen
    assert own_forwards == 0 and len(forwards) >= 1
    inputs = module.aligner.teacher_inputs(rollout)
    pairs = module.aligner.boundary_pairs(inputs, rollout)
    with torch.no_grad():
        t_all = module.teacher(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                               position_ids=inputs.position_ids, output_hidden_states=True).hidden_states
    for _, j in module.terms[1].loss.layers:
        torch.testing.assert_close(states.teacher[j], t_all[j][pairs.batch, pairs.teacher])


def test_the_term_is_refused_where_the_teacher_has_no_layers_to_read(teacher_dir):
    with pytest.raises(ValueError, match="reference must be 'teacher'"):
        DistillationModule(student=HFModel(config=TINY, tokenizer="builtin:char", seed=0),
                           teacher=HFModel(path=teacher_dir),
                           extra_terms=[LossTerm("hidden_match", reference="initial_student", completions="gold")])
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationModule(student=HFModel(config=TINY, tokenizer="builtin:char", seed=0), loss="cross_entropy",
                           extra_terms=[LossTerm("hidden_match", completions="gold")])


def test_on_fused_rollouts_the_term_joins_a_step_whose_gradient_coherence_is_measured(teacher_dir):
    """The fused path's coherence rebuilds each rollout term's gradient on the logits a chunk at a time; `hidden_match`
    reads no logits (its gradient there is zero), so it is left out of that rebuild and the step runs."""
    from opd_lightning.diagnostics import DiagnosticsConfig

    module = DistillationModule(student=HFModel(config=TINY, tokenizer="builtin:arithmetic_bpe", seed=0),
                                teacher=HFModel(path=teacher_dir), loss="forward_kl", aligner="byte_spans",
                                extra_terms=[LossTerm("hidden_match", weight=1.0)], logits_chunk_size=4,
                                diagnostics=DiagnosticsConfig(grad_coherence_every=1),
                                sampling=SamplingConfig(max_new_tokens=4),
                                optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    module.manual_backward = lambda loss: loss.backward()
    assert "rollout" in module._fused
    total, metrics = module._run_step(BATCH, train=True)
    assert torch.isfinite(total) and metrics["loss/hidden_match"] > 0
    assert "diag/grad_coherence" in module.train_diag.compute()


@pytest.mark.parametrize("chunk", [None, 4])
def test_as_the_only_loss_a_measured_step_runs_and_logs_no_coherence(teacher_dir, chunk):
    """`hidden_match` as the run's loss (a leaderboard row) reads no logits: on a step that measures the gradient's
    coherence on the logits there is none to measure, plain or fused, and the step runs."""
    from opd_lightning.diagnostics import DiagnosticsConfig

    module = DistillationModule(student=HFModel(config=TINY, tokenizer="builtin:char", seed=0),
                                teacher=HFModel(path=teacher_dir), loss="hidden_match", aligner="identity",
                                logits_chunk_size=chunk, diagnostics=DiagnosticsConfig(grad_coherence_every=1),
                                sampling=SamplingConfig(max_new_tokens=4),
                                optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    module.manual_backward = lambda loss: loss.backward()
    total, metrics = module._run_step(BATCH, train=True)
    assert torch.isfinite(total) and metrics["loss/hidden_match"] > 0
    assert "diag/grad_coherence" not in module.train_diag.compute()
