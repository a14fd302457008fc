"""`opd serve-teacher`: a small OpenAI-compatible completions server for a teacher, with prompt log-probs.

A served teacher (`model.teacher.server`, `opd_lightning.served`) reads the protocol that vLLM and SGLang serve and
that lm-eval's `local-completions` model uses: `POST /v1/completions` with `echo: true` and `logprobs: k` returns,
for every prompt token, its log-prob and the k most likely tokens at its position. This module serves any model
`HFModel` loads (a saved directory, a GGUF file, 8/4-bit) through that protocol, so that a teacher can run in its
own process, or on another machine, where neither of those servers can run (they need CUDA); and so that the
client is tested against a real server in `make test`.

What it implements of the protocol: `GET /v1/models`; `POST /v1/completions` with `prompt` as a string, a list of
token ids, or a list of either (one choice each); `max_tokens` (0 scores the prompt only), `temperature` (0:
greedy), `seed`, `stop`, `echo`, `logprobs` (at most `--max-logprobs`, refused above it as vLLM does) and vLLM's
`return_tokens_as_token_ids` (tokens written `token_id:<id>` instead of their text). Each choice's `logprobs` holds
`tokens`, `token_logprobs` (None for the first prompt token), `top_logprobs` (the k most likely plus the realised
token, as vLLM returns them) and `text_offset`. Requests are served one at a time (one model, one lock); the
prompts of a request run as one padded batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from opd_lightning.rollout import position_ids

__all__ = ["CompletionsModel", "main", "make_server", "spawn"]

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the server refuses (HTTP 400), with the reason."""


class CompletionsModel:
    """A causal LM and its tokenizer answering completions requests."""

    def __init__(self, model, tokenizer, name: str, max_logprobs: int = 20) -> None:
        self.model, self.tokenizer, self.name, self.max_logprobs = model.eval(), tokenizer, name, max_logprobs
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.lock = threading.Lock()

    def token(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.tokenizer.decode([token_id])

    def prompts(self, prompt) -> list[list[int]]:
        """`prompt` (a string, token ids, or a list of either) as lists of token ids."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("prompt must be a string, a list of token ids, or a non-empty list of either")
        out = []
        for p in prompt:
            ids = self.tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else p
            if not ids or not all(isinstance(i, int) and 0 <= i < len(self.tokenizer) for i in ids):
                raise RequestError("a prompt's token ids must be a non-empty list of integers below the vocabulary "
                                   f"size {len(self.tokenizer)}")
            out.append(list(ids))
        return out

    @torch.no_grad()
    def logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax of the model's logits at every position of each row, `[L, V]` each (one padded batch)."""
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):  # left padding: each row's positions count from its first token
            ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=position_ids(mask).to(device)).logits
        logp = torch.log_softmax(logits.float(), -1).cpu()  # [R, W, V]
        return [logp[r, width - len(row):] for r, row in enumerate(rows)]

    def complete(self, body: dict) -> dict:
        """The response to one `/v1/completions` request."""
        if body.get("model") not in (None, self.name):
            raise RequestError(f"model {body.get('model')!r} is not served here; this server serves {self.name!r}")
        k = body.get("logprobs")
        if k is not None and (not isinstance(k, int) or not 0 <= k <= self.max_logprobs):
            raise RequestError(f"logprobs must be an integer from 0 to {self.max_logprobs} (this server's "
                               f"--max-logprobs), got {k!r}")
        new, temperature = int(body.get("max_tokens", 16)), float(body.get("temperature", 1.0))
        echo, as_ids = bool(body.get("echo", False)), bool(body.get("return_tokens_as_token_ids", False))
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        rows = self.prompts(body.get("prompt"))
        if self.context is not None and max(map(len, rows)) > self.context:
            raise RequestError(f"a prompt of {max(map(len, rows))} tokens exceeds the model's context of "
                               f"{self.context} tokens")
        generator = torch.Generator().manual_seed(int(body.get("seed", 0) or 0))
        with self.lock:
            if new <= 1:  # scoring (lm-eval and the served teacher ask one token): the prompt's pass picks it
                scores = self.logprobs(rows)
                full = [row + [self._pick(logp[-1], temperature, generator)] * new for row, logp in zip(rows, scores)]
            else:
                full = [row + self._generate(row, new, temperature, generator, stop) for row in rows]
                scores = self.logprobs(full)
        choices = [self._choice(i, row, seq, logp, k, echo, as_ids, stop)
                   for i, (row, seq, logp) in enumerate(zip(rows, full, scores, strict=True))]
        used = sum(len(r) for r in rows)
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": used, "completion_tokens": sum(len(f) for f in full) - used,
                          "total_tokens": sum(len(f) for f in full)}}

    @torch.no_grad()
    def _generate(self, row: list[int], new: int, temperature: float, generator: torch.Generator,
                  stop: list[str]) -> list[int]:
        """Up to `new` tokens (fewer at EOS, a stop string or the end of the context), one full forward each: a
        reference server, not a fast one."""
        out, eos = [], self.tokenizer.eos_token_id
        room = new if self.context is None else min(new, self.context - len(row))
        for _ in range(room):
            token = self._pick(self.logprobs([row + out])[0][-1], temperature, generator)
            out.append(token)
            if token == eos or any(s in self._text(out) for s in stop):
                break
        return out

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _pick(logp: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
        if temperature == 0:
            return int(logp.argmax())
        return int(torch.multinomial(torch.softmax(logp / temperature, -1), 1, generator=generator))

    def _choice(self, index: int, prompt: list[int], seq: list[int], logp: torch.Tensor, k: int | None, echo: bool,
                as_ids: bool, stop: list[str]) -> dict:
        generated = seq[len(prompt):]
        text = self._text(generated)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        finish = "stop" if cut >= 0 or (generated and generated[-1] == self.tokenizer.eos_token_id) else "length"
        if cut >= 0:
            text = text[:cut]
        choice = {"index": index, "text": (self._text(prompt) if echo else "") + text,
                  "finish_reason": finish, "logprobs": None}
        if k is None:
            return choice
        first = 0 if echo else len(prompt)
        tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
        for i in range(first, len(seq)):
            piece = self.tokenizer.decode([seq[i]])
            tokens.append(self.token(seq[i], as_ids))
            offsets.append(offset)
            offset += len(piece)
            if i == 0:  # nothing predicts the first token
                token_logprobs.append(None)
                top.append(None)
                continue
            row = logp[i - 1]  # [V] the prediction of token i
            token_logprobs.append(float(row[seq[i]]))
            best = row.topk(min(k, row.shape[0])).indices.tolist() if k else []
            top.append({self.token(t, as_ids): float(row[t]) for t in dict.fromkeys([*best, seq[i]])})
        choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                              "text_offset": offsets}
        return choice


def make_server(model: CompletionsModel, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server answering the completions protocol for `model` (port 0: any free port)."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._send(status, {"object": "error", "message": message, "type": status.phrase, "code": int(status)})

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(HTTPStatus.OK, {"object": "list", "data": [{"id": model.name, "object": "model"}]})
            elif self.path.rstrip("/") in ("/health", ""):
                self._send(HTTPStatus.OK, {"status": "ok"})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

        def do_POST(self) -> None:
            if self.path.rstrip("/") not in ("/v1/completions", "/completions"):
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}: this server answers /v1/completions")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._send(HTTPStatus.OK, model.complete(body))
            except (RequestError, json.JSONDecodeError, TypeError) as error:
                self._error(HTTPStatus.BAD_REQUEST, str(error))
            except Exception as error:  # the server keeps serving; the client sees a 500 and may retry
                log.exception("request failed")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")

        def log_message(self, format: str, *args) -> None:
            log.debug(format, *args)

    return ThreadingHTTPServer((host, port), Handler)


def spawn(args: list[str]) -> tuple[subprocess.Popen, str]:
    """`opd serve-teacher ARGS` in a subprocess, returned once it serves: (the process, its base URL)."""
    process = subprocess.Popen([sys.executable, "-m", "opd_lightning", "serve-teacher", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    found = re.search(r"serving .* at (http://\S+)", line)
    if not found:
        process.kill()
        raise RuntimeError(f"opd serve-teacher {' '.join(args)} did not start: {line!r}")
    return process, found.group(1)


def main(argv: list[str]) -> None:
    """`opd serve-teacher --model PATH [--tokenizer T] [--gguf-file F] [--dtype D] [--quantization Q] [--name N]
    [--host H] [--port P] [--max-logprobs K]`: serve until interrupted."""
    parser = argparse.ArgumentParser(prog="opd serve-teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved model directory (or one holding --gguf-file)")
    parser.add_argument("--tokenizer", help="tokenizer directory or id (default: the model's)")
    parser.add_argument("--gguf-file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", choices=["8bit", "nf4", "fp4"])
    parser.add_argument("--name", help="the model name clients send (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    parser.add_argument("--max-logprobs", type=int, default=20, help="the largest `logprobs` a request may ask")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from opd_lightning.models import HFModel

    spec = HFModel(path=args.model, tokenizer=args.tokenizer, gguf_file=args.gguf_file, dtype=args.dtype,
                   quantization=args.quantization)
    tokenizer = spec.load_tokenizer()
    model = spec.load_model(tokenizer)
    if args.quantization is None:
        model = model.to(args.device)
    server = make_server(CompletionsModel(model, tokenizer, args.name or args.model, args.max_logprobs), args.host,
                         args.port)
    host, port = server.server_address[:2]
    print(f"serving {args.name or args.model} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
