"""Distributed Data Parallel: one process per device, gradients averaged by all-reduce.

The strategy starts the processes when nothing else did (``launch``), joins the process group
(``setup_environment``, through ``syncstep.launch``), and owns the collectives. It wraps the model in
``torch.nn.parallel.DistributedDataParallel`` and runs the training step through it, so that DDP's
hooks all-reduce the gradients during backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from syncstep.launch import Environment, can_self_launch, init_process_group, self_launch
from syncstep.strategies.common import StepRunner, apply_to_tensors, extract_loss, move_to_device

T = TypeVar("T")


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class DDPStrategy:
    name = "ddp"

    def __init__(self, *, accelerator: str, device_ids: list[int] | None, num_devices: int, num_nodes: int,
                 env: Environment, timeout: timedelta, find_unused_parameters: bool = False, **_: Any) -> None:
        self.env, self.timeout = env, timeout
        self.num_devices = num_devices
        launched = env.source != "local"
        self.global_rank, self.local_rank = env.global_rank, env.local_rank
        cuda = accelerator != "cpu"
        self.devices = [torch.device("cuda", device_ids[self.local_rank]) if cuda else torch.device("cpu")]
        self.find_unused_parameters = find_unused_parameters
        self.name = "ddp_find_unused_parameters_true" if find_unused_parameters else "ddp"
        # The k of the global batch, known before any process starts (a launcher's world is checked
        # against it in strategies/select.py); the processes are the replicas.
        self.world_size = num_devices * num_nodes
        self.num_processes = env.world_size if launched else 1
        self.gradient_averaging = self.world_size
        self.replicas = [self.global_rank]
        # NCCL only reduces tensors on the GPU; gloo takes CPU tensors.
        self.collective_device = self.root_device if self.root_device.type == "cuda" else torch.device("cpu")
        self.runner: StepRunner | None = None
        self.ddp: DistributedDataParallel | None = None

    @property
    def root_device(self) -> torch.device:
        return self.devices[0]

    def launch(self) -> None:
        """From a plain ``python train.py`` with devices > 1, start the processes (this one never returns)."""
        if self.env.source != "local" or self.num_devices == 1:
            return  # already launched, or one process: DDP with a world of one
        why = can_self_launch()
        if why:
            raise ValueError(
                f"strategy='ddp' with devices={self.num_devices} needs {self.num_devices} processes, and syncstep "
                f"cannot start them itself because {why}. Run the script with python, or with "
                f"torchrun --nproc-per-node={self.num_devices} script.py."
            )
        self_launch(self.num_devices)

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)
        init_process_group(self.env, self.root_device, self.timeout)
        if not dist.is_initialized():  # pragma: no cover - init_process_group raises instead
            raise RuntimeError("the process group did not start")

    def setup(self, runner: StepRunner) -> None:
        device = self.root_device
        runner.module.to(device)
        self.runner = runner
        warn_if_parameters_differ(runner.module, device)
        # DDP broadcasts rank 0's parameters and buffers at construction, so every replica starts equal.
        self.ddp = DistributedDataParallel(
            runner,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
        )

    def _move(self, batch: Any) -> Any:
        return batch if self.devices[0].type == "cpu" else move_to_device(batch, self.devices[0])

    def sync_gradients(self, enabled: bool) -> None:
        # Same effect as ddp.no_sync() on the micro-batches before the last one, without a context
        # manager around forward and backward (nanoGPT does the same).
        self.ddp.require_backward_grad_sync = enabled

    manual = False  # manual optimization: training_step's output is returned as it is

    def training_step(
        self, batches: Iterator[Any], counts: tuple[int, ...], weights: tuple[float, ...], batch_idx: int
    ) -> torch.Tensor:
        output = self.ddp("train", self._move(next(batches)), batch_idx, counts[0])
        if self.manual:
            return output
        loss = extract_loss(output)
        weight = weights[0]
        return loss if weight == 1.0 else loss * weight

    def evaluation_step(self, stage: str, batches: list[Any], counts: list[int], batch_idx: int) -> list[Any]:
        # Evaluation has no backward, so it skips DDP's forward (and its buffer broadcast).
        return [self.runner(stage, self._move(batches[0]), batch_idx, counts[0])]

    def prepare_for_manual_backward(self, loss: torch.Tensor) -> None:
        """In manual optimization the backward runs inside DDP's forward (in training_step), before DDP
        would prepare its reducer for it; prepare it here, as Lightning does, or no gradient is synced."""
        ddp = self.ddp
        if ddp is None or not ddp.require_backward_grad_sync:
            return
        ddp.require_forward_param_sync = True
        find = ddp.find_unused_parameters and not ddp.static_graph
        outputs = list(torch.nn.parallel.distributed._find_tensors(loss)) if find else []
        ddp.reducer._rebuild_buckets()
        ddp.reducer.prepare_for_backward(outputs)

    # -- collectives: every rank calls them, in the same order --------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum / max / min over the processes; the result is on ``tensor``'s device (in place if it can)."""
        if not dist.is_initialized():
            return tensor
        moved = tensor.to(self.collective_device)
        dist.all_reduce(moved, op=_OPS[op])
        return moved if moved.device == tensor.device else moved.to(tensor.device)

    def broadcast_object(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, sent to every rank (``make`` runs nowhere else)."""
        if not dist.is_initialized():
            return make()
        box: list[Any] = [make() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: T) -> list[T]:
        if not dist.is_initialized():
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_gather(self, data: Any) -> Any:
        """Every rank's tensors stacked along a new first dimension (on the collective device and back)."""
        if not dist.is_initialized():
            return data

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            local = tensor.detach().to(self.collective_device).contiguous()
            out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(out, local)
            return torch.stack(out).to(tensor.device)

        return apply_to_tensors(data, gather)

    def teardown(self) -> None:
        self.ddp = None


def warn_if_parameters_differ(module: torch.nn.Module, device: torch.device) -> None:
    """Compare a checksum of every parameter across ranks before DDP copies rank 0's to the others.

    DDP would make the replicas equal anyway, but different start-up parameters mean the processes
    did not build the model the same way (an unseeded init, rank-dependent code), which usually hides
    other differences; say so once, on rank 0.
    """
    names, params = zip(*module.named_parameters()) if any(True for _ in module.parameters()) else ((), ())
    if not params:
        return
    with torch.no_grad():
        local = torch.stack([p.detach().double().sum() + p.detach().double().abs().sum() for p in params]).to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    if dist.get_rank() != 0:
        return
    differing = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if differing:
        first = names[int((gathered[differing[0]] != gathered[0]).nonzero()[0, 0])]
        warnings.warn(
            f"model parameters differ across ranks at start-up: rank(s) {differing} differ from rank 0 (first: "
            f"{first}). DDP copies rank 0's parameters to every rank, so training stays consistent, but the "
            "processes did not build the model the same way: seed before building it "
            "(syncstep.seed_everything(seed)) or load the same weights everywhere.",
            stacklevel=2,
        )
