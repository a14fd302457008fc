"""DistillationModule: the LightningModule that runs on-policy distillation.

One optimizer step: encode the prompts, roll out (on-policy from the student with probability λ, else the
dataset's or the teacher's completions), count the valid completion tokens of the whole step (all micro-batches,
all ranks) for the loss normaliser, then per micro-batch score with the frozen references, run the student and
back-propagate the weighted loss terms. Optimization is manual because the normaliser must be known before the
first backward of the step; gradient accumulation is therefore `micro_batch_size`, not the Trainer's flag.

The teacher and the initial-student reference are kept out of the module's children: they never reach the
optimizer, the state dict or a checkpoint. Loss terms and the aligner are children, so their own parameters (DSKD's
projectors, its cross-model attention) are optimised and saved with the student.

Where completions come from is `rollout_source.RolloutSource`, a mixin; the pure parts live in `rollout`,
`objective`, `diagnostics` and `sharding`.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from opd_lightning.aligners import AlignedTarget, Aligner
from opd_lightning.diagnostics import Diagnostics, output_layer_grad_coherence
from opd_lightning.hidden import fill_student_hidden, needs_hidden, output_layer_input, setup_sizes, teacher_hidden
from opd_lightning.losses import HIDDEN_STATES, DistillationLoss, LossInputs
from opd_lightning.models import HFModel, LoraOptions, apply_lora, freeze
from opd_lightning.objective import LossTerm, check_pairing, fill_inputs, resolve_aligner
from opd_lightning.rollout import Rollout, SamplingConfig
from opd_lightning.rollout_source import RolloutSource
from opd_lightning.sharding import average_replicated_grads, clip_by_global_norm, shard_student

__all__ = ["DistillationModule"]

SAMPLED_DIAGNOSTICS = ("diag/grad_coherence",)


def _completion_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                       completion_length: int) -> Tensor:
    """Logits predicting the last `completion_length` tokens: `[B, N, V]`."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=completion_length + 1, use_cache=False)
    return out.logits[:, :-1]


class DistillationModule(RolloutSource, LightningModule):
    """Student, frozen teacher, aligner and loss terms, wired for on-policy distillation."""

    def __init__(
        self,
        student: HFModel,
        teacher: HFModel | None = None,
        loss: DistillationLoss | str = "reverse_kl",
        aligner: Aligner | str = "identity",
        extra_terms: list[LossTerm] | None = None,
        lora: LoraOptions | None = None,
        sampling: SamplingConfig | None = None,
        on_policy_fraction: float = 1.0,
        off_policy_source: Literal["dataset", "teacher"] = "dataset",
        micro_batch_size: int | None = None,
        grad_clip_norm: float | None = 1.0,
        max_length: int | None = None,
        use_chat_template: bool = False,
        mask_special_tokens: bool = False,
        diagnostics: bool = True,
        diag_topk: int = 8,
        diag_ngram: int = 3,
        diag_max_positions: int | None = 64,
        grad_coherence_every: int = 20,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        extra_lr: float | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            student: the model to train (`path` or `config`, see `HFModel`).
            teacher: the frozen model to distil from; None for losses that need no teacher (SFT with
                `cross_entropy`).
            loss: the main term, against the teacher on the rollouts: a registry name or a loss instance.
            aligner: how the teacher sees student rollouts: a registry name or an aligner instance.
            extra_terms: further weighted terms (e.g. SFT on gold completions, KL to the initial student).
            lora: train LoRA adapters instead of all student weights.
            sampling: rollout sampling settings (temperature, top-p, top-k, max new tokens, stop at EOS).
            on_policy_fraction: λ, the probability that a training batch is rolled out by the student; otherwise
                its completions come from `off_policy_source`. Validation and test are always on-policy.
            off_policy_source: "dataset" (the batch's `completion` texts) or "teacher" (sequence-level KD: the
                teacher samples the completions with `sampling`).
            micro_batch_size: rows per forward/backward; the batch is one optimizer step (gradient
                accumulation). None: the whole batch at once.
            grad_clip_norm: clip the gradient's global norm to this value before each step; None disables.
            max_length: context limit for prompt + completion; defaults to the student's
                `max_position_embeddings`. Longer prompts are refused with an error.
            use_chat_template: wrap each prompt as a user turn with the tokenizer's chat template.
            mask_special_tokens: leave completion positions holding special tokens other than EOS (pad, unk, BOS,
                chat-template markers) out of every loss; they stay in the context the models read.
            diagnostics: compute and log the `diag/*` health metrics each step (see `opd_lightning.diagnostics`).
            diag_topk: k of the `diag/topk_overlap` diagnostic (mass on tokens in both models' top-k).
            diag_ngram: n of the `diag/repetition_rate` diagnostic (tokens that repeat an earlier n-gram).
            diag_max_positions: positions per micro-batch whose full distributions feed the entropy and top-k
                diagnostics (evenly spaced; bounds their cost at large vocabularies); None: all.
            grad_coherence_every: measure `diag/grad_coherence` every this many optimizer steps (0: never).
            optimizer: optimizer factory (LightningCLI `class_path`/`init_args`), given the trainable parameters.
            scheduler: learning-rate scheduler factory, stepped once per optimizer step.
            extra_lr: learning rate of the trainable parts outside the student (DSKD's projectors, the `dskd_cma`
                attention), as a second parameter group; None: the optimizer's own. DSKD's recipe uses 1e-3.
            seed: seed of the rollouts' random draws (on/off-policy choice, sampling); each step's draws derive
                from (seed, step, rank), so a resumed run continues exactly as an uninterrupted one.
        """
        super().__init__()
        if not 0.0 <= on_policy_fraction <= 1.0:
            raise ValueError(f"on_policy_fraction must be in [0, 1], got {on_policy_fraction}")
        self.automatic_optimization = False
        self.sampling = sampling or SamplingConfig()
        self.on_policy_fraction, self.off_policy_source = on_policy_fraction, off_policy_source
        self.micro_batch_size, self.grad_clip_norm = micro_batch_size, grad_clip_norm
        self.use_chat_template = use_chat_template
        self.mask_special_tokens = mask_special_tokens
        self.grad_coherence_every = grad_coherence_every
        self.diagnostics = diagnostics
        self.train_diag, self.val_diag = (Diagnostics(diag_topk, diag_ngram, diag_max_positions) for _ in range(2))
        self._diag = self.val_diag  # the one `_run_step` feeds; set per step
        self.optimizer_factory, self.scheduler_factory, self.extra_lr = optimizer, scheduler, extra_lr
        self.seed = seed
        self._draws = 0  # draws within the current step; reset by `_run_step`

        self.student_tokenizer = student.load_tokenizer()
        base = student.load_model(self.student_tokenizer)
        self.max_length = max_length or getattr(base.config, "max_position_embeddings", None)
        self._frozen: dict[str, nn.Module] = {}  # not children: no optimizer, no state dict, no checkpoint
        self.terms = nn.ModuleList([LossTerm(loss), *(extra_terms or [])])
        if any(t.reference == "initial_student" for t in self.terms) and lora is None:
            self._frozen["initial_student"] = freeze(copy.deepcopy(base))
        self.student = apply_lora(base, lora) if lora is not None else base
        self.student.train()  # from_pretrained returns eval mode, which would silently disable dropout
        self.lora = lora
        self._sharded = False

        self.aligner = resolve_aligner(aligner)
        self.teacher_tokenizer = None
        needs_teacher = any(t.reference == "teacher" and t.needs_reference for t in self.terms)
        if teacher is None and (needs_teacher or (on_policy_fraction < 1 and off_policy_source == "teacher")):
            raise ValueError("this configuration needs a teacher (a loss term reads teacher outputs, or "
                             "off_policy_source is 'teacher'): set model.teacher")
        if teacher is not None:
            self.teacher_tokenizer = teacher.load_tokenizer()
            self._frozen["teacher"] = freeze(teacher.load_model(self.teacher_tokenizer))
            self.aligner.bind(self.student_tokenizer, self.teacher_tokenizer, self._vocab_size(self.student),
                              self._vocab_size(self._frozen["teacher"]))
            setup_sizes(self.terms, self.aligner, self.student, self.teacher)  # before the optimizer exists
        self._needs = check_pairing(self.terms, self.aligner)  # (reference, completions) -> inputs to compute

    # ----------------------------------------------------------------------------------------------- models
    @property
    def teacher(self) -> nn.Module | None:
        return self._frozen.get("teacher")

    @staticmethod
    def _vocab_size(model: nn.Module) -> int:
        return model.get_output_embeddings().weight.shape[0]

    def _place_frozen(self) -> None:
        for model in self._frozen.values():
            if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
                continue  # bitsandbytes weights stay where they were loaded
            model.to(self.device)

    def configure_model(self) -> None:
        """Under `ModelParallelStrategy`, shard the student with FSDP2 (`sharding.shard_student`); the rest stays
        whole on every rank. Generation then needs `synced_gpus`, which `_generate` sets for sharded strategies."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy) or self._sharded:
            return
        shard_student(self.student, self.device_mesh["data_parallel"])
        self._sharded = True

    def on_fit_start(self) -> None:
        self._place_frozen()
        if self.logger is not None:
            self.logger.log_hyperparams({"sampling": vars(self.sampling), "on_policy_fraction": self.on_policy_fraction,
                                         "off_policy_source": self.off_policy_source})

    def on_validation_start(self) -> None:
        self._place_frozen()

    def on_test_start(self) -> None:
        self._place_frozen()

    def _reference_target(self, reference: str, rollout: Rollout, needs: frozenset[str]) -> AlignedTarget:
        """The reference's outputs at the completion positions, in the form the loss `needs`."""
        grad = torch.is_grad_enabled()  # for an aligner's own parameters (hidden states only)
        with torch.no_grad():
            if reference == "teacher":
                inputs = self.aligner.teacher_inputs(rollout)
                hidden = [] if HIDDEN_STATES in needs else None
                with output_layer_input(self.teacher, hidden):
                    logits = _completion_logits(self.teacher, inputs.input_ids, inputs.attention_mask,
                                                inputs.position_ids, inputs.completion_length)
                target = self.aligner.project(logits, inputs, rollout, needs)
                self._diag.update_coverage(target.coverage)
                if hidden:
                    with torch.set_grad_enabled(grad):
                        states = teacher_hidden(hidden[0], logits, self.student, self.teacher)
                        self.aligner.project_hidden(target, states, inputs, rollout)
                return target
            args = (rollout.sequences, rollout.attention_mask, rollout.position_ids, rollout.completion_mask.shape[1])
            if self.lora is not None:
                with self.student.disable_adapter():
                    logits = _completion_logits(self.student, *args)
            else:
                logits = _completion_logits(self._frozen["initial_student"], *args)
            ids = torch.arange(logits.shape[-1], device=logits.device)
            return AlignedTarget(coverage=1.0, teacher_logits=logits, teacher_native_logits=logits, vocab_pairs=(ids, ids))

    # ------------------------------------------------------------------------------------------- objective
    def _objective(self, rollouts: dict[str, Rollout], counts: dict[str, Tensor],
                   measure: bool = False) -> tuple[Tensor, dict]:
        """Weighted sum of the terms on one micro-batch, each normalised by its step-wide token count."""
        student_logits, targets = {}, {}
        total, metrics = torch.zeros((), device=self.device), {}
        hidden: dict[str, Tensor] = {}  # input of the output layer [B, N, H], for gradient coherence or a loss
        for term in self.terms:
            rollout = rollouts[term.completions]
            if term.completions not in student_logits:
                keep = (term.completions == "rollout" and measure) or needs_hidden(self.terms, term.completions)
                store = [] if keep else None
                with output_layer_input(self.student, store):
                    student_logits[term.completions] = _completion_logits(
                        self.student, rollout.sequences, rollout.attention_mask, rollout.position_ids,
                        rollout.completion_mask.shape[1])
                if store:
                    hidden[term.completions] = store[0][:, :-1]
            inputs = LossInputs(student_logits[term.completions], rollout.completion_ids, rollout.completion_mask,
                                num_items=counts[term.completions])
            if HIDDEN_STATES in term.loss.requires:
                fill_student_hidden(inputs, hidden[term.completions], self.student, self.teacher)
            if term.needs_reference:
                key = (term.reference, term.completions)
                if key not in targets:
                    targets[key] = self._reference_target(term.reference, rollout, self._needs[key])
                fill_inputs(inputs, targets[key])
            out = term.loss(inputs)
            total = total + term.weight * out.loss
            metrics[f"loss/{term.name}"] = out.loss.detach()
            metrics.update({f"{term.name}/{k}": v for k, v in out.metrics.items() if k != term.loss.registry_name})
        coherence = hidden["rollout"].detach() if measure and "rollout" in hidden else None
        self._diagnose(rollouts["rollout"], student_logits["rollout"], targets.get(("teacher", "rollout")),
                       total, coherence)
        return total, metrics

    def _diagnose(self, rollout: Rollout, student_logits: Tensor, target: AlignedTarget | None, total: Tensor,
                  hidden: Tensor | None) -> None:
        """Feed the step's diagnostics: token statistics, and gradient coherence when `hidden` was captured."""
        if not self.diagnostics:
            return
        mask = rollout.completion_mask
        dense = target is not None and target.teacher_logits is not None and target.student_projection is None
        self._diag.update_tokens(student_logits.detach(), target.teacher_logits if dense else None,
                                 rollout.completion_ids, mask, target.mask if dense else None)
        if hidden is not None and total.requires_grad:
            (dlogits,) = torch.autograd.grad(total, student_logits, retain_graph=True)  # [B, N, V], loss only
            self._diag.update_grad_coherence(output_layer_grad_coherence(dlogits[mask], hidden[mask]))

    def _step_counts(self, rollouts: dict[str, Rollout]) -> dict[str, Tensor]:
        counts = {}
        for name, rollout in rollouts.items():
            local = rollout.completion_mask.sum().float()
            counts[name] = self.trainer.strategy.reduce(local, reduce_op="sum") if self._trainer else local
            if counts[name] == 0:
                raise ValueError(f"every completion token of this step's {name} batch is masked: nothing to learn "
                                 "from. Check sampling.max_new_tokens and the data's completions")
        return counts

    def _run_step(self, batch: dict, train: bool) -> tuple[Tensor, dict]:
        self._draws = 0
        self._diag = self.train_diag if train else self.val_diag
        rollouts = self._rollouts(batch, train)
        self._diag.update_rollout(rollouts["rollout"].completion_mask, rollouts["rollout"].truncated)
        every = self.grad_coherence_every
        measure_step = self.diagnostics and train and every > 0 and (self.global_step if self._trainer else 0) % every == 0
        counts = self._step_counts(rollouts)
        size = len(rollouts["rollout"])
        micro = self.micro_batch_size or size
        scale = self.trainer.world_size if self._trainer else 1  # data-parallel averaging undone: sum / global count
        total, sums = torch.zeros((), device=self.device), defaultdict(float)
        local_tokens = rollouts["rollout"].completion_mask.sum().clamp_min(1)
        for start in range(0, size, micro):
            part = {k: r.select(slice(start, start + micro)) for k, r in rollouts.items()}
            with torch.set_grad_enabled(train):
                loss, metrics = self._objective(part, counts, measure=measure_step and start == 0)
            if train:
                self.manual_backward(loss * scale)
            total = total + loss.detach()
            share = part["rollout"].completion_mask.sum() / local_tokens
            for key, value in metrics.items():
                sums[key] += value * (1 if key.startswith("loss/") else share)
        rollout = rollouts["rollout"]
        return total * scale, {**sums, "rollout/on_policy": float(rollout.on_policy),
                               "tokens": rollout.completion_mask.sum().float()}

    # ----------------------------------------------------------------------------------------- lightning
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        loss, metrics = self._run_step(batch, train=True)
        if self._sharded:  # FSDP2 averages the student's gradients; the trainable parts outside it are ours to
            average_replicated_grads(self._extra_parameters(), self.trainer.world_size)
        if self.grad_clip_norm is not None and self._sharded:
            clip_by_global_norm(self.parameters(), self.grad_clip_norm)
        elif self.grad_clip_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm")
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=len(batch["prompt"]))
        self.log("train/lr", opt.param_groups[0]["lr"])
        diagnostics = self.train_diag.compute()  # synced across ranks by the metric itself
        self.train_diag.reset()
        # Measured on a sample of steps only: written straight to the loggers, as Lightning would repeat a value
        # logged with self.log on the steps that do not log it.
        sampled = {k: float(diagnostics.pop(k)) for k in SAMPLED_DIAGNOSTICS if k in diagnostics}
        self.log_dict(diagnostics)
        for logger in self.loggers if sampled else []:
            logger.log_metrics(sampled, step=self.global_step - 1)  # the step self.log uses here
        return loss

    def _eval_step(self, batch: dict, stage: str) -> Tensor:
        loss, metrics = self._run_step(batch, train=False)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]), sync_dist=True)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=len(batch["prompt"]), sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def _log_eval_diagnostics(self, stage: str) -> None:
        self.log_dict({f"{stage}/{k}": v for k, v in self.val_diag.compute().items()})
        self.val_diag.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval_diagnostics("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_diagnostics("test")

    def _extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the student: DSKD's projectors, the `dskd_cma` attention."""
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("student.")]

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.extra_lr is not None:
            extra = self._extra_parameters()
            if not extra:
                raise ValueError("extra_lr is set but nothing outside the student trains: it applies to DSKD's "
                                 "projectors and the dskd_cma aligner; drop it")
            student = [p for p in self.student.parameters() if p.requires_grad]
            params = [{"params": student}, {"params": extra, "lr": self.extra_lr}]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer),
                                                         "interval": "step"}}

    def save_student(self, path: str, merge_lora: bool = True) -> None:
        """Write the student in Hugging Face format with its tokenizer.

        With LoRA, `merge_lora` writes a plain model with the adapters merged in (a copy is merged; training
        state is untouched); otherwise only the adapter is written, loadable with `peft.PeftModel.from_pretrained`.
        """
        model = self.student
        if self.lora is not None and merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.student_tokenizer.save_pretrained(path)
