"""Distributed Data Parallel: one process per device, gradients averaged by all-reduce.

The strategy starts the processes when nothing else did (``launch``), joins the process group
(``setup_environment``, through ``syncstep.launch``), and owns the collectives (all three shared with
fsdp in ``common.ProcessPerDevice``). It wraps the model in
``torch.nn.parallel.DistributedDataParallel`` and runs the training step through it, so that DDP's
hooks all-reduce the gradients during backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from syncstep.strategies import comm_hooks
from syncstep.strategies.common import ProcessPerDevice, StepRunner, extract_loss, load_plain_state, plain_state


class DDPStrategy(ProcessPerDevice):
    name = "ddp"

    def __init__(self, *, find_unused_parameters: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.find_unused_parameters = find_unused_parameters
        self.name = "ddp_find_unused_parameters_true" if find_unused_parameters else "ddp"
        self.runner: StepRunner | None = None
        self.ddp: DistributedDataParallel | None = None

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

    def register_comm_hook(self, wrappers: list) -> None:
        """The model's one communication hook: the all-reduce wrapped by ``wrappers`` (strategies/comm_hooks.py),
        registered once, before the first backward. Without wrappers DDP keeps its built-in all-reduce."""
        state, hook = comm_hooks.build_comm_hook(None, None, None)
        comm_hooks.register(self.ddp, state, hook, wrappers)

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

    def gather_state(self, model: torch.nn.Module, optimizers: list) -> tuple[dict, list[dict]]:
        return plain_state(model, optimizers)

    def load_state(self, model: torch.nn.Module, optimizers: list, model_state: dict, optimizer_states: list) -> None:
        load_plain_state(model, optimizers, model_state, optimizer_states)

    def summary_lines(self, optimizers: list) -> list[str]:
        return []

    def teardown(self) -> None:
        self.ddp = None


def warn_if_parameters_differ(module: torch.nn.Module, device: torch.device) -> None:
    """Compare a checksum of every parameter across ranks before DDP (or fsdp) copies rank 0's to the others.

    The copy makes the replicas equal anyway, but different start-up parameters mean the processes
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
            f"{first}). syncstep copies rank 0's parameters to every rank, so training stays consistent, but the "
            "processes did not build the model the same way: seed before building it "
            "(syncstep.seed_everything(seed)) or load the same weights everywhere.",
            stacklevel=2,
        )
