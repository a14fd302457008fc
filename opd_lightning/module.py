"""DistillationModule: the LightningModule that runs on-policy distillation.

One optimizer step: draw whether the step is on-policy (the same on every rank), roll out (`RolloutSource`: the
student's samples, else the dataset's or the teacher's completions), count the valid completion tokens of the whole
step (all micro-batches, all ranks) for the loss normaliser, then per micro-batch score with the frozen references
(`ReferenceScorer`), run the student and back-propagate the weighted loss terms (`objective`). Optimization is manual
because the normaliser must be known before the first backward of the step; gradient accumulation is therefore
`rollout.micro_batch_size`, not the Trainer's flag.

The teacher and the initial-student reference are kept out of the module's children: they never reach the
optimizer, the state dict or a checkpoint. Loss terms and the aligner are children, so their own parameters (DSKD's
projectors, its cross-model attention) are optimised and saved with the student. The constructor's arguments are
recorded as plain data (`hparams`), so `DistillationModule.load_from_checkpoint(path)` rebuilds the module, the
teacher reloaded from its recorded description.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from opd_lightning.aligners import ALIGNERS, Aligner
from opd_lightning.diagnostics import (
    CoherenceSums,
    Diagnostics,
    DiagnosticsConfig,
    ShiftProbe,
    noncanonical_rows,
    output_layer_grad_coherence,
)
from opd_lightning.hidden import (
    capture_layers,
    fill_student_hidden,
    needs_hidden,
    output_layer,
    output_layer_input,
    reads_hidden,
    reads_layers,
    setup_sizes,
    vocab_size,
)
from opd_lightning.hparams import build, factory, record_hyperparameters
from opd_lightning.losses import (
    LOSSES,
    DistillationLoss,
    HiddenRows,
    LayerStates,
    LossInputs,
    TeacherTarget,
    TopK,
    default_chunk,
)
from opd_lightning.losses.fused import CHUNK_ELEMENTS
from opd_lightning.models import HFModel, LoraOptions, apply_lora, freeze
from opd_lightning.objective import LossTerm, check_pairing, fused_batches, resolve_aligner
from opd_lightning.reference import ReferenceScorer, completion_hidden, completion_logits
from opd_lightning.rollout import Rollout, SamplingConfig
from opd_lightning.rollout_source import RolloutPolicy, RolloutSource, check_ranks_agree
from opd_lightning.served import check_served
from opd_lightning.sharding import average_replicated_grads, clip_by_global_norm, shard_student
from opd_lightning.teacher_cache import TeacherCache

__all__ = ["DistillationModule"]

log = logging.getLogger(__name__)
# Diagnostics measured on some steps only (every `grad_coherence_every` steps; the steps that read gold completions)
SAMPLED_DIAGNOSTICS = ("diag/grad_coherence", "diag/gold_nll", "diag/gold_top1", "diag/policy_shift",
                       "diag/step_gain")


class DistillationModule(LightningModule):
    """Student, frozen teacher, aligner and loss terms, wired for on-policy distillation."""

    def __init__(
        self,
        student: HFModel,
        teacher: HFModel | None = None,
        loss: DistillationLoss | str | dict = "reverse_kl",
        aligner: Aligner | str | dict = "identity",
        extra_terms: list[LossTerm] | None = None,
        lora: LoraOptions | None = None,
        sampling: SamplingConfig | None = None,
        rollout: RolloutPolicy | None = None,
        diagnostics: DiagnosticsConfig | None = None,
        teacher_topk: int | None = None,
        logits_chunk_size: int | Literal["auto"] | None = "auto",
        teacher_cache: str | None = None,
        grad_clip_norm: float | None = 1.0,
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
            loss: the main term, against the teacher on the rollouts: a registry name (LOSS_NAMES), a mapping
                `{name: <registry name>, <arguments>}`, or a loss class (`class_path`/`init_args`, or
                `--model.loss <registry name> --model.loss.<argument> <value>` on the command line).
            aligner: how the teacher sees student rollouts, chosen like `loss` among ALIGNER_NAMES.
            extra_terms: further weighted terms (e.g. SFT on gold completions, KL to the initial student).
            lora: train LoRA adapters instead of all student weights.
            sampling: rollout sampling settings (temperature, top-p, top-k, max new tokens, stop at EOS, stop strings).
            rollout: where each step's completions come from (λ, off-policy source), micro-batches, context limit,
                chat template, special-token masking (see `RolloutPolicy`).
            diagnostics: the `diag/*` health metrics (see `DiagnosticsConfig`).
            teacher_topk: give the losses the teacher's top-k log-probs and tail mass per position instead of its
                dense distribution (the top-k form; the losses that accept it say how they treat the tail); None:
                dense.
            logits_chunk_size: the fused output layer: for batches whose every loss term fuses (the dense
                divergences, `gold`, `uld`), the student's logits are never held whole; the losses read its final
                hidden states and output layer this many positions at a time (values and gradients equal the
                unfused path's, under DDP and FSDP2 too). "auto" (the default): `default_chunk(V)` positions (2**23
                logits) a chunk, on the batches whose `[B, N, V]` logits would exceed one chunk (smaller ones gain
                nothing). None: the logits `[B, N, V]` are always materialised. A teacher that shares the student's
                tokenizer hands its hidden states and output layer the same way when dense logits are all the losses
                read, or, with `teacher_topk`, keeps only its top-k, taken a chunk of positions at a time. With an
                aligner that projects the student (`char_level`) the batches keep their logits.
            teacher_cache: a directory written by `opd cache-teacher` (see `opd_lightning.teacher_cache`): the
                teacher's top-k targets on the dataset's completions (and on completions it wrote), read instead of
                running the teacher on off-policy and gold batches; on-policy batches still go to the teacher. Needs
                `teacher_topk` (the cache's k); a cache written for another teacher, tokenizer, aligner, k, rollout
                settings or data is refused, naming the difference.
            grad_clip_norm: clip the gradient's global norm to this value before each step; None disables.
            optimizer: optimizer factory (LightningCLI `class_path`/`init_args`), given the trainable parameters.
            scheduler: learning-rate scheduler factory, stepped once per optimizer step.
            extra_lr: learning rate of the trainable parts outside the student (DSKD's projectors, `hidden_match`'s
                maps, the `dskd_cma` attention), as a second parameter group; None: the optimizer's own. DSKD's
                recipe uses 1e-3.
            seed: seed of the rollouts' draws: the on/off-policy choice from (seed, step), the same on every rank,
                and each row's sampling noise from (seed, step, dataset row); a resumed run draws what an
                uninterrupted one would.
        """
        super().__init__()
        record_hyperparameters(self)
        student, teacher, lora = build(student, HFModel), build(teacher, HFModel), build(lora, LoraOptions)
        if student.server is not None:
            raise ValueError("model.student.server: the student is trained in this process; only a teacher can be "
                             "served (model.teacher.server)")
        self.automatic_optimization = False
        self.sampling = build(sampling, SamplingConfig) or SamplingConfig()
        self.rollout_policy = build(rollout, RolloutPolicy) or RolloutPolicy()
        self.diag_config = build(diagnostics, DiagnosticsConfig) or DiagnosticsConfig()
        self.grad_clip_norm, self.extra_lr, self.seed = grad_clip_norm, extra_lr, seed
        self.optimizer_factory, self.scheduler_factory = factory(optimizer), factory(scheduler)
        config = self.diag_config
        self.train_diag, self.val_diag = (Diagnostics(config.topk, config.ngram, config.max_positions) for _ in range(2))
        self._diag = self.val_diag  # the one `_run_step` feeds; set per step
        self.step_diagnostics: dict[str, Tensor | float] = {}  # the last training step's diag/* (RolloutGuard reads)
        self._shift_probe: ShiftProbe | None = None  # the step's logits before its optimizer step, when it measures
        self._split = "train"  # the data split of the step's batch; set per step
        if teacher_topk is not None and teacher_topk < 1:
            raise ValueError(f"teacher_topk must be a positive integer or None, got {teacher_topk}")
        if logits_chunk_size not in (None, "auto") and (not isinstance(logits_chunk_size, int) or logits_chunk_size < 1):
            raise ValueError(f"logits_chunk_size must be a positive integer, 'auto' or None, got {logits_chunk_size!r}")
        self.logits_chunk_size = logits_chunk_size

        self.student_tokenizer = student.load_tokenizer()
        base = student.load_model(self.student_tokenizer)
        self.max_length = self.rollout_policy.max_length or getattr(base.config, "max_position_embeddings", None)
        self._frozen: dict[str, nn.Module] = {}  # not children: no optimizer, no state dict, no checkpoint
        self.terms = nn.ModuleList([LossTerm(loss), *(LossTerm.of(t) for t in extra_terms or [])])
        if any(t.reference == "initial_student" for t in self.terms) and lora is None:
            self._frozen["initial_student"] = freeze(copy.deepcopy(base))
        self.student = apply_lora(base, lora) if lora is not None else base
        self.student.train()  # from_pretrained returns eval mode, which would silently disable dropout
        self.lora = lora
        self._sharded = False

        self.aligner = resolve_aligner(aligner)
        self.teacher_tokenizer = None
        for term in self.terms:
            if reads_layers(term.loss) and term.reference != "teacher":
                raise ValueError(f"loss {term.loss.registry_name!r} compares the student's layers with the teacher's: "
                                 f"its term's reference must be 'teacher', got {term.reference!r}")
        needs_teacher = any(t.reference == "teacher" and (t.needs_reference or reads_layers(t.loss)) for t in self.terms)
        policy = self.rollout_policy
        if teacher is None and (needs_teacher or (policy.on_policy_fraction < 1 and policy.off_policy_source == "teacher")):
            raise ValueError("this configuration needs a teacher (a loss term reads teacher outputs, or "
                             "rollout.off_policy_source is 'teacher'): set model.teacher")
        self.teacher_spec = teacher
        if teacher is not None:
            self.teacher_tokenizer = teacher.load_tokenizer()
            self._frozen["teacher"] = freeze(teacher.load_model(self.teacher_tokenizer))
            if teacher.server is not None:
                check_served(self.terms, self.aligner, teacher_topk, policy, teacher.server)
            self.aligner.bind(self.student_tokenizer, self.teacher_tokenizer, vocab_size(self.student),
                              vocab_size(self._frozen["teacher"]))
            setup_sizes(self.terms, self.aligner, self.student, self.teacher)  # before the optimizer exists
        self._needs = check_pairing(self.terms, self.aligner, teacher_topk)  # (reference, completions) -> inputs
        self._fused = fused_batches(self.terms, logits_chunk_size, self.aligner)
        self.scorer = ReferenceScorer(self.aligner, self.teacher, self._frozen.get("initial_student"), teacher_topk)
        self.rollout_source = RolloutSource(self.student_tokenizer, self.teacher_tokenizer, policy, self.sampling,
                                            same_tokenizer=self.aligner.same_tokenizer, max_length=self.max_length,
                                            gold=any(t.completions == "gold" for t in self.terms), seed=seed)
        self.teacher_cache = self._open_cache(teacher_cache)
        log.info("distilling with %s (loss %s, aligner %s, λ = %g)", ", ".join(t.name for t in self.terms),
                 self.terms[0].loss.registry_name, self.aligner.registry_name, policy.on_policy_fraction)

    def _open_cache(self, path: str | None) -> TeacherCache | None:
        if path is None:
            return None
        if self.teacher is None or self.scorer.teacher_topk is None:
            raise ValueError("model.teacher_cache holds the teacher's top-k targets: it needs model.teacher and "
                             "model.teacher_topk (the k it was written with)")
        cache = TeacherCache(path)
        cache.check(self)
        self.rollout_source.teacher_cache = cache
        return cache

    def _cached_kinds(self, split: str) -> list[str]:
        """The kinds of cached targets a run reads on `split`."""
        policy, kinds = self.rollout_policy, set()
        if split == "train" and policy.on_policy_fraction < 1:
            kinds.add("dataset" if policy.off_policy_source == "dataset" else "teacher")
        if self.rollout_source.gold:
            kinds.add("dataset")
        return sorted(kinds)

    # ----------------------------------------------------------------------------------------------- models
    @property
    def teacher(self) -> nn.Module | None:
        return self._frozen.get("teacher")

    def _place_frozen(self) -> None:
        for model in self._frozen.values():
            if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
                continue  # bitsandbytes weights stay where they were loaded
            model.to(self.device)

    def configure_model(self) -> None:
        """Under `ModelParallelStrategy`, shard the student with FSDP2 (`sharding.shard_student`); the rest stays
        whole on every rank. Generation then needs `synced_gpus`, which `_sharded_generation` tells."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy) or self._sharded:
            return
        shard_student(self.student, self.device_mesh["data_parallel"])
        self._sharded = True

    def _sharded_generation(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy | ModelParallelStrategy)

    def setup(self, stage: str) -> None:
        """Check, before any step, that the data carries the fields this configuration reads."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "require_field"):
            return
        gold = self.rollout_source.gold
        why = ("rollout.on_policy_fraction < 1 with off_policy_source 'dataset'" if self.rollout_policy.reads_completions()
               else "a loss term trains on gold completions")
        if stage == "fit" and (self.rollout_policy.reads_completions() or gold):
            datamodule.require_field("train", "completion", why)
        if gold:
            datamodule.require_field({"fit": "val", "validate": "val"}.get(stage, stage), "completion", why)
        if self.teacher_cache is not None:
            datamodule.setup(stage)
            splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
            for split in splits:
                if split in datamodule.datasets:
                    for kind in self._cached_kinds(split):
                        self.teacher_cache.check_data(split, kind, datamodule.datasets[split])

    def on_fit_start(self) -> None:
        self._place_frozen()
        if self.logger is not None:
            self.logger.log_hyperparams({"sampling": vars(self.sampling), "rollout": vars(self.rollout_policy)})

    def on_validation_start(self) -> None:
        self._place_frozen()

    def on_test_start(self) -> None:
        self._place_frozen()

    def _target(self, reference: str, rollout: Rollout, needs: frozenset[str], fused: bool = False,
                layers: dict[int, Tensor | None] | None = None) -> TeacherTarget:
        """The reference's target at the completion positions, in the forms the terms `needs`; `layers`: the teacher's
        hidden states to take from the same forward where there is one (`ReferenceScorer.teacher_target`)."""
        if reference == "teacher":
            if self.teacher_cache is not None and rollout.source != "student":
                target = self.teacher_cache.target(self._split, rollout, needs)
            else:
                target = self.scorer.teacher_target(rollout, needs, self.student, self._chunk() if fused else None,
                                                    layers)
            self._diag.update_coverage(target.coverage)
            return target
        return self.scorer.initial_target(rollout, needs, self.student, lora=self.lora is not None)

    # ------------------------------------------------------------------------------------------- objective
    def _objective(self, rollouts: dict[str, Rollout], counts: dict[str, Tensor], measure: bool = False,
                   shift: bool = False) -> tuple[Tensor, dict]:
        """Weighted sum of the terms on one micro-batch, each normalised by its step-wide token count; `measure`:
        gradient coherence too; `shift`: keep the student's logits on the rollout for `diag/policy_shift`."""
        student_logits, targets = {}, {}
        total, metrics = torch.zeros((), device=self.device), {}
        hidden: dict[str, Tensor] = {}  # input of the output layer [B, N, H], for gradient coherence or a loss
        layers: dict[str, dict[int, Tensor]] = {}  # hidden states [B, P + N, H] by index, for `reads_layers` losses
        teacher_layers: dict[str, dict[int, Tensor | None]] = {}  # the teacher's, from its target's forward
        for term in self.terms:
            rollout = rollouts[term.completions]
            fused = self._fuses(term.completions, rollout)  # no `[B, N, V]` logits (coherence: `_fused_grad_coherence`)
            if term.completions not in student_logits:
                keep = (term.completions == "rollout" and measure) or needs_hidden(self.terms, term.completions)
                store = [] if keep and not fused else None
                layers[term.completions] = {}
                with output_layer_input(self.student, store), \
                        capture_layers(self.student, self._layers_read(term.completions, "student_layers"),
                                       layers[term.completions]):
                    student_logits[term.completions] = self._student_logits(rollout, fused)
                if store:
                    hidden[term.completions] = store[0][:, :-1]
            key = (term.reference, term.completions)
            if term.needs_reference and key not in targets:
                wanted = None
                if term.reference == "teacher":  # filled by the target's forward where it has one
                    wanted = teacher_layers[term.completions] = dict.fromkeys(
                        self._layers_read(term.completions, "teacher_layers"))
                targets[key] = self._target(term.reference, rollout, self._needs[key], fused, wanted)
            inputs = LossInputs(student_logits[term.completions], rollout.completion_ids, rollout.completion_mask,
                                teacher=targets.get(key) if term.needs_reference else None,
                                num_items=counts[term.completions])
            if reads_hidden(term.loss):
                fill_student_hidden(inputs, hidden[term.completions], self.student)
            if reads_layers(term.loss):
                inputs.layers = self._layer_states(term.loss, rollout, layers[term.completions],
                                                   teacher_layers.get(term.completions, {}))
            out = term.loss(inputs)
            total = total + term.weight * out.loss
            metrics[f"loss/{term.name}"] = out.loss.detach()
            metrics.update({f"{term.name}/{k}": v for k, v in out.metrics.items()})
        coherence = hidden["rollout"].detach() if measure and "rollout" in hidden else None
        if shift:
            self._shift_probe = ShiftProbe(rollouts["rollout"], student_logits["rollout"],
                                           self.diag_config.max_positions, self._fuses("rollout", rollouts["rollout"]),
                                           *_dense_target(targets.get(("teacher", "rollout"))))
        self._diagnose(rollouts["rollout"], student_logits["rollout"], targets.get(("teacher", "rollout")),
                       total, coherence)
        # the likelihood of the gold completions, free where a term read them (as the step's rollout, or beside it)
        read = next((name for name in student_logits if rollouts[name].source == "dataset"), None)
        if self.diag_config.enabled and read is not None:
            gold = rollouts[read]
            self._diag.update_gold(student_logits[read], gold.completion_ids, gold.completion_mask)
        if measure and isinstance(student_logits["rollout"], HiddenRows) and total.requires_grad:
            coherence = self._fused_grad_coherence(rollouts["rollout"], student_logits["rollout"], targets,
                                                   counts["rollout"])
            if coherence is not None:
                self._diag.update_grad_coherence(coherence)
        return total, metrics

    def _layers_read(self, completions: str, side: str) -> set[int]:
        """The hidden-state indices that the terms reading layers (`hidden_match`) on `completions` read, on one side:
        `side` is "student_layers" or "teacher_layers"."""
        return {i for t in self.terms if t.completions == completions and reads_layers(t.loss)
                for i in getattr(t.loss, side)}

    def _layer_states(self, loss: DistillationLoss, rollout: Rollout, student: dict[int, Tensor],
                      taken: dict[int, Tensor | None]) -> LayerStates:
        """Both models' hidden states at the positions of `rollout` where their tokenizations end a token on the same
        byte (`Aligner.boundary_pairs`), for a loss that `reads_layers`: the student's from its forward on the batch
        (`student`, by index), the teacher's from the forward that scored the same text (`taken`, prompt included),
        else from a forward of its own on it."""
        with torch.no_grad():
            inputs = self.aligner.teacher_inputs(rollout)
            pairs = self.aligner.boundary_pairs(inputs, rollout)
            teacher = {i: taken.get(i) for i in loss.teacher_layers}
            if any(h is None for h in teacher.values()):
                teacher = {}
                with capture_layers(self.teacher, loss.teacher_layers, teacher):
                    self.teacher(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                 position_ids=inputs.position_ids, logits_to_keep=1)
            teacher = {i: h[pairs.batch, pairs.teacher] for i, h in teacher.items()}
        return LayerStates({i: h[pairs.batch, pairs.student] for i, h in student.items()}, teacher, pairs.in_prompt,
                           pairs.batch)

    def _fused_grad_coherence(self, rollout: Rollout, student: HiddenRows, targets: dict,
                              count: Tensor) -> Tensor | None:
        """`diag/grad_coherence` of a fused batch, without its `[B, N, V]` logits. Every term on the rollout is a loss
        that fuses, a sum over positions, so the loss's gradient with respect to a chunk of positions' logits is that
        chunk's own: it is rebuilt a chunk at a time from the same terms and targets (one more pass through the
        output layer, on measured steps only) and folded into the coherence's two sums (`CoherenceSums`). None where no
        term on the rollout reads the logits."""
        rows, cols = rollout.completion_mask.nonzero(as_tuple=True)
        weight, bias = student.weight.detach(), None if student.bias is None else student.bias.detach()
        step = student.chunk_size or default_chunk(weight.shape[0])
        # a term reading layer states (hidden_match) does not read the logits: its gradient with respect to them is 0
        terms = [t for t in self.terms if t.completions == "rollout" and not reads_layers(t.loss)]
        if not terms:
            return None
        sums = CoherenceSums()
        for lo in range(0, rows.numel(), step):
            r, c = rows[lo : lo + step], cols[lo : lo + step]
            h = student.hidden[r, c].detach()  # [c, H]
            with torch.enable_grad():
                logits = nn.functional.linear(h, weight, bias).requires_grad_()  # [c, V]
                total = torch.zeros((), device=h.device)
                for term in terms:
                    inputs = LossInputs(logits[None], rollout.completion_ids[r, c][None],
                                        torch.ones_like(r, dtype=torch.bool)[None],
                                        teacher=_target_at(targets[term.reference, "rollout"], r, c), num_items=count)
                    total = total + term.weight * term.loss(inputs).loss
                (dlogits,) = torch.autograd.grad(total, logits)
            sums.add(dlogits, h)
        return sums.value()

    def _student_logits(self, rollout: Rollout, fused: bool) -> Tensor | HiddenRows:
        """The student's logits at the completion positions `[B, N, V]`; `fused`: its hidden states there and its
        output layer instead (`HiddenRows`), read by the dense losses a chunk of positions at a time."""
        args = (rollout.sequences, rollout.attention_mask, rollout.position_ids, rollout.completion_mask.shape[1])
        if not fused:
            return completion_logits(self.student, *args)
        weight, bias = output_layer(self.student)
        hidden = completion_hidden(self.student, weight, *args)
        if self._sharded:
            # FSDP2 keeps the root module's parameters (the output layer's among them) gathered from its forward
            # through the backward: read after the forward, the weight is the whole one, and the gradient the fused
            # loss gives it is reduce-scattered into the shards with the rest of the root's.
            from torch.distributed.tensor import DTensor

            weight, bias = output_layer(self.student)
            if isinstance(weight, DTensor):
                raise ValueError("under FSDP2 the student's output layer is sharded after its forward (it was wrapped "
                                 "as its own FSDP unit, or the root reshards after forward), so the fused output "
                                 "layer cannot read it: set model.logits_chunk_size to null")
        return HiddenRows(hidden, weight, bias, self._chunk())

    def _chunk(self) -> int:
        """Positions per chunk of the fused output layer."""
        if self.logits_chunk_size == "auto":
            return default_chunk(vocab_size(self.student))
        return self.logits_chunk_size

    def _fuses(self, completions: str, rollout: Rollout) -> bool:
        """Whether this micro-batch of `completions` reads the student fused: its terms allow it (`fused_batches`) and,
        with "auto", its logits would exceed one chunk."""
        if completions not in self._fused:
            return False
        if self.logits_chunk_size != "auto":
            return True
        return rollout.completion_mask.numel() * vocab_size(self.student) > CHUNK_ELEMENTS

    def _diagnose(self, rollout: Rollout, student_logits: Tensor, target: TeacherTarget | None, total: Tensor,
                  hidden: Tensor | None) -> None:
        """Feed the step's diagnostics: token statistics, and gradient coherence when `hidden` was captured."""
        if not self.diag_config.enabled:
            return
        mask = rollout.completion_mask
        teacher, teacher_mask = _dense_target(target)
        self._diag.update_tokens(student_logits.detach(), teacher, rollout.completion_ids, mask, teacher_mask)
        if hidden is not None and total.requires_grad and isinstance(student_logits, Tensor):
            (dlogits,) = torch.autograd.grad(total, student_logits, retain_graph=True, allow_unused=True)  # [B, N, V]
            if dlogits is not None:  # None: no term read the logits (hidden_match alone), no coherence to measure
                self._diag.update_grad_coherence(output_layer_grad_coherence(dlogits[mask], hidden[mask]))

    def _target_rows(self, rollouts: dict[str, Rollout]) -> int:
        """Rows per micro-batch that bound the teacher's side of a fused step across tokenizers: where a term reads the
        aligner's dense target (no `teacher_topk`), its teacher logits and `[B, N, V]` target exist for one micro-batch
        at a time, so the step runs in micro-batches of `ReferenceScorer.rows_per_group` rows (at most
        `CHUNK_ELEMENTS` values each, at least one row; the gradient is the whole batch's, as with
        `rollout.micro_batch_size`). The smallest over the ranks, so that every rank runs as many backward passes.
        The whole batch when no fused term reads such a target."""
        size = len(rollouts["rollout"])
        keys = [(completions, needs) for (reference, completions), needs in self._needs.items()
                if reference == "teacher" and completions in self._fused and completions in rollouts
                and self.scorer.projects_dense(needs)]
        if not keys:
            return size
        rows = size
        for completions, needs in keys:
            rollout = rollouts[completions]
            cached = self.teacher_cache is not None and rollout.source != "student"
            if not cached and self._fuses(completions, rollout):
                rows = min(rows, self.scorer.rows_per_group(rollout, self.student))
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank takes this branch (config only)
            rows = int(self.all_gather(torch.tensor(rows, device=self.device)).min())
        return rows

    def _step_counts(self, rollouts: dict[str, Rollout]) -> dict[str, Tensor]:
        counts = {}
        for name, rollout in rollouts.items():
            local = rollout.completion_mask.sum().float()
            counts[name] = self.trainer.strategy.reduce(local, reduce_op="sum") if self._trainer else local
            if counts[name] == 0:
                raise ValueError(f"every completion token of this step's {name} batch is masked: nothing to learn "
                                 "from. Check sampling.max_new_tokens and the data's completions")
        return counts

    def rollouts(self, batch: dict, train: bool, step: int | None = None) -> dict[str, Rollout]:
        """The step's rollouts of `batch` (`RolloutSource`); `step` defaults to the trainer's global step."""
        step = (self.global_step if self._trainer is not None else 0) if step is None else step
        on_policy = self.rollout_source.on_policy(step, train)
        if train and self.rollout_policy.mixes and self._trainer is not None and self.trainer.world_size > 1:
            check_ranks_agree(self.trainer.strategy, on_policy, step, self.device)
        return self.rollout_source.rollouts(batch, on_policy=on_policy, student=self.student, teacher=self.teacher,
                                            step=step, train=train, device=self.device,
                                            sharded=self._sharded_generation(), split=self._split)

    def _run_step(self, batch: dict, train: bool, split: str = "train") -> tuple[Tensor, dict]:
        self._diag = self.train_diag if train else self.val_diag
        self._split = split  # the data the batch comes from, for the teacher cache
        step = self.global_step if self._trainer is not None else 0
        rollouts = self.rollouts(batch, train, step)
        rollout = rollouts["rollout"]
        self._diag.update_rollout(rollout.completion_mask, rollout.truncated)
        if self.diag_config.enabled and rollout.on_policy:
            self._diag.update_noncanonical(noncanonical_rows(self.student_tokenizer, rollout.completion_ids,
                                                             rollout.completion_mask))
        every = self.diag_config.grad_coherence_every
        measure_step = self.diag_config.enabled and train and every > 0 and step % every == 0
        shift_every = self.diag_config.policy_shift_every
        shift_step = self.diag_config.enabled and train and shift_every > 0 and step % shift_every == 0
        counts = self._step_counts(rollouts)
        size = len(rollouts["rollout"])
        micro = min(self.rollout_policy.micro_batch_size or size, self._target_rows(rollouts))
        scale = self.trainer.world_size if self._trainer else 1  # data-parallel averaging undone: sum / global count
        total, sums = torch.zeros((), device=self.device), defaultdict(float)
        local_tokens = rollouts["rollout"].completion_mask.sum().clamp_min(1)
        for start in range(0, size, micro):
            part = {k: r.select(slice(start, start + micro)) for k, r in rollouts.items()}
            with torch.set_grad_enabled(train):
                loss, metrics = self._objective(part, counts, measure=measure_step and start == 0,
                                                shift=shift_step and start == 0)
            if train:
                self.manual_backward(loss * scale)
            total = total + loss.detach()
            share = part["rollout"].completion_mask.sum() / local_tokens
            for key, value in metrics.items():
                sums[key] += value * (1 if key.startswith("loss/") else share)
        if train:
            self._gold_probe(batch, rollouts, step)
        rollout = rollouts["rollout"]
        return total * scale, {**sums, "rollout/on_policy": float(rollout.on_policy),
                               "tokens": rollout.completion_mask.sum().float()}

    @torch.no_grad()
    def _gold_probe(self, batch: dict, rollouts: dict[str, Rollout], step: int) -> None:
        """`diagnostics.gold_every`: on a step that read no gold completions, the student's likelihood of the batch's
        (one forward pass, no gradient). The same branch on every rank: the step's rollout source is drawn alike."""
        every = self.diag_config.gold_every
        if not (self.diag_config.enabled and every and step % every == 0):
            return
        if any(rollout.source == "dataset" for rollout in rollouts.values()):
            return  # measured on the gold completions the step read
        if batch.get("completion") is None:
            raise ValueError("model.diagnostics.gold_every scores the data's gold completions, and this batch has no "
                             "`completion` field: add it, or set gold_every to 0")
        gold = self.rollout_source.gold_rollout(batch, self.device)
        logits = completion_logits(self.student, gold.sequences, gold.attention_mask, gold.position_ids,
                                   gold.completion_mask.shape[1])
        self._diag.update_gold(logits, gold.completion_ids, gold.completion_mask)

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
        self._measure_shift()
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
        # for RolloutGuard (read, and synced, only by it); whether the step distilled the student's own rollouts
        self.step_diagnostics = {**diagnostics, **sampled, "rollout/on_policy": metrics["rollout/on_policy"]}
        self.log_dict(diagnostics)
        for logger in self.loggers if sampled else []:
            logger.log_metrics(sampled, step=self.global_step - 1)  # the step self.log uses here
        return loss

    @torch.no_grad()
    def _measure_shift(self) -> None:
        """`diag/policy_shift` of the step just taken: the student scores the rollout it kept logits of again (the
        same branch on every rank: the steps that measure are set by the configuration)."""
        if (probe := self._shift_probe) is None:
            return
        self._shift_probe = None
        self.train_diag.update_policy_shift(*probe.shift(self._student_logits(probe.rollout, probe.fused)))

    def _eval_step(self, batch: dict, stage: str) -> Tensor:
        loss, metrics = self._run_step(batch, train=False, split=stage)
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
        """Trainable parameters outside the student: DSKD's projectors, `hidden_match`'s maps, the `dskd_cma`
        attention."""
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("student.")]

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.extra_lr is not None:
            extra = self._extra_parameters()
            if not extra:
                raise ValueError("extra_lr is set but nothing outside the student trains: it applies to DSKD's "
                                 "projectors, hidden_match's maps and the dskd_cma aligner; drop it")
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


def _dense_target(target: TeacherTarget | None) -> tuple[Tensor | None, Tensor | None]:
    """The teacher's dense target in the student's vocabulary and where it holds, `([B, N, V], [B, N])`, that the
    diagnostics compare the student with; (None, None) where the target has none (token log-probs only, or logits in
    a projected space)."""
    if target is None or target.logits is None or target.student_projection is not None:
        return None, None
    return target.logits, target.mask


def _target_at(target: TeacherTarget, rows: Tensor, cols: Tensor) -> TeacherTarget:
    """The teacher's target at positions `(rows, cols)`, as a batch of one row, in the forms the losses that fuse
    read: the mask, dense logits (`[1, c, V]`, from `HiddenRows` too) or the top-k form, and the native logits; the
    vocabulary pairs as they are."""
    at = lambda x: None if x is None else x[rows, cols][None]  # a tensor, or HiddenRows projecting those rows
    topk = target.topk
    if topk is not None:
        topk = TopK(at(topk.ids), at(topk.logprobs), at(topk.tail), topk.temperature)
    return TeacherTarget(mask=at(target.mask), logits=at(target.logits), topk=topk,
                         native_logits=at(target.native_logits), vocab_pairs=target.vocab_pairs)


# `--help` lists the registry names where the docstring says LOSS_NAMES and ALIGNER_NAMES.
DistillationModule.__init__.__doc__ = DistillationModule.__init__.__doc__.replace(
    "LOSS_NAMES", ", ".join(sorted(LOSSES))).replace("ALIGNER_NAMES", ", ".join(sorted(ALIGNERS)))
