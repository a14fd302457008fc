"""A served teacher: `opd serve-teacher` runs the teacher in its own process, and a fit scores its rollouts through the
completions protocol (echo + logprobs) instead of holding the teacher.

Every test talks HTTP to a real server on localhost: `opd serve-teacher` in a subprocess for the main path, the
same server class in a thread for the failures (a server that errors, or answers short).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from test_module import make_module
from test_resume import metrics, opd
from test_teacher_cache import batch_of, data_module

from opd_lightning.models import HFModel
from opd_lightning.serve import CompletionsModel, make_server, spawn
from opd_lightning.served import ServedTeacher, TeacherServer, TeacherServerError
from opd_lightning.target import TEACHER_TOKEN_LOGPROBS, TEACHER_TOPK

NEEDS = frozenset({TEACHER_TOPK, TEACHER_TOKEN_LOGPROBS})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, port: int = 0, name: str = "teacher", max_logprobs: int = 512):
    """`opd serve-teacher` in a subprocess; returns (process, base URL) once it serves."""
    return spawn(["--model", model_dir, "--port", str(port), "--name", name, "--max-logprobs", str(max_logprobs)])


def serving(model_dir: str):
    process, url = start_server(model_dir)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def served(teacher_dir):
    """The tiny character teacher, served."""
    yield from serving(teacher_dir)


@pytest.fixture(scope="module")
def served_bpe(bpe_teacher_dir):
    """The tiny BPE teacher, served."""
    yield from serving(bpe_teacher_dir)


def served_spec(url: str, tokenizer: str, **options) -> HFModel:
    return HFModel(server=TeacherServer(url=url, model="teacher", **options), tokenizer=tokenizer)


def test_the_served_logits_carry_the_teachers_top_k_and_realised_log_probs(served, teacher_dir):
    tokenizer = HFModel(path=teacher_dir).load_tokenizer()
    model = HFModel(path=teacher_dir).load_model(tokenizer).eval()
    teacher = ServedTeacher(TeacherServer(url=served, model="teacher", top_k=4, batch_size=2), tokenizer)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 3], [4, 5, 6, 7, 8, 9, 10, 11], [0, 12, 13, 14, 15, 2, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8, [0, 1, 1, 1, 1, 1, 0, 0]])  # both paddings, two requests
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    got = teacher(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=5).logits
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits, -1)
    want = want[:, -5:]
    for b in range(3):
        real = mask[b, -5:].bool().nonzero().squeeze(-1).tolist()[:-1]  # positions predicting a next real token
        for p in real:
            top = want[b, p].topk(4)
            torch.testing.assert_close(got[b, p, top.indices], top.values, rtol=0, atol=1e-5)
            nxt = ids[b, -5 + p + 1]
            torch.testing.assert_close(got[b, p, nxt], want[b, p, nxt], rtol=0, atol=1e-5)
            rest = torch.ones(got.shape[-1], dtype=torch.bool)
            rest[top.indices], rest[nxt] = False, False
            assert got[b, p, rest].unique().numel() == 1  # the rest spread evenly ...
            torch.testing.assert_close(got[b, p].exp().sum(), torch.tensor(1.0), rtol=0, atol=1e-5)  # ... conserving mass


def test_a_served_target_and_step_equal_the_in_process_teachers(served, teacher_dir):
    """Same tokenizer, `teacher_topk` within the server's `top_k`: the top-k form, token log-probs and a training
    step's loss and gradients are the in-process teacher's."""
    common = {"teacher_topk": 3, "loss": "forward_kl", "on_policy_fraction": 0.0}
    local = make_module(teacher_dir, **common)
    remote = make_module(teacher_dir, teacher=served_spec(served, teacher_dir, top_k=5), **common)
    remote.student.load_state_dict(local.student.state_dict())
    rollout = local.rollouts(batch_of(data_module(), "train", [0, 5, 9]), train=True, step=0)["rollout"]
    a = local.scorer.teacher_target(rollout, NEEDS, local.student)
    b = remote.scorer.teacher_target(rollout, NEEDS, remote.student)
    valid = rollout.completion_mask
    assert torch.equal(a.topk.ids[valid], b.topk.ids[valid])
    torch.testing.assert_close(b.topk.logprobs[valid], a.topk.logprobs[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(b.topk.tail[valid], a.topk.tail[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(b.token_logprobs[valid], a.token_logprobs[valid], rtol=0, atol=1e-5)
    batch = batch_of(data_module(), "train", [3, 9, 1, 6])
    losses, grads = [], []
    for module in (local, remote):
        module.manual_backward = lambda loss: loss.backward()  # outside a Trainer
        losses.append(module._run_step(batch, train=True)[0])
        grads.append([p.grad.clone() for p in module.student.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    for g_remote, g_local in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_remote, g_local, rtol=1e-4, atol=1e-6)


def test_across_tokenizers_a_served_teacher_with_its_whole_vocabulary_gives_the_aligned_target(served_bpe,
                                                                                                bpe_teacher_dir):
    """byte_spans on a BPE teacher for a character student: with `top_k` covering the teacher's vocabulary nothing
    is spread, and the projected top-k target equals the in-process teacher's."""
    size = len(HFModel(path=bpe_teacher_dir).load_tokenizer())
    student = HFModel(config=TINY, tokenizer="builtin:char", seed=0)
    common = {"student": student, "aligner": "byte_spans", "teacher_topk": 2, "loss": "forward_kl",
              "on_policy_fraction": 0.0}
    local = make_module(bpe_teacher_dir, **common)
    remote = make_module(bpe_teacher_dir, teacher=served_spec(served_bpe, bpe_teacher_dir, top_k=size), **common)
    rollout = local.rollouts(batch_of(data_module(), "train", [1, 8, 3]), train=True, step=0)["rollout"]
    a = local.scorer.teacher_target(rollout, NEEDS, local.student)
    b = remote.scorer.teacher_target(rollout, NEEDS, remote.student)
    valid = rollout.completion_mask & a.mask
    assert valid.any() and torch.equal(b.mask & rollout.completion_mask, valid)
    assert torch.equal(a.topk.ids[valid], b.topk.ids[valid])
    torch.testing.assert_close(b.topk.logprobs[valid], a.topk.logprobs[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(b.token_logprobs[valid], a.token_logprobs[valid], rtol=0, atol=1e-5)


class Flaky(CompletionsModel):
    """Fails its first `failures` requests (HTTP 500); with `short`, answers one log-prob per position."""

    def __init__(self, *args, failures: int = 0, short: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failures, self.short, self.calls = failures, short, 0

    def complete(self, body: dict) -> dict:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("the accelerator is busy")
        out = super().complete(body)
        if self.short:
            for choice in out["choices"]:
                top = choice["logprobs"]["top_logprobs"]
                choice["logprobs"]["top_logprobs"] = [t and dict(list(t.items())[:1]) for t in top]
        return out


@pytest.fixture
def threaded(teacher_dir):
    """Start a `Flaky` server in a thread: `threaded(**options)` returns (model, URL)."""
    tokenizer = HFModel(path=teacher_dir).load_tokenizer()
    model = HFModel(path=teacher_dir).load_model(tokenizer)
    servers = []

    def start(**options):
        flaky = Flaky(model, tokenizer, "teacher", **options)
        server = make_server(flaky, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return flaky, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_failing_server_is_retried_with_backoff(threaded, teacher_dir):
    flaky, url = threaded(failures=2)
    tokenizer = HFModel(path=teacher_dir).load_tokenizer()
    teacher = ServedTeacher(TeacherServer(url=url, model="teacher", top_k=2, retries=2, backoff=0.01), tokenizer)
    assert flaky.calls == 0  # the model list is not a completion
    out = teacher(input_ids=torch.tensor([[4, 5, 6, 7]]), logits_to_keep=3).logits
    assert flaky.calls == 3 and torch.isfinite(out).all()
    flaky.calls, flaky.failures = 0, 5
    with pytest.raises(TeacherServerError, match=r"did not answer after 3 tries \(last: HTTP 500.*busy.*opd serve"):
        teacher(input_ids=torch.tensor([[4, 5, 6, 7]]), logits_to_keep=3)


def test_a_server_that_answers_fewer_log_probs_than_asked_is_refused(threaded, teacher_dir):
    _, url = threaded(short=True)
    teacher = ServedTeacher(TeacherServer(url=url, model="teacher", top_k=3),
                            HFModel(path=teacher_dir).load_tokenizer())
    with pytest.raises(TeacherServerError, match=r"returned 1 log-probs at a position, fewer than .*top_k = 3"):
        teacher(input_ids=torch.tensor([[4, 5, 6, 7]]), logits_to_keep=3)


def test_unreachable_servers_unknown_models_and_refused_requests_name_the_fix(served, teacher_dir):
    tokenizer = HFModel(path=teacher_dir).load_tokenizer()
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherServerError, match=rf"{nowhere}/v1/models did not answer after 2 tries.*Connection"
                                                 r".*opd serve-teacher.*model.teacher.server.url"):
        ServedTeacher(TeacherServer(url=nowhere, model="teacher", retries=1, backoff=0.01), tokenizer)
    with pytest.raises(TeacherServerError, match=r"serves \['teacher'\], not 'other'"):
        ServedTeacher(TeacherServer(url=served, model="other"), tokenizer)
    with pytest.raises(TeacherServerError, match=r"refused the request \(HTTP 400\).*logprobs must be .* 0 to 512"):
        ServedTeacher(TeacherServer(url=served, model="teacher", top_k=600), tokenizer)(
            input_ids=torch.tensor([[4, 5, 6]]))
    with pytest.raises(ValueError, match="a served teacher needs `tokenizer`"):
        HFModel(server=TeacherServer(url=served, model="teacher"))
    with pytest.raises(ValueError, match="exactly one of `path`"):
        HFModel(path=teacher_dir, server=TeacherServer(url=served, model="teacher"), tokenizer=teacher_dir)


@pytest.mark.parametrize(("options", "message"), [
    ({"aligner": "exact_spans", "teacher_topk": 2}, r"exact_spans.*KV cache.*use byte_spans"),
    ({"loss": "forward_kl"}, r"top 5 log-probs per position: set model.teacher_topk"),
    ({"teacher_topk": 8}, r"teacher_topk = 8 is more than the served teacher returns"),
    ({"teacher_topk": 2, "on_policy_fraction": 0.5, "off_policy_source": "teacher"}, r"teacher write completions"),
    ({"loss": "dskd", "aligner": "dskd_cma"}, r"reads the teacher's hidden states"),
    ({"teacher_topk": 2, "extra_terms": [{"loss": "hidden_match", "completions": "gold"}]},
     r"hidden_match.*reads the teacher's layers' hidden states"),
    ({"student_served": True}, r"only a teacher can be served"),
])
def test_what_a_served_teacher_cannot_give_is_refused_when_the_module_is_built(served_bpe, bpe_teacher_dir, options,
                                                                               message):
    spec = served_spec(served_bpe, bpe_teacher_dir, top_k=5)
    options = {"loss": "forward_kl", "aligner": "byte_spans", "student": HFModel(config=TINY, tokenizer="builtin:char"),
               **options}
    if options.pop("student_served", False):
        options["student"] = spec
    with pytest.raises(ValueError, match=message):
        make_module(bpe_teacher_dir, teacher=spec, **options)


def served_config(tmp_path: Path, root: Path, url: str, teacher_dir: str, callbacks: list | None = None) -> Path:
    steps = 6
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": steps, "accelerator": "cpu", "default_root_dir": str(root), "log_every_n_steps": 1,
                    "enable_checkpointing": False, "check_val_every_n_epoch": None, "val_check_interval": steps,
                    "limit_val_batches": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "opd_lightning.export.ExportStudent"},
                                  {"class_path": "opd_lightning.evaluation.LmEvalCallback",
                                   "init_args": {"tasks": ["arithmetic"], "limit": 6, "on_fit_start": True,
                                                 "evaluate_teacher": True}}, *(callbacks or [])]},
        "model": {"student": {"config": dict(TINY, max_position_embeddings=32), "tokenizer": "builtin:char"},
                  "teacher": {"server": {"url": url, "model": "teacher", "top_k": 5, "retries": 1, "backoff": 0.05},
                              "tokenizer": teacher_dir},
                  "aligner": "byte_spans", "loss": "forward_kl", "teacher_topk": 3,
                  "rollout": {"on_policy_fraction": 0.5}, "sampling": {"max_new_tokens": 4}},
        "data": {"batch_size": 4, "limit_train": 12, "limit_eval": 4},  # 3 steps an epoch: the failure is mid-epoch
    }
    path = tmp_path / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("stop", [2, 3])  # mid-epoch; at the end of the first epoch (3 steps an epoch)
def test_a_fit_across_tokenizers_survives_its_server_stopping_and_resumes_by_last(bpe_teacher_dir, tmp_path, stop):
    """`opd fit` with a served BPE teacher for a character student; the server is killed after step `stop`, the fit
    ends with `last.ckpt` and a message naming the fix; with the server restarted, `--ckpt_path last` ends as the run
    whose server never stopped (metrics, evaluations of the student and of the served teacher, exported student)."""
    port = free_port()
    process, url = start_server(bpe_teacher_dir, port=port)
    try:
        straight = opd("fit", "--config", str(served_config(tmp_path, tmp_path / "straight", url, bpe_teacher_dir)))
        assert straight.returncode == 0, straight.stderr[-3000:]
        root = tmp_path / "failed"
        kill = {"class_path": "signal_at.KillAt", "init_args": {"step": stop, "pid": process.pid, "port": port}}
        failed = opd("fit", "--config", str(served_config(tmp_path, root, url, bpe_teacher_dir, callbacks=[kill])))
        process.wait(timeout=30)
        assert failed.returncode != 0
        assert "did not answer after 2 tries" in failed.stderr and "--ckpt_path last" in failed.stderr
        assert f"holds the {stop} steps before it" in failed.stderr
        assert (root / "logs" / "version_0" / "checkpoints" / "last.ckpt").is_file() and not (root / "hf").exists()
        process, url = start_server(bpe_teacher_dir, port=port)
        resumed = opd("fit", "--config", str(served_config(tmp_path, root, url, bpe_teacher_dir)), "--ckpt_path", "last")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"at step {stop}" in resumed.stderr
    finally:
        process.terminate()
    want, got = metrics(tmp_path / "straight"), metrics(root)
    assert {r["step"] for r in got} == {str(s) for s in range(6)} and len(got) == len(want)
    for a, b in zip(want, got, strict=True):
        for key, value in a.items():
            if value:
                assert float(b[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-9, nan_ok=True), (a["step"], key)
    history = (root / "logs" / "version_0" / "eval_history.jsonl").read_text()
    assert history == (tmp_path / "straight" / "logs" / "version_0" / "eval_history.jsonl").read_text()
    assert '"stage": "fit_start", "model": "teacher"' in history  # scored through the server by lm-eval
    from safetensors.torch import load_file

    exported = load_file(root / "hf" / "model.safetensors")
    for name, value in load_file(tmp_path / "straight" / "hf" / "model.safetensors").items():
        torch.testing.assert_close(exported[name], value, rtol=1e-6, atol=1e-8, msg=name)


def test_lm_evals_own_completions_client_reads_the_server_as_the_in_process_model(served, teacher_dir):
    """The protocol, checked by an independent client: lm-eval's `local-completions` model, pointed at the server,
    gives the log-likelihoods, greedy flags and greedy generations that its `HFLM` gives on the model in memory."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tokenizer = HFModel(path=teacher_dir).load_tokenizer()
    model = HFModel(path=teacher_dir).load_model(tokenizer).eval()
    local = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, backend="causal")
    remote = LocalCompletionsAPI(base_url=f"{served}/completions", model="teacher", tokenizer_backend="huggingface",
                                 tokenizer=teacher_dir, batch_size=4, max_length=64)
    pairs = [("12+34=", "46"), ("7-5=", "2"), ("99-17=", "82"), ("3+3=", "6\n")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    want = local.loglikelihood(requests)
    assert all(a < -0.5 for a, _ in want)  # a random teacher: real, distinct log-likelihoods
    for (a, greedy_a), (b, greedy_b) in zip(want, remote.loglikelihood(requests), strict=True):
        assert b == pytest.approx(a, abs=1e-4) and greedy_a == greedy_b
    prompts = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 6}), i)
               for i, (p, _) in enumerate(pairs)]
    generated = local.generate_until(prompts)
    assert any(generated) and remote.generate_until(prompts) == generated


def test_a_server_that_writes_tokens_as_text_is_read_through_the_teacher_tokenizer(threaded, teacher_dir):
    """Servers that ignore `return_tokens_as_token_ids` write each token as its text: the same logits come back."""
    flaky, url = threaded()
    tokenizer = HFModel(path=teacher_dir).load_tokenizer()
    teacher = ServedTeacher(TeacherServer(url=url, model="teacher", top_k=3), tokenizer)
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    by_id = teacher(input_ids=ids).logits
    plain = flaky.complete
    flaky.complete = lambda body: plain({**body, "return_tokens_as_token_ids": False})
    assert "token_id:" not in str(flaky.complete({"prompt": [4, 5], "max_tokens": 1, "echo": True, "logprobs": 2}))
    torch.testing.assert_close(teacher(input_ids=ids).logits, by_id, rtol=0, atol=0)
