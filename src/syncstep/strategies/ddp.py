"""Distributed Data Parallel: one process per device, gradients averaged by all-reduce.

The strategy starts the processes when nothing else did (``launch``), joins the process group
(``setup_environment``, through ``syncstep.launch``), and owns the collectives (all three shared with
fsdp in ``common.ProcessPerDevice``). It wraps the model in
``torch.nn.parallel.DistributedDataParallel`` and runs the training step through it, so that DDP's
hooks all-reduce the gradients during backward.

``Trainer(strategy=DDPStrategy(...))`` (Lightning's spelling) sets DDP's own options: a communication
hook (``ddp_comm_hook``: fp16 / bf16 compression or PowerSGD, see ``comm_hooks.py``), ``bucket_cap_mb``,
``gradient_as_bucket_view``, ``static_graph`` and ``find_unused_parameters``; ``strategy="ddp"`` is
``DDPStrategy()``. Other parts of syncstep that must see the all-reduce append a wrapper to
``DDP.comm_hook_wrappers`` before ``setup``; the hook and its wrappers are registered once, through
``comm_hooks.register``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from syncstep.strategies import comm_hooks
from syncstep.strategies.common import ProcessPerDevice, StepRunner, extract_loss, load_plain_state, plain_state


@dataclasses.dataclass(frozen=True)
class DDPStrategy:
    """``Trainer(strategy=DDPStrategy(...))``: DDP's options (Lightning's names); ``"ddp"`` is ``DDPStrategy()``."""

    ddp_comm_hook: str | None = None
    """None (the plain all-reduce), "fp16", "bf16" (the bucket all-reduced in half precision: half the
    bytes) or "powersgd" (low-rank compression with error feedback): torch's ddp_comm_hooks."""
    ddp_comm_options: dict | None = None
    """PowerSGD's options (PowerSGDState's keyword arguments), e.g. {"matrix_approximation_rank": 2,
    "start_powerSGD_iter": 100}; syncstep's default start_powerSGD_iter is 10 (torch's: 1000)."""
    bucket_cap_mb: float | None = None
    """Gradient bucket size in MiB (None: DDP's default, 25): larger buckets, fewer all-reduces; smaller,
    more overlap with backward."""
    gradient_as_bucket_view: bool = False
    """Gradients are views into the all-reduce buckets: one copy less per step, less memory."""
    static_graph: bool = False
    """The same parameters get gradients on every step: DDP can skip work it otherwise redoes each step."""
    find_unused_parameters: bool = False
    """Some parameters get no gradient on some steps (DDP then searches the graph every step)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ddp_comm_options", comm_hooks.check_options(self.ddp_comm_hook,
                                                                              self.ddp_comm_options))
        cap = self.bucket_cap_mb
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
            raise ValueError(f"bucket_cap_mb must be a number > 0 (MiB), or None for DDP's 25; got {cap!r}.")
        for name in ("gradient_as_bucket_view", "static_graph", "find_unused_parameters"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")


class DDP(ProcessPerDevice):
    """The running ddp strategy, built by strategies/select.py from a :class:`DDPStrategy`."""

    name = "ddp"

    def __init__(self, *, options: DDPStrategy | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = options = options if options is not None else DDPStrategy()
        self.find_unused_parameters = options.find_unused_parameters
        self.name = "ddp_find_unused_parameters_true" if self.find_unused_parameters else "ddp"
        self.runner: StepRunner | None = None
        self.ddp: DistributedDataParallel | None = None
        # (state, hook) -> (state, hook) functions that wrap the communication hook, applied in order;
        # appended to before setup by whatever must see the all-reduce (comm_hooks.register)
        self.comm_hook_wrappers: list[comm_hooks.Wrapper] = []
        self.comm_state: Any = None  # the inner hook's state (PowerSGD's), for checkpoints

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
            gradient_as_bucket_view=self.options.gradient_as_bucket_view,
            static_graph=self.options.static_graph,
            **({} if self.options.bucket_cap_mb is None else {"bucket_cap_mb": self.options.bucket_cap_mb}),
        )
        # process_group None: torch's hooks then use the default group, and the strategy, which outlives the
        # fit, holds no reference to it (one would keep gloo's threads alive until interpreter shutdown)
        self.comm_state, self._comm_hook = comm_hooks.build_comm_hook(
            self.options.ddp_comm_hook, self.options.ddp_comm_options, None)

    def register_comm_hook(self, wrappers: list) -> None:
        """The model's one communication hook, registered once per fit before the first backward (the fit
        loop calls this): the configured hook (``ddp_comm_hook``, or the plain all-reduce) inside
        ``comm_hook_wrappers`` and then ``wrappers`` (the noise scale's), through ``comm_hooks.register``.
        With no compression and no wrapper, DDP keeps its built-in all-reduce."""
        comm_hooks.register(self.ddp, self.comm_state, self._comm_hook, [*self.comm_hook_wrappers, *wrappers])

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

    def extra_state(self) -> dict | None:
        """The communication hook's state (PowerSGD's error feedback, one per rank), for checkpoints;
        every rank calls it."""
        local = comm_hooks.state_dict(self.comm_state)
        if local is None:
            return None
        return {"comm_hook": self.all_gather_object(local)}

    def load_extra_state(self, saved: dict | None, print_fn: Any = print) -> None:
        """The inverse of ``extra_state`` at the same device count; at another, each rank starts its
        error feedback at zero (it is each rank's own residual) and keeps rank 0's iteration and P, Q."""
        ranks = (saved or {}).get("comm_hook")
        if not ranks or comm_hooks.state_dict(self.comm_state) is None:
            return
        if len(ranks) == self.num_processes:
            comm_hooks.load_state_dict(self.comm_state, ranks[self.global_rank], self.collective_device)
            return
        comm_hooks.load_state_dict(self.comm_state, ranks[0], self.collective_device, error_feedback=False)
        print_fn(f"syncstep: PowerSGD's error feedback was saved by {len(ranks)} processes and this run has "
                 f"{self.num_processes}; it restarts at zero (each rank's is its own), the rest carries over.")

    def summary_lines(self, optimizers: list) -> list[str]:
        o = self.options
        if o.ddp_comm_hook is None:
            return []
        options = ", ".join(f"{k}={v}" for k, v in sorted(o.ddp_comm_options.items()))
        return [f"ddp communication hook: {o.ddp_comm_hook}" + (f" ({options})" if options else "")]

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
