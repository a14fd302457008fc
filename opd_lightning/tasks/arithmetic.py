"""The embedded gold task: integer arithmetic written as text, with a character-level tokenizer.

Distillation needs a task whose answers can be checked exactly, that runs on a CPU in seconds, and that needs no
download. Problems look like ``"23+58="`` with completion ``"81"``; a model is right when its greedy completion,
cut at the first newline or EOS, equals the answer. The tokenizer is built in code (one token per character, no
training, no BOS) so that tests and tiny models share a fixed vocabulary of 49 ids.

The shipped splits (``data/arithmetic/{train,validation,test}.jsonl``) are written by
``python -m opd_lightning.tasks.arithmetic``. Test and validation prompts are unique and disjoint from each other
and from train. Train is drawn with replacement from the prompts left over: with the default ``max_value=99`` and
``+``/``-`` there are only 15,050 distinct prompts, fewer than the 20,000 training rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers costs ~1 s to import; only char_tokenizer needs it.
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CHARACTERS",
    "DATA_DIR",
    "FEWSHOT_PREFIX",
    "SPECIAL_TOKENS",
    "SPLITS",
    "bpe_tokenizer",
    "char_tokenizer",
    "draw_problems",
    "load_problems",
    "main",
    "make_problems",
    "split_parser",
    "task_data_path",
    "write_jsonl",
    "write_splits",
]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")  # ids 0, 1, 2
CHARACTERS = "0123456789+-*= \n" + "abcdefghijklmnopqrstuvwxyz" + "?,.:"
SPLITS = ("train", "validation", "test")
DATA_DIR = Path(__file__).parent / "data" / "arithmetic"
# Three worked examples (none is a validation or test prompt) for models that were never trained on the bare format:
# small pretrained models answer "23+58=" in prose, but continue a pattern. `builtin:arithmetic_fewshot/<split>`
# data and the `arithmetic_fewshot` lm-eval task put this before every prompt.
FEWSHOT_PREFIX = "36+47=83\n90-38=52\n5+7=12\n"
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer of the arithmetic task.

    Every character of ``CHARACTERS`` is one token (ids 3..48 in that order); any other character becomes
    ``<unk>``. Nothing is added around the text (no BOS, no EOS), padding is on the left, and decoding
    concatenates tokens, so ``decode(encode(text)) == text`` for text made of known characters.

    Returns:
        A fast tokenizer with offsets, ``save_pretrained`` and ``AutoTokenizer.from_pretrained`` support.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Each character (newline included, hence [\s\S] rather than ".") is its own pre-token, keeping its offsets.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens with no separator (WordLevel would insert spaces)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def bpe_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Build a byte-level BPE tokenizer for the arithmetic task: the cross-tokenizer demo's student tokenizer.

    Trained in code (deterministically) on the shipped training split, GPT-2 style: digits group into numbers, so
    most numbers up to two digits are one token, where the character tokenizer spends one token per digit. Its
    vocabulary, ids, spelling (`Ġ` for a space) and special tokens all differ from `char_tokenizer`'s.

    Args:
        vocab_size: the 256 byte symbols and the two special tokens (`<pad>` 0, `<eos>` 1) included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    texts = [row["prompt"] + row["completion"] for row in load_problems("train")]
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left", clean_up_tokenization_spaces=False)


BUILTIN_TOKENIZERS = ("builtin:char", "builtin:arithmetic_bpe", "builtin:arithmetic_bpe_<percent>")


def builtin_tokenizer(name: str) -> PreTrainedTokenizerFast | None:
    """The embedded tokenizer called `name`, or None when `name` is not one (`BUILTIN_TOKENIZERS`).

    `builtin:char` is `char_tokenizer()`, `builtin:arithmetic_bpe` is `bpe_tokenizer()`, and
    `builtin:arithmetic_bpe_<percent>` (1 to 99) keeps only the first `percent`% of that BPE's merges
    (`aligners.keep_merges`): an ordered BPE subset of it, for distillation between two BPE vocabularies of the same
    family (e.g. `builtin:arithmetic_bpe_10` splits most numbers into digits, `_90` keeps nearly all of them whole).
    """
    if name == "builtin:char":
        return char_tokenizer()
    if name == "builtin:arithmetic_bpe":
        return bpe_tokenizer()
    match = re.fullmatch(r"builtin:arithmetic_bpe_(\d+)", name)
    if match is None:
        return None
    percent = int(match.group(1))
    if not 1 <= percent <= 99:
        raise ValueError(f"{name}: the share of merges kept is a percentage from 1 to 99, got {percent}")
    from opd_lightning.aligners import keep_merges

    tok = keep_merges(bpe_tokenizer(), percent / 100)
    tok.padding_side, tok.clean_up_tokenization_spaces = "left", False
    return tok


def make_problems(
    n: int,
    seed: int,
    max_value: int = 99,
    ops: Sequence[str] = ("+", "-"),
    *,
    exclude: Collection[str] = (),
    unique: bool = False,
) -> list[dict[str, str]]:
    """Draw arithmetic problems with operands in ``[0, max_value]``.

    Subtraction orders its operands so that results are never negative.

    Args:
        n: number of problems.
        seed: seed of the private random generator (same arguments, same list).
        max_value: largest operand.
        ops: operators to draw from, among ``+``, ``-`` and ``*``.
        exclude: prompts never to return (e.g. held-out splits).
        unique: return no prompt twice.

    Returns:
        ``n`` dicts ``{"prompt": "23+58=", "completion": "81", "answer": "81"}``.

    Raises:
        ValueError: for an unknown operator, or when ``unique`` asks for more prompts than exist.
    """
    if unknown := set(ops) - set(_OPS):
        raise ValueError(f"unknown operators {sorted(unknown)}; known: {sorted(_OPS)}")
    space = sum((max_value + 1) * (max_value + 2) // 2 if op == "-" else (max_value + 1) ** 2 for op in set(ops))

    def sample(rng: random.Random) -> tuple[str, str]:
        op, a, b = rng.choice(tuple(ops)), rng.randint(0, max_value), rng.randint(0, max_value)
        if op == "-" and a < b:
            a, b = b, a
        return f"{a}{op}{b}=", str(_OPS[op](a, b))

    return draw_problems(n, seed, space, sample, exclude=exclude, unique=unique)


def draw_problems(n: int, seed: int, space: int, sample: Callable[[random.Random], tuple[str, str]], *,
                  exclude: Collection[str] = (), unique: bool = False) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "completion", "answer"}`` from `sample(rng) -> (prompt, answer)`, skipping `exclude`
    (and, if `unique`, repeats); `space` is how many prompts exist. Raises ValueError when too few are left."""
    available = space - len(set(exclude))
    if n > 0 and (available <= 0 or (unique and n > available)):
        raise ValueError(f"asked for {n} problems; {space} prompts exist and {len(set(exclude))} are excluded")
    rng = random.Random(seed)
    seen, problems = set(exclude), []
    while len(problems) < n:
        prompt, answer = sample(rng)
        if prompt in seen:
            continue
        if unique:
            seen.add(prompt)
        problems.append({"prompt": prompt, "completion": answer, "answer": answer})
    return problems


def task_data_path(split: str) -> Path:
    """Path of a shipped split: ``train``, ``validation`` or ``test``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return DATA_DIR / f"{split}.jsonl"


def load_problems(split: str) -> list[dict[str, str]]:
    """Read a shipped split as a list of problem dicts."""
    with task_data_path(split).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write rows as JSON lines (UTF-8, `\\n` line ends), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def split_parser(description: str, out_dir: Path, sizes: tuple[int, int, int]) -> argparse.ArgumentParser:
    """Command-line options shared by the tasks' split writers; `sizes` are the train, validation, test defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out-dir", type=Path, default=out_dir, help="where the three jsonl files go")
    parser.add_argument("--seed", type=int, default=0, help="test uses seed, validation seed+1, train seed+2")
    for split, size in zip(("train", "validation", "test"), sizes, strict=True):
        parser.add_argument(f"--{split}-size", type=int, default=size)
    return parser


def write_splits(draw: Callable[..., list[dict[str, str]]], args: argparse.Namespace) -> None:
    """Write test, validation and train drawn by `draw(n, seed, exclude=, unique=)`, held-out splits first (so
    that adding training rows never changes them), unique and disjoint; train draws with replacement."""
    test = draw(args.test_size, args.seed, unique=True)
    held_out = {p["prompt"] for p in test}
    validation = draw(args.validation_size, args.seed + 1, exclude=held_out, unique=True)
    held_out |= {p["prompt"] for p in validation}
    train = draw(args.train_size, args.seed + 2, exclude=held_out)
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        write_jsonl(args.out_dir / f"{name}.jsonl", rows)
        print(f"wrote {len(rows)} problems to {args.out_dir / f'{name}.jsonl'}")


def main(argv: Sequence[str] | None = None) -> None:
    """Regenerate the shipped splits (``python -m opd_lightning.tasks.arithmetic --help``)."""
    parser = split_parser(__doc__.splitlines()[0], DATA_DIR, (20000, 200, 500))
    parser.add_argument("--max-value", type=int, default=99)
    parser.add_argument("--ops", default="+-", help="operators to use, e.g. '+-' or '+-*'")
    args = parser.parse_args(argv)
    write_splits(functools.partial(make_problems, max_value=args.max_value, ops=tuple(args.ops)), args)


if __name__ == "__main__":
    main()
