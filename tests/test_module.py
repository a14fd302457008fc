"""End-to-end behaviour of DistillationModule with tiny in-code models (no network)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY
from lightning.pytorch import Trainer, seed_everything

from opd_lightning.data import PromptDataModule
from opd_lightning.models import HFModel, LoraOptions
from opd_lightning.module import DistillationModule
from opd_lightning.objective import LossTerm
from opd_lightning.reference import ReferenceScorer
from opd_lightning.rollout import SamplingConfig
from opd_lightning.rollout_source import RolloutPolicy

BATCH = {"prompt": ["12+34=", "7-3=", "5+5=", "81-9="], "completion": ["46", "4", "10", "72"],
         "answer": ["46", "4", "10", "72"]}


POLICY = {"on_policy_fraction", "off_policy_source", "micro_batch_size", "max_length", "use_chat_template",
          "mask_special_tokens"}


def make_module(teacher_dir, **overrides):
    """A tiny module; rollout-policy options may be given flat here (they go into `RolloutPolicy`)."""
    args = {"student": HFModel(config=TINY, tokenizer="builtin:char", seed=0),
            "teacher": HFModel(path=teacher_dir), "loss": "reverse_kl",
            "sampling": SamplingConfig(max_new_tokens=4),
            "optimizer": lambda params: torch.optim.AdamW(params, lr=1e-3)}
    policy = {k: overrides.pop(k) for k in list(overrides) if k in POLICY}
    args.update(overrides)
    return DistillationModule(**args, rollout=RolloutPolicy(**policy))


def fit(module, tmp_path, max_steps=2, **trainer_args):
    data = PromptDataModule(batch_size=4, limit_train=16, limit_eval=4, val=None, test=None)
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **trainer_args)
    trainer.fit(module, datamodule=data)
    return trainer


def test_fast_dev_run_trains_the_student_only(teacher_dir, tmp_path):
    module = make_module(teacher_dir)
    teacher_before = copy.deepcopy(module.teacher.state_dict())
    student_before = copy.deepcopy(module.student.state_dict())
    data = PromptDataModule(batch_size=4, limit_train=8, limit_eval=4)
    Trainer(fast_dev_run=True, accelerator="cpu", enable_progress_bar=False).fit(module, datamodule=data)
    assert all(torch.equal(v, module.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert any(not torch.equal(v, module.student.state_dict()[k]) for k, v in student_before.items())
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())


def test_teacher_is_never_in_the_checkpoint_or_optimizer(teacher_dir):
    module = make_module(teacher_dir)
    keys = module.state_dict().keys()
    assert keys and all(k.startswith("student.") for k in keys)
    optimized = {id(p) for p in module.configure_optimizers().param_groups[0]["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}


def test_on_policy_fraction_mixes_rollouts(teacher_dir):
    module = make_module(teacher_dir, on_policy_fraction=0.5, seed=3)
    flags = [module.rollouts(BATCH, train=True, step=step)["rollout"].on_policy for step in range(40)]
    assert 8 <= sum(flags) <= 32
    assert flags == [module.rollouts(BATCH, train=True, step=step)["rollout"].on_policy for step in range(40)]
    off = make_module(teacher_dir, on_policy_fraction=0.0).rollouts(BATCH, train=True)["rollout"]
    tok = off_tok = module.student_tokenizer
    expected = [off_tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in BATCH["completion"]]
    got = [row[mask].tolist() for row, mask in zip(off.completion_ids, off.completion_mask, strict=True)]
    assert not off.on_policy and got == expected
    assert all(make_module(teacher_dir).rollouts(BATCH, train=True, step=s)["rollout"].on_policy for s in range(5))


def test_sequence_kd_uses_teacher_completions(teacher_dir):
    greedy = SamplingConfig(do_sample=False, max_new_tokens=4)
    module = make_module(teacher_dir, on_policy_fraction=0.0, off_policy_source="teacher", sampling=greedy)
    rollout = module.rollouts(BATCH, train=True)["rollout"]
    ids, mask = module.rollout_source.encode_prompts(BATCH["prompt"], module.device)
    direct = module.teacher.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=4,
                                     pad_token_id=0, eos_token_id=module.student_tokenizer.eos_token_id)
    n = rollout.completion_ids.shape[1]
    assert not rollout.on_policy
    assert torch.equal(rollout.completion_ids[rollout.completion_mask], direct[:, ids.shape[1]:][:, :n][rollout.completion_mask])


def test_stop_strings_end_student_rollouts(teacher_dir):
    greedy = SamplingConfig(do_sample=False, max_new_tokens=4, stop_at_eos=False)
    module = make_module(teacher_dir, sampling=greedy)
    free, tok = module.rollouts(BATCH, train=True)["rollout"], module.student_tokenizer
    firsts = sorted({tok.decode(row[:1]) for row in free.completion_ids})  # each row's first character
    stopped = make_module(teacher_dir, sampling=SamplingConfig(do_sample=False, max_new_tokens=4, stop_at_eos=False,
                                                               stop=firsts)).rollouts(BATCH, train=True)["rollout"]
    assert free.completion_mask.sum(1).tolist() == [4] * 4
    assert stopped.completion_mask.sum(1).tolist() == [1] * 4 and not stopped.truncated.any()
    assert torch.equal(stopped.completion_ids[:, 0], free.completion_ids[:, 0])
    assert tok.eos_token_id not in stopped.completion_ids[stopped.completion_mask].tolist()

def test_micro_batches_match_one_batch_gradient(teacher_dir, tmp_path):
    """The normaliser is the step's token count, so accumulation over micro-batches gives the same gradient."""
    grads = []
    for micro in (None, 1):
        module = make_module(teacher_dir, on_policy_fraction=0.0, micro_batch_size=micro)
        module.manual_backward = lambda loss: loss.backward()
        module._run_step(BATCH, train=True)
        grads.append(torch.cat([p.grad.flatten() for p in module.student.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_extra_terms_sft_and_kl_to_initial_student(teacher_dir, tmp_path):
    terms = [LossTerm("cross_entropy", weight=0.5, completions="gold"),
             LossTerm("reverse_kl", weight=0.1, reference="initial_student")]
    module = make_module(teacher_dir, extra_terms=terms)
    module.manual_backward = lambda loss: loss.backward()
    loss, metrics = module._run_step(BATCH, train=True)
    assert metrics["loss/reverse_kl@initial_student"].abs() < 1e-6  # the student still is its initial self
    assert metrics["loss/cross_entropy@gold"] > 0
    expected = metrics["loss/reverse_kl"] + 0.5 * metrics["loss/cross_entropy@gold"]
    torch.testing.assert_close(loss, expected + 0.1 * metrics["loss/reverse_kl@initial_student"])


def test_lora_trains_adapters_and_exports(teacher_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = make_module(teacher_dir, lora=LoraOptions(r=4, alpha=8))
    trainable = [n for n, p in module.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    fit(module, tmp_path, max_steps=2)
    ids = torch.tensor([[5, 6, 7]])
    module.student.eval()
    expected = module.student(ids).logits
    module.save_student(str(tmp_path / "merged"), merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
    module.save_student(str(tmp_path / "adapter"), merge_lora=False)
    base = HFModel(config=TINY, tokenizer="builtin:char", seed=0).load_model(module.student_tokenizer)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(adapted(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_lora_kl_to_initial_student_uses_the_base_model(teacher_dir):
    module = make_module(teacher_dir, lora=LoraOptions(r=4), extra_terms=[LossTerm("reverse_kl",
                                                                                    reference="initial_student")])
    assert "initial_student" not in module._frozen  # no copy: the adapter is disabled instead
    module.manual_backward = lambda loss: loss.backward()
    _, metrics = module._run_step(BATCH, train=True)
    assert metrics["loss/reverse_kl@initial_student"].abs() < 1e-6  # LoRA B starts at zero


@pytest.mark.parametrize(("quantization", "limit"), [("8bit", 0.01), ("nf4", 0.05)])
def test_quantized_teacher_on_cpu(teacher_dir, tmp_path, quantization, limit):
    """The quantized teacher is the one that scores: its distributions differ from the full-precision teacher's by
    the quantization error only (8-bit ~6e-4, nf4 ~9e-3 in total variation here; another random teacher: ~0.12), yet
    do differ, and a step trains on them. Loading it unquantized, or scoring with another model, fails this."""
    full = make_module(teacher_dir, on_policy_fraction=0.0)
    module = make_module(teacher_dir, teacher=HFModel(path=teacher_dir, quantization=quantization),
                         on_policy_fraction=0.0)
    assert module.teacher.is_quantized
    rollout = full.rollouts(BATCH, train=True)["rollout"]
    needs, mask = frozenset({"teacher_logits"}), rollout.completion_mask
    p = full._target("teacher", rollout, needs).logits[mask].softmax(-1)
    q = module._target("teacher", rollout, needs).logits[mask].softmax(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    assert 0 < tv.max() < limit
    before = copy.deepcopy(module.student.state_dict())
    trainer = fit(module, tmp_path, max_steps=1)
    assert trainer.global_step == 1
    assert any(not torch.equal(v, module.student.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("rows", [8, 12], ids=["epoch_boundary", "mid_epoch"])
def test_save_then_resume_continues_the_same_run(teacher_dir, tmp_path, rows):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, root, ckpt=None):
        seed_everything(0)
        module = make_module(teacher_dir, seed=0)
        data = PromptDataModule(batch_size=4, limit_train=rows, val=None, test=None)
        saver = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
        trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=root, callbacks=[saver])
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        return trainer, module

    straight = run(4, tmp_path / "straight")[1]
    run(2, tmp_path / "first")
    ckpt = tmp_path / "first" / "step=2.ckpt"
    assert not any("teacher" in k for k in torch.load(ckpt, weights_only=False)["state_dict"])
    resumed_trainer, resumed = run(4, tmp_path / "resumed", ckpt=str(ckpt))
    assert resumed_trainer.global_step == 4
    for (name, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_identity_aligner_refuses_a_different_tokenizer(bpe_teacher_dir):
    with pytest.raises(ValueError, match="identity aligner needs the teacher to use the student's tokenizer"):
        make_module(bpe_teacher_dir, teacher=HFModel(path=bpe_teacher_dir))


def test_unknown_loss_name_suggests_the_closest():
    from opd_lightning.objective import resolve_loss

    with pytest.raises(KeyError, match="Did you mean 'reverse_kl'"):
        resolve_loss("revers_kl")


def test_bad_inputs_get_clear_errors(teacher_dir):
    module = make_module(teacher_dir, on_policy_fraction=0.0)
    with pytest.raises(ValueError, match="completion 1 of the batch is empty"):
        module.rollouts(dict(BATCH, completion=["4", "", "1", "2"]), train=True)
    with pytest.raises(ValueError, match="exceeds the context of 64 tokens"):
        module.rollouts(dict(BATCH, prompt=["1+1=" * 20] * 4), train=True)
    with pytest.raises(ValueError, match="prompt 0 of the batch is empty"):
        module.rollouts(dict(BATCH, prompt=[""] * 4), train=True)
    with pytest.raises(ValueError, match="need a `completion` field"):
        module.rollouts(dict(BATCH, completion=None), train=True)
    rollout = module.rollouts(BATCH, train=True)["rollout"]
    rollout.completion_mask[:] = False
    with pytest.raises(ValueError, match="every completion token of this step's rollout batch is masked"):
        module._step_counts({"rollout": rollout})
    with pytest.raises(ValueError, match="needs a teacher"):
        make_module(teacher_dir, teacher=None)


def test_nan_teacher_logits_are_refused(teacher_dir):
    module = make_module(teacher_dir)
    with torch.no_grad():
        module.teacher.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        module._run_step(BATCH, train=False)


def test_sft_without_teacher(tmp_path):
    module = DistillationModule(student=HFModel(config=TINY, tokenizer="builtin:char"), teacher=None,
                                loss="cross_entropy", rollout=RolloutPolicy(on_policy_fraction=0.0),
                                sampling=SamplingConfig(max_new_tokens=4),
                                optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    module.manual_backward = lambda loss: loss.backward()
    first, _ = module._run_step(BATCH, train=False)
    fit(module, tmp_path, max_steps=5)
    last, _ = module._run_step(BATCH, train=False)
    assert last < first


def test_special_token_masking_drops_special_tokens_but_not_eos(teacher_dir):
    tok_batch = dict(BATCH, completion=["4<unk>6", "4", "1<pad>", "2"])
    plain = make_module(teacher_dir, on_policy_fraction=0.0).rollouts(tok_batch, train=True)["rollout"]
    masked = make_module(teacher_dir, on_policy_fraction=0.0, mask_special_tokens=True).rollouts(tok_batch,
                                                                                                   train=True)["rollout"]
    tok = make_module(teacher_dir).student_tokenizer
    specials = torch.isin(plain.completion_ids, torch.tensor([tok.unk_token_id, tok.pad_token_id]))
    assert (plain.completion_mask & specials).sum() == 2
    assert torch.equal(masked.completion_mask, plain.completion_mask & ~specials)
    eos = plain.completion_ids == tok.eos_token_id
    assert masked.completion_mask[eos].all()


def test_teacher_topk_hands_the_losses_the_topk_form(teacher_dir):
    """With every token kept the step is the dense step; with fewer it differs (the tail is one bucket); a loss that
    needs dense logits is refused when the module is built, naming the losses that take the form."""
    def step(**kwargs):
        module = make_module(teacher_dir, on_policy_fraction=0.0, loss="forward_kl", **kwargs)
        module.manual_backward = lambda loss: loss.backward()
        loss, _ = module._run_step(BATCH, train=True)
        return loss, torch.cat([p.grad.flatten() for p in module.student.parameters()])

    vocab = len(make_module(teacher_dir).student_tokenizer)
    dense, full, few = step(), step(teacher_topk=vocab + 8), step(teacher_topk=3)
    torch.testing.assert_close(full[0], dense[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(full[1], dense[1], rtol=1e-4, atol=1e-8)
    assert few[0] < dense[0]  # a lower bound of the dense forward KL
    with pytest.raises(ValueError, match=r"teacher_topk is set, but loss 'gold' needs the teacher's dense outputs "
                                         r"\(teacher_native_logits, vocab_pairs\): set model.teacher_topk to null "
                                         r"\(--model.teacher_topk null\) for it; losses that take the top-k form"):
        make_module(teacher_dir, loss="gold", teacher_topk=4)


@pytest.mark.parametrize("case", ["forward_kl", "reverse_kl to the initial student, top-k", "lora on the output layer",
                                  "a term that reads logits"])
def test_the_fused_output_layer_equals_the_unfused_step(teacher_dir, case):
    """`logits_chunk_size` changes how the dense losses read the student, not what they compute: the same loss, the
    same gradients and the same diagnostics as the unfused step (fp32, so to rounding)."""
    options = {"forward_kl": {"loss": "forward_kl"},
               "reverse_kl to the initial student, top-k": {
                   "loss": "forward_kl", "teacher_topk": 5,
                   "extra_terms": [LossTerm("reverse_kl", weight=0.3, reference="initial_student")]},
               "lora on the output layer": {"loss": "generalized_jsd",
                                            "lora": LoraOptions(r=4, target_modules=["q_proj", "lm_head"])},
               "a term that reads logits": {"loss": "forward_kl",
                                            "extra_terms": [LossTerm("cross_entropy", weight=0.5, completions="gold")]},
               }[case]

    def step(chunk):
        seed_everything(0)
        module = make_module(teacher_dir, on_policy_fraction=0.5, logits_chunk_size=chunk, **copy.deepcopy(options))
        module.manual_backward = lambda loss: loss.backward()
        if case == "lora on the output layer":  # start the adapters away from zero, so that they carry gradient
            with torch.no_grad():
                for name, p in module.student.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.1)
        loss, metrics = module._run_step(BATCH, train=True)
        grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
        return module, loss, metrics, grads, module.train_diag.compute()

    built = []  # the teacher's side: hidden states and output layer, where its logits are all a loss reads
    original = ReferenceScorer._fused_teacher_target
    ReferenceScorer._fused_teacher_target = lambda *a: built.append(original(*a)) or built[-1]
    try:
        plain, fused = step(None), step(3)
    finally:
        ReferenceScorer._fused_teacher_target = original
    assert plain[0]._fused == set() and fused[0]._fused == {"rollout"}  # the gold batches' SFT reads logits
    kinds = {("TopK" if t.topk is not None else type(t.logits).__name__) if t is not None else None for t in built}
    assert kinds == ({"TopK"} if "top-k" in case else {"HiddenRows"}), kinds  # top-k: taken chunk by chunk
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-7)
    assert fused[3].keys() == plain[3].keys() and len(plain[3]) > 0
    for name in plain[3]:
        torch.testing.assert_close(fused[3][name], plain[3][name], rtol=1e-4, atol=1e-7, msg=name)
    assert "diag/grad_coherence" in plain[4] and plain[4].keys() == fused[4].keys()  # measured on both
    for key, value in plain[4].items():
        torch.testing.assert_close(fused[4][key], value, rtol=1e-4, atol=1e-6, equal_nan=True, msg=key)
    if case == "lora on the output layer":
        assert any("lm_head" in n and "lora" in n for n in plain[3])


def test_the_teachers_top_k_taken_chunk_by_chunk_equals_the_dense_top_k():
    from opd_lightning.losses import HiddenRows

    from opd_lightning.reference import chunked_topk
    from opd_lightning.target import TopK

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8, dtype=torch.float64, generator=g), torch.randn(30, 8, dtype=torch.float64,
                                                                                          generator=g)
    bias = torch.randn(30, dtype=torch.float64, generator=g)
    want = TopK.from_logits(hidden @ weight.T + bias, 4)
    for chunk in (1, 3, 10, None):
        got = chunked_topk(HiddenRows(hidden, weight, bias, chunk), 4)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-12)
        torch.testing.assert_close(got.tail, want.tail, rtol=0, atol=1e-12)


def test_auto_fuses_the_batches_whose_logits_exceed_one_chunk(teacher_dir, monkeypatch):
    import opd_lightning.module as module_lib

    def step(**kwargs):
        seed_everything(0)
        module = make_module(teacher_dir, loss="forward_kl", on_policy_fraction=0.0, **kwargs)
        module.manual_backward = lambda loss: loss.backward()
        loss, _ = module._run_step(BATCH, train=True)
        return module, loss, torch.cat([p.grad.flatten() for p in module.student.parameters()])

    module = make_module(teacher_dir, loss="forward_kl", on_policy_fraction=0.0)
    rollout = module.rollouts(BATCH, train=True)["rollout"]
    assert module.logits_chunk_size == "auto" and module._fused == {"rollout"}
    assert not module._fuses("rollout", rollout)  # tiny logits: one chunk would hold them all, nothing to gain
    monkeypatch.setattr(module_lib, "CHUNK_ELEMENTS", rollout.completion_mask.numel())  # now they exceed one
    assert module._fuses("rollout", rollout)
    module._sharded = True
    assert module._fuses("rollout", rollout)  # under FSDP2 too (tests/test_distributed.py: equal to one process)
    seen = []
    original = module_lib.DistillationModule._student_logits
    monkeypatch.setattr(module_lib.DistillationModule, "_student_logits",
                        lambda self, r, fused: seen.append(fused) or original(self, r, fused))
    _, auto_loss, auto_grads = step()
    _, plain_loss, plain_grads = step(logits_chunk_size=None)
    assert seen == [True, False]
    torch.testing.assert_close(auto_loss, plain_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(auto_grads, plain_grads, rtol=1e-4, atol=1e-7)


def test_fused_output_layer_refusals(teacher_dir):
    with pytest.raises(ValueError, match="logits_chunk_size must be a positive integer"):
        make_module(teacher_dir, logits_chunk_size=0)
    module = make_module(teacher_dir, loss="forward_kl", logits_chunk_size=4,
                         lora=LoraOptions(r=4, dropout=0.1, target_modules=["lm_head"]))
    module.manual_backward = lambda loss: loss.backward()
    with pytest.raises(ValueError, match="LoRA adapter with dropout"):
        module._run_step(BATCH, train=True)
    module = make_module(teacher_dir, loss="forward_kl", logits_chunk_size=4)
    module.student.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping = 30.0 after its output layer"):
        module._run_step(BATCH, train=True)


def test_the_fused_output_layer_across_tokenizers(bpe_teacher_dir):
    """Across tokenizers the student's side is fused (the teacher's target is projected as before) with the same
    step; an aligner that compares the student in another space keeps the logits."""
    def step(chunk, aligner):
        seed_everything(0)
        module = make_module(bpe_teacher_dir, on_policy_fraction=0.5, loss="forward_kl", aligner=aligner,
                             logits_chunk_size=chunk)
        module.manual_backward = lambda loss: loss.backward()
        loss, _ = module._run_step(BATCH, train=True)
        return module, loss, torch.cat([p.grad.flatten() for p in module.student.parameters()])

    plain, fused = step(None, "byte_spans"), step(3, "byte_spans")
    assert fused[0]._fused == {"rollout"}
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused[2], plain[2], rtol=1e-4, atol=1e-7)
    module, loss, _ = step(3, "char_level")
    assert module._fused == set() and torch.isfinite(loss)


@pytest.mark.parametrize("aligner", ["byte_spans", "exact_spans"])
def test_across_tokenizers_a_fused_dense_step_runs_a_group_of_rows_at_a_time(bpe_teacher_dir, monkeypatch, aligner):
    """Without top-k, a fused step across tokenizers runs in micro-batches of `rows_per_group` rows (here one), so the
    teacher's logits and the aligner's dense target exist for one row at a time; loss and gradients equal the
    unfused whole-batch step's. The top-k form, or one tokenizer, keeps the whole batch."""
    from opd_lightning import reference

    def step(chunk, **options):
        seed_everything(0)
        module = make_module(bpe_teacher_dir, on_policy_fraction=0.5, loss="forward_kl", aligner=aligner,
                             logits_chunk_size=chunk, **options)
        module.manual_backward = lambda loss: loss.backward()
        loss, _ = module._run_step(BATCH, train=True)
        return module, loss, torch.cat([p.grad.flatten() for p in module.student.parameters()])

    plain = step(None)
    scored = []
    original = reference.ReferenceScorer.teacher_target
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 1)  # one row a group
    monkeypatch.setattr(reference.ReferenceScorer, "teacher_target",
                        lambda self, r, *a, **k: scored.append(len(r)) or original(self, r, *a, **k))
    fused = step(3)
    assert scored == [1] * len(BATCH["prompt"])  # never the whole batch's target
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused[2], plain[2], rtol=1e-4, atol=1e-7)
    rollouts = fused[0].rollouts(BATCH, train=True)
    assert fused[0]._target_rows(rollouts) == 1
    assert plain[0]._target_rows(rollouts) == len(BATCH["prompt"])  # unfused: the logits are whole anyway
    assert step(3, teacher_topk=3)[0]._target_rows(rollouts) == len(BATCH["prompt"])  # reduced group by group


@pytest.mark.parametrize("aligner", ["byte_spans", "vocab_map", "char_level", "mined", "bpe_subset"])
def test_across_tokenizers_a_fused_step_computes_the_teachers_logits_at_the_read_positions_only(bpe_teacher_dir,
                                                                                                  subset_dirs, aligner):
    """In a fused step, an aligner that reads the teacher's logits a set of positions at a time (`reads_rows`) gets
    the teacher's hidden states and output layer: the output layer never runs on the teacher's rows, and the dense
    target, token log-probs and coverage equal those projected from the whole `[B, M, V_T]` logits."""
    from opd_lightning.target import TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS

    teacher, student = ((subset_dirs["teacher"], HFModel(config=TINY, tokenizer=subset_dirs["student"]))
                        if aligner == "bpe_subset" else (bpe_teacher_dir, HFModel(config=TINY, tokenizer="builtin:char")))
    module = make_module(teacher, student=student, on_policy_fraction=0.5, loss="forward_kl", aligner=aligner)
    assert module.aligner.reads_rows
    rollout = module.rollouts(BATCH, train=True, step=1)["rollout"]
    needs = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS}) & module.aligner.provides
    whole = module.scorer.teacher_target(rollout, needs, module.student)
    vocab = module.teacher.get_output_embeddings().weight.shape[0]

    def no_logits(layer, args, output):
        assert output.shape[-1] != vocab, "the teacher's output layer ran on whole rows"

    handle = module.teacher.get_output_embeddings().register_forward_hook(no_logits)
    try:
        rows = module.scorer.teacher_target(rollout, needs, module.student, 3)
    finally:
        handle.remove()
    valid = rollout.completion_mask & whole.mask
    assert valid.any() and torch.equal(rows.mask & rollout.completion_mask, valid)
    assert rows.coverage == whole.coverage and rows.mass_coverage == pytest.approx(whole.mass_coverage, abs=1e-6)
    torch.testing.assert_close(rows.logits[valid], whole.logits[valid], rtol=1e-5, atol=1e-5)
    if TEACHER_TOKEN_LOGPROBS in needs:
        torch.testing.assert_close(rows.token_logprobs[valid], whole.token_logprobs[valid], rtol=1e-5, atol=1e-5)
    handle = module.teacher.get_output_embeddings().register_forward_hook(no_logits)
    with pytest.raises(AssertionError, match="ran on whole rows"):  # the check itself: unfused, the logits are built
        module.scorer.teacher_target(rollout, needs, module.student)
    handle.remove()


@pytest.mark.parametrize("aligner", ["byte_spans", "exact_spans"])
def test_across_tokenizers_a_fused_top_k_batch_is_scored_a_group_of_rows_at_a_time(bpe_teacher_dir, monkeypatch,
                                                                                   aligner):
    """With the top-k form, the teacher's logits and the aligner's dense target are built for a group of rows at a
    time (here one row) and reduced to top-k at once; the target equals the whole batch's, and so does the step."""
    from opd_lightning import reference
    from opd_lightning.target import TEACHER_TOKEN_LOGPROBS, TEACHER_TOPK

    def step(chunk):
        seed_everything(0)
        module = make_module(bpe_teacher_dir, on_policy_fraction=0.0, loss="forward_kl", aligner=aligner,
                             teacher_topk=3, logits_chunk_size=chunk)
        module.manual_backward = lambda loss: loss.backward()
        loss, _ = module._run_step(BATCH, train=True)
        return module, loss, torch.cat([p.grad.flatten() for p in module.student.parameters()])

    plain = step(None)
    module = plain[0]
    rollout = module.rollouts(BATCH, train=True)["rollout"]
    needs = frozenset({TEACHER_TOPK, TEACHER_TOKEN_LOGPROBS})
    whole = module.scorer.teacher_target(rollout, needs, module.student)
    assert module.scorer.teacher_target(rollout, needs, module.student, 3).topk is not None  # fits in one group
    groups = []
    original = reference.ReferenceScorer.teacher_target
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 1)  # one row a group
    monkeypatch.setattr(reference.ReferenceScorer, "teacher_target",
                        lambda self, r, *a, **k: groups.append(len(r)) or original(self, r, *a, **k))
    rows = module.scorer.teacher_target(rollout, needs, module.student, 3)
    assert groups == [4, 1, 1, 1, 1]
    valid = rollout.completion_mask & whole.mask
    assert torch.equal(rows.mask & rollout.completion_mask, valid) and rows.coverage == pytest.approx(whole.coverage)
    assert torch.equal(rows.topk.ids[valid], whole.topk.ids[valid])
    for name in ("logprobs", "tail"):
        torch.testing.assert_close(getattr(rows.topk, name)[valid], getattr(whole.topk, name)[valid], rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(rows.token_logprobs[valid], whole.token_logprobs[valid], rtol=1e-5, atol=1e-6)
    fused = step(3)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused[2], plain[2], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_losses_of_several_parts_run_fused_across_tokenizers(teacher_dir, loss):
    """`uld` and `gold` read the student fused (their parts are sums over positions): the same loss, gradients and
    diagnostics, `diag/grad_coherence` included, as the unfused step; the teacher's native logits as they are."""
    def step(chunk):
        seed_everything(0)
        module = make_module(teacher_dir, student=HFModel(config=TINY, tokenizer="builtin:arithmetic_bpe", seed=0),
                             aligner="byte_spans", loss=loss, on_policy_fraction=1.0, logits_chunk_size=chunk)
        module.manual_backward = lambda value: value.backward()
        value, metrics = module._run_step(BATCH, train=True)
        grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
        return module, value, metrics, grads, module.train_diag.compute()

    plain, fused = step(None), step(2)
    assert plain[0]._fused == set() and fused[0]._fused == {"rollout"}
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-7)
    assert fused[2].keys() == plain[2].keys()
    for key in plain[2]:
        torch.testing.assert_close(fused[2][key], plain[2][key], rtol=1e-5, atol=1e-7, msg=key)
    for name in plain[3]:
        torch.testing.assert_close(fused[3][name], plain[3][name], rtol=1e-4, atol=1e-7, msg=name)
    assert "diag/grad_coherence" in plain[4] and plain[4].keys() == fused[4].keys()
    for key, value in plain[4].items():
        torch.testing.assert_close(fused[4][key], value, rtol=1e-4, atol=1e-6, equal_nan=True, msg=key)
