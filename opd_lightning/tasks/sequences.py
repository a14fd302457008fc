"""A second gold task, for small pretrained models: continue an arithmetic sequence by one term.

Problems look like ``"418,420,422,"`` with answer ``"424"``: a start in ``[1, 899]`` and a step of 1, 2 or 10.
Every prompt follows three worked examples (`FEWSHOT_PREFIX`), the format such models continue. The arithmetic
task is out of reach of SmolLM2-135M-Instruct (it scores 0.025 with worked examples), so a same-tokenizer
distillation from it has nothing to pass on there; this task is one it does well enough to teach. A model is right
when its greedy completion, cut at the first newline or comma, equals the answer.

The shipped splits (``data/sequences/{train,validation,test}.jsonl``, bare prompts without the worked examples)
are written by ``python -m opd_lightning.tasks.sequences``. Test and validation prompts are unique and disjoint
from each other and from train; train draws with replacement from the 2,297 prompts left over.
`builtin:sequences/<split>` data and the `sequences` lm-eval task put the worked examples before every prompt.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Collection, Sequence
from pathlib import Path

from opd_lightning.tasks.arithmetic import write_jsonl

__all__ = ["DATA_DIR", "FEWSHOT_PREFIX", "STEPS", "main", "make_sequences"]

DATA_DIR = Path(__file__).parent / "data" / "sequences"
FEWSHOT_PREFIX = "4,5,6,7\n20,22,24,26\n35,40,45,50\n"
STEPS = (1, 2, 10)
MAX_START = 899


def make_sequences(n: int, seed: int, *, exclude: Collection[str] = (), unique: bool = False) -> list[dict[str, str]]:
    """Draw ``n`` problems ``{"prompt": "418,420,422,", "completion": "424", "answer": "424"}``.

    Args:
        n: number of problems.
        seed: seed of the private random generator (same arguments, same list).
        exclude: prompts never to return (e.g. held-out splits).
        unique: return no prompt twice.

    Raises:
        ValueError: when fewer prompts exist than asked for.
    """
    space = MAX_START * len(STEPS)
    available = space - len(set(exclude))
    if n > 0 and (available <= 0 or (unique and n > available)):
        raise ValueError(f"asked for {n} problems; {space} prompts exist and {len(set(exclude))} are excluded")
    rng = random.Random(seed)
    seen, problems = set(exclude), []
    while len(problems) < n:
        start, step = rng.randint(1, MAX_START), rng.choice(STEPS)
        prompt = f"{start},{start + step},{start + 2 * step},"
        if prompt in seen:
            continue
        if unique:
            seen.add(prompt)
        answer = str(start + 3 * step)
        problems.append({"prompt": prompt, "completion": answer, "answer": answer})
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    """Regenerate the shipped splits (``python -m opd_lightning.tasks.sequences --help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help="where the three jsonl files go")
    parser.add_argument("--seed", type=int, default=0, help="test uses seed, validation seed+1, train seed+2")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--validation-size", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=300)
    args = parser.parse_args(argv)
    test = make_sequences(args.test_size, args.seed, unique=True)  # held-out splits first
    held_out = {p["prompt"] for p in test}
    validation = make_sequences(args.validation_size, args.seed + 1, exclude=held_out, unique=True)
    held_out |= {p["prompt"] for p in validation}
    train = make_sequences(args.train_size, args.seed + 2, exclude=held_out)
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        write_jsonl(args.out_dir / f"{name}.jsonl", rows)
        print(f"wrote {len(rows)} problems to {args.out_dir / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
