"""One process, one device."""

from __future__ import annotations

from typing import Any

import torch

from syncstep.strategies.common import StepRunner, extract_loss, move_to_device


class SingleDeviceStrategy:
    name = "single"
    replicas = [0]
    world_size = 1
    gradient_averaging = 1

    def __init__(self, devices: list[torch.device], **_: Any) -> None:
        if len(devices) != 1:
            raise ValueError(f"strategy='single' runs on one device, got {len(devices)}; use 'ddp' or 'dp'.")
        self.devices = devices
        self.on_cpu = devices[0].type == "cpu"
        self.runner: StepRunner | None = None

    def setup(self, runner: StepRunner) -> None:
        runner.module.to(self.devices[0])
        self.runner = runner

    def _move(self, batch: Any) -> Any:
        return batch if self.on_cpu else move_to_device(batch, self.devices[0])

    def training_step(
        self, batches: list[Any], counts: list[int], weights: list[float], batch_idx: int
    ) -> torch.Tensor:
        # forward() rather than __call__: the runner is ours and has no hooks (the user's module keeps its).
        loss = extract_loss(self.runner.forward("train", self._move(batches[0]), batch_idx, counts[0]))
        return loss if weights[0] == 1.0 else loss * weights[0]

    def evaluation_step(self, stage: str, batches: list[Any], counts: list[int], batch_idx: int) -> None:
        self.runner(stage, self._move(batches[0]), batch_idx, counts[0])

    def sync_gradients(self, enabled: bool) -> None:
        pass

    def teardown(self) -> None:
        pass
