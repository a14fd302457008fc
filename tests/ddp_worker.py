"""Optimizer steps on 4 rows of unequal completion length, single-process or data-parallel over 2 CPU processes (gloo).

Run by tests/test_distributed.py: `python tests/ddp_worker.py TEACHER_DIR OUT_FILE DEVICES STRATEGY CASE`
(STRATEGY: auto, ddp, or fsdp2 for FSDP2 through ModelParallelStrategy). CASE:
- `same`: forward KL with one tokenizer, λ = 0, one step;
- `mixed`: the same with λ = 0.5 and sampled rollouts, 6 steps (some on-policy, some on the dataset's completions);
- `disagree`: as `mixed`, but rank 1 draws the opposite rollout source (a bug on purpose): the run must fail, saying so;
- `resume`: as `mixed`, but stopped after 3 steps with a checkpoint, and resumed from it to step 6;
  `resume_stateless`: the same with plain SGD, whose empty optimizer state Lightning's FSDP2 loader cannot restore;
- `fused_cross_rows`: the fused output layer across tokenizers with the aligner's dense target, one row per micro-batch;
- `dskd_cma`: DSKD across tokenizers with its trainable attention and projectors; `dskd_cma_clip`: the same with
  gradient clipping.
Writes every trainable weight after the last step; with SGD, equal files mean equal global gradients at every step.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY

from opd_lightning.data import PromptDataModule
from opd_lightning.models import HFModel
from opd_lightning.module import DistillationModule
from opd_lightning.rollout import SamplingConfig
from opd_lightning.rollout_source import RolloutPolicy, RolloutSource

ROWS = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "12+34=", "completion": "46 and more text"},
        {"prompt": "99-9=", "completion": "90"}, {"prompt": "5+5=", "completion": "10 then some"}]

SAME = {"tokenizer": "builtin:char", "loss": "forward_kl", "aligner": "identity"}
CASES = {"same": SAME,
         "mixed": {**SAME, "fraction": 0.5, "steps": 6, "lr": 0.2},
         "disagree": {**SAME, "fraction": 0.5, "steps": 6, "lr": 0.2},
         "resume": {**SAME, "fraction": 0.5, "steps": 6, "lr": 0.1, "momentum": 0.9},  # an optimizer with state
         "resume_stateless": {**SAME, "fraction": 0.5, "steps": 6, "lr": 0.1},  # plain SGD keeps no state
         "fused": {**SAME, "fraction": 0.5, "steps": 6, "lr": 0.2, "chunk": 3},  # the fused output layer
         "fused_tied": {**SAME, "fraction": 0.5, "steps": 6, "lr": 0.2, "chunk": 3, "tied": True},  # the embedding
         # across tokenizers, fused, the dense target: the step runs a row at a time (micro-batches agreed by the ranks)
         "fused_cross_rows": {"tokenizer": "builtin:arithmetic_bpe", "loss": "forward_kl", "aligner": "byte_spans",
                              "fraction": 0.5, "steps": 4, "lr": 0.2, "chunk": 3, "group_elements": 1},
         "dskd_cma": {"tokenizer": "builtin:arithmetic_bpe", "loss": "dskd", "aligner": "dskd_cma"},
         # clipping by the global norm over sharded and replicated gradients (0.01: every step is clipped)
         "dskd_cma_clip": {"tokenizer": "builtin:arithmetic_bpe", "loss": "dskd", "aligner": "dskd_cma", "clip": 0.01}}


def build(teacher_dir: str, spec: dict) -> DistillationModule:
    config = {**TINY, "tie_word_embeddings": True} if spec.get("tied") else TINY
    return DistillationModule(student=HFModel(config=config, tokenizer=spec["tokenizer"]),
                              teacher=HFModel(path=teacher_dir), loss=spec["loss"], aligner=spec["aligner"],
                              rollout=RolloutPolicy(on_policy_fraction=spec.get("fraction", 0.0)),
                              grad_clip_norm=spec.get("clip"), logits_chunk_size=spec.get("chunk"), sampling=SamplingConfig(max_new_tokens=20),
                              optimizer=lambda params: torch.optim.SGD(params, lr=spec.get("lr", 1.0),
                                                                       momentum=spec.get("momentum", 0.0)))


def fit(module, data_file: Path, devices: int, strategy: str, steps: int, ckpt: str | None = None) -> Trainer:
    data = PromptDataModule(train=str(data_file), val=None, test=None, batch_size=4 // devices)
    trainer = Trainer(max_steps=steps, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if getattr(module, "disagree", False):
        draw = RolloutSource.on_policy
        module.rollout_source.on_policy = lambda step, train: draw(module.rollout_source, step, train) != (
            trainer.global_rank == 1)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return trainer


def main(teacher_dir: str, out: str, devices: int, strategy: str, case: str = "same") -> None:
    seed_everything(0)
    data_file = Path(out).with_suffix(".jsonl")
    data_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = CASES[case]
    if "group_elements" in spec:
        from opd_lightning import reference

        reference.CHUNK_ELEMENTS = spec["group_elements"]
    module = build(teacher_dir, spec)
    module.disagree = case == "disagree" and devices > 1
    steps = spec.get("steps", 1)
    if case.startswith("resume") and devices > 1:  # stop half-way with a checkpoint, then go on from it in a new module
        ckpt = str(Path(out).with_suffix(".ckpt"))
        fit(module, data_file, devices, strategy, steps // 2).save_checkpoint(ckpt)
        module = build(teacher_dir, spec)
        trainer = fit(module, data_file, devices, strategy, steps, ckpt=ckpt)
    else:
        trainer = fit(module, data_file, devices, strategy, steps)
    if devices > 1 and strategy == "fsdp2":  # FSDP2: the student's weights really are sharded
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in module.student.parameters())
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}
    assert any(not k.startswith("student.") for k in state) == case.startswith("dskd_cma")  # the extras are in
    if trainer.is_global_zero:
        torch.save(state, out)
        on_policy = [module.rollout_source.on_policy(step, True) for step in range(steps)]
        Path(out).with_suffix(".draws.json").write_text(json.dumps(on_policy))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
