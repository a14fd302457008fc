"""A teacher cache: the teacher's top-k targets, computed once and read by a fit instead of running the teacher.

`opd cache-teacher --config CONFIG --out DIR` runs the configuration's teacher (through its aligner, so the targets
are already on the student's tokens) over the completions that do not depend on the student:
- the dataset's completions (kind "dataset"), which off-policy steps with `off_policy_source: dataset` and the terms
  trained on gold completions read, for every split that has them;
- with `off_policy_source: teacher`, one completion per training row written by the teacher (kind "teacher", with
  the sampling settings and the row's seed at step 0): sequence-level KD on a fixed teacher sample per prompt, as
  in Kim & Rush's original recipe, instead of a fresh sample each time the row comes back.
It keeps the top-k form (`model.teacher_topk` log-probs and the tail's mass, at temperature 1) and, where the aligner
gives them, the teacher's log-prob of each student token. A fit with `model.teacher_cache: DIR` then scores those
batches from the cache; on-policy batches still go to the teacher.

Layout of DIR: `manifest.json` (what the targets depend on, see `describe`, and their sizes) and one safetensors file
per split and kind, `<split>.<kind>.safetensors`, holding flat per-token tensors and per-row offsets:
`offsets` `[R + 1]`; per token: `completion_ids` (the student's ids), `valid` (the completion mask), `attend` (the
attention mask over the completion), `target_mask`, `topk_ids` `[T, k]`, `topk_logprobs` `[T, k]`, `topk_tail`,
optionally `token_logprobs` and `token_spans`; per row: `truncated`. A row's tokens are its completion columns up to
its last attended one.

A cache that does not match the fit's configuration (teacher, tokenizers, aligner, k, the settings that shape the
completions, the data) is refused with the differences named; and every batch read from it is checked against the
tokens the fit built from the data, so a cache never silently scores other text.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from opd_lightning.rollout import Rollout
from opd_lightning.target import TEACHER_TOKEN_LOGPROBS, TEACHER_TOPK, TeacherTarget, TopK

__all__ = ["FORMAT", "TeacherCache", "describe", "fingerprint", "main", "write_cache"]

log = logging.getLogger(__name__)
FORMAT = 1
KINDS = ("dataset", "teacher")
SERVED = frozenset({TEACHER_TOPK, TEACHER_TOKEN_LOGPROBS})  # what a cache can hand a loss


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Its class and vocabulary: two tokenizers with the same fingerprint give the same ids."""
    return f"{type(tokenizer).__name__}:{_digest(sorted(tokenizer.get_vocab().items()))}"


def fingerprint(dataset, completions: bool) -> str:
    """The split's prompts (and completions) in order."""
    fields = ("prompt", "completion") if completions else ("prompt",)
    return _digest([[dataset[i][f] for f in fields] for i in range(len(dataset))])


def describe(module) -> dict:
    """Everything a cached target depends on but the data: the teacher, both tokenizers, the aligner, k and the
    rollout settings that shape the completions and their context."""
    from opd_lightning.hparams import plain, spec_of

    sampling, policy = module.sampling, module.rollout_policy
    return {
        "teacher": plain(module.teacher_spec),
        "student_tokenizer": tokenizer_fingerprint(module.student_tokenizer),
        "teacher_tokenizer": tokenizer_fingerprint(module.teacher_tokenizer),
        "aligner": spec_of(module.aligner),
        "k": module.scorer.teacher_topk,
        "temperature": 1.0,
        "max_new_tokens": sampling.max_new_tokens,
        "max_length": module.max_length,
        "use_chat_template": policy.use_chat_template,
        "mask_special_tokens": policy.mask_special_tokens,
        # only the teacher-written completions depend on these
        "teacher_sampling": {**vars(sampling), "seed": module.seed} if policy.off_policy_source == "teacher" else None,
    }


def _differences(cached: dict, run: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(cached) | set(run)):
        a, b = cached.get(key), run.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache {a!r}, this run {b!r}")
    return out


class TeacherCache:
    """A cache directory opened for reading (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"model.teacher_cache: {self.path} holds no manifest.json; write the cache with "
                                    f"`opd cache-teacher --config CONFIG --out {self.path}`")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"teacher cache {self.path} is in format {self.manifest.get('format')}, this version "
                             f"reads {FORMAT}: write it again with `opd cache-teacher`")
        self._files: dict[tuple[str, str], dict[str, Tensor]] = {}

    def _refuse(self, differences: list[str]) -> None:
        raise ValueError(f"teacher cache {self.path} does not match this configuration ({'; '.join(differences)}): "
                         f"write it again with `opd cache-teacher --config CONFIG --out {self.path}`, or set "
                         "model.teacher_cache to null")

    def check(self, module) -> None:
        """Refuse a cache written for another teacher, tokenizer, aligner, k or rollout settings."""
        differences = _differences(self.manifest["config"], describe(module))
        if differences:
            self._refuse(differences)

    def check_data(self, split: str, kind: str, dataset) -> None:
        """Refuse a cache written from other data for `split`, or without the kind the run reads there."""
        entry = self.manifest["splits"].get(split, {}).get(kind)
        if entry is None:
            self._refuse([f"no {kind!r} targets for the {split} split (the run reads them)"])
        now = fingerprint(dataset, completions=kind == "dataset")
        if entry["fingerprint"] != now or entry["rows"] != len(dataset):
            self._refuse([(f"{split} data: cache {entry['rows']} rows with fingerprint {entry['fingerprint']}, this run "
                          f"{len(dataset)} rows with fingerprint {now}")])

    def has(self, split: str, kind: str) -> bool:
        return kind in self.manifest["splits"].get(split, {})

    def _load(self, split: str, kind: str) -> dict[str, Tensor]:
        if (split, kind) not in self._files:
            from safetensors.torch import load_file

            if not self.has(split, kind):
                self._refuse([f"no {kind!r} targets for the {split} split (the run reads them)"])
            self._files[split, kind] = load_file(self.path / f"{split}.{kind}.safetensors")
        return self._files[split, kind]

    def _rows(self, split: str, kind: str, rows: Tensor | None) -> tuple[dict[str, Tensor], list[slice]]:
        if rows is None:
            raise ValueError("a batch read from the teacher cache must carry its dataset rows (`index`)")
        data = self._load(split, kind)
        offsets = data["offsets"].tolist()
        if int(rows.max()) >= len(offsets) - 1:
            self._refuse([f"row {int(rows.max())} of the {split} split is past the cache's {len(offsets) - 1} rows"])
        return data, [slice(offsets[r], offsets[r + 1]) for r in rows.tolist()]

    def rollout(self, split: str, rows: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, pad_token_id: int) -> Rollout:
        """The teacher-written completions of `rows` as a rollout after the given prompts."""
        data, spans = self._rows(split, "teacher", rows)
        width = max(1, max(s.stop - s.start for s in spans))
        device = prompt_ids.device
        ids = torch.full((len(spans), width), pad_token_id, dtype=prompt_ids.dtype, device=device)
        valid = torch.zeros(len(spans), width, dtype=torch.bool, device=device)
        attend = torch.zeros_like(valid)
        for row, span in enumerate(spans):
            n = span.stop - span.start
            ids[row, :n] = data["completion_ids"][span].to(device, ids.dtype)
            valid[row, :n], attend[row, :n] = data["valid"][span].to(device), data["attend"][span].to(device)
        truncated = data["truncated"][rows.cpu()].to(device)
        return Rollout(torch.cat([prompt_ids, ids], 1), torch.cat([prompt_mask, attend.to(prompt_mask.dtype)], 1),
                       valid, prompt_ids.shape[1], truncated, False, rows=rows, source="teacher")

    def target(self, split: str, rollout: Rollout, needs: frozenset[str]) -> TeacherTarget:
        """The cached target on `rollout` (its `source` is the kind), in the forms `needs` (⊆ top-k, token
        log-probs); refused if the rollout's tokens differ from those the cache scored."""
        kind = rollout.source
        data, spans = self._rows(split, kind, rollout.rows)
        b, n = rollout.completion_mask.shape
        k, device = data["topk_ids"].shape[-1], rollout.sequences.device
        ids = torch.zeros(b, n, k, dtype=torch.long, device=device)
        logprobs = torch.zeros(b, n, k, dtype=data["topk_logprobs"].dtype, device=device)
        tail = torch.full((b, n), float("-inf"), dtype=logprobs.dtype, device=device)
        mask = torch.zeros(b, n, dtype=torch.bool, device=device)
        tokens = torch.zeros(b, n, dtype=logprobs.dtype, device=device) if "token_logprobs" in data else None
        spans_of = torch.zeros(b, n, dtype=torch.long, device=device) if "token_spans" in data else None
        completion, attend = rollout.completion_ids, rollout.attention_mask[:, rollout.prompt_length:].bool()
        for row, span in enumerate(spans):
            m = span.stop - span.start
            same = (m <= n and not attend[row, m:].any()
                    and torch.equal(data["completion_ids"][span].to(device, completion.dtype), completion[row, :m])
                    and torch.equal(data["valid"][span].to(device), rollout.completion_mask[row, :m]))
            if not same:
                row_id = int(rollout.rows[row])
                self._refuse([(f"the cached {kind} completion of {split} row {row_id} is not the one this run built "
                              "(the data, the tokenizer or the completion settings changed)")])
            ids[row, :m] = data["topk_ids"][span].to(device, torch.long)
            logprobs[row, :m] = data["topk_logprobs"][span].to(device)
            tail[row, :m] = data["topk_tail"][span].to(device)
            mask[row, :m] = data["target_mask"][span].to(device)
            if tokens is not None:
                tokens[row, :m] = data["token_logprobs"][span].to(device)
            if spans_of is not None:
                spans_of[row, :m] = data["token_spans"][span].to(device, torch.long)
        if TEACHER_TOKEN_LOGPROBS in needs and tokens is None:
            self._refuse(["the cache holds no token log-probs (its aligner gives none), which a loss here reads"])
        valid = rollout.completion_mask
        coverage = float((mask & valid).sum() / valid.sum().clamp_min(1))
        return TeacherTarget(coverage=coverage, mask=mask, topk=TopK(ids, logprobs, tail, self.manifest["config"]
                                                                     ["temperature"]),
                             token_logprobs=tokens, token_spans=spans_of)


def _rows_of(rollout: Rollout, target: TeacherTarget, with_tokens: bool) -> list[dict[str, Tensor]]:
    """One dict of per-token tensors per row of a scored rollout, cut after its last attended column."""
    attend = rollout.attention_mask[:, rollout.prompt_length:].bool()
    columns = torch.arange(attend.shape[1], device=attend.device)
    lengths = torch.where(attend, columns + 1, 0).amax(1).tolist()
    mask = target.mask if target.mask is not None else torch.ones_like(rollout.completion_mask)
    out = []
    for row, m in enumerate(lengths):
        entry = {"completion_ids": rollout.completion_ids[row, :m].int(), "valid": rollout.completion_mask[row, :m],
                 "attend": attend[row, :m], "target_mask": mask[row, :m],
                 "topk_ids": target.topk.ids[row, :m].int(), "topk_logprobs": target.topk.logprobs[row, :m].float(),
                 "topk_tail": target.topk.tail[row, :m].float()}
        if with_tokens:
            entry["token_logprobs"] = target.token_logprobs[row, :m].float()
            if target.token_spans is not None:
                entry["token_spans"] = target.token_spans[row, :m].int()
        out.append({key: value.detach().cpu() for key, value in entry.items()})
    return out


def write_cache(module, datamodule, out: str | Path, splits: tuple[str, ...] = ("train", "val", "test"),
                batch_size: int | None = None) -> dict:
    """Score the data's (and the teacher's) completions with `module`'s teacher and write the cache to `out`.

    Returns the manifest. `module` needs a teacher and `teacher_topk`; its device is used as it is.
    """
    from safetensors.torch import save_file

    from opd_lightning.data import collate
    from opd_lightning.rollout_source import completions
    from opd_lightning.seeding import SAMPLE_TEACHER

    if module.teacher is None or module.scorer.teacher_topk is None:
        raise ValueError("opd cache-teacher needs model.teacher and model.teacher_topk (the cache keeps the top-k form)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    datamodule.setup()
    source = module.rollout_source
    with_tokens = TEACHER_TOKEN_LOGPROBS in module.aligner.provides
    needs = frozenset({TEACHER_TOPK} | ({TEACHER_TOKEN_LOGPROBS} if with_tokens else set()))
    config = describe(module)
    manifest = {"format": FORMAT, "config": config, "splits": {}, "written": datetime.datetime.now().isoformat(
        timespec="seconds")}
    module.eval()
    for split in splits:
        dataset = datamodule.datasets.get(split)
        if dataset is None:
            continue
        kinds = [kind for kind in KINDS
                 if (kind == "dataset" and all(dataset[i]["completion"] for i in range(len(dataset))))
                 or (kind == "teacher" and split == "train" and config["teacher_sampling"] is not None)]
        for kind in kinds:
            start, rows_out, truncated = time.perf_counter(), [], []
            size = batch_size or datamodule.batch_size
            for lo in range(0, len(dataset), size):
                batch = collate([dataset[i] for i in range(lo, min(lo + size, len(dataset)))])
                rows = torch.tensor(batch["index"], device=module.device)
                prompt_ids, prompt_mask = source.encode_prompts(batch["prompt"], module.device)
                with torch.no_grad():
                    if kind == "dataset":
                        rollout = source.text_rollout(prompt_ids, prompt_mask, completions(batch))
                    else:
                        seeds = source.row_seeds(SAMPLE_TEACHER, 0, batch["index"])
                        rollout = source.teacher_rollout(module.teacher, batch["prompt"], prompt_ids, prompt_mask,
                                                         seeds)
                    rollout = source.finish(rollout, rows, kind)
                    target = module.scorer.teacher_target(rollout, needs, module.student)
                rows_out += _rows_of(rollout, target, with_tokens)
                truncated += rollout.truncated.tolist()
            tensors = {key: torch.cat([r[key] for r in rows_out]) for key in rows_out[0]}
            lengths = torch.tensor([len(r["completion_ids"]) for r in rows_out])
            tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            tensors["truncated"] = torch.tensor(truncated, dtype=torch.bool)
            path = out / f"{split}.{kind}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, path)
            tokens = int(tensors["valid"].sum())
            manifest["splits"].setdefault(split, {})[kind] = {
                "rows": len(dataset), "tokens": tokens, "positions": int(lengths.sum()), "bytes": path.stat().st_size,
                "bytes_per_token": round(path.stat().st_size / max(tokens, 1), 1),
                "fingerprint": fingerprint(dataset, completions=kind == "dataset"),
                "seconds": round(time.perf_counter() - start, 2)}
            log.info("teacher cache: %s %s, %d rows, %d tokens, %.1f bytes per token", split, kind, len(dataset),
                     tokens, manifest["splits"][split][kind]["bytes_per_token"])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def main(argv: list[str]) -> None:
    """`opd cache-teacher --config CONFIG --out DIR [--splits train val test] [--batch-size N] [--device D]`; other
    arguments are passed on as configuration overrides (`--model.teacher_topk 8`)."""
    parser = argparse.ArgumentParser(prog="opd cache-teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the cache directory to write")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--batch-size", type=int, help="rows per teacher pass (default: data.batch_size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args, rest = parser.parse_known_args(argv)
    if "--config" not in rest and not any(a.startswith("--config=") for a in rest):
        parser.error("--config CONFIG is required (the fit's configuration)")
    from opd_lightning.cli import OPDCLI, expand_registry_names
    from opd_lightning.data import PromptDataModule
    from opd_lightning.module import DistillationModule

    argv, sys.argv[1:] = sys.argv[1:], []  # LightningCLI reads `args` below, not the command line it was given
    try:
        cli = OPDCLI(DistillationModule, PromptDataModule, run=False, auto_configure_optimizers=False,
                     args=[*expand_registry_names(rest), "--model.teacher_cache", "null", "--trainer.logger", "false"],
                     save_config_callback=None)
    finally:
        sys.argv[1:] = argv
    module = cli.model.to(args.device)
    module._place_frozen()
    manifest = write_cache(module, cli.datamodule, args.out, tuple(args.splits), args.batch_size)
    for split, kinds in manifest["splits"].items():
        for kind, entry in kinds.items():
            print(f"{split} {kind}: {entry['rows']} rows, {entry['tokens']} tokens, {entry['bytes_per_token']} bytes "
                  f"per token, {entry['seconds']} s")
    print(f"teacher cache written to {args.out}")
