"""Prompt data: JSONL rows of prompt text, with optional gold completion and answer.

Batches stay text (lists of strings): the training module tokenizes with the student's tokenizer, so one data
file serves any student, and cross-tokenizer teachers can re-tokenise the same text. `builtin:<task>/<split>` names
the gold tasks shipped with the package (`arithmetic`, `arithmetic_fewshot`, `sequences`, `long_addition`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochSampler", "PromptDataModule", "PromptDataset", "ResumableLoader", "load_rows"]


BUILTIN = {  # name: (data folder under opd_lightning/tasks/data, module holding the worked examples, or None)
    "arithmetic": ("arithmetic", None),
    "arithmetic_fewshot": ("arithmetic", "opd_lightning.tasks.arithmetic"),
    "sequences": ("sequences", "opd_lightning.tasks.sequences"),
    "long_addition": ("long_addition", None),
}


def _resolve(path: str) -> tuple[Path, str]:
    """The file behind a data path, and the prefix its prompts get (few-shot tasks: their worked examples)."""
    if not path.startswith("builtin:"):
        return Path(path), ""
    import importlib

    from opd_lightning.tasks.arithmetic import DATA_DIR, SPLITS

    task, _, split = path.removeprefix("builtin:").partition("/")
    split = split or "train"
    if task not in BUILTIN or split not in SPLITS:
        raise ValueError(f"unknown builtin data {path!r}; available: builtin:<task>/<split> with task one of "
                         f"{', '.join(BUILTIN)} (arithmetic_fewshot: the arithmetic problems after three worked "
                         f"examples) and split one of {', '.join(SPLITS)}")
    folder, prefix_module = BUILTIN[task]
    prefix = importlib.import_module(prefix_module).FEWSHOT_PREFIX if prefix_module else ""
    return DATA_DIR.parent / folder / f"{split}.jsonl", prefix


def load_rows(path: str, limit: int | None = None) -> list[dict]:
    """Rows of a JSONL file (or `builtin:` name), first `limit` only if given."""
    file, prefix = _resolve(path)
    if not file.exists():
        raise FileNotFoundError(f"data file {file} does not exist")
    rows = []
    with file.open() as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                rows.append({**row, "prompt": prefix + row["prompt"]} if prefix else row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


class PromptDataset(Dataset):
    """Rows with a prompt and optional completion/answer, read from a JSONL file."""

    def __init__(self, path: str, prompt_field: str, completion_field: str, answer_field: str,
                 limit: int | None = None) -> None:
        self.path = path
        self.rows = load_rows(path, limit)
        if not self.rows:
            raise ValueError(f"data file {path} has no rows")
        missing = [i for i, r in enumerate(self.rows) if prompt_field not in r]
        if missing:
            raise ValueError(f"{len(missing)} rows of {path} lack the prompt field {prompt_field!r} (first: row "
                             f"{missing[0]}); set data.prompt_field")
        self.fields = {"prompt": prompt_field, "completion": completion_field, "answer": answer_field}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {**{key: row.get(field) for key, field in self.fields.items()}, "index": index}

    def require(self, key: str, why: str) -> None:
        """Raise, naming the rows and the setting, unless every row holds a non-empty `key` field."""
        name = self.fields[key]
        missing = [i for i, r in enumerate(self.rows) if r.get(name) in (None, "")]
        if missing:
            raise ValueError(f"{len(missing)} of {len(self.rows)} rows of {self.path} lack a {key} (field {name!r}; "
                             f"first: row {missing[0]}), which this configuration reads because {why}: add it, set "
                             f"data.{key}_field to the field that holds it, or change the configuration")


def collate(rows: list[dict]) -> dict:
    """Lists of strings (and `index`, the rows' dataset indices); a field is None unless every row has it."""
    return {key: ([r[key] for r in rows] if all(r[key] is not None for r in rows) else None) for key in rows[0]}


class EpochSampler(Sampler[int]):
    """Shuffles with `seed + epoch`, so a resumed run sees the same order as an uninterrupted one."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader):
    """A DataLoader that remembers how many batches of its epoch it served.

    Lightning saves `state_dict()` of stateful loaders in checkpoints; on resume the batches of the interrupted
    epoch that were already trained on are skipped, so a resumed run sees the data an uninterrupted one would.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._served, self._skip = 0, 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._served = 0
        for batch in super().__iter__():
            self._served += 1
            if self._served > skip:
                yield batch

    def forget_last(self) -> None:
        """The last batch served was not trained on (its step failed): a checkpoint written now serves it again."""
        self._served = max(self._served - 1, 0)

    def state_dict(self) -> dict:
        return {"served": self._served % max(len(self), 1)}  # a finished epoch leaves nothing to skip

    def load_state_dict(self, state: dict) -> None:
        self._skip = state["served"]


class PromptDataModule(LightningDataModule):
    """Train/validation/test prompt files for distillation."""

    def __init__(self, train: str = "builtin:arithmetic/train", val: str | None = "builtin:arithmetic/validation",
                 test: str | None = "builtin:arithmetic/test", batch_size: int = 32, eval_batch_size: int | None = None,
                 prompt_field: str = "prompt", completion_field: str = "completion", answer_field: str = "answer",
                 limit_train: int | None = None, limit_eval: int | None = None, seed: int = 0) -> None:
        """
        Args:
            train: training JSONL file, or `builtin:arithmetic/train`.
            val: validation file (None: no validation data).
            test: test file (None: no test data).
            batch_size: prompts per optimizer step.
            eval_batch_size: prompts per validation/test batch (default `batch_size`).
            prompt_field: JSON key of the prompt text.
            completion_field: JSON key of the gold/reference completion (used off-policy and by gold terms).
            answer_field: JSON key of the gold answer (kept for evaluation).
            limit_train: read only the first rows of the training file.
            limit_eval: read only the first rows of the validation and test files.
            seed: shuffling seed.
        """
        super().__init__()
        self.paths = {"train": train, "val": val, "test": test}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.fields = (prompt_field, completion_field, answer_field)
        self.limits = {"train": limit_train, "val": limit_eval, "test": limit_eval}
        self.seed = seed
        self.datasets: dict[str, PromptDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for split, path in self.paths.items():
            if path is not None and split not in self.datasets:
                self.datasets[split] = PromptDataset(path, *self.fields, limit=self.limits[split])

    def require_field(self, split: str, key: str, why: str) -> None:
        """Check, at set-up, that every row of `split` ("train", "val", "test") has `key` ("completion", ...)."""
        self.setup()
        if split in self.datasets:
            self.datasets[split].require(key, why)

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        return ResumableLoader(data, batch_size=self.batch_size, sampler=EpochSampler(len(data), self.seed),
                               collate_fn=collate, drop_last=len(data) >= self.batch_size)

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            return []
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
