"""What every benchmark worker shares: the workloads, the data, the model, the clock and the result file.

A worker trains one workload with one implementation (syncstep, hand-written, Lightning) and writes
one JSON file. The three implementations build the same model from the same seed, read the same data
in the same order (no shuffling) and take the same SGD steps, so their final losses and parameters
must agree: nobody is measured doing less work.

Timing is taken at the same point in all three: the start of each training step, after the batch is
fetched (``training_step`` in the frameworks, the top of the loop body in the hand-written loop). The
interval between two such points is one whole step: forward, backward, gradient sync, optimizer,
logging, progress bar and fetching the next batch. Steady-state steps/s skips the first ``warmup`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class Workload:
    sizes: tuple[int, ...]  # MLP layer widths, input first
    batch_size: int  # per process
    lr: float = 0.01


WORKLOADS = {
    "w1": Workload((64, 128, 10), 32),  # tiny: framework overhead dominates
    "w2": Workload((1024, 2048, 2048, 10), 128),  # medium: compute dominates
    "w3": Workload((1024, 2048, 2048, 10), 64),  # W2's model, per-process batch 64 (2 processes: 128)
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in all, warm-up included")
    p.add_argument("--warmup", type=int, required=True, help="first steps left out of steps/s")
    p.add_argument("--devices", type=int, default=1, help="processes (syncstep and Lightning ddp)")
    p.add_argument("--lean", action="store_true", help="syncstep: progress bar, logger and checkpoints off")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="syncstep with --devices > 1: ddp, or fsdp with every Linear a unit")
    p.add_argument("--noise-scale", action="store_true", help="syncstep: Trainer(noise_scale=True)")
    p.add_argument("--out", required=True, help="JSON result file (written by rank 0)")
    return p.parse_args()


def make_dataset(workload: Workload, num_samples: int) -> TensorDataset:
    """Inputs from N(0, 1), labels from a fixed random linear teacher: learnable, so the loss moves."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(num_samples, workload.sizes[0], generator=generator)
    teacher = torch.randn(workload.sizes[0], workload.sizes[-1], generator=generator)
    return TensorDataset(x, (x @ teacher).argmax(1))


def make_mlp(workload: Workload) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(workload.sizes[:-1], workload.sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def make_optimizer(workload: Workload, parameters) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=workload.lr, momentum=0.9)


def loss_of(net: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(net(x), y)


class StepClock:
    """Timestamps of the start of every training step, and the last loss (kept as a tensor: no sync).

    Besides wall time it keeps the main thread's CPU time, which a busy machine disturbs much less: with
    one thread per process it is the step's own work (data, forward, backward, optimizer, bookkeeping).
    """

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.cpu_ticks: list[float] = []
        self.first_step_done = 0.0  # wall clock (time.time) when the second step starts
        self.last_loss: torch.Tensor | None = None

    def tick(self) -> None:
        self.ticks.append(time.perf_counter())
        self.cpu_ticks.append(time.thread_time())
        if len(self.ticks) == 2:
            self.first_step_done = time.time()

    def write(self, path: str, args: argparse.Namespace, implementation: str, net: torch.nn.Module,
              world_size: int) -> None:
        ticks, warmup = self.ticks, args.warmup
        measured = len(ticks) - 1 - warmup
        if measured < 1:
            raise RuntimeError(f"only {len(ticks)} steps ran; need more than warmup={warmup} + 1")
        checksum = sum(float(p.detach().double().sum()) for p in net.parameters())
        result = {
            "implementation": implementation,
            "workload": args.workload,
            "steps": len(ticks),
            "warmup": warmup,
            "measured_steps": measured,
            "steps_per_s": measured / (ticks[-1] - ticks[warmup]),
            "cpu_us_per_step": (self.cpu_ticks[-1] - self.cpu_ticks[warmup]) / measured * 1e6,
            "final_loss": float(self.last_loss),
            "param_checksum": checksum,
            "first_step_done": self.first_step_done,
            "world_size": world_size,
            "threads": torch.get_num_threads(),
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)
