"""syncstep's per-step overhead on W1 (MLP 64-128-10, batch 32, 1 thread), measured in one process.

    python benchmarks/overhead.py [--reps 15] [--steps 1000] [--model w1|linear] [--fresh]
    python benchmarks/overhead.py --noise-scale      # the cost of Trainer(noise_scale=True)

``--model linear`` trains one Linear(64, 10) on batches of 2 instead: the torch work per step shrinks to
little more than the calls themselves, so the difference to the hand-written loop is the framework's
own Python per step, with less of the machine's noise on top.

The hand-written loop, syncstep with the progress bar and loggers off, and syncstep as users run it
(bar, CSV and TensorBoard loggers) take turns in the same process, rep after rep, so that a slow
second of a shared machine hits all three alike; each rep times the steps after the first 50 from
inside the training step. Prints the median microseconds per step and the ratio to the hand-written
loop. ``--fresh`` runs every rep of every implementation in a fresh process instead (same rotating
order), as the suite (run.py) does: what a user's run sees, spread more by a noisy machine.

``--noise-scale`` compares, in the same rotation, syncstep (bar and loggers off) with
accumulate_grad_batches=2 with and without ``noise_scale=True`` (on one device the noise scale needs
two micro-batches per step; these are what it measures). The times are per micro-batch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import syncstep

WARMUP = 50
MODEL = {"name": "w1", "batch_size": 32}  # set by --model


def data(steps: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = (steps + WARMUP) * MODEL["batch_size"]
    return TensorDataset(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g))


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    if MODEL["name"] == "linear":
        return torch.nn.Linear(64, 10)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def per_step(ticks: list[float]) -> float:
    return (ticks[-1] - ticks[WARMUP]) / (len(ticks) - 1 - WARMUP) * 1e6


def hand(dataset: TensorDataset) -> float:
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    ticks = []
    for x, y in DataLoader(dataset, batch_size=MODEL["batch_size"], shuffle=True):
        ticks.append(time.perf_counter())
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return per_step(ticks)


class MLP(syncstep.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.ticks = mlp(), []

    def training_step(self, batch, batch_idx):
        self.ticks.append(time.perf_counter())
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def ours(dataset: TensorDataset, lean: bool, **options) -> float:
    model = MLP()
    extra = dict(enable_progress_bar=False, logger=False) if lean else {}
    with tempfile.TemporaryDirectory() as root:
        trainer = syncstep.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=root, lr_scaling="none",
                                   enable_checkpointing=False, **extra, **options)
        trainer.fit(model, DataLoader(dataset, batch_size=MODEL["batch_size"], shuffle=True))
    return per_step(model.ticks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--model", choices=("w1", "linear"), default="w1")
    p.add_argument("--fresh", action="store_true", help="each run in a fresh process")
    p.add_argument("--noise-scale", action="store_true", help="accumulation 2 with and without noise_scale=True")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, in this process, for --fresh
    args = p.parse_args()
    MODEL.update(name=args.model, batch_size=32 if args.model == "w1" else 2)
    torch.set_num_threads(1)
    dataset = data(args.steps)
    measure = {"hand-written": lambda: hand(dataset),
               "syncstep, bar and loggers off": lambda: ours(dataset, lean=True),
               "syncstep (defaults)": lambda: ours(dataset, lean=False)}
    if args.noise_scale:
        measure = {"hand-written": lambda: hand(dataset),
                   "syncstep, accumulation 2": lambda: ours(dataset, lean=True, accumulate_grad_batches=2),
                   "syncstep, accumulation 2, noise_scale=True":
                       lambda: ours(dataset, lean=True, accumulate_grad_batches=2, noise_scale=True)}
    if args.one:
        print(f"us/step {measure[args.one]():.3f}")
        return
    if args.fresh:
        def in_a_fresh_process(name):
            command = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--model", args.model,
                       *(["--noise-scale"] if args.noise_scale else [])]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            return float(out.rsplit("us/step ", 1)[1])

        measure = {name: (lambda name=name: in_a_fresh_process(name)) for name in measure}
    runs: dict[str, list[float]] = {name: [] for name in measure}
    names = list(measure)
    for rep in range(args.reps):  # the order rotates, so that none always runs first or after the same one
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            runs[name].append(measure[name]())
    base = statistics.median(runs["hand-written"])
    where = "fresh processes" if args.fresh else "one process"
    print(f"\n{args.reps} interleaved reps of {args.steps} timed steps in {where}, syncstep "
          f"{syncstep.__version__}, torch {torch.__version__}, 1 thread, model {args.model}", file=sys.stderr)
    print("| implementation | us/step (median) | min | ratio of steps/s to hand-written | same rep: ratio, median |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in runs.items():
        median = statistics.median(values)
        paired = statistics.median(h / v for h, v in zip(runs["hand-written"], values))
        print(f"| {name} | {median:.1f} | {min(values):.1f} | {base / median:.3f} | {paired:.3f} |")


if __name__ == "__main__":
    main()
