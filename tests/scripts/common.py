"""A tiny model and dataset shared by the test scripts and the in-process references."""

from __future__ import annotations

import math
import os
import signal
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import syncstep

IN, HIDDEN, OUT = 8, 16, 3


def dataset(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = torch.randint(0, OUT, (n,), generator=g)
    return TensorDataset(x, y)


def make_net(seed: int = 0, batchnorm: bool = False, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(IN, HIDDEN)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(HIDDEN))
    layers += [torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)]
    if dropout:
        layers.insert(-1, torch.nn.Dropout(dropout))
    return torch.nn.Sequential(*layers)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    raise ValueError(name)


class Tiny(syncstep.Module):
    def __init__(self, lr: float = 0.1, optimizer: str = "sgd", seed: int = 0, batchnorm: bool = False,
                 scheduler: str | None = None, fail: dict | None = None, dropout: float = 0.0):
        super().__init__()
        self.net = make_net(seed, batchnorm, dropout)
        self.lr, self.optimizer_name, self.scheduler, self.fail = lr, optimizer, scheduler, fail or {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        fail = self.fail
        restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and fail.get("first_attempt_only")
        here = fail and self.global_rank == fail.get("rank", 0) and self.global_step == fail.get("step", 0)
        if here and not restarted:
            if fail.get("marker"):  # when the fault happens (time.monotonic is one clock for all processes)
                with open(fail["marker"], "w") as f:
                    f.write(repr(time.monotonic()))
            if fail["kind"] == "raise":
                raise RuntimeError(f"injected failure at step {self.global_step}")
            if fail["kind"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fail["kind"] == "sigterm":  # as a scheduler would: to the launcher (or to us if none)
                os.kill(os.getppid() if fail.get("parent") else os.getpid(), signal.SIGTERM)
                fail["kind"] = "done"
            if fail["kind"] == "sleep":
                time.sleep(fail["seconds"])
            if fail["kind"] == "nan":
                loss = loss * float("nan")
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    test_step = validation_step

    def configure_optimizers(self):
        opt = make_optimizer(self.optimizer_name, self.parameters(), self.lr)
        if self.scheduler == "step":
            return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
                            "interval": "step"}]
        if self.scheduler == "cosine_epoch":
            return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)]
        return opt


def loader(ds, batch_size: int, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)


def reference_sgd(n: int, global_batch: int, steps: int, lr, order=None, epochs: int = 1,
                  optimizer: str = "sgd", seed: int = 0, batchnorm: bool = False, clip: float | None = None) -> dict:
    """Hand-written single-process training: batches of ``global_batch`` samples in ``order``.

    ``lr`` is a number, or a function of the step (set on the optimizer before each step).
    """
    ds = dataset(n)
    net = make_net(seed, batchnorm)
    lr_at = lr if callable(lr) else (lambda step: lr)
    opt = make_optimizer(optimizer, net.parameters(), lr_at(0))
    done = 0
    for epoch in range(epochs):
        idx = list(range(n)) if order is None else order(epoch)
        for start in range(0, n, global_batch):
            if done == steps:
                break
            x, y = ds[idx[start:start + global_batch]]
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            for group in opt.param_groups:
                group["lr"] = lr_at(done)
            opt.step()
            done += 1
    return {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}


def reference_losses(n: int, batch: int, steps: int, lr: float = 0.1) -> list[float]:
    """Hand-written SGD on dataset(n) in order: the loss of each step, before that step's update."""
    ds, net = dataset(n), make_net()
    opt, losses = torch.optim.SGD(net.parameters(), lr=lr), []
    for s in range(steps):
        x, y = ds[s * batch:(s + 1) * batch]
        loss = F.cross_entropy(net(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def shuffled_order(n: int, seed: int):
    """The documented epoch order: torch.randperm(n) with a generator seeded seed + epoch."""
    def order(epoch):
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order


class Quadratic(syncstep.Module):
    """Per-sample loss |w - c_i|^2 / 2: the gradient of sample i is w - c_i, so |G|^2 = |w - mean c|^2 and
    tr(Sigma) = mean |c_i - mean c|^2, exactly."""

    def __init__(self, dim: int, lr: float = 0.0, scheduler: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))
        self.lr, self.scheduler = lr, scheduler

    def training_step(self, batch, batch_idx):
        (c,) = batch
        return 0.5 * (self.w - c).square().sum(1).mean()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return opt
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)]


def quadratic_data(n: int, dim: int, noise: float, seed: int = 0) -> TensorDataset:
    """Targets with mean exactly (1, ..., 1) / sqrt(dim) (|G|^2 = 1 at w = 0) and tr(Sigma) = noise^2 dim."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    z = (z - z.mean(0)) / (z - z.mean(0)).square().sum(1).mean().sqrt() * math.sqrt(dim)
    return TensorDataset((torch.ones(dim, dtype=torch.float64) / math.sqrt(dim) + noise * z).float())


def exact(data: TensorDataset) -> tuple[float, float]:
    (c,) = data.tensors
    c = c.double()
    return float(c.mean(0).square().sum()), float((c - c.mean(0)).square().sum(1).mean())
