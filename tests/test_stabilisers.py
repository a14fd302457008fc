"""Each stabiliser changes what it should: top-p rollouts, KL to the initial student, SFT on gold, the guard."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from test_module import BATCH, make_module

from opd_lightning.data import PromptDataModule
from opd_lightning.objective import LossTerm
from opd_lightning.rollout import SamplingConfig


def test_tiny_top_p_samples_the_argmax(teacher_dir):
    greedy = make_module(teacher_dir, sampling=SamplingConfig(do_sample=False, max_new_tokens=4))
    nucleus = make_module(teacher_dir, sampling=SamplingConfig(top_p=1e-6, max_new_tokens=4))
    free = make_module(teacher_dir, sampling=SamplingConfig(max_new_tokens=4))
    batch = dict(BATCH, prompt=BATCH["prompt"] * 8)
    want = greedy.rollouts(batch, train=False)["rollout"].completion_ids
    assert torch.equal(nucleus.rollouts(batch, train=False)["rollout"].completion_ids, want)
    assert not torch.equal(free.rollouts(batch, train=False)["rollout"].completion_ids, want)


def _train(module, steps, tmp_path):
    data = PromptDataModule(batch_size=4, limit_train=16, val=None, test=None)
    Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path).fit(module, datamodule=data)
    return module


def _objective_value(module, term, teacher_dir):
    """A term's value under the trained student on the fixed batch's dataset completions (no sampling noise)."""
    probe = make_module(teacher_dir, on_policy_fraction=0.0, extra_terms=[term])
    probe.student.load_state_dict(module.student.state_dict())
    with torch.no_grad():
        rollouts = probe.rollouts(BATCH, train=True)
        return probe._objective(rollouts, probe._step_counts(rollouts))[1][f"loss/{term.name}"]


def _feed(guard, metric: str, values: list[tuple[int, float]], steps: int) -> bool:
    """Steps 0..steps-1 through `guard.on_train_batch_end`, each with `metric`'s value where `values` has one (a
    module's `step_diagnostics`), until the guard stops training; whether it did."""
    from types import SimpleNamespace

    trainer, observed = SimpleNamespace(global_step=0, should_stop=False), dict(values)
    for step in range(steps):
        trainer.global_step = step
        seen = {metric: observed[step]} if step in observed else {}
        guard.on_train_batch_end(trainer, SimpleNamespace(step_diagnostics=seen), None, None, 0)
        if trainer.should_stop:
            return True
    return False


def test_kl_to_initial_student_keeps_the_student_close(teacher_dir, tmp_path):
    """SGD, so that the term's weight acts on the step (Adam normalises it away within a few steps); removing the
    initial-student target or its gradient, or pointing it at the current student, fails this by a factor of ~9."""
    fast = lambda params: torch.optim.SGD(params, lr=0.05)
    anchored_term = LossTerm("reverse_kl", weight=20.0, reference="initial_student")
    free = _train(make_module(teacher_dir, optimizer=fast), 6, tmp_path / "free")
    anchored = _train(make_module(teacher_dir, optimizer=fast, extra_terms=[anchored_term]), 6, tmp_path / "anchored")
    probe = LossTerm("reverse_kl", reference="initial_student")
    assert _objective_value(anchored, probe, teacher_dir) < 0.5 * _objective_value(free, probe, teacher_dir)


def test_sft_on_gold_lowers_the_gold_loss(teacher_dir, tmp_path):
    fast = lambda params: torch.optim.AdamW(params, lr=2e-2)
    sft = LossTerm("cross_entropy", weight=5.0, completions="gold")
    free = _train(make_module(teacher_dir, optimizer=fast), 4, tmp_path / "free")
    with_sft = _train(make_module(teacher_dir, optimizer=fast, extra_terms=[sft]), 4, tmp_path / "sft")
    probe = LossTerm("cross_entropy", completions="gold")
    assert _objective_value(with_sft, probe, teacher_dir) < _objective_value(free, probe, teacher_dir)


def test_rollout_guard_warns_and_stops_on_truncation(teacher_dir, tmp_path):
    import pytest

    from opd_lightning.guards import RolloutGuard

    def run(guard):
        module = make_module(teacher_dir, sampling=SamplingConfig(max_new_tokens=1))  # nearly every row truncated
        data = PromptDataModule(batch_size=4, limit_train=32, val=None, test=None)
        trainer = Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                          callbacks=[guard])
        trainer.fit(module, datamodule=data)
        return trainer

    with pytest.warns(UserWarning, match="diag/truncation_rate"):
        stopped = run(RolloutGuard(max_truncation_rate=0.2, patience=2, stop=True))
    assert stopped.global_step == 2
    relaxed = RolloutGuard(max_truncation_rate=1.0, max_repetition_rate=1.0)
    assert run(relaxed).global_step == 6 and relaxed.tripped == []


def test_rollout_guard_reads_sampled_diagnostics_and_floors(teacher_dir, tmp_path):
    """grad_coherence, measured on a sample of steps, reaches the guard through the module's step diagnostics, each
    measurement one observation; a floor no run can meet trips it at the `patience`-th measurement."""
    import pytest

    from opd_lightning.diagnostics import DiagnosticsConfig
    from opd_lightning.guards import RolloutGuard

    module = make_module(teacher_dir, diagnostics=DiagnosticsConfig(grad_coherence_every=2))
    guard = RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, min_grad_coherence=1.01, patience=2,
                         stop=True)
    data = PromptDataModule(batch_size=4, limit_train=32, val=None, test=None)
    trainer = Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[guard])
    with pytest.warns(UserWarning, match="diag/grad_coherence = .* below 1.01 for 2 observations"):
        trainer.fit(module, datamodule=data)
    measured = [s for s in range(8) if s % 2 == 0]  # the optimizer steps that measure it (0-based), 2 observations
    assert trainer.global_step == measured[1] + 1 and [t[1] for t in guard.tripped] == ["diag/grad_coherence"]
    assert 0 < guard.tripped[0][2] <= 1


def test_guard_and_crossing_act_at_the_same_step():
    """The guard fed one series step by step acts where `crossing` says, for a floor and a ceiling; NaN and steps
    without an observation neither strike nor reset."""
    from types import SimpleNamespace

    from opd_lightning.guards import RolloutGuard, crossing

    series = {"diag/topk_overlap": [(0, 0.9), (1, 0.6), (2, 0.65), (4, float("nan")), (5, 0.5), (6, 0.4)],
              "diag/repeat_advantage_ratio": [(0, 1.0), (1, 3.0), (2, 1.0), (3, 2.5), (4, 2.6), (6, 2.7)]}
    limits = {"diag/topk_overlap": ("min", 0.7), "diag/repeat_advantage_ratio": ("max", 2.0)}
    for name, values in series.items():
        bound, limit = limits[name]
        want = crossing(values, limit, bound, patience=3)
        guard = RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, patience=3,
                             **{f"{bound}_{name.removeprefix('diag/')}": limit})
        for step, value in values:
            module = SimpleNamespace(step_diagnostics={name: value})
            guard.on_train_batch_end(SimpleNamespace(global_step=step, should_stop=False), module, None, None, 0)
        assert want == {"diag/topk_overlap": 5, "diag/repeat_advantage_ratio": 6}[name]
        assert [t[0] for t in guard.tripped] == [want]


def test_overlap_drop_is_judged_against_the_runs_first_observations():
    """`max_topk_overlap_drop`: the first `baseline` observations set the reference (their mean), and the guard acts
    at the `patience`-th later observation in a row more than the drop below it, wherever the level started; the
    guard and `crossing` agree step for step."""
    from types import SimpleNamespace

    import pytest

    from opd_lightning.guards import RolloutGuard, crossing

    for level in (0.95, 0.6):  # the same fall from a high and from a low start
        values = [(0, level + 0.01), (1, level - 0.01), (2, level - 0.04), (3, float("nan")), (4, level - 0.06),
                  (5, level - 0.07), (6, level - 0.02), (7, level - 0.08), (8, level - 0.09), (9, level - 0.1)]
        want = crossing(values, -0.05, "min", patience=2, baseline=2)
        assert want == 5  # steps 4 and 5 are more than 0.05 below the mean of steps 0-1; step 6 resets the count
        guard = RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, max_topk_overlap_drop=0.05,
                             baseline=2, patience=2)
        def feed(guard=guard, values=values):
            for step, value in values:
                module = SimpleNamespace(step_diagnostics={"diag/topk_overlap": value})
                guard.on_train_batch_end(SimpleNamespace(global_step=step, should_stop=False), module, None, None, 0)

        with pytest.warns(UserWarning, match="below its first-2-observation mean by more than 0.05"):
            feed()
        assert [t[:2] for t in guard.tripped] == [(5, "diag/topk_overlap_drop"), (8, "diag/topk_overlap_drop")]
        assert crossing(values, 0.7, "min", patience=2) == (None if level == 0.95 else 1)  # an absolute floor differs
    with pytest.raises(ValueError, match="baseline must be at least 1"):
        RolloutGuard(baseline=0)


def test_scaled_watch_judges_a_moving_mean_in_the_baselines_standard_deviations():
    """`scaled` with `window`: the reference is the first `baseline` observations' mean and standard deviation, and
    each later moving mean of `window` observations is judged by its distance from that mean in those deviations."""
    import pytest

    from opd_lightning.guards import Watch, crossing

    # baseline 1, 2, 3: mean 2, sample sd 1. Then 3 (window not full: not judged), 5 (mean of 3 and 5 is 4: 2 sd),
    # 1 (mean 3: 1 sd), 7 (mean 4: 2 sd), 8 (mean 7.5: 5.5 sd).
    values = list(enumerate([1.0, 2.0, 3.0, 3.0, 5.0, float("nan"), 1.0, 7.0, 8.0]))
    assert crossing(values, 1.5, "max", patience=1, baseline=3, scaled=True, window=2) == 4
    assert crossing(values, 1.5, "max", patience=2, baseline=3, scaled=True, window=2) == 8  # 1 sd at step 6 resets
    assert crossing(values, 5.0, "max", patience=1, baseline=3, scaled=True, window=2) == 8
    assert crossing(values, 5.6, "max", patience=1, baseline=3, scaled=True, window=2) is None
    assert crossing(values, 1.5, "max", patience=1, baseline=3, window=2) == 4  # unscaled: 4 - 2 = 2 > 1.5 as well
    assert crossing(values, 2.5, "max", patience=1, baseline=3, window=2) == 8  # ... but 2 is not above 2.5
    assert crossing([(s, -v) for s, v in values], -5.0, "min", patience=1, baseline=3, scaled=True, window=2) == 8
    with pytest.raises(ValueError, match="baseline of at least 2"):
        Watch(1.0, "max", 1, baseline=1, scaled=True)
    with pytest.raises(ValueError, match="window must be at least 1"):
        Watch(1.0, "max", 1, window=0)


def test_drift_acts_once_both_diagnostics_have_crossed_on_policy_steps_only():
    """`Drift`: each diagnostic judged in its baseline's standard deviations, the rule acting at the later of the two
    crossings; `RolloutGuard(drift=...)` fed the same steps acts there, ignoring off-policy steps, and `opd report`'s
    drift check names the same step."""
    from types import SimpleNamespace

    from opd_lightning.guards import Drift, RolloutGuard
    from opd_lightning.report import DEFAULT_THRESHOLDS, drift_check
    from opd_lightning.watch import DriftWatch

    rule = Drift(overlap_fall_sd=2.0, logratio_rise_sd=2.0, baseline=3, window=1, patience=1)
    # overlap: baseline 1.0, 0.9, 0.8 (mean 0.9, sd 0.1), then -1.5 sd, -3 sd (crossed at step 4), 0 sd.
    # log-ratio size: baseline 1, 2, 3 (mean 2, sd 1), then +1, +1.5, +2.5 sd (crossed at step 5).
    overlap = list(enumerate([1.0, 0.9, 0.8, 0.75, 0.6, 0.9]))
    size = list(enumerate([1.0, 2.0, 3.0, 3.0, 3.5, 4.5]))
    assert rule.crossing(overlap, size) == 5
    assert rule.crossing(overlap, size[:5]) is None  # one diagnostic crossed: the rule does not act
    assert Drift(2.0, 2.0, 3, 1, patience=2).crossing(overlap, size) is None  # neither stays past for two in a row
    watch = DriftWatch(rule)
    assert [watch.observe(o, s) for (_, o), (_, s) in zip(overlap, size, strict=True)] == [False] * 5 + [True]
    assert not watch.observe(0.0, 100.0)  # once per run

    guard = RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, drift=rule, stop=True)
    steps = [(step, o, s, 1.0) for (step, o), (_, s) in zip(overlap, size, strict=True)]
    steps.insert(3, (2.5, 0.0, 100.0, 0.0))  # an off-policy step far past both limits: not an observation
    trainer = SimpleNamespace(global_step=0, should_stop=False)
    metrics = {name: [] for name in (*Drift.metrics, "train/rollout/on_policy")}
    for step, o, s, on_policy in steps:
        trainer.global_step = step
        observed = {"diag/topk_overlap": o, "diag/logratio_abs": s, "rollout/on_policy": on_policy}
        guard.on_train_batch_end(trainer, SimpleNamespace(step_diagnostics=observed), None, None, 0)
        for name, value in zip(metrics, (o, s, on_policy), strict=True):
            metrics[name].append((step, value))
        assert trainer.should_stop == (step == 5)
    assert guard.tripped == [(5, "drift", 0.9)]

    loose = {**DEFAULT_THRESHOLDS, "drift_overlap_sd": 2.0, "drift_logratio_sd": 2.0}
    check = drift_check(metrics, loose)  # the report's rule keeps Drift's baseline of 10: too few steps here
    assert check.ok is None and "fewer than 15 on-policy steps" in check.detail
    assert drift_check({"diag/topk_overlap": overlap}, loose).detail == "not logged (diag/logratio_abs)"

    # The report at Drift's defaults (baseline 10, moving mean of 5, 2 in a row): overlap 0.95/0.97 then 0.90 from
    # step 10 (window full at 14: -5.7 sd, crossed at 15); log-ratio size 1.0/1.2 then 1.1, and 3.0 from step 16
    # (moving means 1.1, 1.1, 1.48 = +3.6 sd at 16, 1.86 = +7.2 sd at 17 and 18: crossed at 18).
    overlap = [(s, 0.95 + 0.02 * (s % 2)) for s in range(10)] + [(s, 0.90) for s in range(10, 25)]
    size = [(s, 1.0 + 0.2 * (s % 2)) for s in range(10)] + [(s, 1.1 if s < 16 else 3.0) for s in range(10, 25)]
    on_policy = [(s, 1.0) for s in range(25)]
    spike = {"diag/topk_overlap": (13, 0.0), "diag/logratio_abs": (13, 100.0), "train/rollout/on_policy": (13, 0.0)}
    shift = lambda series: [(s if s < 13 else s + 1, v) for s, v in series]  # step 13 becomes an off-policy step
    logged = {name: sorted([*shift(series), spike[name]]) for name, series in
              zip(spike, (overlap, size, on_policy), strict=True)}
    assert Drift().crossing(overlap, size) == 18
    check = drift_check(logged, DEFAULT_THRESHOLDS)
    assert check.ok is False and check.detail.endswith("crossed at step 19")  # step 18, moved past the spike


def test_drift_guard_reads_the_modules_on_policy_steps(teacher_dir, tmp_path):
    """In a real fit the module hands the guard both diagnostics and whether each step was on-policy: limits every
    step passes make the guard act at the first on-policy step after its baseline (2) and window (1); with gold
    batches only, never."""
    from opd_lightning.guards import Drift, RolloutGuard

    always = Drift(overlap_fall_sd=-1e9, logratio_rise_sd=-1e9, baseline=2, window=1, patience=1)
    for fraction, acts in ((1.0, [(2, "drift")]), (0.0, [])):
        guard = RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, drift=always, stop=True)
        data = PromptDataModule(batch_size=4, limit_train=32, val=None, test=None)
        trainer = Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                          callbacks=[guard])
        trainer.fit(make_module(teacher_dir, on_policy_fraction=fraction), datamodule=data)
        assert [t[:2] for t in guard.tripped] == [(step + 1, label) for step, label in acts]
        assert trainer.global_step == (3 if acts else 5)


def test_gold_likelihood_is_measured_on_the_steps_that_read_gold_completions(teacher_dir, tmp_path):
    """`diag/gold_nll` and `diag/gold_top1` reach the guard on the steps that distil the dataset's completions, and on
    every step when a term reads them beside the rollouts (SFT mixed in); never from the student's own rollouts. On a
    fixed gold batch the value is the student's mean -log p of the gold tokens, computed here from its logits."""
    import pytest
    from lightning.pytorch import Callback

    from opd_lightning.diagnostics import DiagnosticsConfig
    from opd_lightning.guards import GoldRise, RolloutGuard

    sft = LossTerm("cross_entropy", weight=0.5, completions="gold")

    class Seen(Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, module, *args):
            seen = module.step_diagnostics
            self.steps.append((seen["rollout/on_policy"], "diag/gold_nll" in seen, "diag/gold_top1" in seen))

    probe = {"on_policy_fraction": 1.0, "diagnostics": DiagnosticsConfig(gold_every=3)}
    for overrides in ({"on_policy_fraction": 0.5}, {"on_policy_fraction": 1.0, "extra_terms": [sft]}, probe,
                      {"on_policy_fraction": 1.0}):
        seen = Seen()
        data = PromptDataModule(batch_size=4, limit_train=32, val=None, test=None)
        Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path,
                callbacks=[seen, RolloutGuard(max_repetition_rate=None, max_truncation_rate=None,
                                           gold_rise=GoldRise(limit=10.0))]).fit(
            make_module(teacher_dir, **overrides), datamodule=data)
        if "extra_terms" in overrides:
            assert seen.steps == [(1.0, True, True)] * 8
        elif "diagnostics" in overrides:  # scored without a gradient on steps 0, 3 and 6
            assert seen.steps == [(1.0, step % 3 == 0, step % 3 == 0) for step in range(8)]
        elif overrides["on_policy_fraction"] == 1.0:
            assert seen.steps == [(1.0, False, False)] * 8
        else:
            assert {on for on, _, _ in seen.steps} == {0.0, 1.0}
            assert all(nll == top == (on == 0.0) for on, nll, top in seen.steps)

    module = make_module(teacher_dir, on_policy_fraction=0.0)
    with torch.no_grad():
        rollouts = module.rollouts(BATCH, train=True)
        module._diag = module.train_diag
        module._objective(rollouts, module._step_counts(rollouts))
        gold = rollouts["rollout"]
        logits = module.student(gold.sequences, attention_mask=gold.attention_mask,
                                position_ids=gold.position_ids).logits.double()
    start = gold.prompt_length
    logp = logits[:, start - 1 : -1].log_softmax(-1).gather(-1, gold.completion_ids[..., None]).squeeze(-1)
    want = -logp[gold.completion_mask.bool()].mean()
    assert module.train_diag.compute()["diag/gold_nll"].item() == pytest.approx(want.item(), rel=1e-5)
    module.train_diag.reset()  # the probe of gold_every scores the same gold batch alike on an on-policy step
    module.diag_config = DiagnosticsConfig(gold_every=1)
    module._gold_probe(BATCH, {"rollout": module.rollouts(BATCH, train=False)["rollout"]}, step=0)
    assert module.train_diag.compute()["diag/gold_nll"].item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="no `completion` field: add it, or set gold_every to 0"):
        module._gold_probe({"prompt": BATCH["prompt"]}, {}, step=0)


def test_gold_rise_is_judged_against_the_runs_first_gold_observations():
    """`GoldRise`: the first `baseline` observations of `diag/gold_nll` set the reference (their mean), and the rule
    acts at the `patience`-th later observation in a row more than `limit` nats above it; steps without a gold
    observation neither strike nor reset; the guard and `GoldRise.crossing` agree step for step."""

    import pytest

    from opd_lightning.guards import GoldRise, RolloutGuard

    # baseline (steps 0, 2, 3, 5): mean 0.7. Then +0.25 (strike), +0.15 (reset), +0.3, (no observation), +0.21: acts
    values = [(0, 0.6), (2, 0.8), (3, 0.7), (5, 0.7), (6, 0.95), (8, 0.85), (9, 1.0), (11, 0.91), (12, 2.0)]
    rule = GoldRise(limit=0.2, baseline=4, patience=2)
    assert rule.crossing(values) == 11
    assert GoldRise(limit=0.2, baseline=4, patience=3).crossing(values) == 12
    assert GoldRise(limit=0.31, baseline=4, patience=1).crossing(values) == 12
    assert GoldRise(limit=0.2, baseline=4, patience=1).crossing(values) == 6
    assert GoldRise(limit=0.25, baseline=1, patience=1).crossing(values) == 6  # reference 0.6: 0.8 is not above 0.85
    assert GoldRise(limit=0.05, baseline=1, patience=2).crossing(values) == 3  # ... but 0.8 and 0.7 are above 0.65
    guard = RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, gold_rise=rule, stop=True)
    with pytest.warns(UserWarning, match=r"diag/gold_nll = 0.910 has been above its first-4-observation mean by more "
                                         r"than 0.2 for 2 observations at step 11"):
        assert _feed(guard, "diag/gold_nll", values, 13)
    assert guard.tripped == [(11, "diag/gold_nll_rise", 0.91)]
    with pytest.raises(ValueError, match="baseline and patience of at least 1"):
        GoldRise(baseline=0)


def test_guard_lowers_the_learning_rate_when_it_acts():
    """`RolloutGuard(lr_factor=f)`: when a rule acts, every param group's rate and its scheduler's base rates are
    multiplied by f (the schedule goes on from the lower peak, and the scheduler's state carries it into a
    checkpoint); a rule acts once per run of observations past its limit, so the rate is cut again only after the
    diagnostic has come back and crossed anew; with `stop` the run ends and the rate is left as it is."""
    from types import SimpleNamespace

    import pytest

    from opd_lightning.guards import GoldRise, RolloutGuard
    from opd_lightning.optim import WarmupCosine

    def setup(**kwargs):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.3)
        scheduler = WarmupCosine(optimizer, warmup_steps=4, total_steps=100, min_ratio=1.0)
        trainer = SimpleNamespace(global_step=0, should_stop=False, optimizers=[optimizer],
                                  lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
        guard = RolloutGuard(max_repetition_rate=None, max_truncation_rate=None,
                             gold_rise=GoldRise(limit=0.2, baseline=2, patience=1), **kwargs)
        return optimizer, scheduler, trainer, guard

    # reference 1.0 (steps 0, 1); past the limit at steps 3 (acts), 4 (same streak); back at 5; past again at 6
    values = {0: 1.0, 1: 1.0, 2: 1.1, 3: 1.5, 4: 1.6, 5: 1.0, 6: 1.4}
    def feed(steps):
        rates = []
        for step in range(steps):
            trainer.global_step = step
            seen = {"diag/gold_nll": values[step]} if step in values else {}
            guard.on_train_batch_end(trainer, SimpleNamespace(step_diagnostics=seen), None, None, 0)
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates

    optimizer, scheduler, trainer, guard = setup(lr_factor=0.25)
    with pytest.warns(UserWarning, match=r"continuing at 0.25x the learning rate"):
        rates = feed(8)
    factor = [(s + 1) / 5 if s < 4 else 1.0 for s in range(8)]  # WarmupCosine's factor before each step's update
    want = [0.3 * factor[s] * (1.0 if s < 3 else 0.25 if s < 6 else 0.0625) for s in range(8)]
    assert rates == pytest.approx(want)
    assert [step for step, *_ in guard.tripped] == [3, 6]
    assert scheduler.state_dict()["base_lrs"] == pytest.approx([0.3 * 0.0625])
    assert not trainer.should_stop

    optimizer, scheduler, trainer, guard = setup(lr_factor=0.25, stop=True)
    with pytest.warns(UserWarning, match="stopping training"):
        feed(4)
    assert trainer.should_stop and scheduler.base_lrs == [0.3]
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"lr_factor must be in \(0, 1\)"):
            RolloutGuard(lr_factor=bad)


def test_guard_lowered_rate_climbs_back_over_lr_recover_steps():
    """`RolloutGuard(lr_factor=f, lr_recover=K)`: the cut rate climbs back linearly over K steps to where it was,
    a second act during the climb cuts the level reached and starts a new climb, and a guard restored from the first
    one's `state_dict` goes on with the same climb."""
    from types import SimpleNamespace

    import pytest

    from opd_lightning.guards import GoldRise, RolloutGuard

    def setup():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        trainer = SimpleNamespace(global_step=0, should_stop=False, optimizers=[optimizer],
                                  lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
        guard = RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, lr_factor=0.5, lr_recover=4,
                             gold_rise=GoldRise(limit=0.2, baseline=2, patience=1))
        return optimizer, scheduler, trainer, guard

    # reference 1.0; past the limit at step 2 (acts), back at 3, past again at 5 (acts during the climb)
    values = {0: 1.0, 1: 1.0, 2: 1.5, 3: 1.0, 5: 1.5, 6: 1.0}

    def feed(optimizer, scheduler, trainer, guard, steps):
        rates = []
        for step in steps:
            trainer.global_step = step
            guard.on_train_batch_start(trainer, None, None, 0)
            rates.append(optimizer.param_groups[0]["lr"])
            seen = {"diag/gold_nll": values[step]} if step in values else {}
            guard.on_train_batch_end(trainer, SimpleNamespace(step_diagnostics=seen), None, None, 0)
            optimizer.step()
            scheduler.step()
        return rates

    optimizer, scheduler, trainer, guard = setup()
    with pytest.warns(UserWarning, match="climbing back over 4 steps"):
        rates = feed(optimizer, scheduler, trainer, guard, range(12))
    # acts at 2: level 0.5, then 0.625 (step 3), 0.75 (4), 0.875 (5, acts: 0.4375); climb from 0.4375 over 4 steps
    climb = [0.4375 + 0.5625 * k / 4 for k in range(5)]  # steps 5 (after the act) to 9
    levels = [1.0, 1.0, 1.0, 0.625, 0.75, 0.875, *climb[1:], 1.0, 1.0]
    assert rates == pytest.approx([0.2 * x for x in levels])
    assert scheduler.base_lrs == pytest.approx([0.2]) and guard.climb is None and guard.level == 1.0
    assert [step for step, *_ in guard.tripped] == [2, 5]

    # a run resumed mid-climb: the restored guard goes on from the saved level, the scheduler from its own state
    optimizer, scheduler, trainer, guard = setup()
    with pytest.warns(UserWarning):
        first = feed(optimizer, scheduler, trainer, guard, range(7))
    saved, saved_sched = guard.state_dict(), scheduler.state_dict()
    optimizer, scheduler, trainer, guard = setup()
    guard.load_state_dict(saved)
    scheduler.load_state_dict(saved_sched)
    optimizer.param_groups[0]["lr"] = scheduler.get_last_lr()[0]
    rest = feed(optimizer, scheduler, trainer, guard, range(7, 12))
    assert first + rest == pytest.approx([0.2 * x for x in levels])
    assert "lr_recover" in guard.state_key
    with pytest.raises(ValueError, match="lr_recover takes a number of steps of at least 1, with lr_factor"):
        RolloutGuard(lr_recover=10)
    with pytest.raises(ValueError, match="lr_recover takes"):
        RolloutGuard(lr_factor=0.5, lr_recover=0)


def test_guard_climb_is_saved_and_restored_through_a_lightning_checkpoint(tmp_path):
    """The cool-down's state travels in the checkpoint under the guard's own key (two guards with other settings do
    not share it), and a run resumed from it goes on climbing from the saved level."""
    import lightning.pytorch as pl
    import pytest
    from lightning.pytorch.demos.boring_classes import BoringModel

    from opd_lightning.guards import GoldRise, RolloutGuard

    def guards():
        return (RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, gold_rise=GoldRise(), lr_factor=0.5,
                             lr_recover=10),
                RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, gold_rise=GoldRise(), lr_factor=0.5))

    def trainer(steps, callbacks):
        return pl.Trainer(max_steps=steps, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)

    cooling, other = guards()
    assert cooling.state_key != other.state_key
    cooling.level, cooling.climb = 0.5, (0, 0.5)  # as if it had acted just before the first step
    first = trainer(3, (cooling, other))
    first.fit(BoringModel())
    assert cooling.level == pytest.approx(0.5 + 0.5 * 2 / 10)  # the batch starting at step 3 was the last climbed
    first.save_checkpoint(tmp_path / "guard.ckpt")
    saved = torch.load(tmp_path / "guard.ckpt", weights_only=False)["callbacks"]
    assert saved[cooling.state_key] == {"level": cooling.level, "climb": (0, 0.5)}

    resumed, _ = guards()
    trainer(5, (resumed,)).fit(BoringModel(), ckpt_path=tmp_path / "guard.ckpt")
    assert resumed.level == pytest.approx(0.5 + 0.5 * 4 / 10) and resumed.climb == (0, 0.5)


def test_policy_shift_is_the_kl_of_the_step_on_its_own_rollout(teacher_dir, tmp_path):
    """`policy_shift` by hand on two positions; `diag/policy_shift` reaches the guard on the steps that measure it
    (every second step here), is zero for a step that moves nothing (learning rate 0) and equals, on a step taken by
    hand, KL(before ‖ after) computed in float64 from the student's logits on its own rollout before and after;
    `diag/step_gain` equals KL(before ‖ teacher) - KL(after ‖ teacher) there, from the teacher's own logits."""
    import pytest
    from lightning.pytorch import Callback

    from opd_lightning.diagnostics import DiagnosticsConfig, policy_shift

    before = torch.tensor([[0.0, 0.0], [1.0, -float("inf")]])
    after = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    p = 1 / (1 + torch.e)  # softmax([0, 1])[0]
    want = [0.5 * torch.log(torch.tensor(0.5 / p)) + 0.5 * torch.log(torch.tensor(0.5 / (1 - p))),
            torch.log(torch.tensor(2.0))]
    assert policy_shift(before, after).tolist() == pytest.approx([float(w) for w in want], rel=1e-6)
    with pytest.raises(ValueError, match="policy_shift_every"):
        DiagnosticsConfig(policy_shift_every=-1)

    class Seen(Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, module, *args):
            self.values.append(module.step_diagnostics.get("diag/policy_shift"))

    for lr in (0.0, 0.5):
        seen = Seen()
        data = PromptDataModule(batch_size=4, limit_train=32, val=None, test=None)
        Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, callbacks=[seen]).fit(
            make_module(teacher_dir, on_policy_fraction=1.0, diagnostics=DiagnosticsConfig(policy_shift_every=2),
                        optimizer=lambda params, lr=lr: torch.optim.SGD(params, lr=lr)), datamodule=data)
        assert [v is not None for v in seen.values] == [True, False, True, False]
        if lr == 0.0:
            assert all(v == 0.0 for v in seen.values if v is not None)
        else:
            assert all(v > 1e-5 for v in seen.values if v is not None), seen.values

    module = make_module(teacher_dir, on_policy_fraction=1.0, diagnostics=DiagnosticsConfig(policy_shift_every=1),
                         optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    module._diag = module.train_diag
    opt = module.optimizer_factory(module.student.parameters())
    rollouts = module.rollouts(BATCH, train=True, step=0)
    rollout = rollouts["rollout"]
    logits = lambda: module.student(rollout.sequences, attention_mask=rollout.attention_mask,
                                    position_ids=rollout.position_ids).logits[:, rollout.prompt_length - 1 : -1]
    with torch.no_grad():
        old = logits().double()
    loss, _ = module._objective(rollouts, module._step_counts(rollouts), shift=True)
    loss.backward()
    opt.step()
    module._measure_shift()
    with torch.no_grad():
        new = logits().double()
    with torch.no_grad():
        teacher = module.teacher(rollout.sequences, attention_mask=rollout.attention_mask,
                                 position_ids=rollout.position_ids).logits[:, rollout.prompt_length - 1 : -1].double()
    mask = rollout.completion_mask.bool()
    lp, lq, lt = old[mask].log_softmax(-1), new[mask].log_softmax(-1), teacher[mask].log_softmax(-1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)
    want = kl(lp, lq).mean()
    gain = (kl(lp, lt) - kl(lq, lt)).mean()
    assert want > 1e-4 and abs(gain) > 1e-4  # the step moved the policy, and the distance to the teacher
    measured = module.train_diag.compute()
    assert measured["diag/policy_shift"].item() == pytest.approx(want.item(), rel=1e-4)
    assert measured["diag/step_gain"].item() == pytest.approx(gain.item(), rel=1e-3, abs=1e-6)


def test_step_size_acts_on_the_moving_mean_of_the_policy_shift():
    """`StepSize`: the mean of the last `window` observations of `diag/policy_shift` above `limit`, `patience` in a
    row; none judged before `window` of them; steps without an observation neither strike nor reset; the guard,
    `StepSize.crossing` and `opd report`'s check agree."""

    import pytest

    from opd_lightning.guards import RolloutGuard, StepSize
    from opd_lightning.report import DEFAULT_THRESHOLDS, step_size_check

    values = [(0, 0.1), (1, 0.0), (3, 0.0), (4, 0.0), (5, 0.0), (6, 0.04), (8, 0.04), (9, 0.04), (10, 0.04)]
    # means of the last 3: step 3: 0.033 (the first judged), 4: 0, 5: 0, 6: 0.013, 8: 0.027, 9: 0.04, 10: 0.04
    assert StepSize(limit=0.03, window=3).crossing(values) == 3
    assert StepSize(limit=0.035, window=3).crossing(values) == 9
    assert StepSize(limit=0.035, window=3, patience=2).crossing(values) == 10
    assert StepSize(limit=0.05, window=1).crossing(values) == 0
    assert StepSize(limit=0.05, window=3).crossing(values) is None
    with pytest.raises(ValueError, match="StepSize needs"):
        StepSize(window=0)
    rule = StepSize(limit=0.035, window=3, patience=2)
    guard = RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, step_size=rule, stop=True)
    with pytest.warns(UserWarning, match=r"the mean of the last 3 diag/policy_shift \(0.040 now\) has been above 0.035 "
                                         r"for 2 observations at step 10"):
        assert _feed(guard, "diag/policy_shift", values, 12)
    assert guard.tripped == [(10, "diag/policy_shift", 0.04)]
    check = step_size_check({"diag/policy_shift": values}, {**DEFAULT_THRESHOLDS, "policy_shift": 0.03})
    assert check.ok is False and check.detail.endswith("crossed at step 10")  # a window of 5: steps 5-10, mean 0.032
    assert step_size_check({}, DEFAULT_THRESHOLDS).ok is None


def test_step_size_judges_the_first_observations_only_unless_told_otherwise():
    """`StepSize.until`: observations after the first `until` are not judged (40 by default: the shift grows later on
    runs that gain); `until=None` judges the whole run. The guard and `opd report` apply the same horizon."""
    import pytest

    from opd_lightning.guards import RolloutGuard, StepSize
    from opd_lightning.report import DEFAULT_THRESHOLDS, step_size_check
    from opd_lightning.watch import Watch

    late = [(t, 0.01 if t < 45 else 0.1) for t in range(60)]  # the mean of 5 passes 0.03 at step 46 (0.046)
    early = [(t, 0.01 if t < 30 else 0.1) for t in range(60)]  # ... at step 31
    assert StepSize().until == 40
    assert StepSize().crossing(late) is None
    assert StepSize(until=None).crossing(late) == 46
    assert StepSize().crossing(early) == 31
    assert StepSize(until=47).crossing(late) == 46 and StepSize(until=46).crossing(late) is None  # step 46: the 47th
    nan_first = [(0, float("nan")), *[(t, 0.1) for t in range(1, 6)]]  # NaN is no observation: 5 counted, not 6
    assert StepSize(until=5).crossing(nan_first) == 5
    with pytest.raises(ValueError, match="ends before its first moving mean"):
        StepSize(until=4)
    with pytest.raises(ValueError, match="leaves no observation to judge"):
        Watch(0.1, "max", 1, baseline=3, window=2, until=4)
    guard = RolloutGuard(max_repetition_rate=None, max_truncation_rate=None, step_size=StepSize(), stop=True)
    assert not _feed(guard, "diag/policy_shift", late, 60)
    assert step_size_check({"diag/policy_shift": late}, DEFAULT_THRESHOLDS).ok is True
    assert step_size_check({"diag/policy_shift": early}, DEFAULT_THRESHOLDS).ok is False
