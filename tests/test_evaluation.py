"""Tests of the embedded arithmetic task and of lm-eval evaluation, offline, with tiny in-code models.

A model that is provably right (or wrong) is built by hand: a Llama whose layers write nothing to the residual
stream (zeroed ``o_proj``/``down_proj``), whose embeddings are one-hot and whose ``lm_head`` holds a bigram table,
so greedy decoding follows the table exactly. On a task whose answers are all "7", the table "= -> 7 -> <eos>"
must score 1.0 and "= -> 8 -> <eos>" 0.0.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from opd_lightning.evaluation import LmEvalCallback, evaluate_model, flatten_results, materialise_tasks
from opd_lightning.tasks.arithmetic import SPLITS, char_tokenizer, load_problems, make_problems, task_data_path


@pytest.fixture(autouse=True)
def offline_single_thread(monkeypatch):
    """No network at all; one thread (two threads on a shared two-core machine are 5-30x slower here)."""

    attempts = []

    def refuse(*args, **kwargs):  # recorded as well as refused: libraries may swallow the error
        attempts.append(args[1:2] or kwargs)
        raise OSError("network access refused by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # name lookup comes first
    monkeypatch.setattr(socket.socket, "connect", refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def tiny_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def bigram_llama(tok, table: dict[str, str]) -> LlamaForCausalLM:
    """A Llama whose greedy next token is ``table[current token]`` (``<pad>`` for tokens not in the table)."""
    model = tiny_llama(tok)
    ids = tok.convert_tokens_to_ids
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(tok), 64))  # one-hot; RMSNorm scales it by 8
        model.lm_head.weight.zero_()
        for current, following in table.items():
            model.lm_head.weight[ids(following), ids(current)] = 1.0
    return model


@pytest.fixture(scope="module")
def const_task(tmp_path_factory):
    """The shipped arithmetic task's settings on four problems whose answer is 7 (task name ``const7``)."""
    root = tmp_path_factory.mktemp("const7")
    rendered = yaml.safe_load((materialise_tasks(root / "shipped") / "arithmetic.yaml").read_text())
    data = root / "const7.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "7"}) + "\n" for p in ["3+4=", "0+7=", "9-2=", "14-7="]))
    rendered["task"] = "const7"
    rendered["dataset_kwargs"]["data_files"] = {"validation": str(data), "test": str(data)}
    (root / "tasks").mkdir()
    (root / "tasks" / "const7.yaml").write_text(yaml.safe_dump(rendered))
    return str(root / "tasks")


def test_tokenizer_round_trip_offsets_and_save_load(tok, tmp_path):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token) == (0, 1, 2, None)
    for text in ["12+34=", "12+34=46", "what is 3 * 4?\nanswer: 12.", "  a  b "]:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text) and tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert tok.decode(tok("7")["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == "7"
    assert tok("A")["input_ids"] == [tok.unk_token_id]
    assert tok("a b\nc", return_offsets_mapping=True)["offset_mapping"] == [(i, i + 1) for i in range(5)]
    batch = tok(["1+1=", "12+34="], padding=True)["input_ids"]
    assert batch[0][:2] == [0, 0]  # left padding
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "97-53=44\n ok"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"] and loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 1, "left")


def test_shipped_splits_are_disjoint_correct_and_reproducible():
    splits = {split: load_problems(split) for split in SPLITS}
    assert {k: len(v) for k, v in splits.items()} == {"train": 20000, "validation": 200, "test": 500}
    prompts = {k: {p["prompt"] for p in v} for k, v in splits.items()}
    assert len(prompts["validation"]) == 200 and len(prompts["test"]) == 500
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    for problem in splits["validation"] + splits["test"] + splits["train"][:2000]:
        value = eval(problem["prompt"][:-1])
        assert value >= 0 and problem["answer"] == problem["completion"] == str(value)
    # The shipped test split is exactly what the generator's defaults produce.
    assert make_problems(500, 0, unique=True) == splits["test"]
    assert task_data_path("test").name == "test.jsonl"
    with pytest.raises(ValueError, match="known: train"):
        task_data_path("dev")


def test_make_problems_options():
    problems = make_problems(50, 1, max_value=9, ops=("*",), exclude={"3*3="})
    assert all(p["prompt"] != "3*3=" and p["answer"] == str(eval(p["prompt"][:-1])) for p in problems)
    with pytest.raises(ValueError, match="prompts exist"):
        make_problems(101, 0, max_value=9, ops=("+",), unique=True)


def test_flatten_results():
    raw = {"t": {"alias": "t", "exact_match,none": 0.5, "exact_match_stderr,none": "N/A", "acc,strict": 1}}
    assert flatten_results(raw) == {"t": {"exact_match": 0.5, "acc/strict": 1.0}}


def greedy_exact_match(model, tok, task_yaml: Path, limit: int) -> float:
    """Exact match of `model` on the first `limit` test documents, computed from the task's YAML alone.

    Renders ``doc_to_text``/``doc_to_target`` on each document of the test split, generates greedily one prompt
    at a time (no padding) for ``max_gen_toks`` tokens, decodes without special tokens, cuts at each ``until``
    string and compares to the target: what lm-eval's ``generate_until`` and ``exact_match`` do.
    """
    import jinja2

    task = yaml.safe_load(task_yaml.read_text())
    gen = task["generation_kwargs"]
    lines = Path(task["dataset_kwargs"]["data_files"][task["test_split"]]).read_text(encoding="utf-8").splitlines()
    right = 0
    for doc in map(json.loads, lines[:limit]):
        prompt = jinja2.Template(task["doc_to_text"]).render(**doc)
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen["max_gen_toks"],
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in gen["until"]:
            text = text.split(stop)[0]
        right += text == jinja2.Template(task["doc_to_target"]).render(**doc)
    return right / limit


def test_evaluate_shipped_task_exactly_without_context_length_in_config(tok, tmp_path):
    """The shipped arithmetic task scores exactly what greedy decoding of its test prompts earns.

    The model answers "98", then a newline and more digits, to every prompt: right on exactly one of the first
    eight test documents ("33+65="). The expected score is computed independently from the task's YAML and data
    (`greedy_exact_match`). Scoring every answer wrong (or right), lm-eval reading a wrong field or the validation
    split, taking other documents than the first eight, or not cutting at the ``until`` newline fails this. The
    config has no ``max_position_embeddings`` (lm-eval must take ``max_length``), and the model's per-module
    training flags must come back as they were.
    """
    model = bigram_llama(tok, {"=": "9", "9": "8", "8": "\n", "\n": "9"}).eval()
    expected = greedy_exact_match(model, tok, materialise_tasks(tmp_path) / "arithmetic.yaml", limit=8)
    assert expected == 1 / 8  # not a vacuous 0 or 1: the computation above does tell right from wrong
    model.train()
    model.model.layers[0].eval()
    del model.config.max_position_embeddings
    results = evaluate_model(model, tok, ["arithmetic"], limit=8, max_length=64)
    assert results == {"arithmetic": {"exact_match": expected}}
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"=": "7", "7": "<eos>"}, 1.0),
        ({"=": "7", "7": "\n"}, 1.0),  # the task's stop sequence
        ({"=": "8", "8": "<eos>"}, 0.0),
        ({"=": "7", "7": "7"}, 0.0),  # never stops: "77777777"
    ],
)
def test_evaluate_scores_a_known_model_exactly(tok, const_task, table, expected):
    results = evaluate_model(bigram_llama(tok, table), tok, ["const7"], include_path=const_task)
    assert results == {"const7": {"exact_match": expected}}


def test_evaluate_peft_model_keeps_adapter_active(tok, const_task):
    from peft import LoraConfig, get_peft_model

    base = bigram_llama(tok, {"=": "8", "8": "<eos>", "7": "<eos>"})  # wrong on its own
    peft_model = get_peft_model(base, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=["lm_head"]))
    ids = tok.convert_tokens_to_ids
    lora = peft_model.base_model.model.lm_head
    with torch.no_grad():  # the adapter adds 16 to the logit of "7" after "=" (the base gives "8" 8)
        lora.lora_A["default"].weight.copy_(torch.nn.functional.one_hot(torch.tensor([ids("=")]), 64).float())
        lora.lora_B["default"].weight.zero_()[ids("7"), 0] = 2.0
    peft_model.train()
    assert evaluate_model(peft_model, tok, ["const7"], include_path=const_task) == {"const7": {"exact_match": 1.0}}
    assert peft_model.training
    with peft_model.disable_adapter():
        assert evaluate_model(peft_model, tok, ["const7"], include_path=const_task)["const7"]["exact_match"] == 0.0


class StubModule(pl.LightningModule):
    """The attributes LmEvalCallback reads, and one trivial training step."""

    def __init__(self, student, tokenizer, teacher):
        super().__init__()
        self.student, self.student_tokenizer = student, tokenizer
        self.teacher, self.teacher_tokenizer = teacher, tokenizer

    def training_step(self, batch, batch_idx):
        return self.student(input_ids=batch[0]).logits.float().mean()

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.0)

    def _loader(self):
        return DataLoader(TensorDataset(torch.full((1, 4), 4, dtype=torch.long)), batch_size=1)

    train_dataloader = val_dataloader = test_dataloader = _loader


def test_callback_in_a_real_fit(tok, tmp_path):
    module = StubModule(tiny_llama(tok, seed=1), tok, tiny_llama(tok, seed=2))
    callback = LmEvalCallback(limit=4, on_fit_start=True, evaluate_teacher=True)
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        default_root_dir=tmp_path,
        callbacks=[callback],
        num_sanity_val_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    assert 0.0 <= float(trainer.callback_metrics["eval/arithmetic/exact_match"]) <= 1.0
    trainer.test(module)
    assert "eval/arithmetic/exact_match" in trainer.callback_metrics
    history = [json.loads(line) for line in (callback.history_path).read_text().splitlines()]
    assert callback.history_path.parent == tmp_path / "lightning_logs" / "version_0"
    assert [(h["stage"], h["model"], h["step"]) for h in history] == [
        ("fit_start", "student", 0),
        ("fit_start", "teacher", 0),
        ("validation", "student", 1),
        ("test", "student", 1),
    ]  # no entry for the sanity check; the teacher once
    assert all(set(h["results"]) == {"arithmetic"} for h in history)
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"eval/arithmetic/exact_match", "eval_teacher/arithmetic/exact_match"} <= set(logged)


@pytest.mark.parametrize(("task", "plain", "module"), [("arithmetic_fewshot", "arithmetic", "arithmetic"),
                                                     ("sequences", None, "sequences")])
def test_fewshot_task_and_data_share_the_worked_examples(tmp_path, tok, task, plain, module):
    import importlib

    from opd_lightning.data import load_rows

    prefix = importlib.import_module(f"opd_lightning.tasks.{module}").FEWSHOT_PREFIX
    rendered = yaml.safe_load((materialise_tasks(tmp_path) / f"{task}.yaml").read_text())
    assert rendered["doc_to_text"] == prefix + "{{prompt}}"
    for split in ("test", "validation"):  # lm-eval reads the files the builtin data reads
        data_file = rendered["dataset_kwargs"]["data_files"][split]
        bare = [json.loads(line) for line in Path(data_file).read_text(encoding="utf-8").splitlines()[:3]]
        rows = load_rows(f"builtin:{task}/{split}", 3)
        assert [prefix + r["prompt"] for r in bare] == [r["prompt"] for r in rows]
        assert [r["answer"] for r in bare] == [r["answer"] for r in rows]
    if plain:
        assert [prefix + r["prompt"] for r in load_rows(f"builtin:{plain}/train", 3)] == \
            [r["prompt"] for r in load_rows(f"builtin:{task}/train", 3)]
    results = evaluate_model(tiny_llama(tok), tok, [task], limit=4, max_length=64)
    assert set(results[task]) == {"exact_match/strict", "exact_match/first_number"}


def test_sequence_problems_are_correct_and_the_splits_disjoint():
    from opd_lightning.data import load_rows
    from opd_lightning.tasks.sequences import FEWSHOT_PREFIX, STEPS, make_sequences

    splits = {s: [r["prompt"].removeprefix(FEWSHOT_PREFIX) for r in load_rows(f"builtin:sequences/{s}")]
              for s in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [2000, 100, 300]
    assert len(set(splits["test"])) == 300 and len(set(splits["validation"])) == 100
    assert not set(splits["test"]) & set(splits["validation"])
    assert not (set(splits["test"]) | set(splits["validation"])) & set(splits["train"])
    for row in load_rows("builtin:sequences/train", 200) + make_sequences(50, seed=7):
        terms = [int(t) for t in row["prompt"].removeprefix(FEWSHOT_PREFIX).rstrip(",").split(",")]
        step = terms[1] - terms[0]
        assert step in STEPS and terms[2] - terms[1] == step and int(row["answer"]) == terms[2] + step
    with pytest.raises(ValueError, match="unknown builtin data"):
        load_rows("builtin:sequences/dev")


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_callback_skips_fit_start_and_teacher_when_resuming(tok, tmp_path, monkeypatch, caplog):
    """A fit resumed from a checkpoint adds no "fit_start" entry and no teacher entry to the history.

    A real Trainer writes a checkpoint after one step and a second Trainer resumes from it; evaluation itself is
    replaced by a recorder, which keeps the test cheap. Evaluating at fit start regardless of ``trainer.ckpt_path``,
    or forgetting that the teacher was done, fails this, as does an INFO line that does not say where the results
    went.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from opd_lightning import evaluation

    evaluated = []

    def fake_evaluate(model, tokenizer, tasks, **kwargs):
        evaluated.append("teacher" if model is module.teacher else "student")
        return {"arithmetic": {"exact_match": 0.5}}

    monkeypatch.setattr(evaluation, "evaluate_model", fake_evaluate)
    module = StubModule(tiny_llama(tok, seed=1), tok, tiny_llama(tok, seed=2))

    def fit(max_steps, ckpt_path=None):
        callback = LmEvalCallback(on_fit_start=True, evaluate_teacher=True)
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                             callbacks=[callback, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                             num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, ckpt_path=ckpt_path)
        return callback

    first = fit(1)
    assert evaluated == ["student", "teacher", "student"]
    evaluated.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="opd_lightning.evaluation"):
        resumed = fit(2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert evaluated == ["student"]
    assert resumed.history_path == first.history_path == tmp_path / "eval_history.jsonl"
    history = [json.loads(line) for line in first.history_path.read_text().splitlines()]
    assert [(h["stage"], h["model"], h["step"]) for h in history] == [
        ("fit_start", "student", 0),
        ("fit_start", "teacher", 0),
        ("validation", "student", 1),
        ("validation", "student", 2),  # the resumed fit: no fit_start, no teacher
    ]
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "opd_lightning.evaluation"]
    results = {"arithmetic": {"exact_match": 0.5}}
    assert records == [(logging.INFO, f"lm-eval validation student at step 2: {results} -> {first.history_path}")]


def test_long_addition_problems_are_correct_and_the_splits_disjoint():
    from opd_lightning.data import load_rows
    from opd_lightning.tasks.long_addition import DIGITS, make_long_additions, worked_sum

    assert worked_sum(347, 485) == "7+5+0=12,4+8+1=13,3+4+1=8:832"  # by hand: 7+5 = 12 carry 1, 4+8+1 = 13, ...
    assert worked_sum(5, 99) == "5+9+0=14,0+9+1=10:104"  # the shorter operand's missing digit is 0
    splits = {s: load_rows(f"builtin:long_addition/{s}") for s in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [20000, 200, 500]
    prompts = {s: {r["prompt"] for r in rows} for s, rows in splits.items()}
    assert len(prompts["test"]) == 500 and len(prompts["validation"]) == 200
    assert not prompts["test"] & prompts["validation"]
    assert not (prompts["test"] | prompts["validation"]) & prompts["train"]
    for row in splits["train"][:300] + make_long_additions(50, seed=7):
        a, b = (int(v) for v in row["prompt"].rstrip("=").split("+"))
        assert {len(str(a)), len(str(b))} <= set(DIGITS) and row["answer"] == str(a + b)
        steps, total = row["completion"].split(":")
        assert total == row["answer"] and len(steps.split(",")) == max(len(str(a)), len(str(b)))
        assert 18 <= len(row["completion"]) <= 41


def test_long_addition_tasks_score_the_sum_and_the_written_out_steps(tmp_path, tok):
    rendered = {t: yaml.safe_load((materialise_tasks(tmp_path) / f"{t}.yaml").read_text())
                for t in ("long_addition", "long_addition_steps")}
    assert rendered["long_addition"]["doc_to_target"] == "{{answer}}"
    assert rendered["long_addition_steps"]["doc_to_target"] == "{{completion}}"
    from lm_eval.filters.extraction import RegexFilter

    (sum_filter,) = rendered["long_addition"]["filter_list"][0]["filter"][:1]
    extract = RegexFilter(regex_pattern=sum_filter["regex_pattern"])
    assert list(extract.apply([["7+5+0=12,4+8+1=13,3+4+1=8:832"], ["7+5+0=12"]], [{}, {}])) == [["832"], ["[invalid]"]]
    results = evaluate_model(tiny_llama(tok), tok, ["long_addition", "long_addition_steps"], limit=2, max_length=64)
    assert set(results["long_addition"]) == {"exact_match/sum"} and set(results["long_addition_steps"]) == {
        "exact_match"}
