"""`make demo`: the embedded default, end to end, in one command.

Stage 1 trains a small teacher on the shipped arithmetic task (supervised, `configs/quickstart/teacher.yaml`)
and exports it in Hugging Face format. Stage 2 distils it on-policy into a smaller, freshly initialised student
(`configs/quickstart/distill.yaml`); its lm-eval callback scores the teacher, the student before the first step
and the student after the last against the gold answers. The demo prints the table and writes
`runs/quickstart/eval.json` = {task, metric, teacher, student_before, student_after} plus stage timings.
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=REPO / "configs" / "quickstart")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)  # the demo is a fresh, seeded run every time
    timings = {"teacher_stage_s": run_stage(args.configs / "teacher.yaml", []),
               "distill_stage_s": run_stage(args.configs / "distill.yaml", [])}
    result = summarise(args.out / "distill" / "logs" / "version_0" / "eval_history.jsonl", "arithmetic",
                       "exact_match")
    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\n{result['task']} ({result['metric']}, lm-eval, {args.out / 'eval.json'})")
    print("| model | score |\n|---|---|")
    for key in ("teacher", "student_before", "student_after"):
        print(f"| {key} | {result[key]:.3f} |")
    gain = result["student_after"] - result["student_before"]
    print(f"gain {gain:+.3f}; teacher stage {timings['teacher_stage_s']:.0f} s, "
          f"distillation stage {timings['distill_stage_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
