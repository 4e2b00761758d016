"""Lightning code on syncstep: hook order, callbacks, loggers, DataModules, hyperparameters, predict,
manual optimization, torchmetrics; in one process here, on 2 processes in test_lightning_ddp.py."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import syncstep
from common import Tiny, dataset, loader, make_net
from helpers import assert_params_close
from syncstep.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from syncstep.loggers import CSVLogger

HOOKS = [
    "setup", "teardown", "on_fit_start", "on_fit_end", "on_sanity_check_start", "on_sanity_check_end",
    "on_train_start", "on_train_end", "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start",
    "on_train_batch_end", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_validation_start", "on_validation_end", "on_validation_epoch_start",
    "on_validation_epoch_end", "on_validation_batch_start", "on_validation_batch_end", "on_save_checkpoint",
]
MODULE_ONLY = ["prepare_data", "configure_model", "configure_callbacks", "configure_optimizers", "training_step",
               "validation_step"]


def recorder(calls: list[str]) -> Callback:
    def hook(name):
        return lambda self, trainer, module, *args, **kwargs: calls.append(f"Callback.{name}")

    return type("Recorder", (Callback,), {name: hook(name) for name in HOOKS})()


def recorded_module(calls: list[str]) -> Tiny:
    def hook(name):
        base = getattr(Tiny, name)

        def method(self, *args, **kwargs):
            calls.append(name)
            return base(self, *args, **kwargs)

        return method

    names = [n for n in HOOKS + MODULE_ONLY if hasattr(Tiny, n)]  # (sanity-check hooks are callbacks' only)
    return type("Recorded", (Tiny,), {name: hook(name) for name in names})()


def test_hooks_run_in_lightnings_order():
    """The order of Lightning's documentation and its own test (tests/tests_pytorch/models/test_hooks.py),
    written out by hand for 1 epoch of 2 training batches, 2 validation batches and 1 sanity batch.
    syncstep zeroes the gradients after the optimizer step (Lightning: before the backward), so
    on_before_zero_grad comes after on_before_optimizer_step here."""
    calls: list[str] = []
    trainer = syncstep.Trainer(accelerator="cpu", max_epochs=1, callbacks=[recorder(calls)], logger=False,
                               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                               default_root_dir=None, enable_checkpointing=False)
    trainer.fit(recorded_module(calls), loader(dataset(8), 4), loader(dataset(4, seed=1), 2))

    def both(name):
        return [f"Callback.{name}", name]

    def validation(batches):
        out = both("on_validation_start") + both("on_validation_epoch_start")
        for _ in range(batches):
            out += both("on_validation_batch_start") + ["validation_step"] + both("on_validation_batch_end")
        return out + both("on_validation_epoch_end") + both("on_validation_end")

    batch = (both("on_train_batch_start") + ["training_step"] + both("on_before_backward")
             + both("on_after_backward") + both("on_before_optimizer_step") + both("on_before_zero_grad")
             + both("on_train_batch_end"))
    expected = (["configure_callbacks", "prepare_data"] + both("setup") + ["configure_model", "configure_optimizers"]
                + both("on_fit_start") + ["Callback.on_sanity_check_start"] + validation(1)
                + ["Callback.on_sanity_check_end"] + both("on_train_start") + both("on_train_epoch_start")
                + batch + batch + validation(2) + both("on_train_epoch_end") + both("on_train_end")
                + both("on_fit_end") + both("teardown"))
    assert calls == expected


def test_checkpoint_hooks_and_callback_state_go_into_checkpoints(tmp_path):
    class Counting(Callback):
        def __init__(self):
            self.batches = 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.batches += 1
            assert set(outputs) == {"loss"} and outputs["loss"].ndim == 0

        def state_dict(self):
            return {"batches": self.batches}

        def load_state_dict(self, state):
            self.batches = state["batches"]

        def on_save_checkpoint(self, trainer, module, checkpoint):
            checkpoint["counted"] = self.batches

    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    first = Counting()
    syncstep.Trainer(max_epochs=1, callbacks=[first], **common).fit(Tiny(), loader(dataset(12), 4))
    state = syncstep.checkpoint.load(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert state["callbacks"][first.state_key] == {"batches": 3} and state["counted"] == 3
    second = Counting()
    syncstep.Trainer(max_epochs=2, callbacks=[second], **common).fit(Tiny(), loader(dataset(12), 4), ckpt_path="last")
    assert second.batches == 6  # 3 restored + 3 trained


class Regression(syncstep.LightningModule):
    """A Lightning-style module: save_hyperparameters, a validation loss, Adam, a step scheduler."""

    def __init__(self, hidden: int = 16, lr: float = 0.05, note: str = "x"):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch):  # Lightning allows leaving batch_idx out
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                                                   "interval": "epoch"}}


class Digits(syncstep.LightningDataModule):
    def __init__(self, n=40, batch_size=4):
        super().__init__()
        self.n, self.batch_size, self.calls = n, batch_size, []

    def prepare_data(self):
        self.calls.append("prepare_data")

    def setup(self, stage):
        self.calls.append(f"setup:{stage}")
        self.train, self.val = dataset(self.n), dataset(self.n // 2, seed=1)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)

    def teardown(self, stage):
        self.calls.append(f"teardown:{stage}")


def read_csv(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_datamodule_checkpoint_early_stopping_lr_monitor_and_csv_logger(tmp_path):
    checkpoint = ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=2, filename="{epoch}-{val_loss:.4f}")
    stopping = EarlyStopping(monitor="val_loss", patience=2, min_delta=0.01)
    logger = CSVLogger(str(tmp_path), name="lit")
    trainer = syncstep.Trainer(accelerator="cpu", max_epochs=12, default_root_dir=str(tmp_path), logger=logger,
                               callbacks=[checkpoint, stopping, LearningRateMonitor(logging_interval="epoch")],
                               enable_progress_bar=False, lr_scaling="none")
    dm = Digits()
    trainer.fit(Regression(lr=0.1), datamodule=dm)
    assert dm.calls[:2] == ["prepare_data", "setup:fit"] and dm.calls[-1] == "teardown:fit"
    assert trainer.datamodule is dm and trainer.logger is logger
    assert trainer.log_dir == str(tmp_path / "lit" / "version_0")
    rows = read_csv(tmp_path / "lit" / "version_0" / "metrics.csv")
    val = [(int(r["epoch"]), float(r["val_loss"])) for r in rows if "val_loss" in r]
    # The early-stopping rule, by hand, on the logged history: stop at the first epoch whose loss has
    # not improved by min_delta on the best for `patience` checks.
    best, wait, stop_epoch = math.inf, 0, None
    for epoch, loss in val:
        if loss < best - 0.01:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= 2:
                stop_epoch = epoch
                break
    assert stop_epoch is not None and 2 <= stop_epoch < 11, val
    assert stopping.stopped_epoch == stop_epoch and trainer.current_epoch == stop_epoch
    assert [e for e, _ in val] == list(range(stop_epoch + 1))
    # The best checkpoint is the epoch with the lowest logged val_loss, and its score is that loss.
    best_epoch, best_loss = min(val, key=lambda item: item[1])
    assert float(checkpoint.best_model_score) == pytest.approx(best_loss, rel=1e-6)
    assert checkpoint.best_model_path.endswith(f"epoch={best_epoch}-val_loss={best_loss:.4f}.ckpt")
    assert len(list((tmp_path / "lit" / "version_0" / "checkpoints").glob("*.ckpt"))) == 2
    # LearningRateMonitor(logging_interval="epoch"): the LR of each epoch's first step, StepLR halving it.
    lrs = sorted({(int(r["epoch"]), float(r["lr-SGD"])) for r in rows if "lr-SGD" in r and "val_loss" not in r
                  and "train_loss_step" not in r})
    assert lrs == [(e, pytest.approx(0.1 * 0.5 ** e)) for e in range(stop_epoch + 1)]
    # callback_metrics also has the plain name of a value logged on_step and on_epoch (Lightning's).
    assert float(trainer.callback_metrics["train_loss"]) == float(trainer.callback_metrics["train_loss_epoch"])
    # test() without a model uses the fitted one; ckpt_path="best" loads the best weights.
    best_model = Regression.load_from_checkpoint(checkpoint.best_model_path)
    tested = trainer.validate(ckpt_path="best", datamodule=dm)[0]
    x, y = dm.val[:]
    with torch.no_grad():
        assert tested["val_loss"] == pytest.approx(F.cross_entropy(best_model(x), y).item(), rel=1e-5)


def test_save_hyperparameters_and_load_from_checkpoint(tmp_path):
    trainer = syncstep.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=str(tmp_path), logger=False,
                               enable_progress_bar=False)
    model = Regression(hidden=12, lr=0.01, note="first")
    assert model.hparams == {"hidden": 12, "lr": 0.01, "note": "first"} and model.hparams.lr == 0.01
    trainer.fit(model, loader(dataset(16), 4))
    path = tmp_path / "checkpoints" / "last.ckpt"
    loaded = Regression.load_from_checkpoint(str(path), note="override")
    assert loaded.hparams == {"hidden": 12, "lr": 0.01, "note": "override"}
    assert_params_close(loaded.state_dict(), model.state_dict(), atol=0)
    trainer.save_checkpoint(str(tmp_path / "weights.ckpt"), weights_only=True)
    again = Regression.load_from_checkpoint(str(tmp_path / "weights.ckpt"))
    assert_params_close(again.state_dict(), model.state_dict(), atol=0)

    class WithNet(syncstep.Module):
        def __init__(self, net: torch.nn.Module, width: int = 3):
            super().__init__()
            self.save_hyperparameters()
            self.net = net

    with pytest.warns(UserWarning, match=r"'net' is a Linear.*ignore=\['net'\]"):
        kept = WithNet(torch.nn.Linear(2, 2))
    assert kept.hparams == {"width": 3}


def test_predict_returns_every_sample_once_in_order():
    model = Tiny()
    trainer = syncstep.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    out = trainer.predict(model, loader(dataset(11), 4))
    assert [len(b) for b in out] == [4, 4, 3]
    x, _ = dataset(11)[:]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(out), model(x), rtol=0, atol=1e-6)


def test_manual_optimization_with_two_optimizers_equals_a_hand_written_loop():
    """A GAN-shaped step (two optimizers, toggle_optimizer), against the same steps written by hand."""

    class TwoPlayers(Tiny):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.other = make_net(seed=1)

        def training_step(self, batch, batch_idx):
            first, second = self.optimizers()
            x, y = batch
            self.toggle_optimizer(first)
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            first.step()
            first.zero_grad()
            self.untoggle_optimizer(first)
            self.toggle_optimizer(second)
            loss2 = F.cross_entropy(self.other(x) + self.net(x).detach(), y)
            self.manual_backward(loss2)
            second.step()
            second.zero_grad()
            self.untoggle_optimizer(second)
            self.log("loss", loss)

        def configure_optimizers(self):
            return [torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.SGD(self.other.parameters(), lr=0.2)]

    model = TwoPlayers()
    trainer = syncstep.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                               enable_checkpointing=False, lr_scaling="none")
    trainer.fit(model, loader(dataset(16), 4))
    assert trainer.global_step == 8  # Lightning's meaning: every optimizer step counts
    net, other = make_net(), make_net(seed=1)
    opt1, opt2 = torch.optim.SGD(net.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.2)
    ds = dataset(16)
    for s in range(4):
        x, y = ds[s * 4:(s + 1) * 4]
        F.cross_entropy(net(x), y).backward()
        opt1.step()
        opt1.zero_grad()
        F.cross_entropy(other(x) + net(x).detach(), y).backward()
        opt2.step()
        opt2.zero_grad()
    expected = {**{f"net.{k}": v for k, v in net.state_dict().items()},
                **{f"other.{k}": v for k, v in other.state_dict().items()}}
    assert_params_close(model.state_dict(), expected)


def test_torchmetrics_metric_objects_in_self_log():
    torchmetrics = pytest.importorskip("torchmetrics")

    class WithAccuracy(Tiny):
        def __init__(self):
            super().__init__()
            self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.accuracy(self(x), y)
            self.log("val_acc", self.accuracy)

    model = WithAccuracy()
    trainer = syncstep.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    result = trainer.validate(model, loader(dataset(13, seed=2), 4))[0]
    x, y = dataset(13, seed=2)[:]
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    assert result["val_acc"] == pytest.approx(expected, abs=1e-6)
    assert model.accuracy.update_count == 0  # reset at the epoch's end


@pytest.mark.parametrize(("argument", "match"), [
    ("profiler", "'profiler' is a Lightning argument syncstep does not support"),
    ("overfit_batches", "'overfit_batches' is a Lightning argument syncstep does not support"),
])
def test_lightning_arguments_syncstep_lacks_say_so(argument, match):
    with pytest.raises(TypeError, match=match):
        syncstep.Trainer(**{argument: 1})


def test_limits_fast_dev_run_and_min_epochs():
    seen = []

    class Model(Tiny):
        def training_step(self, batch, batch_idx):
            seen.append(batch_idx)
            return super().training_step(batch, batch_idx)

    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    syncstep.Trainer(max_epochs=2, limit_train_batches=2, **common).fit(Model(), loader(dataset(40), 4))
    assert seen == [0, 1, 0, 1]  # 2 batches an epoch (batch_idx counts within the epoch, as in Lightning)
    trainer = syncstep.Trainer(fast_dev_run=True, **common)
    trainer.fit(Tiny(), loader(dataset(40), 4), loader(dataset(8), 4))
    assert trainer.global_step == 1

    class StopsAtOnce(Callback):
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = True

    trainer = syncstep.Trainer(max_epochs=5, min_epochs=3, callbacks=[StopsAtOnce()], **common)
    trainer.fit(Tiny(), loader(dataset(8), 4))
    assert trainer.current_epoch == 2 and trainer.global_step == 6


def test_a_lightning_hook_syncstep_does_not_call_is_a_warning():
    class Custom(Tiny):
        def optimizer_step(self, *args, **kwargs):
            pass

    with pytest.warns(UserWarning, match="optimizer_step is a Lightning hook that syncstep does not call"):
        syncstep.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False).fit(Custom(), loader(dataset(8), 4))


def test_loggers_keep_their_directory_from_fit_to_test(tmp_path):
    """One version directory per Trainer, as Lightning's: test() after fit() logs into it too."""
    trainer = syncstep.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=str(tmp_path),
                               enable_progress_bar=False, log_every_n_steps=1)
    trainer.fit(Tiny(), loader(dataset(8), 4))
    trainer.test(dataloaders=loader(dataset(6, seed=1), 3))
    version = tmp_path / "syncstep_logs" / "version_0"
    assert trainer.log_dir == str(version) and not (tmp_path / "syncstep_logs" / "version_1").exists()
    rows = read_csv(version / "metrics.csv")
    assert any("val_acc" in r for r in rows)  # Tiny's test_step logs val_acc
    assert len(list(version.glob("events.out.tfevents.*"))) == 2  # one event file per stage
