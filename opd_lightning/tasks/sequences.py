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

import random
from collections.abc import Collection, Sequence
from pathlib import Path

from opd_lightning.tasks.arithmetic import draw_problems, split_parser, write_splits

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
    def sample(rng: random.Random) -> tuple[str, str]:
        start, step = rng.randint(1, MAX_START), rng.choice(STEPS)
        return f"{start},{start + step},{start + 2 * step},", str(start + 3 * step)

    return draw_problems(n, seed, MAX_START * len(STEPS), sample, exclude=exclude, unique=unique)


def main(argv: Sequence[str] | None = None) -> None:
    """Regenerate the shipped splits (``python -m opd_lightning.tasks.sequences --help``)."""
    write_splits(make_sequences, split_parser(__doc__.splitlines()[0], DATA_DIR, (2000, 100, 300)).parse_args(argv))


if __name__ == "__main__":
    main()
