"""Cost of the `diag/*` diagnostics relative to a whole training step (target: under 5%).

    .venv/bin/python -m benchmarks.diagnostics_cost [--steps 10] [--vocab 32768]

Times full optimizer steps (rollout, teacher forward, student forward and backward, optimizer) of the same
module with diagnostics off, on without gradient coherence, on with it every step, and on with the step's own
diagnostics (`policy_shift_every: 1`) every step, alternating the four so that machine noise hits all; the coherence cost is then amortised at its default rate (1 step in 20). Models are built from configs
with a realistic vocabulary size; the prompts are the embedded arithmetic task's. Writes its table into
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time

import torch

from benchmarks.quickstart import machine, record
from opd_lightning.data import load_rows
from opd_lightning.diagnostics import DiagnosticsConfig
from opd_lightning.models import HFModel
from opd_lightning.module import DistillationModule
from opd_lightning.rollout import SamplingConfig


def build(diagnostics: DiagnosticsConfig, teacher_dir: str, vocab: int) -> DistillationModule:
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128, "vocab_size": vocab}
    module = DistillationModule(student=HFModel(config=config, tokenizer="builtin:char", seed=0),
                                teacher=HFModel(path=teacher_dir), loss="forward_kl",
                                diagnostics=diagnostics,
                                sampling=SamplingConfig(max_new_tokens=32, stop_at_eos=False),
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    module.manual_backward = lambda loss: loss.backward()
    module._optimizer = module.configure_optimizers()
    return module


def step(module: DistillationModule, batch: dict) -> float:
    start = time.perf_counter()
    module._optimizer.zero_grad()
    module._run_step(batch, train=True)
    module._optimizer.step()
    module._measure_shift()  # `diag/policy_shift` where the step measures it, as `training_step` does
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rows = load_rows("builtin:arithmetic/train", args.batch)
    batch = {"prompt": [r["prompt"] for r in rows], "completion": None}
    teacher_dir = tempfile.mkdtemp()
    teacher_config = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4,
                      "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 128,
                      "vocab_size": args.vocab}
    source = HFModel(config=teacher_config, tokenizer="builtin:char", seed=1)
    source.load_model(source.load_tokenizer()).save_pretrained(teacher_dir)
    source.load_tokenizer().save_pretrained(teacher_dir)
    # Off; on without gradient coherence; with it on every step; with the step's own diagnostics on every step. Outside
    # a trainer every step is step 0, which every `*_every` setting measures: the 0s turn them off.
    settings = {"off": DiagnosticsConfig(enabled=False), "tokens": DiagnosticsConfig(grad_coherence_every=0),
                "coherence": DiagnosticsConfig(grad_coherence_every=1),
                "shift": DiagnosticsConfig(grad_coherence_every=0, policy_shift_every=1)}
    modules = {name: build(config, teacher_dir, args.vocab) for name, config in settings.items()}
    for module in modules.values():
        step(module, batch)  # warm-up
    times = {name: [] for name in modules}
    for _ in range(args.steps):
        for name, module in modules.items():
            times[name].append(step(module, batch))
    off, tokens, coherence, shift = (statistics.mean(times[n]) for n in ("off", "tokens", "coherence", "shift"))
    amortised = (tokens - off) + (coherence - tokens) / 20  # coherence is measured every 20th step by default
    record_text = f"""## Diagnostics cost

Command: `.venv/bin/python -m benchmarks.diagnostics_cost --steps {args.steps} --vocab {args.vocab}`.
Date: {datetime.date.today()}. Machine: {machine()}, fp32. Student Llama 4×256, teacher 4×512, vocabulary
{args.vocab}, batch {args.batch}, 32-token completions, forward KL; mean of {args.steps} alternating steps each.

| setting | mean step (s) |
|---|---|
| diagnostics off | {off:.3f} |
| token and rollout diagnostics | {tokens:.3f} |
| plus gradient coherence on every step | {coherence:.3f} |
| token and rollout diagnostics plus `policy_shift` and `step_gain` on every step (`policy_shift_every: 1`, off by default) | {shift:.3f} |

Overhead with the defaults (64 positions per micro-batch for entropies and top-k, gradient coherence every
20th step): {amortised:.3f} s per step,
{amortised / off:+.1%} of a training step. The step's own diagnostics on every step add {shift - tokens:.3f} s
({(shift - tokens) / off:+.1%}) to the token and rollout diagnostics."""
    print(record_text)
    record(record_text, "diagnostics")


if __name__ == "__main__":
    main()
