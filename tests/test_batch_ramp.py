"""batch_ramp (batch_ramp.py) against independent references: a hand-written SGD loop whose batch grows
at the same epochs, a problem whose noise scale is known in closed form, a run without interruption,
and a one-process run of the same global batches."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import syncstep
from common import Quadratic, quadratic_data
from helpers import SCRIPTS, assert_params_close, load_result, run, run_configs

QUIET = {"enable_progress_bar": False, "logger": False, "enable_checkpointing": False,
         "enable_model_summary": False}


def regression_data(n: int = 100) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, x @ torch.arange(1.0, 6.0) + 0.3 * torch.randn(n, generator=g))


class Linear(syncstep.Module):
    """Least squares with SGD and a StepLR stepped per optimizer step ("step" interval)."""

    def __init__(self, lr: float = 0.01):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(5, 1)
        self.lr = lr
        self.applied: list[float] = []  # the LR of every optimizer step, read by a pre-hook

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(1), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        opt.register_step_pre_hook(lambda o, args, kwargs: self.applied.append(o.param_groups[0]["lr"]))
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def hand_written(data: TensorDataset, batches: dict[int, int], epochs: int, lr: float, reference: int,
                 warmup: int) -> tuple[dict, list[float]]:
    """The same training by hand: epoch e is torch.randperm(N, seed 0 + e) cut into steps of batches[e]
    samples; the LR of a step is lr x StepLR(10, 0.5) x warmup-or-k at the clock t, the steps of the
    starting batch before it (an epoch's short last step counting as one)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 1)
    x, y = data.tensors
    n, start, t, applied = len(x), batches[0], 0, []
    for epoch in range(epochs):
        size = batches[epoch]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()
        k = size / reference
        for begin in range(0, n, size):
            idx = order[begin:begin + size]
            multiplier = 1 + (k - 1) * t / warmup if t < warmup else k
            step_lr = lr * 0.5 ** (t // 10) * multiplier
            applied.append(step_lr)
            loss = F.mse_loss(net(x[idx]).squeeze(1), y[idx])
            grads = torch.autograd.grad(loss, list(net.parameters()))
            with torch.no_grad():
                for p, g in zip(net.parameters(), grads):
                    p -= step_lr * g
            t += math.ceil(min(begin + size, n) / start) - math.ceil(begin / start)
    return {f"net.{k}": v.detach() for k, v in net.state_dict().items()}, applied


def test_a_schedule_ramp_trains_as_a_hand_written_loop_whose_batch_grows(capsys):
    data = regression_data(100)  # 100 samples: every epoch ends with a short step
    model = Linear(lr=0.01)
    trainer = syncstep.Trainer(max_epochs=6, accumulate_grad_batches=2, reference_batch_size=4, seed=0,
                               warmup_epochs=1, batch_ramp={2: 16, 4: 32}, lr_scaling="linear", **QUIET)
    trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True))
    expected, applied = hand_written(data, {0: 8, 1: 8, 2: 16, 3: 16, 4: 32, 5: 32}, 6, 0.01, reference=4, warmup=13)
    assert_params_close(model.state_dict(), expected)
    assert len(model.applied) == len(applied) == 13 * 2 + 7 * 2 + 4 * 2 == trainer.global_step
    torch.testing.assert_close(model.applied, applied, rtol=1e-12, atol=0)
    # the clock: 13 starting-batch steps per epoch, so StepLR stepped 78 times in 48 optimizer steps
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 78
    out = capsys.readouterr().out
    assert "batch ramp: global batch 16 from epoch 2, 32 from epoch 4" in out
    assert "syncstep: batch ramp, epoch 2: global batch 8 -> 16 (accumulation 2 -> 4; the schedule); lr SGD: " \
           "linear, factor 2 -> 4" in out
    assert "epoch 4: global batch 16 -> 32 (accumulation 4 -> 8; the schedule); lr SGD: linear, factor 4 -> 8" in out
    assert trainer.batch_plan.global_batch_size == 32 and trainer.lr_plan.factors == [8.0]


@pytest.mark.parametrize("b_simple, factor, maximum, expected", [
    (46.0, 1.0, None, [8, 16, 32, 64]),  # B_simple = 46: doubles while the batch is below it, up to 64
    (46.0, 0.5, None, [8, 16, 32, 32]),  # c = 0.5: grows while the batch < 23
    (46.0, 1.0, 16, [8, 16, 16, 16]),  # batch_ramp_max=16
    (0.0, 1.0, None, [8, 8, 8, 8]),  # no noise: B_simple = 0, a bigger batch buys nothing
])
def test_the_noise_ramp_grows_the_batch_while_it_is_below_the_known_noise_scale(b_simple, factor, maximum,
                                                                                 expected):
    # at w = 0: |G|^2 = 1 and tr(Sigma) = dim x noise^2 = B_simple, exactly; many dimensions make the
    # squared norms, and so the estimates, precise
    dim = 1000
    data = quadratic_data(2048, dim, math.sqrt(b_simple / dim))
    sizes = []

    class Sizes(syncstep.Callback):
        def on_train_epoch_start(self, trainer, module):
            sizes.append(trainer.batch_plan.global_batch_size)

    trainer = syncstep.Trainer(max_epochs=4, accumulate_grad_batches=2, batch_ramp="noise",
                               batch_ramp_factor=factor, batch_ramp_max=maximum, log_every_n_steps=4, seed=0,
                               callbacks=[Sizes()], **QUIET)
    trainer.fit(Quadratic(dim, lr=0.0), DataLoader(data, batch_size=4, shuffle=True))
    assert sizes == expected
    if b_simple:
        assert trainer.noise_scale["b_simple"] == pytest.approx(b_simple, rel=0.2)


def test_resume_inside_a_ramped_run_is_bitwise(tmp_path):
    data = regression_data(100)

    def fit(ckpt_path=None):
        model = Linear(lr=0.01)
        trainer = syncstep.Trainer(max_epochs=5, accumulate_grad_batches=2, reference_batch_size=4, seed=0,
                                   warmup_epochs=1, batch_ramp={2: 16, 3: 32}, lr_scaling="linear",
                                   enable_progress_bar=False, logger=False, enable_model_summary=False,
                                   default_root_dir=str(tmp_path), ckpt_every_n_steps=1, keep_last=1000)
        trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True), ckpt_path=ckpt_path)
        return model, trainer

    whole, trainer = fit()
    final = {k: v.clone() for k, v in whole.state_dict().items()}
    steps = trainer.global_step
    # mid-epoch before the first change, at the end of the epoch before it (the change still to come),
    # right after it, and inside the last ramped epoch
    for name in ("epoch=1-step=15.ckpt", "epoch=1-step=26.ckpt", "epoch=2-step=27.ckpt", "epoch=3-step=36.ckpt"):
        again, resumed = fit(str(tmp_path / "checkpoints" / name))
        for key, value in again.state_dict().items():
            assert torch.equal(value, final[key]), (name, key)
        assert resumed.global_step == steps
        assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == 13 * 5
        assert resumed.batch_plan.global_batch_size == 32


def test_resume_inside_a_noise_ramp_is_bitwise(tmp_path):
    data = quadratic_data(512, 10, 2.15)

    def fit(ckpt_path=None):
        model = Quadratic(10, lr=0.02, scheduler=True)
        trainer = syncstep.Trainer(max_epochs=4, accumulate_grad_batches=2, batch_ramp="noise", log_every_n_steps=4,
                                   seed=0, enable_progress_bar=False, logger=False, enable_model_summary=False,
                                   default_root_dir=str(tmp_path), ckpt_every_n_steps=5, keep_last=1000)
        trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True), ckpt_path=ckpt_path)
        return model, trainer

    whole, trainer = fit()
    final = {k: v.clone() for k, v in whole.state_dict().items()}
    assert trainer.batch_plan.global_batch_size > 8  # the ramp did grow the batch
    checkpoints = sorted((tmp_path / "checkpoints").glob("epoch=*-step=*.ckpt"),
                         key=lambda p: int(p.stem.split("step=")[1]))
    for path in checkpoints[1::4]:
        again, resumed = fit(str(path))
        for key, value in again.state_dict().items():
            assert torch.equal(value, final[key]), (path.name, key)
        assert resumed.global_step == trainer.global_step
        assert repr(resumed.noise_scale["history"]) == repr(trainer.noise_scale["history"])


def test_ddp_with_a_ramp_matches_one_process_at_the_same_global_batches(tmp_path):
    base = {"n": 37, "batch_size": 4, "shuffle": True, "seed": 3, "max_epochs": 3, "global_batch_size": 8,
            "batch_ramp": {"1": 16, "2": 32}, "lr_scaling": "linear", "reference_batch_size": 8,
            "scheduler": "step", "optimizer": "sgd_momentum"}
    run_configs(tmp_path, [{**base, "name": "ramp_ddp", "devices": 2, "strategy": "ddp"}], timeout=150)
    run_configs(tmp_path, [{**base, "name": "ramp_single", "devices": 1, "strategy": "auto"}], timeout=90)
    ddp, single = load_result(tmp_path / "ramp_ddp.pt"), load_result(tmp_path / "ramp_single.pt")
    assert ddp["global_step"] == single["global_step"] == 5 + 3 + 2
    assert_params_close(ddp["params"], single["params"])
    torch.testing.assert_close(ddp["lrs"], single["lrs"], rtol=1e-12, atol=0)
    assert "batch ramp, epoch 2: global batch 16 -> 32" not in ddp["summary"]  # (the summary is the start's)


def test_a_ramped_run_resumes_on_another_device_count_at_its_ramped_batch(tmp_path):
    """Saved by one process inside the ramp's second batch, resumed by two DDP processes: the run goes on
    at the checkpoint's global batch and ends where the uninterrupted one-process run does."""
    base = {"n": 37, "batch_size": 4, "shuffle": True, "seed": 3, "max_epochs": 3, "global_batch_size": 8,
            "batch_ramp": {"1": 16, "2": 32}, "lr_scaling": "linear", "reference_batch_size": 8,
            "scheduler": "step", "optimizer": "sgd_momentum", "enable_checkpointing": True,
            "ckpt_every_n_steps": 1, "keep_last": 100, "root": str(tmp_path / "run")}
    run_configs(tmp_path, [{**base, "name": "whole", "devices": 1, "strategy": "auto"}], timeout=90)
    checkpoint = str(tmp_path / "run" / "checkpoints" / "epoch=1-step=6.ckpt")  # 1 of epoch 1's 3 steps
    run_configs(tmp_path, [{**base, "name": "resumed", "devices": 2, "strategy": "ddp", "ckpt_path": checkpoint,
                            "root": str(tmp_path / "resumed")}], timeout=150)
    whole, resumed = load_result(tmp_path / "whole.pt"), load_result(tmp_path / "resumed.pt")
    assert whole["global_step"] == resumed["global_step"] == 10
    assert_params_close(resumed["params"], whole["params"])


def test_the_noise_ramp_under_ddp_grows_the_batch_by_the_replicas_noise_scale_on_every_rank(tmp_path):
    """Under DDP the small batches are the replicas' gradients (the communication hook), and B_small grows
    with the accumulation: the same known B_simple gives the same doublings as in one process, on both ranks."""
    config = {"name": "ramp", "ramp": {"dim": 1000, "n": 2048, "b_simple": 46.0, "epochs": 4}}
    spec = tmp_path / "configs.json"
    spec.write_text(json.dumps([config]))
    run([sys.executable, str(SCRIPTS / "noise_ddp.py"), str(spec)], timeout=180, cwd=str(tmp_path))
    ranks = [torch.load(tmp_path / f"ramp.rank{r}.pt", weights_only=False) for r in range(2)]
    for saved in ranks:
        assert saved["sizes"] == [8, 16, 32, 64]
        assert saved["global_step"] == 256 + 128 + 64 + 32
    result = ranks[0]["result"]
    assert result["source"] == "ddp" and result["small_batch"] == 32  # 4 per device x accumulation 8 at the end
    assert result["b_simple"] == pytest.approx(46.0, rel=0.2)


def test_bad_ramps_are_refused_with_the_reason():
    data = DataLoader(regression_data(40), batch_size=4)
    with pytest.raises(ValueError, match="batch_ramp must be None, 'noise' or a dict"):
        syncstep.Trainer(batch_ramp="grow")
    with pytest.raises(ValueError, match="keys are epochs"):
        syncstep.Trainer(batch_ramp={"2": 16})
    with pytest.raises(ValueError, match="batch_ramp_factor must be a number > 0"):
        syncstep.Trainer(batch_ramp="noise", batch_ramp_factor=0)
    with pytest.raises(ValueError, match="batch_ramp_max caps the noise ramp"):
        syncstep.Trainer(batch_ramp={1: 8}, batch_ramp_max=64)
    with pytest.raises(ValueError, match=r"batch_ramp\[2\]=18 is not a multiple of per-device batch x world size = 4.*"
                                         r"nearest: 16 or 20"):
        syncstep.Trainer(max_epochs=1, batch_ramp={2: 18}, **QUIET).fit(Linear(), data)
    with pytest.raises(ValueError, match=r"batch_ramp\[0\]=8, but the run starts at global batch 4"):
        syncstep.Trainer(max_epochs=1, batch_ramp={0: 8}, **QUIET).fit(Linear(), data)
    with pytest.raises(ValueError, match="not measurable with one batch per step"):
        syncstep.Trainer(max_epochs=1, batch_ramp="noise", **QUIET).fit(Linear(), data)
    with pytest.raises(ValueError, match="use one"):
        syncstep.Trainer(max_epochs=1, batch_ramp={1: 8}, lr_scaling="adascale", accumulate_grad_batches=2,
                         **QUIET).fit(Linear(), data)
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        syncstep.Trainer(max_epochs=1, batch_ramp={1: 8}, use_distributed_sampler=False, **QUIET).fit(Linear(), data)

    class Manual(Linear):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimization"):
        syncstep.Trainer(max_epochs=1, batch_ramp={1: 8}, **QUIET).fit(Manual(), data)


def test_a_ramp_added_on_resume_keeps_the_warmup_where_it_was(tmp_path):
    data = regression_data(100)
    common = dict(accumulate_grad_batches=2, reference_batch_size=4, seed=0, warmup_epochs=1, lr_scaling="linear",
                  enable_progress_bar=False, logger=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    syncstep.Trainer(max_epochs=2, **common).fit(Linear(), DataLoader(data, batch_size=4, shuffle=True))
    model = Linear()
    trainer = syncstep.Trainer(max_epochs=4, batch_ramp={2: 16}, **common)  # (from the end of epoch 1)
    trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True), ckpt_path="last")
    expected, applied = hand_written(data, {0: 8, 1: 8, 2: 16, 3: 16}, 4, 0.01, reference=4, warmup=13)
    assert_params_close(model.state_dict(), expected)
    torch.testing.assert_close(model.applied, applied[26:], rtol=1e-12, atol=0)  # (the steps after the resume)


def test_lr_schedule_follows_a_schedule_ramp_and_says_what_it_cannot_know(capsys):
    data = regression_data(100)
    common = dict(accumulate_grad_batches=2, reference_batch_size=4, warmup_epochs=1, lr_scaling="linear", **QUIET)
    lrs = syncstep.Trainer(max_epochs=6, batch_ramp={2: 16, 4: 32}, **common).lr_schedule(
        Linear(), DataLoader(data, batch_size=4))["lr-SGD"]
    _, applied = hand_written(data, {0: 8, 1: 8, 2: 16, 3: 16, 4: 32, 5: 32}, 6, 0.01, reference=4, warmup=13)
    torch.testing.assert_close(lrs, applied, rtol=1e-12, atol=0)
    capsys.readouterr()
    noise = syncstep.Trainer(max_epochs=2, batch_ramp="noise", **common).lr_schedule(
        Linear(), DataLoader(data, batch_size=4))["lr-SGD"]
    assert "lr_schedule() shows the run at the starting global batch 8" in capsys.readouterr().out
    assert len(noise) == 2 * 13
