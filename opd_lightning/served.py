"""A served teacher: the teacher runs in an inference server, and training reads its prompt log-probs over HTTP.

`model.teacher: {server: {url: ..., model: ..., top_k: k}, tokenizer: ...}` replaces the teacher model in the
process by `ServedTeacher`, which scores every rollout through the server's OpenAI-compatible completions endpoint
(`echo: true`, `logprobs: k`, prompts sent as the teacher's token ids; the protocol of vLLM, SGLang, lm-eval's
`local-completions`, and `opd serve-teacher`). The teacher's weights never enter training memory.

The server returns, at every position, the log-probs of its k most likely tokens and of the realised token, as
text or, when it honours vLLM's `return_tokens_as_token_ids`, as ids. `ServedTeacher` is called like the model it
stands for (`forward(input_ids, attention_mask, ..., logits_to_keep)`) and returns logits in the teacher's
vocabulary: at each position the returned log-probs, and the rest of the mass spread evenly over the other tokens
(the server says nothing more about them). So every aligner that reads the teacher's logits serves it, across
tokenizers too; the realised tokens' log-probs, which the lookahead walks of `byte_spans` read, are the server's
own. With `model.teacher_topk` at most the server's `top_k`, a target sharing the student's tokenizer is the in-process
teacher's top-k form (ids, log-probs and tail mass, to float rounding); a larger `teacher_topk` would read the spread, and
is refused when the module is built. What needs the teacher's weights or its KV cache is refused there too
(`exact_spans`' branch queries, hidden-state losses, the teacher writing completions).

Requests carry `batch_size` rows each; a connection error, a timeout or an HTTP 408/429/5xx is retried `retries`
times with exponential backoff (`backoff`, 2x, ...); then, or at once for any other HTTP error, `TeacherServerError`
names the server and the fix. A fit that stops on it writes `last.ckpt` first (`resume.Interruptible`), so no
training state is lost: resume with `--ckpt_path last` once the server answers.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from opd_lightning.target import HIDDEN_STATES, TEACHER_LOGITS, TEACHER_NATIVE_LOGITS, VOCAB_PROJECTION

__all__ = ["ServedTeacher", "TeacherServer", "TeacherServerError", "check_served"]

log = logging.getLogger(__name__)
RETRIED = {408, 429, 500, 502, 503, 504}


class TeacherServerError(RuntimeError):
    """The teacher's server could not be reached, or answered something other than what was asked."""


@dataclass
class TeacherServer:
    """Where the teacher is served.

    Args:
        url: the server's base URL, e.g. `http://127.0.0.1:8000/v1` (`/v1` is added when missing).
        model: the model name the server serves (`GET /v1/models` lists it).
        top_k: log-probs asked per position (`logprobs` of the request); at least `model.teacher_topk`.
        batch_size: rollout rows per request.
        timeout: seconds to wait for one response.
        retries: further tries after a connection error, a timeout or an HTTP 408/429/5xx.
        backoff: seconds before the first retry, doubled for each next one.
    """

    url: str
    model: str
    top_k: int = 20
    batch_size: int = 8
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"model.teacher.server.url must start with http:// or https://, got {self.url!r}")
        for name in ("top_k", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model.teacher.server.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise ValueError("model.teacher.server: retries and backoff must be >= 0 and timeout > 0")

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


class ServedTeacher(nn.Module):
    """The teacher behind a completions server, called like a causal LM (see the module docstring)."""

    served = True  # what the module checks to refuse what a server cannot give

    def __init__(self, server: TeacherServer, tokenizer) -> None:
        super().__init__()
        self.server, self.tokenizer = server, tokenizer
        self.config = SimpleNamespace(vocab_size=len(tokenizer), name_or_path=server.model)
        self._by_text: dict[str, int] | None = None
        served = [m.get("id") for m in self._request("GET", "/models").get("data", [])]
        if server.model not in served:
            raise TeacherServerError(f"the server at {server.base} serves {served}, not {server.model!r}: set "
                                     "model.teacher.server.model to one of those")
        log.info("teacher served at %s (%s, top-%d log-probs, vocabulary %d)", server.base, server.model,
                 server.top_k, self.config.vocab_size)

    def get_output_embeddings(self) -> None:
        return None  # no output layer in this process

    def _request(self, method: str, route: str, body: dict | None = None) -> dict:
        url, data = self.server.base + route, None if body is None else json.dumps(body).encode()
        last = None
        for attempt in range(self.server.retries + 1):
            if attempt:
                time.sleep(self.server.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.server.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:500]
                if error.code not in RETRIED:
                    raise TeacherServerError(f"the teacher server at {url} refused the request (HTTP {error.code}): "
                                             f"{detail}") from None
                last = f"HTTP {error.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            log.warning("teacher server %s: %s (try %d of %d)", url, last, attempt + 1, self.server.retries + 1)
        raise TeacherServerError(f"the teacher server at {url} did not answer after {self.server.retries + 1} tries "
                                 f"(last: {last}): start it (e.g. `opd serve-teacher --model DIR --port PORT`) or fix "
                                 "model.teacher.server.url; a fit stopped by this resumes with --ckpt_path last")

    def _token_id(self, key: str) -> int:
        if key.startswith("token_id:"):
            return int(key.removeprefix("token_id:"))
        if self._by_text is None:  # a server that writes tokens as text: its vocabulary pieces (older vLLM), else
            texts: dict[str, list[int]] = {}  # the text each token decodes to, where that text is unique
            for i in range(self.config.vocab_size):
                texts.setdefault(self.tokenizer.decode([i]), []).append(i)
            self._by_text = {t: ids[0] if len(ids) == 1 else -1 for t, ids in texts.items()}
            self._by_text.update(self.tokenizer.get_vocab())
        found = self._by_text.get(key)
        if found is None or found < 0:
            raise TeacherServerError(f"the teacher server returned the token {key!r}, which "
                                     f"{'is not in' if found is None else 'is ambiguous in'} the teacher tokenizer's "
                                     "vocabulary: start the server with tokens returned as ids (vLLM honours "
                                     "return_tokens_as_token_ids) or set model.teacher.tokenizer to the served model's")
        return found

    def score(self, rows: list[list[int]]) -> list[list[dict[int, float]]]:
        """For each row of teacher ids, at each position but the first, `{id: log-prob}` of the server's top-k and
        the realised token (which is listed first)."""
        out = []
        for lo in range(0, len(rows), self.server.batch_size):
            batch = rows[lo : lo + self.server.batch_size]
            body = {"model": self.server.model, "prompt": batch, "max_tokens": 1, "temperature": 0.0, "echo": True,
                    "logprobs": self.server.top_k, "return_tokens_as_token_ids": True}
            choices = sorted(self._request("POST", "/completions", body).get("choices", []), key=lambda c: c["index"])
            if len(choices) != len(batch):
                raise TeacherServerError(f"the teacher server answered {len(choices)} choices for {len(batch)} prompts")
            out += [self._positions(row, choice) for row, choice in zip(batch, choices, strict=True)]
        return out

    def _positions(self, row: list[int], choice: dict) -> list[dict[int, float]]:
        logprobs = choice.get("logprobs") or {}
        lps, tops = logprobs.get("token_logprobs") or [], logprobs.get("top_logprobs") or []
        if len(lps) < len(row) or len(tops) < len(row):
            raise TeacherServerError(f"the teacher server returned log-probs for {min(len(lps), len(tops))} prompt "
                                     f"tokens of {len(row)}: it must echo the prompt with its log-probs (echo: true, "
                                     "logprobs: k), as vLLM, SGLang and `opd serve-teacher` do")
        tokens = logprobs.get("tokens") or []
        if tokens and all(str(t).startswith("token_id:") for t in tokens[: len(row)]) and \
                [self._token_id(t) for t in tokens[: len(row)]] != row:
            raise TeacherServerError("the teacher server echoed other tokens than the prompt's ids: it must take "
                                     "prompts as token ids, unchanged")
        want = min(self.server.top_k, self.config.vocab_size)
        positions = []
        for i in range(1, len(row)):
            top = {self._token_id(key): float(v) for key, v in (tops[i] or {}).items()}
            if len(top) < want:
                raise TeacherServerError(f"the teacher server returned {len(top)} log-probs at a position, fewer than "
                                         f"model.teacher.server.top_k = {self.server.top_k}: raise the server's limit "
                                         "(vLLM: --max-logprobs; opd serve-teacher: --max-logprobs) or lower top_k")
            positions.append({row[i]: float(lps[i]), **{t: v for t, v in top.items() if t != row[i]}})
        return positions

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                logits_to_keep: int = 0, use_cache: bool = False, **_) -> SimpleNamespace:
        """Logits `[B, K, V]` at the last `logits_to_keep` positions (all with 0): the server's log-probs where it
        gave them, the rest of each position's mass spread evenly; positions outside `attention_mask`, and each
        row's last (nothing follows it), are zero. No KV cache (`cache` is None)."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        size, width = self.config.vocab_size, input_ids.shape[1]
        start = width - (logits_to_keep or width)  # the first kept column
        where = [m.nonzero().squeeze(-1).tolist() for m in mask.cpu()]
        scores = self.score([input_ids[b, w].tolist() for b, w in enumerate(where)])
        # Per kept position: (row, column) and the spread log-prob; per returned log-prob: (position, id, value).
        at, fills, entries = [], [], []
        for b, (cols, positions) in enumerate(zip(where, scores, strict=True)):
            for col, known in zip(cols[:-1], positions, strict=True):  # the position predicting the next real token
                if col >= start:
                    entries += [(len(at), t, v) for t, v in known.items()]
                    at.append((b, col - start))
                    fills.append(spread_fill(list(known.values()), size))
        logits = torch.zeros(input_ids.shape[0], width - start, size)  # [B, K, V]
        if at:
            rows, cols = torch.tensor(at).T
            position, ids, values = torch.tensor(entries, dtype=torch.float64).T
            ids, position = ids.long(), position.long()
            if int(ids.max()) >= size or int(ids.min()) < 0:
                bad = int(ids.max()) if int(ids.max()) >= size else int(ids.min())
                raise TeacherServerError(f"the teacher server returned token id {bad}, outside the teacher "
                                         f"tokenizer's vocabulary of {size}: set model.teacher.tokenizer to the served "
                                         "model's")
            logits[rows, cols] = torch.tensor(fills).unsqueeze(-1)  # the rest of each position's mass, spread evenly
            logits[rows[position], cols[position], ids] = values.float()  # what the server returned
        return SimpleNamespace(logits=logits.to(input_ids.device), cache=None)


def spread_fill(values: list[float], size: int) -> float:
    """The log-prob of each of the `size - len(values)` tokens the server did not return, when the returned ones have
    log-probs `values`: the rest of the mass spread evenly (far below every returned one when rounding left none)."""
    rest, others = 1.0 - math.fsum(math.exp(v) for v in values), size - len(values)
    return math.log(rest / others) if others and rest > 0 else min(values) - 30.0


def check_served(terms, aligner, teacher_topk: int | None, policy, server: TeacherServer) -> None:
    """Refuse, naming the fix, what a served teacher cannot give: its KV cache (branch queries), its hidden states,
    its whole distribution (dense and native targets; the top-k form up to `server.top_k` is what it gives), and
    completions written by it."""
    if aligner.queries_teacher:
        raise ValueError(f"aligner {aligner.registry_name!r} queries the teacher off the realised path through its KV "
                         "cache, which a served teacher does not expose: use byte_spans (the same targets along the "
                         "realised text) or a teacher loaded in the process (model.teacher.path)")
    whole = {HIDDEN_STATES: "hidden states", TEACHER_NATIVE_LOGITS: "whole distribution in its own vocabulary",
             VOCAB_PROJECTION: "whole distribution in its own vocabulary"}
    for term in terms:
        if term.loss.reads_layers:
            raise ValueError(f"loss {term.loss.registry_name!r} reads the teacher's layers' hidden states, which a "
                             "served teacher does not return: load the teacher in the process (model.teacher.path)")
        if term.reference != "teacher" or not term.needs_reference:
            continue
        missing = sorted({whole[c] for c in term.loss.requires & set(whole)})
        if missing:
            raise ValueError(f"loss {term.loss.registry_name!r} reads the teacher's {' and '.join(missing)}, which a "
                             "served teacher does not return (only top-k and token log-probs): load the teacher in "
                             "the process (model.teacher.path), or choose a loss that reads the top-k form")
        if TEACHER_LOGITS in term.loss.requires and teacher_topk is None:
            raise ValueError(f"loss {term.loss.registry_name!r} reads the teacher's distribution, and a served teacher "
                             f"returns its top {server.top_k} log-probs per position: set model.teacher_topk (at most "
                             "model.teacher.server.top_k)")
    if teacher_topk is not None and teacher_topk > server.top_k:
        raise ValueError(f"model.teacher_topk = {teacher_topk} is more than the served teacher returns "
                         f"(model.teacher.server.top_k = {server.top_k}): raise top_k or lower teacher_topk")
    if policy.on_policy_fraction < 1 and policy.off_policy_source == "teacher":
        raise ValueError("rollout.off_policy_source 'teacher' has the teacher write completions, which a served "
                         "teacher does not do here: use off_policy_source 'dataset', or a teacher in the process")
