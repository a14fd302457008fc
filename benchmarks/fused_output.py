"""One training step's loss and backward from hidden states: unfused, chunked, fused, and Liger-Kernel, side by side.

    .venv/bin/python -m benchmarks.fused_output [--vocab 131072 262144] [--tokens 1024 4096] [--hidden 1024]
        [--methods naive chunked fused liger] [--fused-chunks N ...] [--memory-cap-gb 12] [--min-time 1] [--no-record]

Every case starts from the same inputs: the student's final hidden states `[T, H]` and output layer `[V, H]` (both
trained), and the teacher's hidden states and output layer of the same sizes (frozen), fp32, forward KL at
temperature 1, all T positions valid. One step is the loss and its backward pass:
- `naive`: the student's and the teacher's logits `[T, V]` in full, then the loss in one piece;
- `chunked`: the same logits, the loss with `chunk_size=256` (the library's dense path before the fused layer);
- `fused`: `opd_lightning.losses.fused_dense_divergence`, the teacher as `HiddenRows` (neither side's logits held
  whole), the default chunk (`default_chunk(V)` positions), or with `--fused-chunks` each of those chunk sizes
  (rows `fused@N`; such a run is recorded in its own block);
- `liger`: Liger-Kernel 0.8.5's `LigerFusedLinearJSDLoss` with beta 0 (its forward KL), `weight_hard_loss` 0,
  `compiled=False`, its default chunk of 1,024 positions (`make bench` installs it).
Each case runs in its own process, so that the peak resident set (`ru_maxrss`) is that case's: the table gives the
peak of the whole process (inputs and weights included) and the inputs alone (the peak before the step). A case
that needs more than `--memory-cap-gb` (an address-space limit) is reported as over it. Time: the median of
`torch.utils.benchmark.Timer.blocked_autorange` over at least `--min-time` seconds, after the memory-measuring step;
ratios are against `naive` in the same run (or the unfused `chunked` where `naive` did not fit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys

import torch
from torch.utils.benchmark import Timer

from benchmarks.quickstart import machine, record

METHODS = ("naive", "chunked", "fused", "liger")


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def case(method: str, vocab: int, tokens: int, hidden: int, min_time: float, chunk: int | None = None) -> dict:
    from opd_lightning.losses import LOSSES, HiddenRows, dense_divergence, fused_dense_divergence

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).div_(hidden**0.5).requires_grad_()
    th = torch.randn(tokens, hidden, generator=g)
    tw = torch.randn(vocab, hidden, generator=g).div_(hidden**0.5)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    per_token = LOSSES.build("forward_kl").per_token
    inputs_gb = rss_gb()

    if method in ("naive", "chunked"):
        loss_chunk = None if method == "naive" else 256

        def step() -> float:
            logits, teacher = (h @ w.T).unsqueeze(0), (th @ tw.T).unsqueeze(0)
            loss = dense_divergence(per_token, logits, teacher, mask, chunk_size=loss_chunk)
            loss.backward()
            return float(loss)
    elif method == "fused":
        def step() -> float:
            loss = fused_dense_divergence(per_token, h.unsqueeze(0), w, HiddenRows(th.unsqueeze(0), tw), mask,
                                          chunk_size=chunk)
            loss.backward()
            return float(loss)
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=False)
        labels = torch.zeros(tokens, dtype=torch.long)

        def step() -> float:
            loss = liger(h, w, th, tw, labels)
            loss.backward()
            return float(loss)

    value = step()
    peak_gb = rss_gb()
    grad_norm = float(torch.cat([h.grad.flatten(), w.grad.flatten()]).norm())
    seconds = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time).median
    return {"method": method if chunk is None else f"{method}@{chunk}", "vocab": vocab, "tokens": tokens, "hidden": hidden, "loss": value,
            "grad_norm_first_step": grad_norm, "peak_gb": peak_gb, "inputs_gb": inputs_gb, "seconds": seconds}


def run_case(method: str, vocab: int, tokens: int, hidden: int, cap_gb: float, min_time: float,
             chunk: int | None = None) -> dict:
    command = [sys.executable, "-m", "benchmarks.fused_output", "--case", method, str(vocab), str(tokens), str(hidden),
               "--memory-cap-gb", str(cap_gb), "--min-time", str(min_time), *(["--chunk", str(chunk)] if chunk else [])]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    reason = f"over {cap_gb:g} GB" if "MemoryError" in done.stderr or "DefaultCPUAllocator" in done.stderr \
        else (done.stderr.strip().splitlines() or ["failed"])[-1][:160]
    name = method if chunk is None else f"{method}@{chunk}"
    return {"method": name, "vocab": vocab, "tokens": tokens, "hidden": hidden, "error": reason}


def table(results: list[dict]) -> str:
    rows = [("| V | tokens | method | loss | gradient norm | peak RSS (GB) | inputs (GB) | peak / fused | s / step | "
            "time / unfused |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for (vocab, tokens) in sorted({(r["vocab"], r["tokens"]) for r in results}):
        group = {r["method"]: r for r in results if (r["vocab"], r["tokens"]) == (vocab, tokens)}
        fused = group.get("fused") or next((r for m, r in group.items() if m.startswith("fused")), {})
        base = next((group[m] for m in ("naive", "chunked") if "seconds" in group.get(m, {})), None)
        for method in sorted(group, key=lambda m: (METHODS.index(m.split("@")[0]), int(m.split("@")[1] or 0)
                                                   if "@" in m else 0)):
            r = group[method]
            if "error" in r:
                rows.append(f"| {vocab:,} | {tokens:,} | {method} | – | – | {r['error']} | | | | |")
                continue
            ratio = f"{r['peak_gb'] / fused['peak_gb']:.2f}" if "peak_gb" in fused else "–"
            speed = f"{r['seconds'] / base['seconds']:.2f} ({base['method']})" if base else "–"
            rows.append(f"| {vocab:,} | {tokens:,} | {method} | {r['loss']:.5f} | {r['grad_norm_first_step']:.5g} | "
                        f"{r['peak_gb']:.2f} | "
                        f"{r['inputs_gb']:.2f} | {ratio} | {r['seconds']:.2f} | {speed} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--fused-chunks", type=int, nargs="+", help="fused rows at these chunk sizes (positions)")
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)  # one case's fused chunk
    parser.add_argument("--memory-cap-gb", type=float, default=12.0)
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--case", nargs=4, metavar=("METHOD", "V", "T", "H"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # one measurement, in this process
        cap = int(args.memory_cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        method, vocab, tokens, hidden = args.case[0], *map(int, args.case[1:])
        print(json.dumps(case(method, vocab, tokens, hidden, args.min_time, args.chunk)))
        return
    results = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            for method in args.methods:
                for chunk in (args.fused_chunks or [None]) if method == "fused" else [None]:
                    results.append(run_case(method, vocab, tokens, args.hidden, args.memory_cap_gb, args.min_time,
                                            chunk))
                    print(json.dumps(results[-1]), flush=True)
    title = "the fused path's chunk size" if args.fused_chunks else "one step's loss and backward from hidden states"
    text = f"""## Fused output layer: {title}

Command: `.venv/bin/python -m benchmarks.fused_output --vocab {' '.join(map(str, args.vocab))} --tokens \
{' '.join(map(str, args.tokens))} --hidden {args.hidden} --methods {' '.join(args.methods)}\
{' --fused-chunks ' + ' '.join(map(str, args.fused_chunks)) if args.fused_chunks else ''} --memory-cap-gb \
{args.memory_cap_gb:g}`. Date: {datetime.date.today()}. Machine: {machine()}, fp32.
What each method does, and how memory and time are measured: the docstring of `benchmarks/fused_output.py`. "Loss"
and "gradient norm" (of the hidden states' and output layer's gradients together) are the first step's (the same
inputs in every method of a row group, so they must agree); "inputs" is the
process's peak before the step (the interpreter and libraries and the four weight and hidden-state tensors, built in
place).

{table(results)}"""
    print(text)
    if not args.no_record:
        record(text, "fused_output_chunks" if args.fused_chunks else "fused_output")


if __name__ == "__main__":
    main()
