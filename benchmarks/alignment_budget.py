"""What 5x TRL GOLD's alignment leaves an aligner writing a dense target on the synthetic pairs, and what its parts
and this machine's passes over the teacher's rows cost, in one run on the batches of `benchmarks/alignment.py`.

    .venv/bin/python -m benchmarks.alignment_budget [--pairs synthetic_10 synthetic_90] [--rows 16] [--tokens 256]
        [--min-time 2] [--no-record]

The budget is GOLD's alignment (both sides, `alignment.gold_alignment`) divided by 5, per 1,000 student tokens. Against
it, each timed with `torch.utils.benchmark.Timer.blocked_autorange` (`alignment.timed`) on the same batch and the same
random teacher logits:
- each dense aligner's two parts apart: `teacher_inputs` (re-tokenisation and span alignment) and `project`;
- passes over the aligned teacher rows (`char_level`'s: where both tokenizations start a token), none of them an
  aligner: one read (a sum of each row, no exp: the memory floor), one exp and sum of each row by PyTorch
  (`exp_blocks`, MKL's vector exp) and by glibc's vectorised `expf` (libmvec, AVX-512 where the CPU has it; a C loop
  compiled here with the system's C compiler, skipped where there is none: a second exp, to tell the machine from
  the library), the same exp fused with the scatter into the 258 byte classes in one C loop that never writes the
  exps out (what a native kernel would make of `char_level`'s pass), one scatter-sum of exps already in cache into the 258 byte classes (`ColumnSums`, as `char_level`
  adds them) and into the student's columns (the first level of `byte_spans`; `bpe_subset`'s is alike), the top 10 of exps
  in cache (`block_topk`, as `mined` takes them), and one row of the student's vocabulary size written per aligned
  row into a `[B, N, V_s]` target (the row's logits copied: what `vocab_map`, `byte_spans`, `bpe_subset` and `mined`
  write, without their exps).
Each pass is a floor for the aligners that make it: an aligner's time can be read against the sum of its passes and
its re-tokenisation.
`--no-record` prints the tables without writing them into `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from opd_lightning.aligners.rows import block_topk, copy_rows_, exp_blocks
from opd_lightning.aligners.text import target_rows
from opd_lightning.losses import TEACHER_LOGITS

from benchmarks.alignment import (
    aligned_starts,
    bound_aligner,
    gold_alignment,
    make_rollout,
    random_logits,
    student_softmax,
    synthetic_pair,
    text_bank,
    timed,
)
from benchmarks.quickstart import machine, record
from opd_lightning.target import row_view

DENSE = ("vocab_map", "byte_spans", "bpe_subset", "char_level", "mined")  # the aligners writing a dense target
SPEEDUP = 5  # the target: this many times faster than GOLD's alignment
TOPK = 10  # `mined`'s default top-k

LOOPS = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>

void exp_sums(const float* base, const long* rows, long n, long width, float* totals, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (long i = 0; i < n; i++) {
    const float* x = base + rows[i] * width;
    float s = 0.f;
    #pragma omp simd reduction(+:s)
    for (long j = 0; j < width; j++) s += expf(x[j]);
    totals[i] = s;
  }
}

/* exp of each row, added into its class (four interleaved copies of the classes, summed at the end), one row at a
   time: the exps of 256 columns at a time in a small buffer, never written out. */
void exp_class_sums(const float* base, const long* rows, long n, long width, const int* cls, long size,
                    float* out, int threads) {
  #pragma omp parallel num_threads(threads)
  {
    float* acc = malloc(sizeof(float) * 4 * size);
    float tmp[256];
    #pragma omp for schedule(static)
    for (long i = 0; i < n; i++) {
      const float* x = base + rows[i] * width;
      memset(acc, 0, sizeof(float) * 4 * size);
      for (long j0 = 0; j0 < width; j0 += 256) {
        long m = width - j0 < 256 ? width - j0 : 256, k = 0;
        #pragma omp simd
        for (long q = 0; q < m; q++) tmp[q] = expf(x[j0 + q]);
        for (; k + 4 <= m; k += 4) {
          acc[cls[j0 + k]] += tmp[k];
          acc[size + cls[j0 + k + 1]] += tmp[k + 1];
          acc[2 * size + cls[j0 + k + 2]] += tmp[k + 2];
          acc[3 * size + cls[j0 + k + 3]] += tmp[k + 3];
        }
        for (; k < m; k++) acc[cls[j0 + k]] += tmp[k];
      }
      float* o = out + i * size;
      for (long c = 0; c < size; c++) o[c] = (acc[c] + acc[size + c]) + (acc[2 * size + c] + acc[3 * size + c]);
    }
    free(acc);
  }
}
"""


@cache
def compiled_loops() -> SimpleNamespace | None:
    """Two C loops compiled here (`-O3 -march=native -ffast-math`, which lets GCC call glibc's vectorised `expf`,
    libmvec; 512-bit vectors preferred), run on torch's thread count over rows `index` of a `[R, V]` fp32 tensor:
    `exp_sums(rows, index, totals)`, Σ_j exp(rows[index[i], j]) into `totals[i]`; `exp_class_sums(rows, index,
    classes, out)`, Σ_j exp(rows[index[i], j]) added into `out[i, classes[j]]` (`classes` int32 `[V]`, each in
    `0..out.shape[1]`), the exps never written out. None where no C compiler or libmvec is found."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    folder = Path(tempfile.mkdtemp(prefix="exp_loops_"))
    (folder / "loops.c").write_text(LOOPS)
    command = [compiler, "-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-fPIC",
               "-shared", str(folder / "loops.c"), "-o", str(folder / "loops.so"), "-lmvec", "-lm"]
    built = not subprocess.run(command, check=False, capture_output=True).returncode
    library = ctypes.CDLL(str(folder / "loops.so")) if built else None
    shutil.rmtree(folder)  # a loaded library stays mapped
    if library is None:
        return None
    pointer, long, threads = ctypes.c_void_p, ctypes.c_long, lambda: ctypes.c_int(torch.get_num_threads())

    def check(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
        assert rows.dtype == out.dtype == torch.float32 and rows.is_contiguous() and out.is_contiguous()
        assert index.dtype == torch.long and index.is_contiguous() and len(out) == len(index)

    def exp_sums(rows: torch.Tensor, index: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
        check(rows, index, totals)
        library.exp_sums(pointer(rows.data_ptr()), pointer(index.data_ptr()), long(len(index)), long(rows.shape[1]),
                         pointer(totals.data_ptr()), threads())
        return totals

    def exp_class_sums(rows: torch.Tensor, index: torch.Tensor, classes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        check(rows, index, out)
        assert classes.dtype == torch.int32 and len(classes) == rows.shape[1]
        assert 0 <= int(classes.min()) and int(classes.max()) < out.shape[1]
        library.exp_class_sums(pointer(rows.data_ptr()), pointer(index.data_ptr()), long(len(index)),
                               long(rows.shape[1]), pointer(classes.data_ptr()), long(out.shape[1]),
                               pointer(out.data_ptr()), threads())
        return out

    return SimpleNamespace(exp_sums=exp_sums, exp_class_sums=exp_class_sums)


def passes(student, teacher, rollout, logits: torch.Tensor) -> list[tuple[str, Callable[[], torch.Tensor] | None]]:
    """The timed passes over the aligned teacher rows: (label, function; None where it cannot run here). Each
    function returns what it computed: the rows' sums `[n]`; their exps' sums `[n]`; from the first block of exps,
    taken again for every block, its byte classes' sums `[c, 258]`, its student columns' sums `[c, V_s + 1]` or its
    top-k `([c, k], [c, k])`; every row's byte classes' sums by the fused loop `[n, 258]`; or the target's rows
    `[B * N, V_s]`."""
    aligner, spans = bound_aligner("char_level", student, teacher), bound_aligner("byte_spans", student, teacher)
    at = aligned_starts(aligner, rollout)
    batch, pos = (at >= 0).nonzero(as_tuple=True)
    t_pos, size = at[batch, pos], min(len(student), logits.shape[-1])
    view, per = row_view(logits)
    index = (batch * per + t_pos).contiguous()
    totals, exps = torch.empty(len(batch)), torch.empty(len(batch))
    cached = next(exp_blocks(logits, batch, t_pos))[2].clone()  # one block of exps, summed again and again
    sums, columns = torch.empty(len(cached), 258), torch.empty(len(cached), len(student) + 1)
    loops = compiled_loops()
    classes = aligner.teacher_classes[: logits.shape[-1]]
    classes = classes.where(classes >= 0, 257).int().contiguous()  # the skipped tokens in the last column
    fused = torch.empty(len(batch), 258)
    cuts = (np.flatnonzero(np.diff(index.numpy()) != 1) + 1).tolist()
    row_runs = [(a, b, int(index[a])) for a, b in zip([0, *cuts], [*cuts, len(index)], strict=True)]

    def read() -> torch.Tensor:  # each run of consecutive rows summed where it lies: no copy, no exp
        for a, b, first in row_runs:
            torch.sum(view[first : first + b - a], -1, out=totals[a:b])
        return totals

    def exp_torch() -> torch.Tensor:
        for lo, hi, probs in exp_blocks(logits, batch, t_pos):
            torch.sum(probs, -1, out=exps[lo:hi])
        return exps

    def write() -> torch.Tensor:  # each aligned row's first V_s logits copied into a [B, N, V_s] target
        flat = target_rows((*at.shape, size), batch, pos).view(-1, size)
        copy_rows_(flat, (batch * at.shape[1] + pos).numpy(), view[:, :size], index.numpy())
        return flat

    def topk() -> tuple[torch.Tensor, torch.Tensor]:
        for lo in range(0, len(batch), len(cached)):
            top = block_topk(cached[: min(len(cached), len(batch) - lo)], TOPK)
        return top

    def scatter(column_sums, out: torch.Tensor) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            for lo in range(0, len(batch), len(cached)):
                n = min(len(cached), len(batch) - lo)
                column_sums(cached[:n], keep_skipped=True, out=out[:n])
            return out
        return run

    return [("one read of each aligned teacher row (a sum, no exp): the memory floor", read),
            ("one exp and sum of each aligned teacher row, PyTorch (MKL)", exp_torch),
            ("one exp and sum of each aligned teacher row, glibc libmvec compiled here",
             None if loops is None else lambda: loops.exp_sums(view, index, exps)),
            ("one scatter-sum of exps in cache into 258 byte classes (`ColumnSums`)",
             scatter(aligner.teacher_sums, sums)),
            ("one scatter-sum of exps in cache into the student's columns (`byte_spans`' first level)",
             scatter(spans.root_sums, columns)),
            ("exp and scatter-sum into 258 byte classes, one fused C loop compiled here (libmvec's exp)",
             None if loops is None else lambda: loops.exp_class_sums(view, index, classes, fused)),
            (f"the top {TOPK} of exps in cache (`block_topk`)", topk),
            ("one student-vocabulary row written per aligned teacher row (its logits copied, no exp)", write)]


def aligner_parts(name: str, student, teacher, rollout, logits: torch.Tensor
                  ) -> tuple[Callable[[], object], Callable[[], object]]:
    """An aligner's `teacher_inputs` and its `project` (on inputs made once), as two functions to time."""
    aligner = bound_aligner(name, student, teacher)
    inputs = aligner.teacher_inputs(rollout)
    needs = frozenset({TEACHER_LOGITS})
    aligner.project(logits, inputs, rollout, needs)  # warm-up (`mined`'s cache of nearest spellings)
    return (lambda: aligner.teacher_inputs(rollout)), (lambda: aligner.project(logits, inputs, rollout, needs))


def run_pair(pair: str, bank: str, rows: int, tokens: int, min_time: float) -> list[dict]:
    """Rows of the pair's table: (part, ms per 1,000 tokens or None, note); the first is GOLD, the second the budget."""
    student, teacher = synthetic_pair(bank, int(pair.split("_")[1]) / 100)
    rollout = make_rollout(student, bank, rows, tokens)
    logits = random_logits(student, teacher, rollout)
    per_1k = 1e6 / int(rollout.completion_mask.sum())  # seconds of the batch -> ms per 1,000 tokens
    gold_step = gold_alignment(student, teacher, rollout, logits, student_softmax(student, rollout))[0]
    gold = timed(gold_step, min_time)[0] * per_1k
    del gold_step  # and the student softmax it holds
    table = [{"part": "GOLD (TRL 1.16), both sides: the baseline", "ms": gold},
             {"part": f"the budget: GOLD / {SPEEDUP}", "ms": gold / SPEEDUP}]
    for label, step in passes(student, teacher, rollout, logits):
        table.append({"part": label, "ms": None if step is None else timed(step, min_time)[0] * per_1k,
                      "note": "no C compiler or libmvec here" if step is None else ""})
    for name in DENSE:
        inputs, project = (timed(step, min_time)[0] * per_1k for step in aligner_parts(name, student, teacher,
                                                                                       rollout, logits))
        table.append({"part": f"`{name}`: `teacher_inputs`", "ms": inputs})
        table.append({"part": f"`{name}`: `project`", "ms": project,
                      "note": f"whole: {inputs + project:.1f} ms, {gold / (inputs + project):.1f}x GOLD"})
    return table


def markdown(table: list[dict]) -> str:
    budget = table[1]["ms"]
    lines = ["| part | ms / 1k tokens | share of the budget | note |", "|---|---|---|---|"]
    for row in table:
        ms = "" if row["ms"] is None else f"{row['ms']:.2f}"
        share = "" if row["ms"] is None else f"{row['ms'] / budget:.2f}"
        lines.append(f"| {row['part']} | {ms} | {share} | {row.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["synthetic_10", "synthetic_90"],
                        choices=["synthetic_10", "synthetic_90"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per part, at least")
    parser.add_argument("--no-record", action="store_true", help="print the tables only; leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bank = text_bank()
    for pair in args.pairs:
        share = pair.removeprefix("synthetic_")
        section = f"""### The 5x GOLD budget: synthetic byte-level BPE, the student keeps {share}% of the teacher's merges

Command: `.venv/bin/python -m benchmarks.alignment_budget --pairs {pair} --rows {args.rows} --tokens {args.tokens}`.
Date: {datetime.date.today()}. Machine: {machine()}, fp32.

{markdown(run_pair(pair, bank, args.rows, args.tokens, args.min_time))}"""
        print(section, flush=True)
        if not args.no_record:
            record(section, f"alignment_budget_{pair}")


if __name__ == "__main__":
    main()
