"""The Trainer: the public API. Arguments become a ``TrainerConfig``, the machine and launcher choose a
strategy, and ``fit`` / ``validate`` / ``test`` / ``lr_schedule`` run the loop of ``loop.py``.

A ``fit()`` in one paragraph (docs/architecture.md has the whole flow): the strategy starts the worker
processes if it needs them (``launch``: in the parent this never returns), joins the process group and
wraps the model (``_running``); ``loop.FitLoop`` derives the plan (optimizers, data layout, batch and
LR arithmetic), resumes if asked, prints the plan and trains; ``fit()`` returns, or raises
``Preempted`` if a SIGTERM stopped it after a checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch

from syncstep.config import TrainerConfig, unknown_arguments
from syncstep.data import inspect_loader
from syncstep.evaluation import evaluate
from syncstep.guards import NonFiniteLossError, Preempted
from syncstep.launch import detect_environment, report_failure
from syncstep.loop import FitLoop, FitPlan, plan_fit, plan_summary
from syncstep.metrics import Metrics
from syncstep.module import Module
from syncstep.optim import simulate_lrs
from syncstep.resume import find_checkpoint, load_weights, restart_checkpoint
from syncstep.rng import seed_everything
from syncstep.state import RunState
from syncstep.strategies.common import StepRunner
from syncstep.strategies.fsdp import FSDPStrategy
from syncstep.strategies.select import select_strategy

__all__ = ["NonFiniteLossError", "Preempted", "Trainer"]


class Trainer:
    """Train a :class:`syncstep.Module` on one device, or with ``strategy="dp"``, ``"ddp"`` or ``"fsdp"``.

    The DataLoader's ``batch_size`` is the per-device batch for every strategy; the global batch is
    per-device batch x devices x num_nodes x accumulate_grad_batches, and the learning rate is scaled
    for it (``lr_scaling``, default "auto": linear for SGD, square root for Adam-like optimizers),
    relative to ``reference_batch_size`` (default: the per-device batch). All of it is printed at start.
    Every argument is documented in :class:`syncstep.config.TrainerConfig`.
    """

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int = -1,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
        strategy: str | FSDPStrategy = "auto",
        num_nodes: int = 1,
        precision: str | int = "32",
        accumulate_grad_batches: int | None = None,
        global_batch_size: int | None = None,
        lr_scaling: str = "auto",
        reference_batch_size: int | None = None,
        warmup_epochs: float | None = None,
        warmup_steps: float | None = None,
        warmup_interval: str = "step",
        warmup_type: str = "linear",
        warmup_start_factor: float | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        val_check_interval: int | float | None = None,
        check_val_every_n_epoch: int | None = 1,
        log_every_n_steps: int = 50,
        seed: int | None = None,
        default_root_dir: str | None = None,
        enable_progress_bar: bool = True,
        logger: Any = True,
        enable_checkpointing: bool = True,
        ckpt_every_n_epochs: int | None = 1,
        ckpt_every_n_steps: int | None = None,
        keep_last: int = 2,
        on_nonfinite_loss: str = "error",
        use_distributed_sampler: bool = True,
        timeout: float | timedelta = 300.0,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise unknown_arguments(unknown)
        arguments = {name: value for name, value in locals().items() if name not in ("self", "unknown")}
        self.config = TrainerConfig(**arguments)
        self._env = detect_environment()
        self.strategy = select_strategy(self.config, self._env)
        if seed is not None:
            seed_everything(seed)
        self.state = RunState()
        self.metrics = Metrics()
        self._logs = self.metrics.store  # what Module.log writes into (one attribute lookup on the hot path)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list = []
        self.batch_plan = None
        self.lr_plan = None
        self.estimated_stepping_batches: int | None = None  # optimizer steps of the run (Lightning's name)
        self.log_dir: str | None = None
        self._plan: FitPlan | None = None

    # -- where this process stands ----------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Number of processes (Lightning's meaning: 1 for dp)."""
        return self.strategy.num_processes

    @property
    def global_rank(self) -> int:
        return self._env.global_rank

    @property
    def local_rank(self) -> int:
        return self._env.local_rank

    @property
    def node_rank(self) -> int:
        return self._env.node_rank

    @property
    def is_global_zero(self) -> bool:
        return self._env.global_rank == 0

    @property
    def num_devices(self) -> int:
        return self.strategy.num_devices

    @property
    def num_nodes(self) -> int:
        return self.config.num_nodes

    @property
    def max_epochs(self) -> int | None:
        return self.config.max_epochs

    @property
    def max_steps(self) -> int:
        return self.config.max_steps

    @property
    def precision(self) -> str:
        return self.config.precision

    @property
    def default_root_dir(self) -> str:
        return self.config.default_root_dir

    @property
    def checkpoint_dir(self) -> str:
        return self.config.checkpoint_dir

    @property
    def current_epoch(self) -> int:
        return self.state.current_epoch

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def should_stop(self) -> bool:
        return self.state.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self.state.should_stop = value

    @property
    def stage(self) -> str | None:
        """What the trainer is running: "fit", "validate", "test", or None between calls."""
        return self.state.stage

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        """The latest value of every logged metric, as float64 tensors (Lightning's name and type)."""
        return self.metrics.callback_metrics

    @property
    def logged_metrics(self) -> dict[str, float]:
        return self.metrics.logged

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_global_zero:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    # -- public entry points ----------------------------------------------------------------------
    def fit(self, model: Module, train_dataloaders: Any = None, val_dataloaders: Any = None,
            ckpt_path: str | None = None) -> None:
        """Train ``model``. ``ckpt_path`` resumes: a path, or "last" for the newest good checkpoint.

        Raises :class:`syncstep.Preempted` (a ``SystemExit`` with code 143) on every rank when a
        SIGTERM stopped the run after writing a checkpoint.
        """
        self._check_module(model)
        train = train_dataloaders if train_dataloaders is not None else model.train_dataloader()
        if train is None:
            raise ValueError("fit() needs training data: pass train_dataloaders=, or define train_dataloader().")
        val = val_dataloaders if val_dataloaders is not None else model.val_dataloader()
        self._check_loaders(train, "train_dataloaders")
        self._check_loaders(val, "val_dataloaders")
        self.strategy.launch()
        ckpt_path = restart_checkpoint(ckpt_path, self.config.enable_checkpointing, self.print)
        self.state.preempted = False
        with self._running(model, "fit"):
            FitLoop(self, model, train, val).run(ckpt_path)
        if self.state.preempted:
            raise Preempted(f"SIGTERM: training stopped at step {self.global_step} after saving a checkpoint in "
                            f"{self.checkpoint_dir}; resume with trainer.fit(..., ckpt_path='last').")

    def validate(self, model: Module, dataloaders: Any = None, ckpt_path: str | None = None) -> list[dict[str, float]]:
        """Evaluate with ``validation_step``; one dict of epoch metrics per dataloader."""
        return self._evaluate_entry(model, dataloaders, ckpt_path, "validate")

    def test(self, model: Module, dataloaders: Any = None, ckpt_path: str | None = None) -> list[dict[str, float]]:
        """Evaluate with ``test_step``; one dict of epoch metrics per dataloader."""
        return self._evaluate_entry(model, dataloaders, ckpt_path, "test")

    def lr_schedule(self, model: Module, train_dataloaders: Any = None) -> dict[str, list[float]]:
        """The effective LR of every optimizer step this run would take, without training or launching.

        Simulates the user's schedulers (on copies; ReduceLROnPlateau is taken as constant) and applies
        the scaling and warmup. Returns {"lr-<optimizer>": [lr at step 0, 1, ...]} (first param group).
        """
        self._check_module(model)
        loader = train_dataloaders if train_dataloaders is not None else model.train_dataloader()
        self._check_loaders(loader, "train_dataloaders")
        plan = self._set_plan(plan_fit(self.config, self.strategy, model, loader, lambda make: make()))
        return simulate_lrs(plan.optimizers, plan.scheduler_configs, plan.lr, plan.lr_names, plan.steps_per_epoch,
                            plan.total_steps, list(model.parameters()))

    def plan_summary(self) -> str:
        """The start-up summary of the last planned run (``fit`` or ``lr_schedule``)."""
        if self._plan is None:
            raise RuntimeError("nothing is planned yet: call trainer.lr_schedule(model, loader) or fit() first.")
        return plan_summary(self.config, self.strategy, self._plan)

    # -- set-up -----------------------------------------------------------------------------------
    def _set_plan(self, plan: FitPlan) -> FitPlan:
        self._plan = plan
        self.optimizers, self.lr_scheduler_configs = plan.optimizers, plan.scheduler_configs
        self.batch_plan, self.lr_plan, self.estimated_stepping_batches = plan.batch, plan.lr, plan.total_steps
        return plan

    def _evaluate_entry(self, model: Module, loaders: Any, ckpt_path: str | None, stage: str) -> list[dict]:
        self._check_module(model)
        if loaders is None:
            loaders = model.val_dataloader() if stage == "validate" else model.test_dataloader()
        if loaders is None:
            raise ValueError(f"{stage}() needs data: pass dataloaders=, or define "
                             f"{'val' if stage == 'validate' else 'test'}_dataloader().")
        self._check_loaders(loaders, "dataloaders")
        self.strategy.launch()
        with self._running(model, stage):
            if ckpt_path is not None:
                path, state = find_checkpoint(self.checkpoint_dir, ckpt_path, self.print)
                if state is not None:
                    load_weights(self.strategy, model, [], path, state)
                    self.print(f"syncstep: {stage} with the weights of {path}")
            return [evaluate(self, loader, stage) for loader in (loaders if isinstance(loaders, (list, tuple))
                                                                 else [loaders])]

    @staticmethod
    def _check_module(model: Any) -> None:
        if not isinstance(model, Module):
            raise TypeError(
                f"Trainer needs a syncstep.Module, got {type(model).__name__}. Subclass syncstep.Module and "
                "define training_step and configure_optimizers."
            )

    def _check_loaders(self, loaders: Any, what: str) -> None:
        if loaders is None or not self.config.use_distributed_sampler:
            return
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            inspect_loader(loader, what)

    @contextlib.contextmanager
    def _running(self, model: Module, stage: str) -> Iterator[None]:
        """The strategy's environment and the wrapped model for one fit / validate / test."""
        strategy = self.strategy
        strategy.setup_environment()
        model._trainer = self
        model.configure_model()  # before the strategy moves and wraps (fsdp: shards) the model
        strategy.setup(StepRunner(model, self._logs.context))
        self.state.stage = stage
        try:
            yield
        except BaseException as error:
            report_failure(error, rank=self.global_rank, world_size=self.world_size,
                           where=f"{stage} at epoch {self.current_epoch}, step {self.global_step}")
            raise
        finally:
            self.metrics.finalize()
            strategy.teardown()
            self.state.stage = None
