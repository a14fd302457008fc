"""A gold task with long completions: column addition written out one column at a time, then the sum.

Problems look like ``"347+485="`` with completion ``"7+5+0=12,4+8+1=13,3+4+1=8:832"`` and answer ``"832"``: from
the rightmost column, each column as ``digit+digit+carry=column sum`` (a missing digit of the shorter operand is
0), comma separated, then ``:`` and the sum. Operands have 2 to 4 digits, so completions run from 18 to 41
characters (tokens with the character tokenizer, whose alphabet they use), where the arithmetic task's answers are
at most three. Every step is a one-digit addition with a carry the previous step wrote, so the quickstart-sized
models can learn it on a CPU, and what happens over tens of on-policy tokens (repetition, a student straying from the
teacher deeper into its own prefix) can show.

Two lm-eval tasks score a model's greedy completion, cut at the first newline: `long_addition`, the number after the
first ``:`` against the gold sum (the score), and `long_addition_steps`, the whole written-out completion against the
gold one. The shipped splits (``data/long_addition/{train,validation,test}.jsonl``) are written by
``python -m opd_lightning.tasks.long_addition``; test and validation prompts are unique and disjoint from each other
and from train.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from pathlib import Path

from opd_lightning.tasks.arithmetic import draw_problems, split_parser, write_splits

__all__ = ["DATA_DIR", "DIGITS", "main", "make_long_additions", "worked_sum"]

DATA_DIR = Path(__file__).parent / "data" / "long_addition"
DIGITS = (2, 3, 4)  # digits per operand, drawn uniformly, then the operand uniformly among numbers that long


def worked_sum(a: int, b: int) -> str:
    """The written-out completion of ``a+b=``: each column from the right, then ``:`` and the sum."""
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    x, y = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(x), len(y))):
        p, q = int(x[i]) if i < len(x) else 0, int(y[i]) if i < len(y) else 0
        total = p + q + carry
        steps.append(f"{p}+{q}+{carry}={total}")
        carry = total // 10
    return ",".join(steps) + f":{a + b}"


def make_long_additions(n: int, seed: int, *, exclude: Collection[str] = (),
                        unique: bool = False) -> list[dict[str, str]]:
    """Draw ``n`` problems ``{"prompt": "347+485=", "completion": "7+5+0=12,...:832", "answer": "832"}``.

    Args:
        n: number of problems.
        seed: seed of the private random generator (same arguments, same list).
        exclude: prompts never to return (e.g. held-out splits).
        unique: return no prompt twice.
    """
    def sample(rng: random.Random) -> tuple[str, str]:
        a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in (rng.choice(DIGITS), rng.choice(DIGITS)))
        return f"{a}+{b}=", str(a + b)

    rows = draw_problems(n, seed, (10 ** max(DIGITS) - 10 ** (min(DIGITS) - 1)) ** 2, sample, exclude=exclude,
                         unique=unique)
    for row in rows:
        a, b = (int(v) for v in row["prompt"].rstrip("=").split("+"))
        row["completion"] = worked_sum(a, b)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Regenerate the shipped splits (``python -m opd_lightning.tasks.long_addition --help``)."""
    write_splits(make_long_additions, split_parser(__doc__.splitlines()[0], DATA_DIR, (20000, 200, 500)).parse_args(argv))


if __name__ == "__main__":
    main()
