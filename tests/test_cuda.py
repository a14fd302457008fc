"""The same paths on a CUDA device: losses at a real vocabulary in fp32 and bf16, and Trainer fits in bf16-mixed
precision for the same-tokenizer and every cross-tokenizer aligner. Skipped where no GPU is present.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from lightning.pytorch import Callback, Trainer
from loss_reference import make_batch, ref_dense
from test_losses_parity import DENSE

from opd_lightning.data import PromptDataModule
from opd_lightning.models import HFModel
from opd_lightning.module import DistillationModule
from opd_lightning.rollout import SamplingConfig
from opd_lightning.rollout_source import RolloutPolicy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", sorted(DENSE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_on_cuda_match_float64_at_a_real_vocabulary(name, dtype):
    """As the CPU parity tests: the float64 reference reads the same (rounded) inputs; bf16 gradients are rounded."""
    student, teacher, _target, mask = (t.to(dtype) if t.is_floating_point() else t
                                       for t in make_batch(4, 96, 49_152, seed=1))

    fn, params = DENSE[name]

    def value_and_grad(loss, s, *args):
        s = s.detach().clone().requires_grad_(True)
        value = loss(s, *args)
        return value, torch.autograd.grad(value, s)[0]

    ref, ref_grad = value_and_grad(lambda s, t, m: ref_dense(name, s, t, m, **params), student.double(),
                                   teacher.double(), mask)
    got, grad = value_and_grad(lambda s, t, m: fn(s, t, m, **params), student.cuda(), teacher.cuda(), mask.cuda())
    # the CPU parity tests' tolerances; TVD's gradient is sign(p_S - p_T) and flips where the two are equal
    grad_rtol, grad_atol = (1e-4, 1e-7) if dtype == torch.float32 else (1.6e-2, 1e-5)
    # bf16 logits tie often at a 49k vocabulary, and which tied token fills the last top-k slot is up to the kernel
    value_rtol = 1e-2 if (name, dtype) == ("topk_reverse_kl", torch.bfloat16) else 1e-5
    torch.testing.assert_close(got.double().cpu(), ref, rtol=value_rtol, atol=1e-7)
    if value_rtol == 1e-5:
        torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=grad_rtol, atol=grad_atol)


class _Devices(Callback):
    """Where the student and the teacher sit while training (Lightning moves the module back to CPU after fit)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.seen.add((next(module.student.parameters()).device.type, next(module.teacher.parameters()).device.type))


def _fit(module: DistillationModule, tmp_path, steps: int = 3) -> None:
    before = {k: v.detach().clone() for k, v in module.student.state_dict().items()}
    data = PromptDataModule(batch_size=8, limit_train=32, limit_eval=8, val=None, test=None)
    devices = _Devices()
    trainer = Trainer(max_steps=steps, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, callbacks=[devices])
    trainer.fit(module, datamodule=data)
    after = module.student.state_dict()
    assert devices.seen == {("cuda", "cuda")}
    assert trainer.global_step == steps
    assert any(not torch.equal(v.cpu(), after[k].cpu()) for k, v in before.items())
    assert all(torch.isfinite(p).all() for p in module.student.parameters())


def test_same_tokenizer_fit_on_cuda_with_stop_strings(teacher_dir, tmp_path):
    module = DistillationModule(student=HFModel(config=TINY, tokenizer="builtin:char", seed=0),
                                teacher=HFModel(path=teacher_dir), loss="reverse_kl",
                                rollout=RolloutPolicy(on_policy_fraction=1.0), sampling=SamplingConfig(max_new_tokens=6, stop=["\n"]))
    _fit(module, tmp_path)


CROSS = [("byte_spans", "forward_kl"), ("byte_spans", "sampled_token"), ("byte_spans", "gold"),
         ("vocab_map", "uld"), ("char_level", "generalized_jsd"), ("mined", "forward_kl"), ("dskd_cma", "dskd")]


@pytest.mark.parametrize(("aligner", "loss"), CROSS)
def test_cross_tokenizer_fit_on_cuda(teacher_dir, aligner, loss, tmp_path):
    module = DistillationModule(student=HFModel(config=TINY, tokenizer="builtin:arithmetic_bpe", seed=0),
                                teacher=HFModel(path=teacher_dir), loss=loss, aligner=aligner,
                                rollout=RolloutPolicy(on_policy_fraction=0.5), sampling=SamplingConfig(max_new_tokens=6))
    _fit(module, tmp_path, steps=4)
