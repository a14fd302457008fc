"""How far each aligner's target is from the exact one, and what exactness costs in teacher calls.

    .venv/bin/python -m benchmarks.exact_targets [--rows 32] [--no-record]

On the quickstart pair (the trained character-level teacher, `runs/quickstart/teacher/hf`, and the byte-level BPE
student tokenizer) the exact target at a student position is the teacher's distribution over the student's next
token, enumerated by brute force with one full teacher forward per node of the continuation tree
(`tests/aligner_reference.py`). The rollouts are test problems completed two ways: with their gold answers (the
text a good student writes), and with wrong answers (the gold answer plus a random offset of 1 to 30, the text a
student writes early in training, where the teacher's mass lies off the realised path). For every aligner that
gives a dense target in the student's vocabulary, the table reports KL(exact ‖ target) per position (mean and
maximum over the positions both cover; a target without mass on a token the teacher can write reads as the
aligners' log-probability floor, -80) and the positions it covers. For `exact_spans` it also reports the teacher
tokens its branch queries add, as a share of the main pass's tokens, and its time per batch against the main forward
pass (both with `torch.utils.benchmark`, in the same run).
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
from pathlib import Path

import torch
from opd_lightning.aligners import ALIGNERS, prefixless_encoder
from torch.utils import benchmark

from benchmarks.quickstart import machine, record
from benchmarks.teachers import teacher_dir
from opd_lightning.models import HFModel
from opd_lightning.reference import ReferenceScorer, completion_logits
from opd_lightning.rollout import Rollout
from opd_lightning.target import TEACHER_LOGITS
from opd_lightning.tasks.arithmetic import load_problems

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from aligner_reference import brute_force_next_token

TEACHER = Path("runs/quickstart/teacher/hf")
ORACLE = teacher_dir("builtin:arithmetic_bpe")  # the ablation's teacher with the student's tokenizer
ALIGNERS_COMPARED = {
    "byte_spans": {}, "vocab_map": {}, "mined": {},
    "exact_spans (branches 2, depth 1, min_mass 0)": {"branches": 2, "depth": 1, "min_mass": 0.0},
    "exact_spans (branches 8, depth 4, min_mass 0)": {"min_mass": 0.0},
    "exact_spans (defaults: branches 8, depth 4, min_mass 1e-4)": {},
    "exact_spans (min_mass 1e-3, unbounded otherwise)": {"branches": None, "depth": None, "min_mass": 1e-3},
    "exact_spans (unbounded: min_mass 0)": {"branches": None, "depth": None, "min_mass": 0.0},
}


def rollouts(student_tok, rows: int) -> dict[str, Rollout]:
    """Gold and wrong completions of the first `rows` test problems, in the student's tokens, ending with EOS."""
    problems = load_problems("test")[:rows]
    rng = random.Random(0)
    out = {}
    for kind in ("gold", "wrong"):
        texts = [p["completion"] if kind == "gold" else str(int(p["completion"]) + rng.randint(1, 30))
                 for p in problems]
        prompts = [student_tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in problems]
        comps = [student_tok(t, add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id] for t in texts]
        p_len, c_len = max(map(len, prompts)), max(map(len, comps))
        seq = torch.zeros(rows, p_len + c_len, dtype=torch.long)
        att = torch.zeros_like(seq)
        comp_mask = torch.zeros(rows, c_len, dtype=torch.bool)
        for r, (p, c) in enumerate(zip(prompts, comps, strict=True)):
            seq[r, p_len - len(p) : p_len], seq[r, p_len : p_len + len(c)] = torch.tensor(p), torch.tensor(c)
            att[r, p_len - len(p) : p_len + len(c)] = 1
            comp_mask[r, : len(c)] = True
        out[kind] = Rollout(seq, att, comp_mask, p_len, torch.zeros(rows, dtype=torch.bool), False)
    return out


def exact_targets(teacher, aligner, rollout: Rollout) -> dict[tuple[int, int], torch.Tensor]:
    """The brute-force target at every student position with a teacher token at its start."""
    inputs = aligner.teacher_inputs(rollout)
    view = inputs.alignment
    prompt = view.input_ids.shape[1] - view.teacher_ids.shape[1]
    encoder = prefixless_encoder(aligner.student_tokenizer)
    out = {}
    for b, i in (rollout.completion_mask & (view.teacher_at_start >= 0)).nonzero().tolist():
        ids = inputs.input_ids[b][inputs.attention_mask[b].bool()].tolist()
        n_prompt = int(inputs.attention_mask[b, :prompt].sum())
        out[b, i] = brute_force_next_token(teacher, ids[: n_prompt + int(view.teacher_at_start[b, i])], b"",
                                           aligner.teacher_bytes, aligner.student_bytes,
                                           lambda text: encoder.encode(text.decode()).ids, aligner.student_vocab_size)
    return out


def measure(name: str, options: dict, teacher, teacher_tok, student_tok, batches, exact) -> dict:
    aligner = ALIGNERS.build(name.split(" ")[0], **options)
    aligner.bind(student_tok, teacher_tok, len(student_tok), teacher.config.vocab_size)
    scorer = ReferenceScorer(aligner, teacher, None)
    covered, total, row = 0, 0, {"aligner": name}
    for kind, rollout in batches.items():
        target = scorer.teacher_target(rollout, frozenset({TEACHER_LOGITS}), None)
        total += len(exact[kind])
        kls = []
        for (b, i), want in exact[kind].items():
            if not bool(target.mask[b, i]):
                continue
            covered += 1
            logp = target.logits[b, i].double().log_softmax(-1)
            support = want > 0
            kls.append(float((want[support] * (want[support].log() - logp[support])).sum()))
        row[kind] = (sum(kls) / max(len(kls), 1), max(kls, default=0.0))
    row["covered"] = covered / max(total, 1)
    if aligner.queries_teacher:
        rollout = batches["wrong"]
        inputs = aligner.teacher_inputs(rollout)

        def forward():
            return completion_logits(teacher, inputs.input_ids, inputs.attention_mask, inputs.position_ids,
                                     inputs.completion_length)

        def target():
            return scorer.teacher_target(rollout, frozenset({TEACHER_LOGITS}), None)

        with torch.no_grad():
            f = benchmark.Timer("forward()", globals={"forward": forward}).blocked_autorange(min_run_time=1.0)
            t = benchmark.Timer("target()", globals={"target": target}).blocked_autorange(min_run_time=1.0)
        target()
        row.update(query_share=aligner.last_query_tokens / int(inputs.attention_mask.sum()),
                   forward_ms=f.median * 1e3, target_ms=t.median * 1e3)
    return row


def against_oracle(student_tok, teacher, teacher_tok, rollout: Rollout) -> str:
    """The exact target from the character teacher against the oracle teacher's own distribution (same student
    tokenizer, same score), per completion position of the gold answers: how differently two equally accurate
    teachers spread their mass over the student's tokens."""
    source = HFModel(path=str(ORACLE))
    oracle_tok = source.load_tokenizer()
    oracle = source.load_model(oracle_tok).eval()
    targets = []
    for model, tok, name in ((teacher, teacher_tok, "exact_spans"), (oracle, oracle_tok, "identity")):
        unbounded = {"branches": None, "depth": None, "min_mass": 0.0}
        aligner = ALIGNERS.build(name, **(unbounded if name == "exact_spans" else {}))
        aligner.bind(student_tok, tok, len(student_tok), model.config.vocab_size)
        target = ReferenceScorer(aligner, model, None).teacher_target(rollout, frozenset({TEACHER_LOGITS}), None)
        targets.append(target.logits[..., : len(student_tok)].double().log_softmax(-1))
    exact, own = targets
    ids = rollout.completion_ids.unsqueeze(-1)
    kl = (exact.exp() * (exact - own)).sum(-1)
    p_exact, p_own = exact.gather(-1, ids).squeeze(-1).exp(), own.gather(-1, ids).squeeze(-1).exp()
    agree = exact.argmax(-1) == own.argmax(-1)
    header = ("| completion position | positions | KL(exact ‖ oracle) | p(gold token): exact | oracle | same argmax | "
              "second-best > 0.1: exact | oracle |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for i in range(rollout.completion_mask.shape[1]):
        m = rollout.completion_mask[:, i]
        if not m.any():
            continue
        second = [t[:, i].exp().topk(2, -1).values[:, 1][m] for t in (exact, own)]
        lines.append(f"| {i} | {int(m.sum())} | {kl[:, i][m].mean():.3f} | {p_exact[:, i][m].mean():.3f} | "
                     f"{p_own[:, i][m].mean():.3f} | {agree[:, i][m].double().mean():.3f} | "
                     f"{(second[0] > 0.1).double().mean():.3f} | {(second[1] > 0.1).double().mean():.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--no-record", action="store_true", help="print the table without writing RESULTS.md")
    args = parser.parse_args(argv)
    if not (TEACHER / "config.json").exists():
        raise SystemExit(f"{TEACHER} is missing: run `make demo` (or the quickstart teacher stage) first")
    source = HFModel(path=str(TEACHER))
    teacher_tok = source.load_tokenizer()
    teacher = source.load_model(teacher_tok).eval()
    student_tok = HFModel(config={}, tokenizer="builtin:arithmetic_bpe").load_tokenizer()
    batches = rollouts(student_tok, args.rows)
    reference = ALIGNERS.build("exact_spans")
    reference.bind(student_tok, teacher_tok, len(student_tok), teacher.config.vocab_size)
    exact = {kind: exact_targets(teacher, reference, r) for kind, r in batches.items()}
    rows = [measure(n, o, teacher, teacher_tok, student_tok, batches, exact) for n, o in ALIGNERS_COMPARED.items()]
    header = ("| aligner | KL(exact ‖ target), gold answers: mean (max) | wrong answers: mean (max) | positions covered | "
              "branch-query tokens / main-pass tokens | target time / teacher forward |")
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        extra = (f"{r['query_share']:.2f} | {r['target_ms']:.1f} ms / {r['forward_ms']:.1f} ms = "
                 f"{r['target_ms'] / r['forward_ms']:.2f}" if "query_share" in r else "– (none) | –")
        kl = " | ".join(f"{r[kind][0]:.4f} ({r[kind][1]:.3f})" for kind in ("gold", "wrong"))
        lines.append(f"| {r['aligner']} | {kl} | {r['covered']:.3f} | {extra} |")
    text = f"""## Exact targets across tokenizers: distance from the brute-force target

Command: `.venv/bin/python -m benchmarks.exact_targets --rows {args.rows}`. Date: {datetime.date.today()}.
Machine: {machine()}, fp32. Quickstart pair: the character-level teacher (`{TEACHER}`), the byte-level BPE
student tokenizer; {args.rows} test problems with gold answers and {args.rows} with wrong ones, EOS after each
({sum(len(e) for e in exact.values())} aligned positions). The exact target is the brute-force enumeration of
`tests/aligner_reference.py` (one full teacher forward per tree node). `char_level` targets the next byte, not the
student's vocabulary, and `bpe_subset` refuses this pair; neither is in the table. "Target time" is the whole
teacher target of `exact_spans` (main forward, re-tokenisation, branch queries, projection) on the wrong-answer
batch; "teacher forward" is the main forward alone.

{chr(10).join(lines)}"""
    if (ORACLE / "config.json").exists():
        text += f"""

The exact target against the oracle teacher (`{ORACLE}`, the student's own tokenizer, trained by
`benchmarks/teachers.py` to the character teacher's score) on the {args.rows} gold answers, per completion
position (0: the answer's first token; then EOS or its second token):

{against_oracle(student_tok, teacher, teacher_tok, batches["gold"])}"""
    print(text)
    if not args.no_record:
        record(text, "exact_targets")


if __name__ == "__main__":
    main()
