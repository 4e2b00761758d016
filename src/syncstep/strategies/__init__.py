"""Strategies: what differs between one device, DP, DDP and FSDP, and nothing else.

A strategy owns where this process computes (``devices``), which replicas of the data it feeds
(``replicas``, out of ``world_size``), whether processes must be started (``launch``) and a process
group joined (``setup_environment``), how it wraps the model, how it runs one step's batches and
combines their losses, whether to sync gradients on this backward, the collectives, which put a
tensor where the backend needs it and are the identity in one process, and the model's and
optimizers' state as one process would hold it (fsdp gathers its shards). So the loop never asks
which strategy it runs, and has one code path at any world size.

To add a strategy: a class with the members of :class:`Strategy`, and an entry in ``STRATEGIES``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import torch

from syncstep.strategies.common import StepRunner
from syncstep.strategies.ddp import DDP, DDPStrategy
from syncstep.strategies.dp import DataParallelStrategy
from syncstep.strategies.fsdp import FSDP, FSDPStrategy
from syncstep.strategies.single import SingleDeviceStrategy

T = TypeVar("T")


class Strategy(Protocol):
    name: str
    devices: list[torch.device]  # where this process computes; root_device holds the model
    root_device: torch.device
    num_devices: int  # devices on this node (this process's for dp; one per process for ddp)
    replicas: list[int]  # the data replicas this process feeds
    world_size: int  # replicas across all processes: the k of the global batch
    num_processes: int  # processes in the job (1 for single and dp)
    global_rank: int
    local_rank: int
    gradient_averaging: int  # processes whose gradients are averaged (DDP's world size, else 1)
    state_dict_type: str  # "full" (one checkpoint file, every tensor whole) or "sharded" (fsdp's option)
    forward_is_collective: bool  # every rank must run every forward (fsdp): evaluation pads ranks

    def launch(self) -> None:
        """Start the processes this strategy needs, if nothing else did (never returns in the parent)."""

    def setup_environment(self) -> None:
        """Select this process's device and join the process group, if there is one."""

    def setup(self, runner: StepRunner) -> None:
        """Move the model to its device(s) and wrap it."""

    def training_step(
        self, batches: Iterator[Any], counts: tuple[int, ...], weights: tuple[float, ...], batch_idx: int
    ) -> torch.Tensor:
        """Take one batch per count from ``batches`` (this process's replicas, in order), run them, and
        return the weighted loss to call backward on."""

    def evaluation_step(self, stage: str, batches: list[Any], counts: list[int], batch_idx: int) -> list[Any]:
        """Run the stage's hook on each replica's batch; their outputs, one per replica."""

    def sync_gradients(self, enabled: bool) -> None:
        """Whether the next backward all-reduces the gradients (off on accumulating micro-batches)."""

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``op`` ("sum", "max", "min") over processes; the result is on ``tensor``'s device."""

    def broadcast_object(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, sent to every rank."""

    def all_gather_object(self, obj: T) -> list[T]: ...

    def barrier(self) -> None: ...

    def all_gather(self, data: Any) -> Any:
        """Every rank's tensors stacked along a new first dimension (as it is in one process)."""

    def prepare_for_manual_backward(self, loss: torch.Tensor) -> None:
        """Manual optimization: get ready for a backward inside the training step (DDP's reducer)."""

    def teardown(self) -> None: ...

    def gather_state(self, model: torch.nn.Module, optimizers: list) -> tuple[dict, list[dict]]:
        """The model's state dict and each optimizer's, as one process would hold them (every tensor
        whole, optimizer states keyed by position); at least on rank 0. Every rank calls it."""

    def load_state(self, model: torch.nn.Module, optimizers: list, model_state: dict, optimizer_states: list) -> None:
        """The inverse of ``gather_state``, on every rank (each has read the whole state)."""

    def extra_state(self) -> dict | None:
        """State the strategy itself carries from step to step (ddp: PowerSGD's error feedback), for
        checkpoints; None if it has none. Every rank calls it."""

    def load_extra_state(self, saved: dict | None, print_fn: Callable[..., None]) -> None:
        """The inverse of ``extra_state``, on every rank."""

    def summary_lines(self, optimizers: list) -> list[str]:
        """What the start-up summary adds for this strategy (fsdp: the sharding and memory per device)."""


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "single": SingleDeviceStrategy,
    "dp": DataParallelStrategy,
    "ddp": DDP,  # options: a DDPStrategy (select.py passes the user's, or the defaults)
    "ddp_find_unused_parameters_true": functools.partial(DDP, options=DDPStrategy(find_unused_parameters=True)),
    "fsdp": FSDP,  # options: an FSDPStrategy (select.py passes the user's, or the defaults)
}

__all__ = ["DDP", "FSDP", "STRATEGIES", "Strategy", "DDPStrategy", "DataParallelStrategy", "FSDPStrategy",
           "SingleDeviceStrategy"]
