"""Run the embedded default (`make demo`) and record its table and stage timings in benchmarks/RESULTS.md.

    .venv/bin/python -m benchmarks.quickstart

Whole-stage wall time is the measure here (each stage is one `opd fit`, start-up included); the gold-task scores
come from the lm-eval callback of the distillation stage.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
from pathlib import Path

import torch
import yaml

from opd_lightning.demo import main as demo

RESULTS = Path(__file__).with_name("RESULTS.md")


def mean_sd(values: list[float], digits: int = 3) -> str:
    """Mean ± sample standard deviation of `values`; the mean alone for one value (no spread measured)."""
    mean = statistics.mean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def record(section: str, name: str = "quickstart") -> None:
    """Replace (or append) the block between `name`'s markers in RESULTS.md with `section`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{start}\n{section}\n{end}"
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), block, text, flags=re.DOTALL) if start in text \
        else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def _table(result: dict) -> str:
    return "\n".join(f"| {k} | {result[k]:.3f} |" for k in ("teacher", "student_before", "student_after"))


def main() -> None:
    results = demo([])
    same, cross = results["distill"], results["distill_cross"]
    timings = json.loads(Path("runs/quickstart/timings.json").read_text())
    cross_s = json.loads(Path("runs/quickstart_cross/timings.json").read_text())["distill_stage_s"]
    total = timings["teacher_stage_s"] + timings["distill_stage_s"] + cross_s
    model = yaml.safe_load(Path("configs/quickstart/distill_cross.yaml").read_text())["model"]
    topk = model.get("teacher_topk")
    terms = [t.get("init_args", t) for t in model.get("extra_terms") or []]  # the short or the class_path form
    extra = [f"`{t['loss']}` on the {t.get('completions', 'rollout')} completions (weight {t.get('weight', 1.0)})"
             for t in terms]
    target = (f", teacher top-{topk} + tail bucket" if topk else ", the whole teacher target"
              if model["loss"] != "cross_entropy" else "")
    recipe = (f"aligner `{model['aligner']}`, loss `{model['loss']}`{target}"
              + f", λ = {model['rollout']['on_policy_fraction']}" + "".join(f", plus {e}" for e in extra)
              + " (the shipped row of \"Across tokenizers: where the transfer is lost\" below)")
    record(f"""## Quickstart (`make demo`)

Command: `.venv/bin/python -m benchmarks.quickstart` (runs what `make demo` runs). Date: {datetime.date.today()}.
Machine: {machine()}, fp32.

Task `{same['task']}`, metric `{same['metric']}` (lm-eval, 500 held-out problems, greedy).

Same tokenizer (`configs/quickstart/distill.yaml`, `runs/quickstart/eval.json`):

| model | score |
|---|---|
{_table(same)}

Across tokenizers (`configs/quickstart/distill_cross.yaml`, `runs/quickstart_cross/eval.json`): the character-level
teacher into a student with a byte-level BPE tokenizer; {recipe}:

| model | score |
|---|---|
{_table(cross)}

Gains: {same['student_after'] - same['student_before']:+.3f} (same tokenizer),
{cross['student_after'] - cross['student_before']:+.3f} (across tokenizers). Stage wall times: teacher training
{timings['teacher_stage_s']:.0f} s, same-tokenizer distillation (including the three lm-eval runs)
{timings['distill_stage_s']:.0f} s, cross-tokenizer distillation {cross_s:.0f} s; total {total:.0f} s.""")


if __name__ == "__main__":
    main()
