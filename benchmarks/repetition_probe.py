"""Does the teacher reward repetition? The precondition of repetition collapse under sampled-token OPD, measured on
the long-completion task.

    .venv/bin/python -m benchmarks.repetition_probe [--rows 200] [--teacher DIR] [--student DIR] [--no-record]

Luo et al. (arXiv 2604.08527) trace the collapse to the per-token advantage `a_t = log p_T(y_t) - log p_S(y_t)`
(what `sampled_token` follows) being several times larger on repeated tokens than on the others once the student
starts to repeat itself: the teacher, copying in context, predicts a repeat more confidently than the student does,
so repeating is reinforced. This probe scores, with the long task's teacher (`configs/long_addition/teacher.yaml`) and
the student distilled from it (`configs/long_addition/distill.yaml`), two completions of each of the first `--rows`
test problems: the gold one, and a looping one, the gold completion's first step written again and again (as a
student caught in a loop writes it: `7+5+0=12,7+5+0=12,...`) up to the gold completion's length. Per kind: the mean
of `a_t` on repeated tokens (those ending an n-gram already in their completion, `repeated_token_mask` with
`diag/repetition_rate`'s n = 3) and on the others, their ratio (`diag/repeat_advantage_ratio`), the share of
repeated tokens with `a_t > 0.01` nats (below that, a rounding error of either sign where both models are certain),
and both models' mean log-probability of the repeated tokens. Needs both models (the two configs' `opd fit` runs).
Writes the table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.quickstart import machine, record
from opd_lightning.data import load_rows
from opd_lightning.diagnostics import DiagnosticsConfig, repeated_token_mask
from opd_lightning.reference import completion_logits
from opd_lightning.rollout import rollout_from_token_lists
from opd_lightning.target import token_logprobs as target_logprobs

TEACHER = Path("runs/long_addition/teacher/hf")
STUDENT = Path("runs/long_addition/distill/hf")
# An advantage counted as positive: above this many nats. Where both models are certain of a token, a_t is a rounding
# error of either sign (its share would move with padding), so it does not count.
SIGNIFICANT = 0.01


def looped(completion: str) -> str:
    """The gold completion's first step repeated, comma separated, cut to the gold completion's length."""
    first = completion.split(",")[0].split(":")[0]
    return ",".join([first] * (len(completion) // (len(first) + 1) + 1))[: len(completion)]


@torch.no_grad()
def token_logprobs(model, tokenizer, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          torch.Tensor]:
    """Each completion token's log-probability under `model` after its prompt: (`[B, N]` log-probs, `[B, N]` ids,
    `[B, N]` mask), built as the library builds an off-policy batch (`rollout_from_token_lists`) and scored at the
    completion positions as a teacher is (`completion_logits`)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    tokens = [tokenizer(c, add_special_tokens=False).input_ids for c in completions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rollout = rollout_from_token_lists(enc["input_ids"], enc["attention_mask"], tokens,
                                       max_new_tokens=max(map(len, tokens)), pad_token_id=pad)
    logits = completion_logits(model, rollout.sequences, rollout.attention_mask, rollout.position_ids,
                               rollout.completion_mask.shape[1])
    ids = rollout.completion_ids
    return target_logprobs(logits, ids), ids, rollout.completion_mask


def probe(teacher_dir: Path, student_dir: Path, rows: int) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    if AutoTokenizer.from_pretrained(student_dir).get_vocab() != tokenizer.get_vocab():
        raise SystemExit("the probe compares token log-probs: the teacher and student must share a tokenizer")
    teacher, student = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (teacher_dir, student_dir))
    problems = load_rows("builtin:long_addition/test", rows)
    prompts = [r["prompt"] for r in problems]
    results = []
    for kind, completions in (("gold", [r["completion"] for r in problems]),
                              ("looping", [looped(r["completion"]) for r in problems])):
        t_logp, ids, mask = token_logprobs(teacher, tokenizer, prompts, completions)
        s_logp, _, _ = token_logprobs(student, tokenizer, prompts, completions)
        advantage = t_logp - s_logp
        repeated = repeated_token_mask(ids, mask, DiagnosticsConfig().ngram) & mask
        other = mask & ~repeated
        mean = lambda x, m: float(x[m].mean()) if m.any() else float("nan")
        results.append({"kind": kind, "tokens": int(mask.sum()), "repeated": int(repeated.sum()),
                        "adv_repeated": mean(advantage, repeated), "adv_other": mean(advantage, other),
                        "positive_repeated": mean((advantage > SIGNIFICANT).float(), repeated),
                        "teacher_repeated": mean(t_logp, repeated), "student_repeated": mean(s_logp, repeated)})
    return results


def table(results: list[dict]) -> str:
    lines = [("| completions | tokens | repeated tokens | mean a_t, repeated | mean a_t, others | ratio "
              "(`diag/repeat_advantage_ratio`) | repeated with a_t > 0.01 | log p_T, repeated | log p_S, repeated |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["adv_repeated"] / r["adv_other"] if r["adv_other"] else float("nan")
        lines.append(f"| {r['kind']} | {r['tokens']:,} | {r['repeated']:,} | {r['adv_repeated']:+.3f} | "
                     f"{r['adv_other']:+.3f} | {ratio:.2f} | {r['positive_repeated']:.3f} | "
                     f"{r['teacher_repeated']:.3f} | {r['student_repeated']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--teacher", type=Path, default=TEACHER)
    parser.add_argument("--student", type=Path, default=STUDENT)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    for path, config in ((args.teacher, "teacher"), (args.student, "distill")):
        if not (path / "config.json").exists():
            raise SystemExit(f"{path} is missing: run `opd fit --config configs/long_addition/{config}.yaml` first")
    results = probe(args.teacher, args.student, args.rows)
    text = f"""## Does the teacher reward repetition? (`long_addition`)

Command: `.venv/bin/python -m benchmarks.repetition_probe --rows {args.rows}`. Date: {datetime.date.today()}.
Machine: {machine()}, fp32. Teacher `{args.teacher}`, student `{args.student}` (what the two configs of
`configs/long_addition/` train); {args.rows} test problems. `a_t = log p_T(y_t) - log p_S(y_t)` at each completion
token; repeated tokens end a 3-gram already in their completion. What each row is: the docstring of
`benchmarks/repetition_probe.py`.

{table(results)}"""
    print(text)
    if not args.no_record:
        record(text, "repetition_probe")


if __name__ == "__main__":
    main()
