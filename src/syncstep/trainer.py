"""The Trainer: the public API. Arguments become a ``TrainerConfig``, the machine and launcher choose a
strategy, and ``fit`` / ``validate`` / ``test`` / ``lr_schedule`` run the loop of ``loop.py``.

A ``fit()`` in one paragraph (docs/architecture.md has the whole flow): the strategy starts the worker
processes if it needs them (``launch``: in the parent this never returns), joins the process group and
wraps the model (``stages.running``); ``loop.FitLoop`` derives the plan (optimizers, data layout, batch and
LR arithmetic), resumes if asked, prints the plan and trains; ``fit()`` returns, or raises
``Preempted`` if a SIGTERM or SIGHUP stopped it (after a checkpoint).
"""

from __future__ import annotations

import operator
from datetime import timedelta
from typing import Any

import torch

from syncstep.batch_ramp import scheduled_steps
from syncstep.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from syncstep.config import TrainerConfig, unknown_arguments
from syncstep.fit_plan import FitPlan, plan_fit, plan_summary
from syncstep.guards import NonFiniteLossError, Preempted
from syncstep.hooks import Hooks
from syncstep.launch import detect_environment
from syncstep.loggers import make_loggers
from syncstep.loop import FitLoop
from syncstep.metrics import Metrics
from syncstep.module import Module
from syncstep.optim import planned_steps, simulate_lrs
from syncstep.predict import predict
from syncstep.resume import restart_checkpoint
from syncstep.rng import seed_everything, set_determinism
from syncstep.stages import (
    check_loaders,
    check_module,
    checkpoint_path,
    evaluate_stage,
    load_stage_weights,
    resolve_loaders,
    running,
    split_datamodule,
    stage_model,
    warn_uncalled_hooks,
)
from syncstep.state import RunState
from syncstep.step import ManualOptimization, lr_values
from syncstep.strategies.ddp import DDPStrategy
from syncstep.strategies.fsdp import FSDPStrategy
from syncstep.strategies.select import select_strategy

__all__ = ["NonFiniteLossError", "Preempted", "Trainer"]


def _read(path: str, doc: str | None = None) -> property:
    """A read-only property that returns ``self.<path>`` (e.g. "config.max_epochs")."""
    return property(operator.attrgetter(path), doc=doc)


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
        strategy: str | FSDPStrategy | DDPStrategy = "auto",
        num_nodes: int | str = 1,
        precision: str | int = "32",
        accumulate_grad_batches: int | None = None,
        global_batch_size: int | None = None,
        lr_scaling: str = "auto",
        reference_batch_size: int | None = None,
        noise_scale: bool = False,
        batch_ramp: str | dict | None = None,
        batch_ramp_factor: float = 1.0,
        batch_ramp_max: int | None = None,
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
        callbacks: Any = None,
        min_epochs: int | None = None,
        min_steps: int | None = None,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        num_sanity_val_steps: int = 0,
        fast_dev_run: bool | int = False,
        enable_model_summary: bool = True,
        deterministic: bool | str | None = None,
        benchmark: bool | None = None,
        inference_mode: bool = True,
        sync_batchnorm: bool = False,
        detect_anomaly: bool = False,
        compile: bool | dict = False,
        flops_per_sample: float | None = None,
        peak_flops_per_device: float | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise unknown_arguments(unknown)
        arguments = {name: value for name, value in locals().items() if name not in ("self", "unknown")}
        self.config = config = TrainerConfig(**arguments)
        self._env = detect_environment()
        self.strategy = select_strategy(config, self._env)
        if seed is not None:
            seed_everything(seed)
        set_determinism(config.deterministic, config.benchmark)
        self.state = RunState()
        self.metrics = Metrics()
        self._logs = self.metrics.store  # what Module.log writes into (one attribute lookup on the hot path)
        self.loggers = make_loggers(config.logger, config.default_root_dir)
        self.callbacks: list[Callback] = list(config.callbacks)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list = []
        self.batch_plan = None
        self.lr_plan = None
        self.noise_scale: dict | None = None  # after a fit with noise_scale=True: B_simple and its parts
        self.estimated_stepping_batches: int | None = None  # optimizer steps of the run (Lightning's name)
        self.lightning_module: Module | None = None  # the model of the last fit (or stage)
        self.datamodule: Any = None
        self.hooks = Hooks(self, Module(), [])  # a stage's hooks, made when it starts
        self.sanity_checking = False
        self._plan: FitPlan | None = None
        self._noise: Any = None  # the noise-scale meter of the fit (noise_scale.py), if measured
        self._manual: ManualOptimization | None = None  # manual optimization's optimizers, during fit
        self._checkpointer: Any = None  # the last fit's, for save_checkpoint
        self._fit_validates = False
        self._versions_agreed = False

    # -- where this process stands (read-only views of the environment, config and run state) -----
    global_rank = _read("_env.global_rank")
    local_rank = _read("_env.local_rank")
    node_rank = _read("_env.node_rank")
    max_epochs = _read("config.max_epochs")
    max_steps = _read("config.max_steps")
    precision = _read("config.precision")
    default_root_dir = _read("config.default_root_dir")
    checkpoint_dir = _read("config.checkpoint_dir")
    log_every_n_steps = _read("config.log_every_n_steps")
    current_epoch = _read("state.current_epoch")
    global_step = _read("state.global_step")
    stage = _read("state.stage", 'What the trainer is running: "fit", "validate", "test", "predict", or None.')

    @property
    def world_size(self) -> int:
        """Number of processes (Lightning's meaning: 1 for dp)."""
        return self.strategy.num_processes

    @property
    def is_global_zero(self) -> bool:
        return self._env.global_rank == 0

    @property
    def num_devices(self) -> int:
        return self.strategy.num_devices

    @property
    def num_nodes(self) -> int:
        return self.strategy.world_size // self.strategy.num_devices  # (num_nodes="auto" resolved)

    @property
    def should_stop(self) -> bool:
        return self.state.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self.state.should_stop = value

    @property
    def logger(self) -> Any:
        """The first logger (Lightning's ``trainer.logger``), or None."""
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        """The first logger's directory on every rank (rank 0 chose it), else ``default_root_dir``."""
        for logger in self.loggers:
            directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            if directory:
                return directory
        return self.config.default_root_dir

    @property
    def checkpoint_callbacks(self) -> list[Any]:
        return [c for c in self.hooks.callbacks or self.callbacks if isinstance(c, ModelCheckpoint)]

    @property
    def checkpoint_callback(self) -> Any:
        """The first ModelCheckpoint (``best_model_path``, ``best_model_score``), or None."""
        found = self.checkpoint_callbacks
        return found[0] if found else None

    @property
    def early_stopping_callback(self) -> Any:
        found = [c for c in self.hooks.callbacks or self.callbacks if isinstance(c, EarlyStopping)]
        return found[0] if found else None

    @property
    def model(self) -> Any:
        """The model as the strategy runs it (DDP's wrapper around it under ddp), or the Module."""
        return getattr(self.strategy, "ddp", None) or self.lightning_module

    @property
    def training(self) -> bool:
        return self.state.stage == "fit" and not self.sanity_checking

    @property
    def validating(self) -> bool:
        return self.state.stage == "validate" or self.sanity_checking

    @property
    def testing(self) -> bool:
        return self.state.stage == "test"

    @property
    def predicting(self) -> bool:
        return self.state.stage == "predict"

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
            datamodule: Any = None, ckpt_path: str | None = None) -> None:
        """Train ``model``. ``ckpt_path`` resumes: a path, "last" for the newest good checkpoint, or "best".

        Raises :class:`syncstep.Preempted` (a ``SystemExit`` with code 143) on every rank when a
        SIGTERM or SIGHUP stopped the run (after writing a checkpoint, unless checkpointing is off).
        """
        model = check_module(model)
        train_dataloaders, datamodule = split_datamodule(train_dataloaders, datamodule)
        check_loaders(self.config, train_dataloaders, "train_dataloaders")
        check_loaders(self.config, val_dataloaders, "val_dataloaders")
        if datamodule is None and train_dataloaders is None and type(model).train_dataloader is Module.train_dataloader:
            raise ValueError("fit() needs training data: pass train_dataloaders= or datamodule=, or define "
                             "train_dataloader().")
        warn_uncalled_hooks(model)
        self.strategy.launch()
        ckpt_path = restart_checkpoint(checkpoint_path(self, ckpt_path), self.config.enable_checkpointing, self.print)
        self.state.preempted = False
        with running(self, model, "fit", datamodule):
            train = resolve_loaders("fit", train_dataloaders, datamodule, model)
            if train is None:
                raise ValueError("fit() needs training data: pass train_dataloaders= or datamodule=, or define "
                                 "train_dataloader().")
            val = val_dataloaders if val_dataloaders is not None else resolve_loaders("validate", None, datamodule,
                                                                                       model)
            check_loaders(self.config, train, "train_dataloaders")
            check_loaders(self.config, val, "val_dataloaders")
            with torch.autograd.set_detect_anomaly(self.config.detect_anomaly):
                FitLoop(self, model, train, val).run(ckpt_path)
        if self.state.preempted:
            saved = (f"after saving a checkpoint in {self.checkpoint_dir}; resume with trainer.fit(..., "
                     "ckpt_path='last')") if self.config.enable_checkpointing else "without a checkpoint"
            raise Preempted(f"stop signal (SIGTERM or SIGHUP): training stopped at step {self.global_step} {saved}.")

    def validate(self, model: Module | None = None, dataloaders: Any = None, ckpt_path: str | None = None,
                 verbose: bool = True, datamodule: Any = None) -> list[dict[str, float]]:
        """Evaluate with ``validation_step``; one dict of epoch metrics per dataloader. Without a model,
        the model of the last fit."""
        return evaluate_stage(self, model, dataloaders, ckpt_path, "validate", datamodule)

    def test(self, model: Module | None = None, dataloaders: Any = None, ckpt_path: str | None = None,
             verbose: bool = True, datamodule: Any = None) -> list[dict[str, float]]:
        """Evaluate with ``test_step``; one dict of epoch metrics per dataloader."""
        return evaluate_stage(self, model, dataloaders, ckpt_path, "test", datamodule)

    def predict(self, model: Module | None = None, dataloaders: Any = None, datamodule: Any = None,
                return_predictions: bool | None = None, ckpt_path: str | None = None) -> Any:
        """``predict_step`` over every sample once (exact sharding, no padding), the predictions gathered in
        dataset order on every rank: a list of batches (a list of such lists for several loaders)."""
        model = check_module(stage_model(self, model, "predict"))
        dataloaders, datamodule = split_datamodule(dataloaders, datamodule)
        check_loaders(self.config, dataloaders, "dataloaders")
        self.strategy.launch()
        with running(self, model, "predict", datamodule):
            load_stage_weights(self, model, ckpt_path, "predict")
            loaders = resolve_loaders("predict", dataloaders, datamodule, model)
            if loaders is None:
                raise ValueError("predict() needs data: pass dataloaders= or datamodule=, or define "
                                 "predict_dataloader().")
            several = isinstance(loaders, (list, tuple))
            results = predict(self, list(loaders) if several else [loaders],
                              True if return_predictions is None else return_predictions)
            return results if results is None or several else results[0]

    def save_checkpoint(self, filepath: str, weights_only: bool = False, storage_options: Any = None) -> None:
        """Write a checkpoint to ``filepath`` (atomically, on rank 0; every rank must call it): during or
        after fit the whole run state (resumable), else the model's weights and hyperparameters."""
        if self._checkpointer is not None:
            self._checkpointer.save_to(filepath, weights_only=weights_only)
        elif self.lightning_module is not None:
            from syncstep.resume import save_weights

            save_weights(self, self.lightning_module, filepath)
        else:
            raise RuntimeError("save_checkpoint() needs a model: call it during or after fit().")

    def lr_schedule(self, model: Module, train_dataloaders: Any = None) -> dict[str, list[float]]:
        """The effective LR of every optimizer step this run would take, without training or launching.

        Simulates the user's schedulers (on copies; ReduceLROnPlateau is taken as constant) and applies
        the scaling and warmup. Returns {"lr-<optimizer>": [lr at step 0, 1, ...]} (first param group).
        With a schedule ``batch_ramp`` the steps follow its batches; with ``batch_ramp="noise"`` it is the
        run at the starting global batch (and says so): that ramp's changes are decided during fit().
        """
        model = check_module(model)
        loader = train_dataloaders if train_dataloaders is not None else model.train_dataloader()
        check_loaders(self.config, loader, "train_dataloaders")
        plan = self._set_plan(plan_fit(self.config, self.strategy, model, loader, lambda make: make()))
        if self.config.batch_ramp == "noise":
            self.print("syncstep: lr_schedule() shows the run at the starting global batch "
                       f"{plan.batch.global_batch_size}; batch_ramp='noise' decides its changes (and the LR "
                       "re-derived at each) during fit(), and prints them then.")
        steps = (scheduled_steps(self.config, plan) if isinstance(self.config.batch_ramp, tuple)
                 else planned_steps(plan.lr, plan.steps_per_epoch, plan.total_steps))
        return simulate_lrs(plan.optimizers, plan.scheduler_configs, plan.lr_names, list(model.parameters()), steps)

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

    def _log_values(self, values: dict[str, float]) -> None:
        """Values a callback logs directly (LearningRateMonitor): callback_metrics and the loggers."""
        self.metrics.update(values)
        if self.is_global_zero:
            self.metrics.send({"epoch": self.current_epoch, **values}, self.global_step)

    def applied_lrs(self) -> dict[str, float]:
        """The LR each optimizer applies at the current step, after scaling and warmup (``lr-<name>``)."""
        if self._manual is not None:
            return self._manual.lr_values(self._plan.lr_names)
        if self._checkpointer is not None:  # (in a fit: x AdaScale's gain, the batch ramp's clock)
            multipliers = self._checkpointer.stepper.multipliers_now(self.current_epoch)
        else:
            multipliers = self.lr_plan.multipliers(self.global_step, self.current_epoch)
        return lr_values(self._plan.lr_names, self.optimizers, multipliers)

    def _bar_enabled(self) -> bool:
        bars = [c for c in self.hooks.callbacks or self.callbacks if isinstance(c, TQDMProgressBar)]
        return self.config.enable_progress_bar and self.is_global_zero and not (bars and bars[0].refresh_rate == 0)
