"""Data Parallel: one process, k devices, one optimizer step on the central copy of the model.

Each step: the model on ``devices[0]`` is replicated to every device, replica i runs the user's step
on replica i's batch in its own thread, and the losses are gathered on ``devices[0]`` and combined,
weighted by batch size, into the step's loss. Its backward sends the gradients back through the
replication into the central parameters, and one optimizer step follows.

Unlike ``torch.nn.DataParallel``, each device gets its own DataLoader batch (the same batch semantics
as DDP), so ``devices=k`` always means a global batch of k x batch_size.

On CUDA the replicas come from ``torch.nn.parallel.replicate``. On the CPU all replicas share the
central parameters (they are on the same device); replicas other than the first get their own copy of
the buffers, which matches CUDA, where only the first replica's buffer updates (BatchNorm running
statistics) reach the central model. The CPU version is for developing and testing: it is correct
but not faster than one device.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.nn.parallel import replicate

from syncstep.strategies.common import OneProcess, StepRunner, extract_loss, move_to_device


def cpu_replicate(network: torch.nn.Module, n: int) -> list[torch.nn.Module]:
    """``n`` replicas of ``network`` on the CPU: shared parameters, private buffers (replica 0 is ``network``)."""
    modules = list(network.modules())
    index = {module: i for i, module in enumerate(modules)}
    replicas = [network]
    for _ in range(n - 1):
        copies = [module._replicate_for_data_parallel() for module in modules]
        for module, copy in zip(modules, copies):
            copy._parameters = dict(module._parameters)
            copy._buffers = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
            copy._modules = {k: None if c is None else copies[index[c]] for k, c in module._modules.items()}
        replicas.append(copies[0])
    return replicas


class DataParallelStrategy(OneProcess):
    name = "dp"
    gradient_averaging = 1

    def __init__(self, *, accelerator: str, device_ids: list[int] | None, num_devices: int, **_: Any) -> None:
        if accelerator == "cpu":
            self.devices = [torch.device("cpu")] * num_devices
            if num_devices > 1:
                warnings.warn(
                    f"strategy='dp' on the CPU runs {num_devices} replicas in threads of one process: the "
                    "results are those of DP on GPUs, but it is no faster than one device. Use it to develop "
                    "and test; for speed on CPUs use strategy='ddp'.",
                    stacklevel=4,  # the user's Trainer(...) call
                )
        else:
            self.devices = [torch.device("cuda", i) for i in device_ids]
        self.world_size = self.num_devices = len(self.devices)
        self.replicas = list(range(len(self.devices)))
        self.runner: StepRunner | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.cpu = accelerator == "cpu"

    def setup(self, runner: StepRunner) -> None:
        if not getattr(runner.module, "automatic_optimization", True):
            raise ValueError(
                "manual optimization (automatic_optimization = False) cannot run with strategy='dp': its replicas "
                "run training_step in threads, and each would step the optimizer. Use strategy='ddp' (one "
                "process per device) or one device."
            )
        runner.module.to(self.root_device)
        self.runner = runner
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(self.devices) - 1), thread_name_prefix="syncstep-dp")

    def _replicate(self, n: int) -> list[torch.nn.Module]:
        if self.cpu:
            return cpu_replicate(self.runner, n)
        replicas = replicate(self.runner, self.devices[:n], detach=not torch.is_grad_enabled())
        for replica, device in zip(replicas, self.devices):
            replica.module._device = device
        return replicas

    def _parallel_apply(self, stage: str, batches: list[Any], counts: list[int], batch_idx: int) -> list[Any]:
        """Run replica i on batch i in parallel threads (replica 0 in this thread)."""
        n = len(batches)
        replicas = self._replicate(n)
        device_type = self.devices[0].type
        grad_enabled = torch.is_grad_enabled()
        autocast = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type)

        def run(i: int) -> Any:
            device = self.devices[i]
            with contextlib.ExitStack() as stack:
                if device.type == "cuda":
                    stack.enter_context(torch.cuda.device(device))
                    stack.enter_context(torch.cuda.stream(torch.cuda.current_stream(device)))
                stack.enter_context(torch.set_grad_enabled(grad_enabled))
                # torch's own parallel_apply forwards only "enabled", so bf16 would turn into fp16 there.
                stack.enter_context(torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast))
                batch = batches[i] if self.cpu else move_to_device(batches[i], device)
                try:
                    return replicas[i](stage, batch, batch_idx, counts[i])
                except Exception as error:
                    if hasattr(error, "add_note"):  # Python >= 3.11
                        error.add_note(f"(in DP replica {i} on {device})")
                    raise

        futures = [self.pool.submit(run, i) for i in range(1, n)]
        first = run(0)
        return [first] + [f.result() for f in futures]

    def training_step(
        self, batches: Iterator[Any], counts: tuple[int, ...], weights: tuple[float, ...], batch_idx: int
    ) -> torch.Tensor:
        loaded = [next(batches) for _ in counts]
        # Replicas without a real sample (only at the very end of an epoch) are simply not run.
        n = sum(1 for c in counts if c > 0)
        outputs = self._parallel_apply("train", loaded[:n], list(counts[:n]), batch_idx)
        root = self.devices[0]
        losses = [extract_loss(out).to(root) for out in outputs]
        return sum(loss * w for loss, w in zip(losses, weights))

    def evaluation_step(self, stage: str, batches: list[Any], counts: list[int], batch_idx: int) -> list[Any]:
        return self._parallel_apply(stage, batches, counts, batch_idx)

    def teardown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
