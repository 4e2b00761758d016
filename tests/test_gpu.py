"""CUDA checks: they run wherever a GPU is visible (scripts/gpu_check.sh runs them), and are skipped on
machines without one, such as CI. Each compares against a hand-written reference on the GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import syncstep
from common import Tiny, dataset, loader, make_net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def reference_on_gpu(n, global_batch, steps, lr=0.1):
    ds, net = dataset(n), make_net().cuda()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for s in range(steps):
        x, y = ds[s * global_batch:(s + 1) * global_batch]
        loss = F.cross_entropy(net(x.cuda()), y.cuda())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()}


def close(model, expected, atol=1e-5):
    for key, value in expected.items():
        torch.testing.assert_close(model.state_dict()[key].cpu(), value, atol=atol, rtol=0)


def fit(**kwargs):
    n, b = kwargs.pop("n"), kwargs.pop("batch")
    trainer = syncstep.Trainer(accelerator="gpu", logger=False, enable_progress_bar=False,
                               enable_checkpointing=False, lr_scaling="none", **kwargs)
    model = Tiny()
    trainer.fit(model, loader(dataset(n), b))
    return model, trainer


def test_single_gpu_equals_hand_written_loop():
    model, trainer = fit(devices=1, n=64, batch=8, max_epochs=1)
    assert model.device.type == "cuda"
    close(model, reference_on_gpu(64, 8, 8))


def test_dp_on_every_visible_gpu_equals_one_gpu_with_the_whole_batch():
    k = torch.cuda.device_count()
    model, trainer = fit(devices=k, strategy="dp", n=8 * k * 6 + 3, batch=8, max_epochs=1)  # uneven last step
    assert trainer.global_step == 7
    close(model, reference_on_gpu(8 * k * 6 + 3, 8 * k, 7))


def test_dp_keeps_bf16_inside_the_replicas():
    seen = []

    class Watch(Tiny):
        def training_step(self, batch, batch_idx):
            seen.append(self.net(batch[0]).dtype)
            return super().training_step(batch, batch_idx)

    trainer = syncstep.Trainer(accelerator="gpu", devices=torch.cuda.device_count(), strategy="dp",
                               precision="bf16-mixed", logger=False, enable_progress_bar=False, max_steps=2,
                               enable_checkpointing=False)
    trainer.fit(Watch(), loader(dataset(64), 8))
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_on_gpu(precision):
    model, trainer = fit(devices=1, n=256, batch=32, max_epochs=3, precision=precision)
    fp32, _ = fit(devices=1, n=256, batch=32, max_epochs=3)
    for key, value in fp32.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0.05, rtol=0)
    assert torch.isfinite(trainer.callback_metrics["train_loss_step"])


def test_ddp_with_nccl_in_one_process():
    model, trainer = fit(devices=1, strategy="ddp", n=64, batch=8, max_epochs=1)
    import torch.distributed as dist

    assert dist.get_backend() == "nccl"
    close(model, reference_on_gpu(64, 8, 8))


def test_ddp_with_nccl_skips_a_nonfinite_step():
    """on_nonfinite_loss="skip" agrees over NCCL at every step: the agreement's tensor must be on the GPU."""
    trainer = syncstep.Trainer(accelerator="gpu", devices=1, strategy="ddp", logger=False, enable_progress_bar=False,
                               enable_checkpointing=False, lr_scaling="none", on_nonfinite_loss="skip", max_epochs=1)
    model = Tiny(fail={"rank": 0, "step": 3, "kind": "nan"})
    trainer.fit(model, loader(dataset(24), 4))
    assert trainer.global_step == 6
    # Reference: steps 0, 1, 2, 4, 5 applied on the GPU, step 3 skipped.
    ds, net = dataset(24), make_net().cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for s in (0, 1, 2, 4, 5):
        x, y = ds[s * 4:(s + 1) * 4]
        opt.zero_grad()
        F.cross_entropy(net(x.cuda()), y.cuda()).backward()
        opt.step()
    close(model, {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()})
