"""Strategies: what differs between one device, DP and DDP, and nothing else.

A strategy knows where this process computes (``devices``), which replicas of the data it feeds
(``replicas``, out of ``world_size``), how it wraps the model, how it runs one step's batches and
combines their losses, and whether to sync gradients on this backward. Collectives live in
``syncstep.distributed`` and are no-ops in one process, so the trainer has no ``if distributed``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from syncstep.strategies.ddp import DDPStrategy
from syncstep.strategies.dp import DataParallelStrategy
from syncstep.strategies.single import SingleDeviceStrategy


class Strategy(Protocol):
    name: str
    devices: list[torch.device]  # where this process computes; devices[0] holds the model
    replicas: list[int]  # the data replicas this process feeds
    world_size: int  # replicas across all processes: the k of the global batch
    gradient_averaging: int  # processes whose gradients are averaged (DDP's world size, else 1)

    def setup(self, module: torch.nn.Module) -> None: ...

    def training_step(
        self, batches: Iterator[Any], counts: tuple[int, ...], weights: tuple[float, ...], batch_idx: int
    ) -> torch.Tensor:
        """Take one batch per count from ``batches`` (this process's replicas, in order), run them, and
        return the weighted loss to call backward on."""

    def evaluation_step(self, stage: str, batches: list[Any], counts: list[int], batch_idx: int) -> None: ...

    def sync_gradients(self, enabled: bool) -> None: ...

    def teardown(self) -> None: ...


STRATEGIES: dict[str, Any] = {
    "single": SingleDeviceStrategy,
    "dp": DataParallelStrategy,
    "ddp": DDPStrategy,
    "ddp_find_unused_parameters_true": lambda **kw: DDPStrategy(find_unused_parameters=True, **kw),
}

__all__ = ["STRATEGIES", "Strategy", "DDPStrategy", "DataParallelStrategy", "SingleDeviceStrategy"]
