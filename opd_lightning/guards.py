"""A guard against the failure modes a loss curve hides: degenerate rollouts and a teacher signal that stops helping.

Repetition can become locally rewarding in OPD and collapse a run within tens of steps (Luo et al. 2026);
completions that keep hitting the length limit are the usual first sign. A teacher whose next-token menu does not
overlap the student's (`diag/topk_overlap` low or falling, Li et al. 2026), per-token advantages that cancel in the
summed gradient (`diag/grad_coherence` low) and a teacher whose judgement of the student's tokens worsens deeper
into the student's own prefix (`diag/logratio_drift` negative) are watched as well, and so is the joint drift rule
(`watch.Drift`: the top-k overlap falling while the log-ratio's size rises, each against the run's own start), and
the student's likelihood of the gold completions on the steps that read them (`watch.GoldRise`: its negative
log-likelihood rising above the run's start, a fall of the score read at every gold step);
`benchmarks/failure_modes.py` measures, on failures reproduced at CPU scale, when each acts against when the score
falls, and `benchmarks/guard_check.py` judges candidate rules on those runs and on the warm-start leaderboards'. The
guard reads the step's diagnostics and warns when one stays past its limit for `patience` observations in a row; with
`stop: true` it also ends training, so a checkpoint from before the collapse is what remains, and with `lr_factor`
it lowers the learning rate instead (`benchmarks/guard_response.py` measures that answer). `crossing` is the same
rule applied to a logged series afterwards (`benchmarks/failure_modes.py`).
"""

from __future__ import annotations

import math

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from opd_lightning.report import CHECKS
from opd_lightning.watch import Drift, DriftWatch, GoldRise, StepSize, Watch, crossing, past_limit

__all__ = ["BOUNDS", "Drift", "GoldRise", "RolloutGuard", "StepSize", "Watch", "crossing", "past_limit"]

# Which side of its limit each diagnostic must stay on, "max" (a ceiling) or "min" (a floor): `opd report`'s checks.
BOUNDS: dict[str, str] = {metrics[0]: bound for metrics, bound, _ in CHECKS.values()}


class RolloutGuard(Callback):
    """Warn, and optionally stop, when a diagnostic stays past its limit."""

    def __init__(self, max_repetition_rate: float | None = 0.3, max_truncation_rate: float | None = 0.5,
                 max_repeat_advantage_ratio: float | None = None, max_repeat_advantage_gap: float | None = None,
                 min_topk_overlap: float | None = None, min_grad_coherence: float | None = None,
                 min_logratio_drift: float | None = None, max_topk_overlap_drop: float | None = None,
                 drift: Drift | None = None, gold_rise: GoldRise | None = None, step_size: StepSize | None = None,
                 baseline: int = 10,
                 patience: int = 3, stop: bool = False, lr_factor: float | None = None,
                 lr_recover: int | None = None) -> None:
        """
        Args:
            max_repetition_rate: limit on `diag/repetition_rate` (share of completion tokens that repeat an earlier
                n-gram of their completion); None disables the check.
            max_truncation_rate: limit on `diag/truncation_rate` (share of completions cut by the length limit);
                None disables the check.
            max_repeat_advantage_ratio: limit on `diag/repeat_advantage_ratio` (mean log-ratio advantage of repeated
                tokens over that of the others); None disables the check.
            max_repeat_advantage_gap: limit on `diag/repeat_advantage_gap` (the same two means' difference, in
                nats, which keeps its sign when both means are negative); None disables the check.
            min_topk_overlap: floor on `diag/topk_overlap` (mass both models put on their shared top-k tokens);
                None disables the check.
            min_grad_coherence: floor on `diag/grad_coherence` (norm of the summed output-layer gradient over the
                sum of the per-position norms; measured every `diagnostics.grad_coherence_every` steps, and each
                measurement is one observation); None disables the check.
            min_logratio_drift: floor on `diag/logratio_drift` (mean log-ratio over the second half of each
                completion minus over its first half); None disables the check.
            max_topk_overlap_drop: limit on how far `diag/topk_overlap` falls below its mean over the run's first
                `baseline` observations (`opd report`'s `topk_overlap_drop` check, watched as the run goes); None
                disables the check.
            drift: the joint drift rule (`Drift`: the top-k overlap falling and the log-ratio's size rising, each in
                the run's own early standard deviations, on on-policy steps), with its own baseline, window and
                patience; None disables it. `benchmarks/guard_check.py` records where it acts against where runs fall.
            gold_rise: the gold-likelihood rule (`GoldRise`: `diag/gold_nll`, the student's mean negative
                log-likelihood of the gold completions on the steps that read them, risen a limit in nats above its
                first observations), with its own baseline and patience; None disables it.
            step_size: the step-size rule (`StepSize`: `diag/policy_shift`, how far each optimizer step moved the
                student's policy on its own rollout, above a limit on a moving mean, judged over the first
                observations of the fit; the run must measure it, `diagnostics.policy_shift_every`); None disables it.
            baseline: observations that set the reference of the `_drop` limit.
            patience: consecutive observations past a limit before the guard acts.
            stop: end training (`trainer.should_stop`) when the guard acts, instead of only warning.
            lr_factor: when the guard acts (and does not stop), multiply the learning rate by this factor in (0, 1):
                every optimizer's current rate and its scheduler's base rates, so the schedule goes on from the lower
                peak (and a checkpoint keeps it). A rule acts once per run of observations past its limit, so a
                diagnostic that stays past it lowers the rate once.
            lr_recover: with `lr_factor`, steps over which the rate climbs back, linearly, to where it was before the
                guard acted (a cool-down instead of a lasting cut); None keeps it lowered. A rule acting again during
                the climb cuts the rate reached by `lr_factor` and starts a new climb from there. The climb's state is
                saved in checkpoints with the callback's.
        """
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        given = {"diag/repetition_rate": max_repetition_rate, "diag/truncation_rate": max_truncation_rate,
                 "diag/repeat_advantage_ratio": max_repeat_advantage_ratio,
                 "diag/repeat_advantage_gap": max_repeat_advantage_gap, "diag/topk_overlap": min_topk_overlap,
                 "diag/grad_coherence": min_grad_coherence, "diag/logratio_drift": min_logratio_drift}
        if baseline < 1:
            raise ValueError(f"baseline must be at least 1, got {baseline}")
        self.limits = {name: limit for name, limit in given.items() if limit is not None}
        if lr_factor is not None and not 0 < lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {lr_factor}")
        if lr_recover is not None and (lr_factor is None or lr_recover < 1):
            raise ValueError(f"lr_recover takes a number of steps of at least 1, with lr_factor; got {lr_recover}"
                             f" with lr_factor {lr_factor}")
        self.patience, self.stop, self.lr_factor, self.lr_recover = patience, stop, lr_factor, lr_recover
        # the cool-down under way: the rate's level against where it was (1: none), and the climb's start
        self.level, self.climb = 1.0, None  # climb: (step the guard acted at, level right after)
        # label -> (diagnostic read, its watch): absolute limits by the diagnostic's name, the drop by its own
        self.watches = {name: (name, Watch(limit, BOUNDS[name], patience)) for name, limit in self.limits.items()}
        if max_topk_overlap_drop is not None:
            self.limits["diag/topk_overlap_drop"] = max_topk_overlap_drop
            self.watches["diag/topk_overlap_drop"] = ("diag/topk_overlap",
                                                      Watch(-max_topk_overlap_drop, "min", patience, baseline))
        if gold_rise is not None:
            self.limits["diag/gold_nll_rise"] = gold_rise.limit
            self.watches["diag/gold_nll_rise"] = (gold_rise.metric, gold_rise.watch())
        if step_size is not None:
            self.limits["diag/policy_shift"] = step_size.limit
            self.watches["diag/policy_shift"] = (step_size.metric, step_size.watch())
        self.drift = None if drift is None else DriftWatch(drift)
        self.tripped: list[tuple[int, str, float]] = []  # (step, metric, value) each time the guard acted

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.climb is None:
            return
        acted, low = self.climb
        level = min(1.0, low + (1.0 - low) * max(0, trainer.global_step - acted) / self.lr_recover)
        scale_learning_rate(trainer, level / self.level)
        self.level = level
        if level == 1.0:  # back where it was: the climb is over
            self.climb = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(limits=self.limits, stop=self.stop, lr_factor=self.lr_factor,
                                        lr_recover=self.lr_recover)

    def state_dict(self) -> dict:
        return {"level": self.level, "climb": self.climb}

    def load_state_dict(self, state_dict: dict) -> None:
        self.level, climb = state_dict["level"], state_dict["climb"]
        self.climb = None if climb is None else tuple(climb)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        # This step's diagnostics as the module measured them (sampled ones, e.g. grad_coherence, only on the steps
        # that measure them); a module without them: what was logged through self.log.
        observed = getattr(pl_module, "step_diagnostics", None)
        observed = trainer.callback_metrics if observed is None else observed
        for label, (name, watch) in self.watches.items():
            if (value := observed.get(name)) is None:
                continue  # not measured on this step: no observation
            if watch.observe(value := float(value)):
                side = "above" if watch.bound == "max" else "below"
                limit = (f"its first-{watch.baseline}-observation mean by more than {abs(watch.limit)}"
                         if watch.baseline else str(watch.limit))
                what = f"{name} = {value:.3f}" if watch.window == 1 else \
                    f"the mean of the last {watch.window} {name} ({value:.3f} now)"
                self._act(trainer, label, value, f"{what} has been {side} {limit} for {watch.patience} observations")
        if self.drift is not None and float(observed.get("rollout/on_policy", 1.0)) == 1.0:
            overlap, size = (float(observed.get(name, math.nan)) for name in Drift.metrics)
            if self.drift.observe(overlap, size):
                rule = self.drift.rule
                self._act(trainer, "drift", overlap, f"diag/topk_overlap has fallen {rule.overlap_fall_sd:g} and "
                          f"diag/logratio_abs risen {rule.logratio_rise_sd:g} of their first-{rule.baseline}-"
                          f"observation standard deviations (now {overlap:.3f} and {size:.3f})")

    def _act(self, trainer: Trainer, label: str, value: float, what: str) -> None:
        """Record and warn that the guard acts on `label`; end training if it stops runs, else lower the rate if asked."""
        self.tripped.append((trainer.global_step, label, value))
        if self.stop:
            trainer.should_stop = True
            action = "stopping training"
        elif self.lr_factor is not None:
            scale_learning_rate(trainer, self.lr_factor)
            action = f"continuing at {self.lr_factor:g}x the learning rate"
            if self.lr_recover is not None:
                self.level *= self.lr_factor
                self.climb = (trainer.global_step, self.level)
                action += f", climbing back over {self.lr_recover} steps"
        else:
            action = "continuing (set stop: true to end the run here)"
        rank_zero_warn(f"{what} at step {trainer.global_step}: the run is degenerating; {action}")


def scale_learning_rate(trainer: Trainer, factor: float) -> None:
    """Multiply every optimizer's learning rate by `factor`, now and for the rest of its schedule: each param group's
    `lr` and each scheduler's `base_lrs` (which a `LambdaLR` such as `WarmupCosine` multiplies by its factor at every
    step, so the schedule's shape is kept at the lower peak)."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
    for config in trainer.lr_scheduler_configs:
        if hasattr(config.scheduler, "base_lrs"):
            config.scheduler.base_lrs = [rate * factor for rate in config.scheduler.base_lrs]
