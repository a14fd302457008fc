"""One training step of the real pair (Gemma-3-270M -> SmolLM2-135M-Instruct): unfused, fused, top-k and cached.

    .venv/bin/python -m benchmarks.real_step [--config configs/real/gemma3_to_smollm2.yaml] [--rows 16]
        [--max-new-tokens N] [--chunk 64] [--topk 8] [--steps 3] [--no-record]

Needs `make real-models`. Each variant runs in its own process, built by LightningCLI from the config as `opd fit`
builds it (`run=False`), on the first `--rows` training prompts (the step reads the first batch of `data.batch_size` of them; the cache is
written for all):
- `unfused`: `model.logits_chunk_size` null (`[B, N, V]` logits on both sides);
- `fused`: `model.logits_chunk_size --chunk` (the student's logits never held whole; across tokenizers the step runs
  in micro-batches of rows whose teacher logits and dense target fit 2**23 values, `ReferenceScorer.rows_per_group`);
- `fused + top-k`: and `model.teacher_topk --topk`;
- `fused + top-k + cache`: and `model.teacher_cache`, written first by `opd cache-teacher` with the same config and
  data (its manifest gives the bytes per token; its wall time is reported);
- `fused + top-k + served`: `fused + top-k` with the teacher served by `opd serve-teacher` in another process on the
  same machine (`model.teacher.server`, `--server-top-k` log-probs per position): the training process never holds
  it; the server's own resident peak is reported beside the table. Its losses differ from `fused + top-k`'s where
  the aligner carries the mass the server does not return (spread evenly over the other teacher tokens) into the
  student's top-k.
A step is the module's own: roll out, score, loss and backward over the batch (`_run_step`), gradient clipping and the
AdamW step, timed with `torch.utils.benchmark.Timer.timeit(--steps)` after one untimed step, once with every step
on-policy and once with every step off-policy (the dataset's completions); s/step at λ = 0.5 is their mean (the
config's λ draws each step on- or off-policy with probability 0.5). Peak memory is the process's resident high-water
mark over the steps alone (`VmHWM`, reset through `/proc/self/clear_refs` after the models are loaded). The first
step's loss on each side must agree between `unfused` and `fused`, and between `fused + top-k` and its cached run.
`--max-new-tokens N` overrides `sampling.max_new_tokens` and drops the stop strings, so that on-policy completions
are N tokens long (the config's answers are a few tokens; the logits the fused layer saves grow with the tokens).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.quickstart import machine, record

VARIANTS = ("unfused", "fused", "fused + top-k", "fused + top-k + cache", "fused + top-k + served")


def serve(config: list[str], max_logprobs: int) -> tuple[subprocess.Popen, str, str]:
    """`opd serve-teacher` for the config's teacher, in its own process: (process, URL, its tokenizer)."""
    import yaml

    from opd_lightning.serve import spawn

    teacher = {}
    for path in config:
        teacher.update((yaml.safe_load(Path(path).read_text()).get("model") or {}).get("teacher") or {})
    args = ["--model", teacher["path"], "--name", "teacher", "--port", "0", "--max-logprobs", str(max_logprobs),
            "--dtype", teacher.get("dtype", "float32")]
    args += ["--gguf-file", teacher["gguf_file"]] if teacher.get("gguf_file") else []
    args += ["--tokenizer", teacher["tokenizer"]] if teacher.get("tokenizer") else []
    process, url = spawn(args)
    return process, url, teacher.get("tokenizer") or teacher["path"]


def overrides(variant: str, args, cache: str | None, server: tuple[str, str] | None = None) -> list[str]:
    out = ["--data.limit_train", str(args.rows), "--data.limit_eval", "1"]
    if args.max_new_tokens:
        out += ["--model.sampling.max_new_tokens", str(args.max_new_tokens), "--model.sampling.stop", "[]"]
    out += ["--model.logits_chunk_size", "null" if variant == "unfused" else str(args.chunk)]
    if "top-k" in variant:
        out += ["--model.teacher_topk", str(args.topk)]
    if "cache" in variant:
        out += ["--model.teacher_cache", cache]
    if "served" in variant:
        url, tokenizer = server
        out += ["--model.teacher", json.dumps({"path": None, "server": {"url": url, "model": "teacher",
                                                                        "top_k": args.server_top_k},
                                               "tokenizer": tokenizer})]
    return out


def high_water_gb(pid: int | str = "self") -> float:
    """The resident high-water mark of process `pid` (this one by default), in GB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # kB


def measure(config: list[str], extra: list[str], steps: int) -> dict:
    """One variant, in this process."""
    from torch.utils.benchmark import Timer

    from opd_lightning.cli import OPDCLI
    from opd_lightning.data import PromptDataModule, collate
    from opd_lightning.module import DistillationModule

    sys.argv[1:] = []
    cli = OPDCLI(DistillationModule, PromptDataModule, run=False, auto_configure_optimizers=False,
                 save_config_callback=None, args=[*(a for c in config for a in ("--config", c)), *extra,
                                                  "--trainer.logger", "false", "--trainer.callbacks", "[]"])
    module, data = cli.model, cli.datamodule
    data.setup()
    batch = collate([data.datasets["train"][i] for i in range(min(data.batch_size, len(data.datasets["train"])))])
    module.manual_backward = lambda loss: loss.backward()  # the step outside a Trainer, as the Trainer runs it
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    trainable = [p for p in module.parameters() if p.requires_grad]
    result = {}
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark from here on: steps only
    for side, on in (("on", True), ("off", False)):
        module.rollout_source.on_policy = lambda step, train, on=on: on

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = module._run_step(batch, train=True)
            if module.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, module.grad_clip_norm)
            optimizer.step()
            return float(loss)

        result[f"{side}_loss"] = step()
        result[f"{side}_seconds"] = Timer("step()", globals={"step": step},
                                          num_threads=torch.get_num_threads()).timeit(steps).mean
    result["peak_gb"] = high_water_gb()
    for side, on in (("on", True), ("off", False)):
        module.rollout_source.on_policy = lambda step, train, on=on: on
        result[f"{side}_tokens"] = int(module.rollouts(batch, train=True)["rollout"].completion_mask.sum())
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help="config (repeat for overlays); default: "
                        "configs/real/gemma3_to_smollm2.yaml")
    parser.add_argument("--rows", type=int, default=16, help="training prompts (one batch of data.batch_size)")
    parser.add_argument("--max-new-tokens", type=int, help="on-policy completion length, stop strings dropped")
    parser.add_argument("--chunk", type=int, default=64, help="model.logits_chunk_size of the fused variants")
    parser.add_argument("--topk", type=int, default=8, help="model.teacher_topk of the top-k variants")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side, after one untimed one")
    parser.add_argument("--server-top-k", type=int, default=20, help="log-probs per position asked of the server")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one variant's measurement, as JSON overrides
    args = parser.parse_args(argv)
    config = args.config or ["configs/real/gemma3_to_smollm2.yaml"]
    if args.case:
        print(json.dumps(measure(config, json.loads(args.case), args.steps)))
        return
    results, cache_note, served_note = {}, "", ""
    with tempfile.TemporaryDirectory(prefix="opd_cache_") as cache:
        if any("cache" in v for v in args.variants):
            command = [sys.executable, "-m", "opd_lightning", "cache-teacher", *(a for c in config for a in
                       ("--config", c)), *overrides("fused + top-k", args, None), "--splits", "train", "--out", cache]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, text=True)
            entry = json.loads((Path(cache) / "manifest.json").read_text())["splits"]["train"]["dataset"]
            cache_note = (f"The cache (`opd cache-teacher`, the same overrides, `--splits train`): {entry['rows']} "
                          f"rows, {entry['tokens']} tokens, {entry['bytes']:,} bytes, **{entry['bytes_per_token']} "
                          f"bytes per token** at k = {args.topk}; written in {time.perf_counter() - start:.1f} s "
                          f"(process start and model loading included; {entry['seconds']} s scoring).")
        for variant in args.variants:
            process, server = None, None
            if "served" in variant:
                process, url, tokenizer = serve(config, args.server_top_k)
                server = (url, tokenizer)
            command = [sys.executable, "-m", "benchmarks.real_step", *(a for c in config for a in ("--config", c)),
                       "--steps", str(args.steps), "--case", json.dumps(overrides(variant, args, cache, server))]
            done = subprocess.run(command, check=False, capture_output=True, text=True)
            if process is not None:
                server_gb = high_water_gb(process.pid)
                process.terminate()
                process.wait(timeout=60)
                served_note = (f"The served teacher (`opd serve-teacher`, `top_k` {args.server_top_k}, in its own "
                               f"process on the same machine): its process peaked at {server_gb:.3f} GB resident "
                               "(model loading included), outside the training process's peak in the table.")
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(lines[-1])
            print(variant, results[variant], flush=True)
    base = results.get("unfused")
    rows = [("| variant | loss, first on-policy step | loss, first off-policy step | peak RSS over the steps (GB) | "
            "peak / unfused | s/step on-policy | s/step off-policy | s/step at λ = 0.5 | time / unfused |"),
            "|---|---|---|---|---|---|---|---|---|"]
    for variant, r in results.items():
        mean = (r["on_seconds"] + r["off_seconds"]) / 2
        ratio = f"{r['peak_gb'] / base['peak_gb']:.3f}" if base else "–"
        speed = f"{mean / ((base['on_seconds'] + base['off_seconds']) / 2):.2f}" if base else "–"
        rows.append(f"| {variant} | {r['on_loss']:.6f} | {r['off_loss']:.6f} | {r['peak_gb']:.3f} | {ratio} | "
                    f"{r['on_seconds']:.2f} | {r['off_seconds']:.2f} | {mean:.2f} | {speed} |")
    first = next(iter(results.values()))
    flags = (f" --max-new-tokens {args.max_new_tokens}" if args.max_new_tokens else "")
    command = (f".venv/bin/python -m benchmarks.real_step {' '.join('--config ' + c for c in config)} --rows "
               f"{args.rows}{flags} --chunk {args.chunk} --topk {args.topk} --steps {args.steps}")
    text = f"""## The real pair's training step: fused output layer, top-k and teacher cache

Command: `{command}`. Date: {datetime.date.today()}. Machine: {machine()}, fp32.
How each variant is built and measured: the docstring of `benchmarks/real_step.py` (the first batch of the first
{args.rows} training prompts: {first["on_tokens"]} valid completion tokens on-policy, {first["off_tokens"]} off-policy;
one untimed step then {args.steps} timed per side).

{chr(10).join(rows)}

{cache_note}

{served_note}"""
    print(text)
    if not args.no_record:
        record(text, "real_step" + (f"_{args.max_new_tokens}" if args.max_new_tokens else ""))


if __name__ == "__main__":
    main()
