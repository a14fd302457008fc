"""Evaluation through lm-evaluation-harness, on models already in memory.

Distillation is judged by what the student can do, not by its loss, so evaluation runs real lm-eval tasks:
the in-memory student is wrapped in lm-eval's `HFLM` (no reload, no copy) and scored by `simple_evaluate`.
Choices made here:

- Tasks come only from `include_path` (by default the package's own tasks, rendered by `materialise_tasks`);
  lm-eval's built-in index is never built, which saves ~13 s per call and keeps evaluation offline.
- lm-eval reseeds Python, NumPy and torch by default; we pass no seeds so that evaluating in the middle of a
  run leaves the training RNG streams alone (greedy decoding needs no seed).
- A peft `PeftModel` is passed to `HFLM` as is: `HFLM` only needs `config`, `device`, `generate` and
  `__call__`, which `PeftModel` forwards with the adapter active (tested against the base model).
- `LmEvalCallback` evaluates on global rank 0 only, with the others waiting at a barrier. That is right for
  DDP and single-device runs; under sharded strategies (FSDP, DeepSpeed ZeRO-3) rank 0 holds only a shard,
  so this callback is not meant for them.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import logging
import shutil
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from opd_lightning.tasks.arithmetic import DATA_DIR

__all__ = ["LmEvalCallback", "evaluate_model", "flatten_results", "materialise_tasks"]

log = logging.getLogger(__name__)
TEMPLATE_DIR = Path(__file__).parent / "tasks" / "lm_eval"


def materialise_tasks(dest_dir: str | Path) -> Path:
    """Render the shipped lm-eval task templates into `dest_dir`.

    The templates name their data files as ``$DATA_DIR/...``; lm-eval's ``json`` loader needs absolute paths,
    which cannot be committed, so they are filled in here with the installed package's data directory.

    Args:
        dest_dir: directory to write the YAML files into (created if missing).

    Returns:
        `dest_dir` as a `Path`, ready for ``TaskManager(include_path=..., include_defaults=False)``.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    # JSON string escapes are valid inside YAML double-quoted strings (backslashes, quotes).
    data_dir = json.dumps(DATA_DIR.parent.resolve().as_posix())[1:-1]
    for template in sorted(TEMPLATE_DIR.glob("*.yaml")):
        text = string.Template(template.read_text(encoding="utf-8")).substitute(DATA_DIR=data_dir)
        (dest / template.name).write_text(text, encoding="utf-8")
    return dest


@functools.cache
def _default_include_path() -> str:
    """The package's tasks, rendered once per process into a temporary directory."""
    path = tempfile.mkdtemp(prefix="opd_lm_eval_tasks_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return str(materialise_tasks(path))


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Turn lm-eval's ``results`` into ``{task: {metric: value}}``.

    lm-eval keys each metric as ``"<metric>,<filter>"``. The default filter ``none`` is dropped
    (``"exact_match,none"`` becomes ``"exact_match"``); another filter is kept after a slash
    (``"exact_match,strict-match"`` becomes ``"exact_match/strict-match"``). Standard errors, the alias and any
    other non-numeric entry are dropped.
    """
    flat: dict[str, dict[str, float]] = {}
    for task, entries in results.items():
        metrics = {}
        for key, value in entries.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                metrics[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
        flat[task] = metrics
    return flat


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put `model` in eval mode, then restore each submodule's own training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 64,
    include_path: str | None = None,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Score an in-memory causal LM on lm-eval tasks.

    Args:
        model: a Hugging Face causal LM (``PreTrainedModel`` or peft ``PeftModel``), on the device to use; or a served
            teacher (`served.ServedTeacher`), scored through its server by lm-eval's ``local-completions`` client.
        tokenizer: its tokenizer. Not modified: a copy is used if lm-eval needs to add a pad token.
        tasks: lm-eval task names found under `include_path`.
        limit: score only the first `limit` documents of each task (None: all).
        batch_size: generation batch size.
        include_path: directory of task YAML files; defaults to the package's tasks (`materialise_tasks`).
        max_length: context length in tokens; None lets lm-eval read it from the config (e.g.
            ``max_position_embeddings``), falling back to 2048 when the config has none.

    Returns:
        ``{task: {metric: value}}`` as described in `flatten_results`.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if tokenizer.pad_token is None:  # lm-eval would set one on the caller's tokenizer
        tokenizer = copy.deepcopy(tokenizer)
    task_manager = TaskManager(include_path=include_path or _default_include_path(), include_defaults=False)
    with _eval_mode(model):
        if getattr(model, "served", False):  # a served teacher: lm-eval's own client of the completions protocol
            from lm_eval.models.openai_completions import LocalCompletionsAPI

            server = model.server
            lm = LocalCompletionsAPI(base_url=f"{server.base}/completions", model=server.model, tokenizer_backend="none",
                                     tokenized_requests=False, batch_size=server.batch_size, timeout=int(server.timeout),
                                     max_retries=server.retries + 1)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                      backend="causal")
        out = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=task_manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    if out is None:  # lm-eval returns None off its rank 0; HFLM on a model object is always rank 0
        return {}
    return flatten_results(out["results"])


class LmEvalCallback(pl.Callback):
    """Runs lm-eval tasks on the student (and once on the teacher) during fit and test.

    Reads ``pl_module.student`` / ``pl_module.student_tokenizer`` and, for the teacher,
    ``pl_module.teacher`` / ``pl_module.teacher_tokenizer`` (a ``None`` teacher is skipped). Student metrics
    are logged as ``eval/<task>/<metric>``, teacher metrics as ``eval_teacher/<task>/<metric>``, and every
    evaluation is appended as one JSON line ``{"stage", "model", "step", "results"}`` to
    ``<trainer.log_dir or default_root_dir>/<results_file>``; ``stage`` is ``fit_start`` (the student before
    any step), ``validation`` or ``test``.

    A fit resumed from a checkpoint (``trainer.ckpt_path`` set when fitting starts) skips the ``fit_start``
    evaluation and counts the teacher as done: both were evaluated when the run first started, and evaluating
    again would put a "fit_start" point in the middle of the history. Strategies that restore checkpoints only
    after ``on_fit_start`` (FSDP, DeepSpeed) set ``trainer.ckpt_path`` too late for this, but the callback is not
    meant for them (see the module docstring).
    """

    def __init__(
        self,
        tasks: list[str] = ["arithmetic"],  # noqa: B006 -- copied below; a list default reads well in --help
        limit: int | None = None,
        batch_size: int = 64,
        include_path: str | None = None,
        on_fit_start: bool = False,
        on_validation: bool = True,
        on_test: bool = True,
        evaluate_teacher: bool = False,
        results_file: str = "eval_history.jsonl",
    ) -> None:
        """Configure what is evaluated and when.

        Args:
            tasks: lm-eval task names to run, looked up under `include_path`.
            limit: documents per task (None: whole split); small values keep frequent evaluation cheap.
            batch_size: generation batch size for lm-eval.
            include_path: directory of lm-eval task YAML files; None uses the package's tasks
                (`materialise_tasks`). lm-eval's built-in tasks are never loaded.
            on_fit_start: evaluate the student once before the first training step (stage ``fit_start``); not
                done when the fit resumes from a checkpoint.
            on_validation: evaluate the student at the end of each validation epoch (not during the sanity
                check).
            on_test: evaluate the student at the end of each test epoch.
            evaluate_teacher: also evaluate the teacher, once per fit, at the first evaluation (never in a fit
                resumed from a checkpoint).
            results_file: name of the JSON-lines history file in the run's log directory.
        """
        super().__init__()
        self.tasks = list(tasks)
        self.limit = limit
        self.batch_size = batch_size
        self.include_path = include_path
        self.run_on_fit_start = on_fit_start
        self.run_on_validation = on_validation
        self.run_on_test = on_test
        self.evaluate_teacher = evaluate_teacher
        self.results_file = results_file
        self.history_path: Path | None = None
        self._teacher_done = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts, so every rank must read it, here rather than in rank-0-only code.
        self.history_path = Path(trainer.log_dir or trainer.default_root_dir) / self.results_file

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resumed = bool(trainer.ckpt_path)  # set by now, on every rank, under the strategies this callback suits
        self._teacher_done = resumed
        if self.run_on_fit_start and not resumed:
            self._run(trainer, pl_module, "fit_start", can_log=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on_validation and not trainer.sanity_checking:
            self._run(trainer, pl_module, "validation", can_log=True)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on_test:
            self._run(trainer, pl_module, "test", can_log=True)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, can_log: bool) -> None:
        """Evaluate on rank 0 (student, then the teacher if still due); other ranks wait at a barrier."""
        if trainer.is_global_zero:
            models = [("student", pl_module.student, pl_module.student_tokenizer, "eval")]
            if self.evaluate_teacher and not self._teacher_done and getattr(pl_module, "teacher", None) is not None:
                models.append(("teacher", pl_module.teacher, pl_module.teacher_tokenizer, "eval_teacher"))
            for name, model, tokenizer, prefix in models:
                results = evaluate_model(
                    model,
                    tokenizer,
                    self.tasks,
                    limit=self.limit,
                    batch_size=self.batch_size,
                    include_path=self.include_path,
                )
                self._record(trainer, pl_module, stage, name, results, prefix, can_log)
        if self.evaluate_teacher:  # every rank agrees the teacher is done, whichever rank evaluated it
            self._teacher_done = True
        trainer.strategy.barrier("lm_eval")

    def _record(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: str,
        model: str,
        results: dict[str, dict[str, float]],
        prefix: str,
        can_log: bool,
    ) -> None:
        """Log `results` and append them to the history file."""
        metrics = {f"{prefix}/{task}/{name}": value for task, ms in results.items() for name, value in ms.items()}
        if can_log:
            for key, value in metrics.items():
                pl_module.log(key, value, rank_zero_only=True)
        else:  # self.log is not allowed in this hook; write to the loggers directly
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        entry = {"stage": stage, "model": model, "step": trainer.global_step, "results": results}
        assert self.history_path is not None, "setup() sets the history path"
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        with self.history_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("lm-eval %s %s at step %d: %s -> %s", stage, model, trainer.global_step, results, self.history_path)
