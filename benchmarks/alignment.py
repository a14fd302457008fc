"""Every cross-tokenizer aligner side by side: exactness, coverage, time per 1,000 tokens against TRL's GOLD, peak memory.

    .venv/bin/python -m benchmarks.alignment [--pairs synthetic_10 synthetic_90 real] [--rows 16] [--tokens 256]
        [--min-time 2] [--no-record]

Pairs: the real SmolLM2-135M student against the Gemma-3-270M teacher (`make real-models`), and synthetic
byte-level BPE pairs where the student keeps 10% and 90% of the teacher's merges (an 8,000-token teacher trained
here on the text bank below). Each batch is `--rows` completions of `--tokens` student tokens cut from the text
bank (code, prose, CJK, emoji, accents, numbers, whitespace runs). The timed part is what an aligner adds to a
training step: `teacher_inputs` (re-tokenisation and span alignment) plus `project` (targets at the student's
positions, for a dense same-vocabulary loss; where the target reads the teacher's rows only when indexed, `xtoken`'s
native logits, the rows at its mask as its losses read them), the median of
`torch.utils.benchmark.Timer.blocked_autorange` over at least `--min-time` seconds and three runs. The baseline, timed on the same batch and the same teacher logits in the
same run, is what TRL's GOLD trainer (trl 1.16, `use_uld_loss`, its defaults) does for alignment in a step
(`gold_alignment`); "× GOLD" is its time over the aligner's. Peak memory is the process's resident-set peak above
its level before a call (the largest of three calls). On the real pair the teacher's logits come from a real
Gemma-3-270M forward pass on the same batch, which is timed too: the speed target is align + project under 10% of
that forward pass. A "bound" row times, on the same rows, what any target carrying the teacher's whole distribution
into another space must do at least (`floor_step`: one exp and one scatter-sum of each aligned teacher row, done
the fastest way the library knows), so that a ratio an aligner misses can be read against what the machine allows;
a second one what any target in the student's vocabulary must do at least (`write_step`: one exp-and-sum pass over
each aligned teacher row and one student-vocabulary row written per position).
`--no-record` prints the tables without writing them into `benchmarks/RESULTS.md`.

Exactness is measured against the brute-force references of `tests/aligner_reference.py` where a method claims
exactness (`bpe_subset`: teacher likelihood of the next student token; `char_level`: next-byte distributions), as
the share of spans whose bytes agree on both sides (`byte_spans`, `vocab_map`), and is "approximate" for `mined`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from opd_lightning.aligners import ALIGNERS, TeacherHidden, keep_merges, prefixless_encoder
from opd_lightning.losses import HIDDEN_STATES, TEACHER_LOGITS, TEACHER_NATIVE_LOGITS, VOCAB_PROJECTION
from torch.utils.benchmark import Timer

from benchmarks.quickstart import machine, record
from opd_lightning.rollout import Rollout
from opd_lightning.target import PositionRows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from aligner_reference import first_byte_distribution, spell_with_model, subset_conditional

ALIGNER_NAMES = ("vocab_map", "byte_spans", "bpe_subset", "char_level", "mined", "dskd_cma", "xtoken")
HIDDEN = {"real": (576, 640)}  # (student, teacher) hidden sizes: SmolLM2-135M, Gemma-3-270M; synthetic pairs use 64
EXTRA_TEXT = [
    "東京は日本の首都です。人口は約1400万人で、世界最大級の都市圏を形成している。",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷🇯🇵 — café, naïve, résumé, Ångström, façade, Øresund, Straße.",
    "Numbers: 3.14159, 1,000,000, 42nd, 0x1F, 2024-11-27, 12345678901234567890 and 6.022e23.",
    "Whitespace   runs\t\tand\n\n\nnewlines    end  \n    indented  block\n",
]


def text_bank() -> str:
    """This repository's own sources and docs, interleaved with multilingual, emoji, number and whitespace text."""
    root = Path(__file__).resolve().parents[1]
    files = sorted([*root.glob("*.md"), *(root / "opd_lightning").glob("*.py"), *(root / "aligners").glob("*.py"),
                    *(root / "losses").glob("*.py")])
    parts = [f.read_text(encoding="utf-8") for f in files]
    return "\n".join(p + "\n" + EXTRA_TEXT[i % len(EXTRA_TEXT)] for i, p in enumerate(parts))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@contextmanager
def peak_rss():
    """Yields a dict whose "extra_mb" is, after the block, this process's resident-set peak above its start level
    (sampled every 2 ms)."""
    probe = {"start": _rss(), "peak": _rss(), "extra_mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            probe["peak"] = max(probe["peak"], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield probe
    finally:
        stop.set()
        thread.join()
        probe["extra_mb"] = (max(probe["peak"], _rss()) - probe["start"]) / 2**20


def make_rollout(student, bank: str, rows: int, tokens: int) -> Rollout:
    """`rows` completions of exactly `tokens` student tokens, cut from the text bank, after a short prompt."""
    ids = prefixless_encoder(student).encode(bank, add_special_tokens=False).ids
    if len(ids) < rows * tokens:
        raise ValueError(f"the text bank has {len(ids)} tokens, fewer than {rows} x {tokens}")
    step = len(ids) // rows
    completion = torch.tensor([ids[r * step : r * step + tokens] for r in range(rows)])
    prompt = torch.tensor([student("Continue:", add_special_tokens=False)["input_ids"]] * rows)
    sequences = torch.cat([prompt, completion], 1)
    mask = torch.ones_like(completion, dtype=torch.bool)
    return Rollout(sequences, torch.ones_like(sequences), mask, prompt.shape[1], torch.ones(rows, dtype=torch.bool),
                   True)


def synthetic_pair(bank: str, share: float):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(bank.splitlines(), trainers.BpeTrainer(
        vocab_size=8000, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    teacher = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")
    return keep_merges(teacher, share), teacher


def exactness(name: str, aligner, student, teacher, inputs, target, logits: torch.Tensor, rollout: Rollout) -> str:
    """How close the aligner's targets are to the brute-force reference (or why they are approximate)."""
    view = inputs.alignment
    if name in ("byte_spans", "vocab_map"):
        s_table, t_table = aligner.student_bytes, aligner.teacher_bytes
        agree = total = 0
        for b in range(len(rollout)):
            s_ids, t_ids = rollout.completion_ids[b].numpy(), view.teacher_ids[b].numpy()
            for span in range(int(view.student_span[b].max()) + 1):
                total += 1
                agree += s_table.join(s_ids[view.student_span[b].numpy() == span]) == t_table.join(
                    t_ids[view.teacher_span[b].numpy() == span])
        return f"spans agree byte for byte: {agree}/{total}"
    if name == "char_level":
        at = view.teacher_at_start[0]
        cols = at[at >= 0][:32]
        want = first_byte_distribution(torch.softmax(logits[0, cols].float(), -1), aligner.teacher_bytes,
                                       teacher.eos_token_id)
        shared = aligner.teacher_classes[: logits.shape[-1]]
        classes = sorted(set(shared[shared >= 0].tolist()))
        want = want[:, classes] / want[:, classes].sum(-1, keepdim=True)
        got = target.logits[0][at >= 0][:32].exp()[:, classes]
        return f"max abs error {float((got.double() - want).abs().max()):.1e}"
    if name == "bpe_subset":
        spell = spell_with_model(student, teacher, aligner.teacher_bytes)
        where = target.mask[0].nonzero().squeeze(-1)[:32].tolist()
        error = 0.0
        for i in where:
            start, j = int(view.path_start[0, i]), int(view.containing[0, i])
            path = tuple(rollout.completion_ids[0, start:i].tolist())
            want = subset_conditional(torch.softmax(logits[0, j].double(), -1), path, spell, len(student))
            error = max(error, float((target.logits[0, i].double().exp() - want).abs().max()))
        return f"max abs error {error:.1e} ({len(where)} positions)"
    if name == "dskd_cma":
        return "learned (soft attention; no exact target)"
    if name == "xtoken":
        return "a fixed projection W (no target in the student's vocabulary)"
    return "approximate (nearest spelling, top-k)"


def timed(step: Callable[[], object], min_time: float) -> tuple[float, float]:
    """Median and peak memory (MB above the start) of `step()`: one call under the memory probe, then
    `blocked_autorange` over at least `min_time` seconds and three calls."""
    with peak_rss() as memory:
        start = time.perf_counter()
        step()
        once = time.perf_counter() - start
    with peak_rss() as again:
        timing = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=max(min_time, 3 * once))
    return timing.median, max(memory["extra_mb"], again["extra_mb"])


def measure(name: str, student, teacher, rollout: Rollout, logits: torch.Tensor, min_time: float,
            hidden_sizes: tuple[int, int] = (64, 64)) -> dict:
    aligner = ALIGNERS.build(name)
    start = time.perf_counter()
    try:
        aligner.bind(student, teacher, len(student), len(teacher))
    except ValueError as error:
        return {"aligner": name, "refused": str(error).split(". Use")[0]}
    bind_s = time.perf_counter() - start
    needs = frozenset({HIDDEN_STATES} if name == "dskd_cma" else {TEACHER_LOGITS} if name != "xtoken" else
                      {TEACHER_NATIVE_LOGITS, VOCAB_PROJECTION})  # xtoken: the teacher's own logits and its W
    if name == "dskd_cma":  # its target is attention over the teacher's hidden states
        aligner.setup(*hidden_sizes)
        hidden = torch.randn(len(rollout), logits.shape[1], hidden_sizes[1])
        tables = torch.randn(len(student), hidden_sizes[0]), torch.randn(len(teacher), hidden_sizes[1])
        states = TeacherHidden(hidden, logits, *tables)

    @torch.no_grad()
    def step():
        inputs = aligner.teacher_inputs(rollout)
        target = aligner.project(logits, inputs, rollout, needs)
        if name == "dskd_cma":
            aligner.project_hidden(target, states, inputs, rollout)
        if isinstance(target.native_logits, PositionRows):  # read when indexed: the rows its losses read, timed here
            target.native_logits[target.mask]
        return inputs, target

    step()  # warm-up (e.g. `mined`'s cache of nearest spellings); nothing held: the target's memory is reused
    seconds, peak_mb = timed(step, min_time)
    inputs, target = step()  # for the exactness columns, after the timing: a target held across it takes its memory
    tokens = int(rollout.completion_mask.sum())
    return {"aligner": name, "bind_s": bind_s, "seconds": seconds, "per_1k_ms": 1000 * seconds / tokens * 1000,
            "coverage": target.coverage, "mass": target.mass_coverage, "peak_mb": peak_mb,
            "exactness": exactness(name, aligner, student, teacher, inputs, target, logits, rollout)}


def gold_alignment(student, teacher, rollout: Rollout, logits: torch.Tensor,
                   student_probs: torch.Tensor | None = None) -> tuple[Callable[[], object], str]:
    """What a TRL GOLD step does for alignment on this batch (trl 1.16, `GOLDTrainer` with `use_uld_loss`, the
    config's defaults), as a function to time, and a note on how it was run.

    GOLD's own code, called as its trainer calls it: the student's byte offsets from its token pieces
    (`_maybe_add_completion_byte_offsets`), the texts decoded, the teacher's inputs re-tokenised from them
    (`build_teacher_inputs_from_texts`), then per row the teacher's completion softmax, the byte-offset groups
    (`_align_by_byte_offsets`) and the merge of each group's probabilities (`_merge_probabilities_with_alignment_groups`,
    the default "observed" strategy). The teacher's completion logits are this benchmark's (the same rows, so the
    same work). With `student_probs` (`[B, N, V_s]`, the student's softmax, which any loss computes and is not timed)
    the student's groups are merged too, as GOLD does before its loss sorts both sides. GOLD refuses teachers whose
    tokenizer is not byte-level BPE (Gemma's); there its offsets are computed with that check lifted, by its own
    normalisation.
    """
    import trl.experimental.gold.gold_trainer as gold
    import trl.experimental.utils as gold_utils
    from trl.experimental.gold.gold_config import GOLDConfig

    config = SimpleNamespace(**{k: f.default for k, f in GOLDConfig.__dataclass_fields__.items()
                                if k.startswith("uld_") or k in ("use_extended_uld", "beta")})
    uld = gold.ULDLoss(config)
    trainer = SimpleNamespace(use_uld_loss=True, teacher_tokenizer=teacher, uld_loss_fn=uld, _tokenizer=student)
    byte_level = gold_utils.is_byte_level_tokenizer
    note = "" if byte_level(teacher.backend_tokenizer) else \
        "GOLD refuses this teacher (not byte-level BPE); timed with that check lifted"
    p = rollout.prompt_length
    labels = rollout.sequences.clone()
    labels[:, :p] = -100

    def step() -> list[torch.Tensor]:
        batch = {"input_ids": rollout.sequences, "labels": labels}
        gold.GOLDTrainer._maybe_add_completion_byte_offsets(trainer, batch)
        prompts, texts = student.batch_decode(rollout.sequences[:, :p]), student.batch_decode(rollout.completion_ids)
        gold_utils.is_byte_level_tokenizer = lambda backend: True  # read by encode_with_byte_offsets
        try:
            t_ids, t_labels, _, t_offsets = gold.build_teacher_inputs_from_texts(teacher, prompts, texts)
        finally:
            gold_utils.is_byte_level_tokenizer = byte_level
        (s_at, s_size), (t_at, t_size) = (uld._get_start_and_size_answers(x) for x in (labels, t_labels))
        merged = []
        for i in range(len(rollout)):
            s_n, t_n = s_size[i] - 1, min(t_size[i] - 1, logits.shape[1])  # uld_skip_{student,teacher}_eos
            probs = torch.nn.functional.softmax(logits[i, :t_n] / uld.teacher_temperature, dim=-1)
            groups = uld._align_by_byte_offsets(batch["byte_offsets"][i, s_at[i] : s_at[i] + s_n].tolist(),
                                                t_offsets[i, t_at[i] : t_at[i] + t_n].tolist())
            paired = [(s, t) for s, t in zip(*groups, strict=False) if s and t]
            merged.append(uld._merge_probabilities_with_alignment_groups(probs, [t for _, t in paired],
                                                                         t_ids[i, t_at[i] : t_at[i] + t_n].tolist()))
            if student_probs is not None:
                ids = rollout.sequences[i, s_at[i] : s_at[i] + s_n].tolist()
                merged.append(uld._merge_probabilities_with_alignment_groups(student_probs[i, :s_n],
                                                                             [s for s, _ in paired], ids))
        return merged

    return step, note


def real_teacher_logits(student, teacher, rollout: Rollout) -> tuple[torch.Tensor, float]:
    """Gemma-3-270M's logits on the batch as the aligners present it, and the forward pass's wall time (the faster
    of two passes, which makes an aligner's share of it the larger)."""
    from opd_lightning.models import HFModel
    from opd_lightning.real_models import prepare_model
    from opd_lightning.reference import completion_logits

    model = HFModel(path=str(prepare_model("gemma3"))).load_model().eval()
    aligner = ALIGNERS.build("byte_spans")
    aligner.bind(student, teacher, len(student), len(teacher))
    inputs = aligner.teacher_inputs(rollout)
    times = []
    for _ in range(2):
        logits = None  # the first pass's logits are freed before the second's
        with torch.no_grad():
            start = time.perf_counter()
            logits = completion_logits(model, inputs.input_ids, inputs.attention_mask, inputs.position_ids,
                                        inputs.completion_length)
            times.append(time.perf_counter() - start)
    return logits, min(times)


def run_pair(pair: str, bank: str, rows: int, tokens: int, min_time: float,
             names: tuple[str, ...] = ALIGNER_NAMES) -> tuple[list[dict], float | None]:
    if pair == "real":
        from transformers import AutoTokenizer

        from opd_lightning.real_models import prepare_tokenizer

        student = AutoTokenizer.from_pretrained(prepare_tokenizer("smollm2"))
        teacher = AutoTokenizer.from_pretrained(prepare_tokenizer("gemma3"))
    else:
        student, teacher = synthetic_pair(bank, int(pair.split("_")[1]) / 100)
    rollout = make_rollout(student, bank, rows, tokens)
    if pair == "real":
        logits, forward_s = real_teacher_logits(student, teacher, rollout)
    else:  # random teacher logits of the right shape
        logits, forward_s = random_logits(student, teacher, rollout), None
    sizes = HIDDEN.get(pair, (64, 64))
    results = [measure(name, student, teacher, rollout, logits, min_time, sizes) for name in names]
    tokens_n, gold = int(rollout.completion_mask.sum()), []
    student_probs = student_softmax(student, rollout)
    for side, probs in (("both sides: the baseline", student_probs), ("the teacher's side alone", None)):
        step, note = gold_alignment(student, teacher, rollout, logits, probs)
        seconds, peak_mb = timed(step, min_time)
        gold.append({"aligner": f"GOLD (TRL 1.16), {side}", "seconds": seconds, "per_1k_ms": 1e6 * seconds / tokens_n,
                     "peak_mb": peak_mb, "note": note})
    del student_probs
    seconds, peak_mb = timed(floor_step(student, teacher, rollout, logits), min_time)
    floor = {"aligner": "bound: exp and one scatter-sum of the aligned teacher rows", "seconds": seconds,
             "per_1k_ms": 1e6 * seconds / tokens_n, "peak_mb": peak_mb,
             "note": "not an aligner: the least a target over the teacher's whole vocabulary reads and adds"}
    seconds, peak_mb = timed(write_step(student, teacher, rollout, logits), min_time)
    written = {"aligner": "bound: exp, sum and one student-vocabulary row written per aligned teacher row",
               "seconds": seconds, "per_1k_ms": 1e6 * seconds / tokens_n, "peak_mb": peak_mb,
               "note": "not an aligner: the least any target in the student's vocabulary reads and writes"}
    results = [*results, floor, written, *gold]
    for r in results:
        r["vs_gold"] = gold[0]["seconds"] / r["seconds"] if "seconds" in r else None
    return results, forward_s


def bound_aligner(name: str, student, teacher):
    """The registry's aligner `name`, bound to the pair."""
    aligner = ALIGNERS.build(name)
    aligner.bind(student, teacher, len(student), len(teacher))
    return aligner


def aligned_starts(char_level, rollout: Rollout) -> torch.Tensor:
    """`[B, N]` the teacher position at each completion position where both tokenizations start a token on the same
    byte (the aligned positions of `char_level`, a bound `char_level` aligner), -1 elsewhere."""
    return char_level.teacher_inputs(rollout).alignment.teacher_at_start.masked_fill(~rollout.completion_mask, -1)


def aligned_rows(char_level, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch rows, teacher positions) `[n]` each: the teacher rows read at the aligned positions (`aligned_starts`),
    in order."""
    at = aligned_starts(char_level, rollout)
    batch, pos = (at >= 0).nonzero(as_tuple=True)
    return batch, at[batch, pos]


def random_logits(student, teacher, rollout: Rollout) -> torch.Tensor:
    """Random teacher logits `[B, M, V_t]` at the teacher's completion positions for the rollout (seed 0)."""
    m = bound_aligner("byte_spans", student, teacher).teacher_inputs(rollout).completion_length
    return torch.randn(len(rollout), m, len(teacher), generator=torch.Generator().manual_seed(0))


def student_softmax(student, rollout: Rollout) -> torch.Tensor:
    """A random student softmax `[B, N, V_s]` (seed 1): what any loss computes, and GOLD's alignment merges on the
    student's side."""
    shape = (*rollout.completion_mask.shape, len(student))
    return torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(1)), -1)


def floor_step(student, teacher, rollout: Rollout, logits: torch.Tensor) -> Callable[[], object]:
    """What every projection that carries the teacher's whole distribution into another space must do at least, as
    a function to time: each teacher row an aligned student position reads (`char_level`'s positions: where both
    tokenizations start a token), exponentiated once and summed once into columns, the fastest way this library
    knows (`exp_blocks`: a block of rows at a time, straight from the logits; `ColumnSums`: one `index_add_` per
    block, into interleaved copies of the columns), here into `char_level`'s 257 byte classes, the smallest such
    space. No re-tokenisation, no bookkeeping, no target written. `byte_spans` and `char_level` do this and more;
    `vocab_map`, which reads only the matched columns, need not."""
    from opd_lightning.aligners.rows import exp_blocks

    aligner = bound_aligner("char_level", student, teacher)
    batch, t_pos = aligned_rows(aligner, rollout)
    out = torch.empty(len(batch), 258)

    def run() -> None:
        for lo, hi, probs in exp_blocks(logits, batch, t_pos):
            aligner.teacher_sums(probs, keep_skipped=True, out=out[lo:hi])

    return run


def write_step(student, teacher, rollout: Rollout, logits: torch.Tensor) -> Callable[[], object]:
    """What every dense target in the student's vocabulary must do at least, as a function to time: each teacher row
    an aligned student position reads (`char_level`'s positions, as in `floor_step`) exponentiated and summed once
    (`exp_blocks`), and one row of the student's vocabulary size written into a `[B, N, V_s]` target per position
    (the block's first V_s exps, copied; the target's memory kept between calls, as the aligners keep theirs). No
    scatter, no log, no re-tokenisation. `vocab_map`, `byte_spans`, `bpe_subset` and `mined` each write such a target
    (`vocab_map` reads only the matched columns, fewer than a row where the teacher's vocabulary is the larger)."""
    from opd_lightning.aligners.rows import copy_rows_, exp_blocks
    from opd_lightning.aligners.text import target_rows

    at = aligned_starts(bound_aligner("char_level", student, teacher), rollout)
    batch, pos = (at >= 0).nonzero(as_tuple=True)
    t_pos, size = at[batch, pos], min(len(student), logits.shape[-1])
    dst, totals = (batch * at.shape[1] + pos).numpy(), torch.empty(len(batch))

    def run() -> None:
        flat = target_rows((*at.shape, size), batch, pos).view(-1, size)
        for lo, hi, probs in exp_blocks(logits, batch, t_pos):
            torch.sum(probs, -1, out=totals[lo:hi])
            copy_rows_(flat, dst[lo:hi], probs[:, :size], np.arange(hi - lo))

    return run


def table(pair: str, results: list[dict], forward_s: float | None) -> str:
    head = "| aligner | exactness | coverage | mass kept | ms / 1k tokens | × GOLD | peak MB | bind s |"
    lines = [head + (" vs teacher forward |" if forward_s else ""), "|---" * (8 + bool(forward_s)) + "|"]
    for r in results:
        share = f" {100 * r['seconds'] / forward_s:.1f}% |" if forward_s and "seconds" in r else (
            " |" if forward_s else "")
        if "refused" in r:
            lines.append(f"| {r['aligner']} | refused: {r['refused']} |  |  |  |  |  |  |" + share)
        elif "note" in r:
            lines.append(f"| {r['aligner']} | {r['note']} |  |  | {r['per_1k_ms']:.0f} | "
                         f"{r['vs_gold']:.1f} | {r['peak_mb']:.0f} |  |" + share)
        else:
            mass = "" if r["mass"] is None else f"{r['mass']:.3f}"
            lines.append(f"| {r['aligner']} | {r['exactness']} | {r['coverage']:.3f} | {mass} | {r['per_1k_ms']:.0f} | "
                         f"{r['vs_gold']:.1f} | {r['peak_mb']:.0f} | {r['bind_s']:.1f} |" + share)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["synthetic_10", "synthetic_90", "real"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per aligner, at least")
    parser.add_argument("--aligners", nargs="+", default=list(ALIGNER_NAMES), choices=ALIGNER_NAMES)
    parser.add_argument("--no-record", action="store_true", help="print the tables only; leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    bank = text_bank()
    for pair in args.pairs:  # each pair is recorded in its own block, so pairs can be re-run one at a time
        results, forward_s = run_pair(pair, bank, args.rows, args.tokens, args.min_time, tuple(args.aligners))
        title = ("SmolLM2-135M student, Gemma-3-270M teacher" if pair == "real" else
                 f"Synthetic byte-level BPE: the student keeps {pair.removeprefix('synthetic_')}% of the teacher's merges")
        extra = f"\n\nGemma-3-270M forward pass on the same batch: {forward_s:.2f} s." if forward_s else ""
        section = f"""### Aligners: {title}

Command: `.venv/bin/python -m benchmarks.alignment --pairs {pair} --rows {args.rows} --tokens {args.tokens}`.
Date: {datetime.date.today()}. Machine: {machine()}, fp32.

{table(pair, results, forward_s)}{extra}"""
        print(section, flush=True)
        if not args.no_record and tuple(args.aligners) == ALIGNER_NAMES:
            record(section, f"alignment_{pair}")


if __name__ == "__main__":
    main()
