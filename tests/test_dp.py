"""strategy="dp": one process, k replicas (threads on the CPU), one step on the whole k x b batch."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import syncstep
from common import Tiny, dataset, loader, make_net, reference_sgd, shuffled_order
from helpers import assert_params_close


def fit_dp(k: int, n: int, batch_size: int, **kwargs) -> tuple[Tiny, syncstep.Trainer]:
    model_kwargs = {key: kwargs.pop(key) for key in ("lr", "optimizer", "batchnorm", "scheduler") if key in kwargs}
    shuffle = kwargs.pop("shuffle", False)
    kwargs.setdefault("lr_scaling", "none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "dp on the CPU is not faster" warning
        trainer = syncstep.Trainer(accelerator="cpu", devices=k, strategy="dp", enable_progress_bar=False,
                                   logger=False, enable_checkpointing=False, **kwargs)
    model = Tiny(**model_kwargs)
    trainer.fit(model, loader(dataset(n), batch_size, shuffle))
    return model, trainer


@pytest.mark.parametrize("k", [2, 3])
def test_dp_equals_one_device_with_the_whole_batch(k):
    # 5 x 3 = 15 samples per step with k=3 (8 with k=2); 38 samples leave an uneven final step, which
    # splits unevenly over the replicas (e.g. 8 = 3 + 3 + 2 with k=3, or 6 = 3 + 3 + 0 with k=2).
    b, n = 5 if k == 3 else 4, 38
    model, trainer = fit_dp(k, n, b, max_epochs=2, lr=0.1)
    steps_per_epoch = -(-n // (k * b))
    assert trainer.global_step == 2 * steps_per_epoch >= 5
    expected = reference_sgd(n=n, global_batch=k * b, steps=trainer.global_step, lr=0.1, epochs=2)
    assert_params_close(model.state_dict(), expected)


def test_dp_shuffled_with_momentum_equals_reference():
    model, trainer = fit_dp(3, 50, 4, max_epochs=2, lr=0.05, optimizer="sgd_momentum", shuffle=True, seed=7)
    expected = reference_sgd(n=50, global_batch=12, steps=trainer.global_step, lr=0.05, epochs=2,
                             order=shuffled_order(50, 7), optimizer="sgd_momentum")
    assert_params_close(model.state_dict(), expected)


def test_dp_with_accumulation_equals_the_whole_batch():
    model, trainer = fit_dp(2, 48, 4, max_epochs=1, lr=0.1, accumulate_grad_batches=3)
    assert trainer.global_step == 2
    assert_params_close(model.state_dict(), reference_sgd(n=48, global_batch=24, steps=2, lr=0.1))


def test_dp_logged_epoch_metrics_equal_single_device():
    model, trainer = fit_dp(3, 30, 4, max_epochs=1, lr=0.1)
    # Recompute train_loss_epoch by hand: 3 steps of 12, 12 and 6 samples; mean over all 30 samples.
    ds, net = dataset(30), make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    total = 0.0
    for start in range(0, 30, 12):
        x, y = ds[start:start + 12]
        loss = F.cross_entropy(net(x), y)
        total += loss.item() * len(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(trainer.callback_metrics["train_loss_epoch"]) == pytest.approx(total / 30, abs=1e-6)


def test_dp_validation_counts_every_sample_once():
    model, trainer = fit_dp(3, 12, 4, max_epochs=1, lr=0.1)
    results = trainer.validate(model, loader(dataset(7, seed=2), 2))[0]
    net = make_net()
    net.load_state_dict({k.removeprefix("net."): v for k, v in model.state_dict().items()})
    x, y = dataset(7, seed=2)[:]
    with torch.no_grad():
        logits = net(x)
    assert results["val_acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-7)
    assert results["val_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-6)


def test_dp_batchnorm_keeps_the_first_replicas_running_statistics():
    """As torch.nn.DataParallel: only replica 0's buffer updates reach the model."""
    model, trainer = fit_dp(2, 8, 4, max_steps=1, lr=0.1, batchnorm=True)
    # The reference: replica 0 saw samples 0, 2, 4, 6 (every 2nd of the step's 8).
    net = make_net(batchnorm=True)
    x, _ = dataset(8)[[0, 2, 4, 6]]
    net.train()
    net(x)
    torch.testing.assert_close(model.net[1].running_mean, net[1].running_mean, atol=1e-7, rtol=0)
    torch.testing.assert_close(model.net[1].running_var, net[1].running_var, atol=1e-7, rtol=0)
    assert int(model.net[1].num_batches_tracked) == 1
    assert all(not k.startswith("module.") for k in model.state_dict())


def test_dp_warns_that_the_cpu_brings_no_speed_up():
    with pytest.warns(UserWarning, match="no faster than one device"):
        syncstep.Trainer(accelerator="cpu", devices=2, strategy="dp", logger=False)


def test_dp_final_step_with_a_single_sample_runs_one_replica():
    """25 samples, steps of 12: the last step has 1 sample, so replicas 1 and 2 have nothing to do."""
    model, trainer = fit_dp(3, 25, 4, max_epochs=1, lr=0.1)
    assert trainer.global_step == 3
    assert_params_close(model.state_dict(), reference_sgd(n=25, global_batch=12, steps=3, lr=0.1))


def test_dp_rejects_several_nodes_and_launchers(monkeypatch):
    with pytest.raises(ValueError, match="strategy='ddp'"):
        syncstep.Trainer(accelerator="cpu", devices=2, strategy="dp", num_nodes=2)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="Use strategy='ddp'"):
        syncstep.Trainer(accelerator="cpu", devices=2, strategy="dp")


def test_dp_and_ddp_at_equal_k_end_equal(tmp_path):
    """The DDP run of test_ddp's shuffled config and a DP run of the same config end equal."""
    from helpers import CONFIGS, load_result, run_configs

    cfg = {**CONFIGS[2], "name": "ddp_vs_dp"}
    run_configs(tmp_path, [cfg], timeout=120)
    ddp = load_result(tmp_path / "ddp_vs_dp.pt")
    model, _ = fit_dp(2, 37, 4, max_epochs=2, lr=0.1, shuffle=True, seed=3)
    assert_params_close(model.state_dict(), ddp["params"])


def test_dp_and_ddp_produce_the_same_lr_trajectory(tmp_path):
    from helpers import CONFIGS, load_result, run_configs

    cfg = {**CONFIGS[4], "name": "lr_ddp"}
    run_configs(tmp_path, [cfg], timeout=120)
    ddp = load_result(tmp_path / "lr_ddp.pt")
    cfg_dp = {**cfg, "name": "lr_dp", "strategy": "dp"}
    run_configs(tmp_path, [cfg_dp], timeout=120)
    dp = load_result(tmp_path / "lr_dp.pt")
    assert len(dp["lrs"]) == len(ddp["lrs"]) == 12
    assert dp["lrs"] == pytest.approx(ddp["lrs"], rel=1e-12)
    assert_params_close(dp["params"], ddp["params"])
