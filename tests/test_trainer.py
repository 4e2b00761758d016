"""The Trainer on one device, against hand-written PyTorch loops, and its errors."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

import syncstep
from common import Tiny, dataset, loader, make_net, reference_losses, reference_sgd, shuffled_order
from helpers import assert_params_close


def trainer(**kwargs) -> syncstep.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_checkpointing", False)
    return syncstep.Trainer(accelerator="cpu", **kwargs)


def hand_loop(n, batch, steps, lr_at, *, epochs=1, order=None, momentum=False, clip=None):
    """Plain PyTorch SGD whose LR at step t is lr_at(t) (common.reference_sgd)."""
    return reference_sgd(n, batch, steps, lr_at, order=order, epochs=epochs, clip=clip,
                         optimizer="sgd_momentum" if momentum else "sgd")


# -- training equals the hand-written loop --------------------------------------------------------

def test_single_device_equals_hand_written_loop_with_shuffling_and_momentum():
    t = trainer(max_epochs=3, seed=11, lr_scaling="none")
    model = Tiny(lr=0.05, optimizer="sgd_momentum")
    t.fit(model, loader(dataset(30), 4, shuffle=True))
    expected = hand_loop(30, 4, t.global_step, lambda s: 0.05, epochs=3, order=shuffled_order(30, 11), momentum=True)
    assert t.global_step == 3 * 8
    assert_params_close(model.state_dict(), expected)


def test_accumulation_with_linear_scaling_trains_with_k_times_the_lr():
    t = trainer(max_epochs=1, accumulate_grad_batches=3, lr_scaling="linear")
    model = Tiny(lr=0.05)
    t.fit(model, loader(dataset(36), 4))
    assert_params_close(model.state_dict(), hand_loop(36, 12, 3, lambda s: 0.15))
    assert t.optimizers[0].param_groups[0]["lr"] == 0.05  # the user's LR is put back after every step


def test_warmup_in_training_follows_the_documented_ramp():
    # k = 3 (accumulation), warmup over 6 reference steps = 2 optimizer steps: LR 0.05, 0.1, then 0.15.
    t = trainer(max_epochs=1, accumulate_grad_batches=3, lr_scaling="linear", warmup_steps=6)
    model = Tiny(lr=0.05)
    t.fit(model, loader(dataset(60), 4))
    ramp = [0.05, 0.1, 0.15, 0.15, 0.15]
    assert_params_close(model.state_dict(), hand_loop(60, 12, 5, lambda s: ramp[s]))


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_warmup_then_plain_steps_match_the_hand_written_loop(interval):
    # k = 1 with warmup_start_factor=0.1: the LR ramps up to the user's 0.1 and then stays, so the steps
    # after the warmup take the trainer's plain path (step and zero_grad only). Both must match.
    warmup = {"warmup_steps": 3} if interval == "step" else {"warmup_epochs": 1, "warmup_interval": "epoch"}
    t = trainer(max_epochs=3, lr_scaling="none", warmup_start_factor=0.1, **warmup)
    model = Tiny(lr=0.1)
    t.fit(model, loader(dataset(16), 4))
    ramp = [0.01, 0.04, 0.07] if interval == "step" else [0.01] * 4
    expected = hand_loop(16, 4, 12, lambda s: ramp[s] if s < len(ramp) else 0.1, epochs=3)
    assert t.global_step == 12
    assert_params_close(model.state_dict(), expected)


def test_logged_step_and_epoch_values_are_the_losses_of_a_hand_written_loop(tmp_path):
    t = syncstep.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=str(tmp_path), logger="csv",
                         log_every_n_steps=1, enable_progress_bar=False, enable_checkpointing=False,
                         lr_scaling="none")
    t.fit(Tiny(lr=0.1), loader(dataset(16), 4))
    losses = reference_losses(16, 4, 4)
    with open(tmp_path / "syncstep_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train_loss_step"]) for r in rows if r["train_loss_step"]] == pytest.approx(losses, rel=1e-6)
    assert [float(r["train_loss_epoch"]) for r in rows if r["train_loss_epoch"]] == pytest.approx(
        [sum(losses) / 4], rel=1e-6)
    # callback_metrics: float64 tensors of the latest values, made when read.
    assert t.callback_metrics["train_loss_step"].dtype == torch.float64
    assert float(t.callback_metrics["train_loss_step"]) == pytest.approx(losses[-1], rel=1e-6)
    values = t.validate(Tiny(), loader(dataset(8), 4))  # a fresh model: a different loss, seen at once
    assert float(t.callback_metrics["val_loss"]) == values[0]["val_loss"]


def test_progress_bar_counts_every_step_and_shows_the_last_logged_value(capfd):
    class Model(Tiny):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("shown", loss * 2, prog_bar=True)
            return loss

    t = syncstep.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         log_every_n_steps=3, lr_scaling="none")
    t.fit(Model(), loader(dataset(40), 4))
    final = capfd.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert "10/10" in final
    # The last step's value (step 10; the last logging step was 9), as the bar formats it.
    shown = syncstep.progress.format_metric(float(t.callback_metrics["shown"]))
    assert final.endswith(f"shown={shown}]"), final


def test_tensorboard_events_are_written_in_batches_and_at_flush(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from syncstep.loggers import TensorBoardLogger

    def steps_on_disk():
        logger.writer.flush()  # SummaryWriter's own flush: what was handed to it reaches the file
        accumulator = EventAccumulator(str(tmp_path))
        accumulator.Reload()
        return [e.step for e in accumulator.Scalars("loss")] if "loss" in accumulator.Tags()["scalars"] else []

    logger = TensorBoardLogger(str(tmp_path), name="", version="", write_every=3, write_secs=3600)  # in tmp_path
    for step in (1, 2):
        logger.log_metrics({"epoch": 0, "loss": step / 10}, step)
    assert steps_on_disk() == []
    logger.log_metrics({"epoch": 0, "loss": 0.3}, 3)
    assert steps_on_disk() == [1, 2, 3]
    logger.log_metrics({"epoch": 0, "loss": 0.4}, 4)
    logger.flush()
    assert steps_on_disk() == [1, 2, 3, 4]
    logger.finalize()


def test_gradient_clipping_matches_clip_grad_norm():
    t = trainer(max_epochs=1, gradient_clip_val=0.05, lr_scaling="none")
    model = Tiny(lr=0.5)
    t.fit(model, loader(dataset(20), 4))
    assert_params_close(model.state_dict(), hand_loop(20, 4, 5, lambda s: 0.5, clip=0.05))


def test_user_scheduler_state_is_not_touched_by_scaling_and_warmup():
    t = trainer(max_epochs=2, accumulate_grad_batches=2, lr_scaling="linear", warmup_steps=4)
    model = Tiny(lr=0.1, scheduler="step")  # StepLR(step_size=2, gamma=0.5), interval step
    t.fit(model, loader(dataset(32), 4))
    reference_opt = torch.optim.SGD(make_net().parameters(), lr=0.1)
    reference = torch.optim.lr_scheduler.StepLR(reference_opt, step_size=2, gamma=0.5)
    for _ in range(t.global_step):
        reference_opt.step()
        reference.step()
    assert t.lr_scheduler_configs[0].scheduler.state_dict() == reference.state_dict()
    assert t.optimizers[0].param_groups[0]["lr"] == reference_opt.param_groups[0]["lr"]


# -- configure_optimizers: Lightning's forms ---------------------------------------------------------

def forms():
    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1)

    return {
        "optimizer": lambda m: sgd(m),
        "list": lambda m: [sgd(m)],
        "tuple_of_lists": lambda m: ([o := sgd(m)], [torch.optim.lr_scheduler.StepLR(o, 1)]),
        "dict": lambda m: {"optimizer": (o := sgd(m)), "lr_scheduler": torch.optim.lr_scheduler.StepLR(o, 1)},
        "dict_with_config": lambda m: {"optimizer": (o := sgd(m)), "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.StepLR(o, 1), "interval": "step", "frequency": 2}},
        "list_of_dicts": lambda m: [{"optimizer": sgd(m)}],
        "plateau": lambda m: {"optimizer": (o := sgd(m)), "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(
            o, patience=0), "monitor": "train_loss_epoch"},
    }


@pytest.mark.parametrize("form", sorted(forms()))
def test_configure_optimizers_forms(form):
    class Model(Tiny):
        def configure_optimizers(self):
            return forms()[form](self)

    t = trainer(max_epochs=2)
    t.fit(Model(), loader(dataset(16), 4))
    assert t.global_step == 8
    assert len(t.optimizers) == 1


def test_scheduler_frequency_and_interval():
    class Model(Tiny):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), "interval": "step",
                            "frequency": 3}]

    t = trainer(max_epochs=1, lr_scaling="none")
    t.fit(Model(), loader(dataset(28), 4))  # 7 steps: the scheduler steps after steps 3 and 6
    assert t.optimizers[0].param_groups[0]["lr"] == 0.25


def test_plateau_without_monitor_is_a_clear_error():
    class Model(Tiny):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.ReduceLROnPlateau(opt)]

    with pytest.raises(ValueError, match="ReduceLROnPlateau needs a metric to watch"):
        trainer(max_epochs=1).fit(Model(), loader(dataset(8), 4))


def test_configure_optimizers_returning_nonsense():
    class Model(Tiny):
        def configure_optimizers(self):
            return "adam"

    with pytest.raises(TypeError, match="configure_optimizers must return an optimizer"):
        trainer(max_epochs=1).fit(Model(), loader(dataset(8), 4))


def test_two_optimizers_both_step_and_both_scale():
    class Model(Tiny):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                    torch.optim.Adam(self.net[2].parameters(), lr=0.01)]

    t = trainer(max_epochs=1, accumulate_grad_batches=4)
    t.fit(Model(), loader(dataset(16), 4))
    factors = {o.name: o.factor for o in t.lr_plan.optimizers}
    assert factors == {"SGD": 4.0, "Adam": 2.0}
    # Reference: one step on all 16 samples, SGD at 0.4 on layer 0 and Adam at 0.02 on layer 2.
    net = make_net()
    sgd, adam = torch.optim.SGD(net[0].parameters(), lr=0.4), torch.optim.Adam(net[2].parameters(), lr=0.02)
    x, y = dataset(16)[:]
    F.cross_entropy(net(x), y).backward()
    sgd.step()
    adam.step()
    expected = {f"net.{k}": v for k, v in net.state_dict().items()}
    model_state = t.strategy.runner.module.state_dict()
    assert_params_close(model_state, expected)


# -- evaluation and logging ------------------------------------------------------------------------

def test_validate_and_test_return_one_dict_per_loader():
    t = trainer(max_epochs=1)
    model = Tiny()
    results = t.validate(model, [loader(dataset(5, seed=2), 2), loader(dataset(9, seed=3), 4)])
    assert len(results) == 2 and set(results[0]) == {"val_loss", "val_acc"}
    for result, (n, seed) in zip(results, [(5, 2), (9, 3)]):
        x, y = dataset(n, seed=seed)[:]
        with torch.no_grad():
            assert result["val_loss"] == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-6)
    assert t.test(model, loader(dataset(5, seed=2), 2))[0]["val_loss"] == pytest.approx(results[0]["val_loss"])


def test_metrics_csv_logs_steps_epochs_and_lr(tmp_path):
    t = syncstep.Trainer(accelerator="cpu", max_epochs=2, default_root_dir=str(tmp_path), logger="csv",
                         log_every_n_steps=2, enable_progress_bar=False, enable_checkpointing=False)
    t.fit(Tiny(), loader(dataset(16), 4), loader(dataset(6, seed=1), 3))
    with open(tmp_path / "syncstep_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    step_rows = [r for r in rows if r["train_loss_step"]]
    assert [int(r["step"]) for r in step_rows] == [2, 4, 6, 8]
    assert all(float(r["lr-SGD"]) == 0.1 for r in step_rows)
    assert [int(r["epoch"]) for r in rows if r["val_acc"]] == [0, 1]
    assert [int(r["epoch"]) for r in rows if r["train_loss_epoch"]] == [0, 1]
    assert set(t.callback_metrics) >= {"train_loss_step", "train_loss_epoch", "val_acc", "val_loss", "lr-SGD"}


def test_val_check_interval_validates_inside_the_epoch():
    seen = []

    class Model(Tiny):
        def on_validation_epoch_end(self):
            seen.append(self.global_step)

    t = trainer(max_epochs=1, val_check_interval=2)
    t.fit(Model(), loader(dataset(24), 4), loader(dataset(4, seed=1), 2))
    assert seen == [2, 4, 6]


def test_max_steps_stops_inside_an_epoch():
    t = trainer(max_steps=3)
    t.fit(Tiny(), loader(dataset(40), 4))
    assert (t.global_step, t.current_epoch) == (3, 0)


def test_log_rejects_a_non_scalar():
    class Model(Tiny):
        def training_step(self, batch, batch_idx):
            self.log("per_sample", torch.ones(3))
            return super().training_step(batch, batch_idx)

    with pytest.raises(ValueError, match="log a scalar"):
        trainer(max_epochs=1).fit(Model(), loader(dataset(8), 4))


def test_training_step_returning_none_is_a_clear_error():
    class Model(Tiny):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(ValueError, match="training_step must return the loss"):
        trainer(max_epochs=1).fit(Model(), loader(dataset(8), 4))


def test_bf16_and_fp16_mixed_precision_train_close_to_fp32():
    results = {}
    for precision in ("32", "bf16-mixed", "16-mixed"):
        t = trainer(max_epochs=2, precision=precision, lr_scaling="none")
        model = Tiny(lr=0.1)
        t.fit(model, loader(dataset(32), 8))
        results[precision] = model.state_dict()
    for precision in ("bf16-mixed", "16-mixed"):
        for key, value in results["32"].items():
            torch.testing.assert_close(results[precision][key], value, atol=0.02, rtol=0)
            assert not torch.equal(results[precision][key], value) or "bias" in key


def test_nonfinite_loss_stops_with_the_step_named():
    t = trainer(max_epochs=2)
    with pytest.raises(syncstep.NonFiniteLossError, match="optimizer step 3 \\(first seen on rank 0\\)"):
        t.fit(Tiny(fail={"rank": 0, "step": 3, "kind": "nan"}), loader(dataset(40), 4))


def test_nonfinite_loss_can_be_skipped():
    t = trainer(max_epochs=1, on_nonfinite_loss="skip", lr_scaling="none")
    model = Tiny(fail={"rank": 0, "step": 3, "kind": "nan"})
    t.fit(model, loader(dataset(24), 4))
    assert t.global_step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Reference: steps 0, 1, 2, 4, 5 applied, step 3 (samples 12..15) skipped.
    ds, net = dataset(24), make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for s in (0, 1, 2, 4, 5):
        x, y = ds[s * 4:(s + 1) * 4]
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert_params_close(model.state_dict(), {f"net.{k}": v for k, v in net.state_dict().items()})


def test_skip_under_ddp_agrees_through_the_strategy_on_its_collective_device(monkeypatch):
    """The skip agreement is a collective: it must go through the strategy, which puts the tensor on the
    backend's device (NCCL rejects CPU tensors). A world of one here; test_gpu.py runs it on NCCL."""
    import threading

    import torch.distributed as dist

    from syncstep.strategies.ddp import DDP

    inside, seen = threading.local(), []
    strategy_reduce, torch_reduce = DDP.all_reduce, dist.all_reduce

    def through_strategy(self, tensor, op="sum"):
        inside.on = True
        try:
            return strategy_reduce(self, tensor, op)
        finally:
            inside.on = False

    def recorded(tensor, *args, **kwargs):
        seen.append((getattr(inside, "on", False), tensor.device))
        return torch_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(DDP, "all_reduce", through_strategy)
    monkeypatch.setattr(dist, "all_reduce", recorded)
    t = trainer(max_epochs=1, strategy="ddp", devices=1, on_nonfinite_loss="skip", lr_scaling="none")
    model = Tiny(fail={"rank": 0, "step": 3, "kind": "nan"})
    t.fit(model, loader(dataset(24), 4))
    assert t.global_step == 6 and all(torch.isfinite(p).all() for p in model.parameters())
    assert len(seen) >= 6  # at least one agreement per step
    assert all(via_strategy for via_strategy, _ in seen), seen
    assert {device for _, device in seen} == {t.strategy.collective_device}


def test_trainer_arguments_are_the_config_fields_with_the_same_defaults():
    import dataclasses
    import inspect

    from syncstep.config import TrainerConfig

    signature = {name: p.default for name, p in inspect.signature(syncstep.Trainer).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY}
    fields = {f.name: f.default for f in dataclasses.fields(TrainerConfig) if f.init}
    assert signature == fields


# -- data -----------------------------------------------------------------------------------------

def test_iterable_dataset_and_custom_batch_sampler_get_clear_errors():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from dataset(8)

    with pytest.raises(ValueError, match="IterableDataset"):
        trainer(max_epochs=1).fit(Tiny(), DataLoader(Stream(), batch_size=4))
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(8)), 4, False)

    class MyBatchSampler(torch.utils.data.BatchSampler):
        pass

    custom = MyBatchSampler(torch.utils.data.SequentialSampler(range(8)), 4, False)
    with pytest.raises(ValueError, match="custom batch_sampler"):
        trainer(max_epochs=1).fit(Tiny(), DataLoader(dataset(8), batch_sampler=custom))
    # A plain BatchSampler passed explicitly is what batch_size= builds; but batch_size is then None.
    with pytest.raises(ValueError, match="custom batch_sampler"):
        trainer(max_epochs=1).fit(Tiny(), DataLoader(dataset(8), batch_sampler=sampler))


def test_use_distributed_sampler_false_uses_the_loader_as_it_is():
    t = trainer(max_epochs=1, use_distributed_sampler=False, lr_scaling="none")
    model = Tiny()
    t.fit(model, DataLoader(dataset(20), batch_size=4))
    assert_params_close(model.state_dict(), reference_sgd(n=20, global_batch=4, steps=5, lr=0.1))


def test_a_custom_sampler_sets_the_order():
    order = [5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6]
    t = trainer(max_epochs=1, lr_scaling="none")
    model = Tiny()
    t.fit(model, DataLoader(dataset(12), batch_size=4, sampler=order))
    expected = reference_sgd(n=12, global_batch=4, steps=3, lr=0.1, order=lambda e: order)
    assert_params_close(model.state_dict(), expected)


# -- argument errors, before anything starts ----------------------------------------------------------

def test_design_note_spelling_is_corrected():
    with pytest.raises(TypeError) as info:
        syncstep.Trainer(num_epochs=5, accelerator="cpu", devices=6, strategies="dp")
    message = str(info.value)
    assert "unknown argument 'num_epochs'; did you mean 'max_epochs'?" in message
    assert "unknown argument 'strategies'; did you mean 'strategy'?" in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"devices": 0}, "devices must be 'auto', an int >= 1"),
        ({"devices": [0, 1]}, "lists device indices, which select GPUs"),
        ({"strategy": "dpp"}, "did you mean 'dp'"),
        ({"accelerator": "tpu"}, "accelerator='tpu' is not supported"),
        ({"accelerator": "gpu"}, "no CUDA GPU is visible"),
        ({"precision": "8"}, "precision='8' is not supported"),
        ({"devices": 2, "strategy": "single"}, "strategy='single' runs on one device"),
        ({"num_nodes": 2, "devices": 2, "strategy": "ddp"}, "not started by torchrun or SLURM"),
        ({"lr_scaling": "quadratic"}, "lr_scaling='quadratic'"),
        ({"max_epochs": -1}, "max_epochs must be an int >= 0"),
        ({"val_check_interval": 1.5}, "val_check_interval"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches must be an int >= 1"),
        ({"warmup_type": "cosine"}, "warmup_type='cosine' is not one of"),
        ({"warmup_epochs": 2, "warmup_steps": 10}, "were both given; pass one"),
        ({"warmup_interval": "epoch", "warmup_epochs": 1.5}, "whole number of warmup_epochs"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs.setdefault("accelerator", "cpu")
    with pytest.raises(ValueError, match=match):
        syncstep.Trainer(**kwargs)


def test_more_gpus_than_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="needs GPU 3, but only 2 GPUs are visible"):
        syncstep.Trainer(accelerator="gpu", devices=4)


def test_num_nodes_must_match_the_launcher(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="num_nodes=1, but torchrun started 2 node"):
        syncstep.Trainer(accelerator="cpu", devices=2, strategy="ddp")
    with pytest.raises(ValueError, match="devices=3, but torchrun started 2 process"):
        syncstep.Trainer(accelerator="cpu", devices=3, num_nodes=2, strategy="ddp")


def test_ddp_from_a_notebook_or_pytest_says_how_to_launch():
    t = syncstep.Trainer(accelerator="cpu", devices=2, strategy="ddp")
    with pytest.raises(ValueError, match="torchrun --nproc-per-node=2"):
        t.fit(Tiny(), loader(dataset(8), 4))


def test_fit_needs_a_syncstep_module():
    with pytest.raises(TypeError, match="needs a syncstep.Module"):
        trainer(max_epochs=1).fit(torch.nn.Linear(2, 2), loader(dataset(8), 4))


def test_ddp_on_one_device_runs_in_this_process():
    t = trainer(max_epochs=1, strategy="ddp", devices=1, lr_scaling="none")
    model = Tiny()
    t.fit(model, loader(dataset(12), 4))
    assert_params_close(model.state_dict(), reference_sgd(n=12, global_batch=4, steps=3, lr=0.1))
    assert math.isfinite(float(t.callback_metrics["train_loss_step"]))


def test_default_logger_writes_csv_and_tensorboard(tmp_path):
    t = syncstep.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=str(tmp_path), log_every_n_steps=1,
                         enable_progress_bar=False, enable_checkpointing=False)
    t.fit(Tiny(), loader(dataset(8), 4))
    version = tmp_path / "syncstep_logs" / "version_0"
    assert t.log_dir == str(version)
    assert (version / "metrics.csv").exists()
    events = list(version.glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(version))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train_loss_step")] == [1, 2]
    assert [e.value for e in accumulator.Scalars("lr-SGD")] == pytest.approx([0.1, 0.1])
    # The same values as metrics.csv (float32 in the event file), and no "epoch" scalar.
    with open(version / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train_loss_step")]
    assert [e.value for e in accumulator.Scalars("train_loss_step")] == pytest.approx(
        [float(row["train_loss_step"]) for row in rows], rel=1e-6)
    assert "epoch" not in accumulator.Tags()["scalars"]
