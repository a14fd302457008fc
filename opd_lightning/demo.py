"""`make demo`: the embedded default, end to end, in one command.

Stage 1 trains a small teacher on the shipped arithmetic task (supervised, `configs/quickstart/teacher.yaml`)
and exports it in Hugging Face format. Stage 2 distils it on-policy into a smaller, freshly initialised student
that shares its tokenizer (`configs/quickstart/distill.yaml`); stage 3 distils the same teacher into a student
with a different tokenizer (`configs/quickstart/distill_cross.yaml`, byte-level BPE against the teacher's
characters). Each distillation's lm-eval callback scores the teacher, the student before the first step and the
student after the last against the gold answers. The demo prints the tables and writes
`runs/quickstart/eval.json` and `runs/quickstart_cross/eval.json` = {task, metric, teacher, student_before,
student_after}, plus stage timings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

__all__ = ["main", "summarise"]

REPO = Path(__file__).resolve().parents[1]


def summarise(history_file: Path, task: str, metric: str) -> dict:
    """Teacher, first and last student scores from an `LmEvalCallback` history file."""
    entries = [json.loads(line) for line in history_file.read_text().splitlines() if line.strip()]
    score = {e["model"] + ":" + e["stage"]: e["results"][task][metric] for e in entries}
    students = [e for e in entries if e["model"] == "student"]
    if "student:fit_start" not in score or "teacher:fit_start" not in score or len(students) < 2:
        raise RuntimeError(f"{history_file} lacks the teacher, before and after evaluations: {sorted(score)}")
    return {"task": task, "metric": metric, "teacher": score["teacher:fit_start"],
            "student_before": score["student:fit_start"], "student_after": students[-1]["results"][task][metric]}


def run_stage(config: Path, extra: list[str]) -> float:
    from opd_lightning.cli import main as cli

    start = time.perf_counter()
    cli(["fit", "--config", str(config), *extra])
    return time.perf_counter() - start


def report(out: Path, result: dict, timings: dict) -> None:
    """Write `eval.json` and `timings.json` under `out` and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\n{result['task']} ({result['metric']}, lm-eval, {out / 'eval.json'})")
    print("| model | score |\n|---|---|")
    for key in ("teacher", "student_before", "student_after"):
        print(f"| {key} | {result[key]:.3f} |")
    gain = result["student_after"] - result["student_before"]
    print(f"gain {gain:+.3f}; " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s"
                                           for k, v in timings.items()))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the demo; returns each distillation's summary by config name (`distill`, `distill_cross`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=REPO / "configs" / "quickstart")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--cross-out", type=Path, default=Path("runs/quickstart_cross"))
    parser.add_argument("--skip-cross", action="store_true", help="only the same-tokenizer distillation")
    args = parser.parse_args(argv)
    for out in (args.out, args.cross_out):
        shutil.rmtree(out, ignore_errors=True)  # the demo is a fresh, seeded run every time
    teacher_s = run_stage(args.configs / "teacher.yaml", [])
    results = {}
    stages = [("distill", args.out)] + ([] if args.skip_cross else [("distill_cross", args.cross_out)])
    for config, out in stages:
        timings = {"teacher_stage_s": teacher_s, "distill_stage_s": run_stage(args.configs / f"{config}.yaml", [])}
        results[config] = summarise(out / "distill" / "logs" / "version_0" / "eval_history.jsonl", "arithmetic",
                                    "exact_match")
        report(out, results[config], timings)
    return results


if __name__ == "__main__":
    main()
