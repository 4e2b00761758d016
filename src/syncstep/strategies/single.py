"""One process, one device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from syncstep.strategies.common import OneProcess, StepRunner, extract_loss, move_to_device


class SingleDeviceStrategy(OneProcess):
    name = "single"
    replicas = [0]
    world_size = 1
    num_devices = 1
    gradient_averaging = 1

    def __init__(self, *, accelerator: str, device_ids: list[int] | None, **_: Any) -> None:
        self.devices = [torch.device("cpu") if accelerator == "cpu" else torch.device("cuda", device_ids[0])]
        self.on_cpu = accelerator == "cpu"
        self.runner: StepRunner | None = None

    manual = False  # manual optimization: training_step's output is returned as it is

    def setup(self, runner: StepRunner) -> None:
        runner.module.to(self.root_device)
        self.runner = runner
        self._module, self._context = runner.module, runner.log_context  # (nn.Module's getattr is slow)
        self._takes_batch_idx = runner.takes_batch_idx["train"]

    def _move(self, batch: Any) -> Any:
        return batch if self.on_cpu else move_to_device(batch, self.root_device)

    def training_step(
        self, batches: Iterator[Any], counts: tuple[int, ...], weights: tuple[float, ...], batch_idx: int
    ) -> torch.Tensor:
        # One process, one replica: the user's hook is called directly (no wrapper module is needed, as
        # DDP's hooks are for DDP), with the trainer's context already set to "train" for Module.log.
        batch = next(batches)
        self._context.count = counts[0]
        if not self.on_cpu:
            batch = move_to_device(batch, self.root_device)
        if self._takes_batch_idx:
            loss = self._module.training_step(batch, batch_idx)
        else:
            loss = self._module.training_step(batch)
        if self.manual:
            return loss
        if type(loss) is not torch.Tensor or loss.ndim:  # anything but a plain 0-d tensor: check it
            loss = extract_loss(loss)
        weight = weights[0]
        return loss if weight == 1.0 else loss * weight

    def evaluation_step(self, stage: str, batches: list[Any], counts: list[int], batch_idx: int) -> list[Any]:
        return [self.runner(stage, self._move(batches[0]), batch_idx, counts[0])]

    def teardown(self) -> None:
        pass
