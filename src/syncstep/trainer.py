"""The Trainer: argument checks, the plan, and the loop.

One optimizer step, top to bottom (``Trainer._train_epoch``):

    for each micro-batch of the step (gradient accumulation):
        fetch this process's batches (one per replica it feeds)
        sync gradients only on the last micro-batch (DDP no_sync otherwise)
        loss = strategy.training_step(batches)   # forward on each replica, losses weighted by batch size
        backward(loss)                           # through the grad scaler for 16-bit
    unscale + clip gradients
    optimizer.step() with LR x (scale x warmup) # then the user's LRs are put back
    zero_grad, step-interval schedulers, log every log_every_n_steps, validate / checkpoint when due
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch

from syncstep import checkpoint as ckpt
from syncstep import distributed as dist
from syncstep.config import PRECISIONS, resolve_devices, resolve_strategy, unknown_arguments
from syncstep.data import EvalData, TrainData, inspect_loader
from syncstep.launch import (
    Environment,
    can_self_launch,
    detect_environment,
    init_process_group,
    self_launch,
    write_error_file,
)
from syncstep.metrics import (
    CSVLogger,
    LogStore,
    ProgressBar,
    TensorBoardLogger,
    format_metric,
    next_version_dir,
    tensorboard_available,
)
from syncstep.module import Module
from syncstep.optim import (
    effective_lrs,
    parse_optimizers,
    scaled_step,
    simulate_lrs,
    step_schedulers,
    unique_parameters,
)
from syncstep.plan import (
    LR_SCALING_RULES,
    BatchPlan,
    LRPlan,
    optimizer_names,
    plan_batch,
    plan_lr,
    resolve_warmup,
    summary,
)
from syncstep.rng import rng_state, seed_everything, set_rng_state
from syncstep.strategies import STRATEGIES
from syncstep.strategies.common import StepRunner


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; every rank raises it at the same step."""


class Trainer:
    """Train a :class:`syncstep.Module` on one device, with ``strategy="dp"`` or ``strategy="ddp"``.

    The DataLoader's ``batch_size`` is the per-device batch for every strategy; the global batch is
    per-device batch x devices x num_nodes x accumulate_grad_batches, and the learning rate is scaled
    for it (``lr_scaling``, default "auto": linear for SGD, square root for Adam-like optimizers),
    relative to ``reference_batch_size`` (default: the per-device batch). All of it is printed at start.
    """

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int = -1,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
        strategy: str = "auto",
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
            valid = [p for p in inspect.signature(Trainer.__init__).parameters if p not in ("self", "unknown")]
            raise unknown_arguments(unknown, valid)

        def positive_int(name: str, value: Any, allow_none: bool = True) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")

        if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < 0):
            raise ValueError(f"max_epochs must be an int >= 0, got {max_epochs!r}.")
        if not isinstance(max_steps, int) or max_steps < -1:
            raise ValueError(f"max_steps must be an int >= 0, or -1 for no limit; got {max_steps!r}.")
        self.max_epochs = 1000 if max_epochs is None and max_steps == -1 else max_epochs
        self._max_epochs_defaulted = max_epochs is None and max_steps == -1
        self.max_steps = max_steps
        positive_int("num_nodes", num_nodes, allow_none=False)
        positive_int("accumulate_grad_batches", accumulate_grad_batches)
        positive_int("global_batch_size", global_batch_size)
        positive_int("reference_batch_size", reference_batch_size)
        positive_int("check_val_every_n_epoch", check_val_every_n_epoch)
        positive_int("log_every_n_steps", log_every_n_steps, allow_none=False)
        positive_int("ckpt_every_n_epochs", ckpt_every_n_epochs)
        positive_int("ckpt_every_n_steps", ckpt_every_n_steps)
        positive_int("keep_last", keep_last, allow_none=False)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not supported; use '32', 'bf16-mixed' or '16-mixed'.")
        if lr_scaling not in LR_SCALING_RULES:
            raise ValueError(f"lr_scaling={lr_scaling!r} is not one of {LR_SCALING_RULES}.")
        if gradient_clip_val is not None and (
            not isinstance(gradient_clip_val, (int, float)) or gradient_clip_val <= 0
        ):
            raise ValueError(f"gradient_clip_val must be a number > 0, got {gradient_clip_val!r}.")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}.")
        if val_check_interval is not None and not (
            (isinstance(val_check_interval, int) and val_check_interval >= 1)
            or (isinstance(val_check_interval, float) and 0 < val_check_interval <= 1)
        ):
            raise ValueError(
                f"val_check_interval must be an int >= 1 (optimizer steps) or a float in (0, 1] (a fraction "
                f"of the epoch), got {val_check_interval!r}."
            )
        if on_nonfinite_loss not in ("error", "skip"):
            raise ValueError(f"on_nonfinite_loss must be 'error' or 'skip', got {on_nonfinite_loss!r}.")
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}.")
        if not isinstance(timeout, timedelta):
            if not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ValueError(f"timeout must be seconds > 0 or a timedelta, got {timeout!r}.")
            timeout = timedelta(seconds=timeout)

        self.precision = PRECISIONS[precision]
        self.num_nodes = num_nodes
        self.accumulate_grad_batches = accumulate_grad_batches
        self.global_batch_size = global_batch_size
        self.lr_scaling = lr_scaling
        self.reference_batch_size = reference_batch_size
        self._warmup_args = dict(
            warmup_steps=warmup_steps, warmup_epochs=warmup_epochs, interval=warmup_interval,
            kind=warmup_type, start_factor=warmup_start_factor,
        )
        # Check the warmup arguments now (the real lengths need the data, known at fit()).
        resolve_warmup(**self._warmup_args, steps_per_epoch=1, total_steps=1, batch=BatchPlan(1, 1, 1, 1))
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.val_check_interval = val_check_interval
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.log_every_n_steps = log_every_n_steps
        self.seed = seed
        self.default_root_dir = os.path.abspath(default_root_dir or os.getcwd())
        self.enable_progress_bar = enable_progress_bar
        self._logger_arg = logger
        self.enable_checkpointing = enable_checkpointing
        self.ckpt_every_n_epochs = ckpt_every_n_epochs
        self.ckpt_every_n_steps = ckpt_every_n_steps
        self.keep_last = keep_last
        self.on_nonfinite_loss = on_nonfinite_loss
        self.use_distributed_sampler = use_distributed_sampler
        self.timeout = timeout

        self._env: Environment = detect_environment()
        self.accelerator, self._device_ids, self.num_devices = resolve_devices(accelerator, devices, self._env)
        self.strategy_name = resolve_strategy(strategy, self.num_devices, num_nodes, self._env)
        if self.strategy_name == "dp" and self.accelerator == "cpu" and self.num_devices > 1:
            warnings.warn(
                f"strategy='dp' on the CPU runs {self.num_devices} replicas in threads of one process: the "
                "results are those of DP on GPUs, but it is no faster than one device. Use it to develop "
                "and test; for speed on CPUs use strategy='ddp'.",
                stacklevel=2,
            )
        if seed is not None:
            seed_everything(seed)

        self.current_epoch = 0
        self.global_step = 0
        self._callback_values: dict[str, float] = {}  # callback_metrics as floats; tensors made on demand
        self._callback_tensors: dict[str, torch.Tensor] = {}
        self._callback_stale: set[str] = set()
        self.logged_metrics: dict[str, float] = {}
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list = []
        self.batch_plan: BatchPlan | None = None
        self.lr_plan: LRPlan | None = None
        self.log_dir: str | None = None
        self.should_stop = False
        self._logs = LogStore()
        self._strategy = None
        self._loggers: list[Any] = []
        self._bar = ProgressBar(False)
        self._stage: str | None = None
        self._stop_signal = False
        self._recent_losses: list[tuple[int, torch.Tensor]] = []  # on GPUs: checked at logging steps
        self._first_nonfinite_step: int | None = None  # on the CPU: checked as each loss comes

    # -- where this process stands ----------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Number of processes (Lightning's meaning: 1 for dp)."""
        return self._env.world_size if self._env.source != "local" else 1

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
    def stage(self) -> str | None:
        """What the trainer is running: "fit", "validate", "test", or None between calls."""
        return self._stage

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.default_root_dir, "checkpoints")

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_global_zero:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    # -- public entry points ----------------------------------------------------------------------
    def fit(self, model: Module, train_dataloaders: Any = None, val_dataloaders: Any = None,
            ckpt_path: str | None = None) -> None:
        """Train ``model``. ``ckpt_path`` resumes: a path, or "last" for the newest good checkpoint."""
        self._check_module(model)
        train = train_dataloaders if train_dataloaders is not None else model.train_dataloader()
        if train is None:
            raise ValueError("fit() needs training data: pass train_dataloaders=, or define train_dataloader().")
        val = val_dataloaders if val_dataloaders is not None else model.val_dataloader()
        self._check_loaders(train, "train_dataloaders")
        self._check_loaders(val, "val_dataloaders")
        if os.environ.get("SYNCSTEP_LR_PLOT"):  # `syncstep lr-plot script.py`: draw the plan, do not train
            self._plot_lr_schedule(model, train, os.environ["SYNCSTEP_LR_PLOT"])
            raise SystemExit(0)
        self._launch_if_needed()
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if ckpt_path is None and restarts > 0 and self.enable_checkpointing:
            # torchrun --max-restarts started this job again after a failure: carry on where it stopped.
            self.print(f"syncstep: torchrun restart {restarts}: resuming from the last checkpoint.")
            ckpt_path = "last"
        with self._running(model, "fit"):
            self._fit(model, train, val, ckpt_path)

    def validate(self, model: Module, dataloaders: Any = None, ckpt_path: str | None = None) -> list[dict[str, float]]:
        """Evaluate with ``validation_step``; one dict of epoch metrics per dataloader."""
        return self._evaluate_entry(model, dataloaders, ckpt_path, "validate")

    def test(self, model: Module, dataloaders: Any = None, ckpt_path: str | None = None) -> list[dict[str, float]]:
        """Evaluate with ``test_step``; one dict of epoch metrics per dataloader."""
        return self._evaluate_entry(model, dataloaders, ckpt_path, "test")

    def _evaluate_entry(self, model: Module, loaders: Any, ckpt_path: str | None, stage: str) -> list[dict]:
        self._check_module(model)
        if loaders is None:
            loaders = model.val_dataloader() if stage == "validate" else model.test_dataloader()
        if loaders is None:
            raise ValueError(f"{stage}() needs data: pass dataloaders=, or define "
                             f"{'val' if stage == 'validate' else 'test'}_dataloader().")
        self._check_loaders(loaders, "dataloaders")
        self._launch_if_needed()
        with self._running(model, stage):
            if ckpt_path is not None:
                path, state = self._find_checkpoint(ckpt_path)
                if state is not None:
                    model.load_state_dict(state["state_dict"])
                    self.print(f"syncstep: {stage} with the weights of {path}")
            results = []
            for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
                results.append(self._run_evaluation(loader, stage))
            return results

    # -- set-up -----------------------------------------------------------------------------------
    @staticmethod
    def _check_module(model: Any) -> None:
        if not isinstance(model, Module):
            raise TypeError(
                f"Trainer needs a syncstep.Module, got {type(model).__name__}. Subclass syncstep.Module and "
                "define training_step and configure_optimizers."
            )

    def _check_loaders(self, loaders: Any, what: str) -> None:
        if loaders is None or not self.use_distributed_sampler:
            return
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            inspect_loader(loader, what)

    def _launch_if_needed(self) -> None:
        if self._env.source != "local" or self.strategy_name not in ("ddp", "ddp_find_unused_parameters_true"):
            return
        if self.num_devices == 1:
            return  # one process: DDP with a world of one, no launch needed
        why = can_self_launch()
        if why:
            raise ValueError(
                f"strategy='ddp' with devices={self.num_devices} needs {self.num_devices} processes, and syncstep "
                f"cannot start them itself because {why}. Run the script with python, or with "
                f"torchrun --nproc-per-node={self.num_devices} script.py."
            )
        self_launch(self.num_devices)

    def _devices_for_this_process(self) -> list[torch.device]:
        if self.accelerator == "cpu":
            if self.strategy_name == "dp":
                return [torch.device("cpu")] * self.num_devices
            return [torch.device("cpu")]
        if self.strategy_name == "dp":
            return [torch.device("cuda", i) for i in self._device_ids]
        return [torch.device("cuda", self._device_ids[self.local_rank])]

    @contextlib.contextmanager
    def _running(self, model: Module, stage: str) -> Iterator[None]:
        devices = self._devices_for_this_process()
        if devices[0].type == "cuda":
            torch.cuda.set_device(devices[0])
        if self.strategy_name.startswith("ddp"):
            init_process_group(self._env if self._env.source != "local" else Environment("local"),
                               devices[0], self.timeout)
            if not dist.initialized():  # pragma: no cover - init_process_group raises instead
                raise RuntimeError("the process group did not start")
        self._strategy = STRATEGIES[self.strategy_name](devices=devices)
        model._trainer = self
        runner = StepRunner(model, self._logs.context)
        self._strategy.setup(runner)
        self._stage = stage
        try:
            yield
        except BaseException as error:
            self._report_failure(error, stage)
            raise
        finally:
            self._bar.close()
            for logger in self._loggers:
                if hasattr(logger, "finalize"):
                    logger.finalize()
            self._loggers = []
            self._strategy.teardown()
            self._stage = None

    def _report_failure(self, error: BaseException, stage: str) -> None:
        """Name the rank and where it failed, and hand the traceback to torchrun's error file."""
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            return
        if self._env.world_size > 1:
            print(
                f"syncstep: rank {self.global_rank} failed in {stage} at epoch {self.current_epoch}, step "
                f"{self.global_step}: {type(error).__name__}: {error}",
                file=sys.stderr, flush=True,
            )
        write_error_file(self.global_rank, error)
        if os.environ.get("TORCHELASTIC_ERROR_FILE") and isinstance(error, Exception):
            try:
                from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

                ErrorHandler().record_exception(error)
            except Exception:  # the report is a courtesy; the original error must propagate
                traceback.print_exc()

    def _autocast(self) -> contextlib.AbstractContextManager | None:
        if self.precision == "32":
            return None
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
        return torch.autocast(self._strategy.devices[0].type, dtype=dtype)

    def _make_loggers(self) -> None:
        self._loggers = []
        if not self.is_global_zero or self._logger_arg in (False, None):
            return
        self.log_dir = next_version_dir(os.path.join(self.default_root_dir, "syncstep_logs"))
        wanted = self._logger_arg
        if wanted is True:
            wanted = ["csv", "tensorboard"] if tensorboard_available() else ["csv"]
        for item in wanted if isinstance(wanted, (list, tuple)) else [wanted]:
            if item == "csv":
                self._loggers.append(CSVLogger(self.log_dir))
            elif item == "tensorboard":
                if not tensorboard_available():
                    raise ValueError("logger='tensorboard' needs the tensorboard package: pip install tensorboard.")
                self._loggers.append(TensorBoardLogger(self.log_dir))
            elif hasattr(item, "log_metrics"):
                self._loggers.append(item)
            else:
                raise ValueError(
                    f"logger={item!r}: use True, False, 'csv', 'tensorboard', or an object with "
                    "log_metrics(metrics, step)."
                )

    def _log(self, metrics: dict[str, float], step: int) -> None:
        shown = {k: v for k, v in metrics.items() if k not in self._logs.hidden}
        self.logged_metrics.update(shown)
        for logger in self._loggers:
            logger.log_metrics(shown, step)

    def _flush_loggers(self) -> None:
        for logger in self._loggers:
            if hasattr(logger, "flush"):
                logger.flush()

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        """The latest value of every logged metric, as float64 tensors (Lightning's name and type)."""
        # Kept as floats and made into tensors when read: a logging step that makes them costs ~40 us,
        # 1 us a training step at log_every_n_steps=50, for a dict few read during training.
        if self._callback_stale:
            for name in self._callback_stale:
                self._callback_tensors[name] = torch.tensor(self._callback_values[name], dtype=torch.float64)
            self._callback_stale.clear()
        return self._callback_tensors

    def _update_callback_metrics(self, values: dict[str, float]) -> None:
        self._callback_values.update(values)
        self._callback_stale.update(values)

    # -- fit --------------------------------------------------------------------------------------
    @property
    def num_replicas(self) -> int:
        """Model replicas that each take a per-device batch: the k of the global batch."""
        if self.strategy_name == "single":
            return 1
        return self.num_devices * (self.num_nodes if self.strategy_name != "dp" else 1)

    def _make_plan(self, model: Module, train_loader: Any) -> None:
        """Optimizers, the data layout and the batch / LR arithmetic, derived once, before any step."""
        self.optimizers, self.lr_scheduler_configs = parse_optimizers(model.configure_optimizers())
        per_process = self.num_devices if self.strategy_name == "dp" else 1
        self._train = TrainData(train_loader, self.seed, per_process, self.use_distributed_sampler)
        batch = plan_batch(self._train.per_device_batch_size, self.num_replicas, self.accumulate_grad_batches,
                           self.global_batch_size, self.reference_batch_size)
        self.batch_plan = batch
        self._train.set_layout(batch)
        self._steps_per_epoch = self._train.steps_per_epoch(0)
        total = self._steps_per_epoch * self.max_epochs if self.max_epochs is not None else self.max_steps
        self._total_steps = min(total, self.max_steps) if self.max_steps >= 0 else total
        warmup = resolve_warmup(**self._warmup_args, steps_per_epoch=self._steps_per_epoch,
                                total_steps=self._total_steps, batch=batch)
        self.lr_plan = plan_lr(self.optimizers, self.lr_scaling, batch, warmup)
        self._lr_names = optimizer_names(self.optimizers)

    def lr_schedule(self, model: Module, train_dataloaders: Any = None) -> dict[str, list[float]]:
        """The effective LR of every optimizer step this run would take, without training or launching.

        Simulates the user's schedulers (on copies; ReduceLROnPlateau is taken as constant) and applies
        the scaling and warmup. Returns {"lr-<optimizer>": [lr at step 0, 1, ...]} (first param group).
        """
        self._check_module(model)
        loader = train_dataloaders if train_dataloaders is not None else model.train_dataloader()
        self._check_loaders(loader, "train_dataloaders")
        self._make_plan(model, loader)
        return simulate_lrs(self.optimizers, self.lr_scheduler_configs, self.lr_plan, self._lr_names,
                            self._steps_per_epoch, self._total_steps, list(model.parameters()))

    def _summary(self) -> str:
        return summary(strategy=self.strategy_name, accelerator=self.accelerator, devices=self.num_devices,
                       num_nodes=self.num_nodes, batch=self.batch_plan, lr=self.lr_plan,
                       steps_per_epoch=self._steps_per_epoch, total_steps=self._total_steps,
                       requested_rule=self.lr_scaling)

    def _plot_lr_schedule(self, model: Module, loader: Any, out_png: str) -> None:
        from syncstep.plots import plot_lr_schedule

        lrs = self.lr_schedule(model, loader)
        print(self._summary())
        plot_lr_schedule(lrs, out_png, steps_per_epoch=self._steps_per_epoch)
        print(f"syncstep: LR schedule of {self._total_steps} steps written to {out_png}")

    def _fit(self, model: Module, train_loader: Any, val_loader: Any, ckpt_path: str | None) -> None:
        strategy = self._strategy
        self._make_plan(model, train_loader)
        self._train.set_replicas(strategy.replicas, strategy.gradient_averaging)
        assert self.batch_plan.world_size == strategy.world_size, (self.batch_plan.world_size, strategy.world_size)
        self._scaler = torch.amp.GradScaler(strategy.devices[0].type) if self.precision == "16-mixed" else None
        self._params = unique_parameters(self.optimizers)
        self._val_loader = val_loader
        if val_loader is not None and type(model).validation_step is Module.validation_step:
            self.print("syncstep: validation data was given but the model defines no validation_step; skipping it.")
            self._val_loader = None

        start_epoch, start_sample = 0, 0
        if ckpt_path is not None:
            start_epoch, start_sample = self._resume(model, ckpt_path)
        elif self.enable_checkpointing and ckpt.step_checkpoints(self.checkpoint_dir):
            self.print(f"syncstep: note: {self.checkpoint_dir} holds checkpoints of an earlier run; this run's "
                       f"replace them (keep_last={self.keep_last}). To continue that run, pass ckpt_path='last'.")

        if self._max_epochs_defaulted:
            self.print("syncstep: neither max_epochs nor max_steps was set; training for max_epochs=1000.")
        self.print(self._summary())
        self._make_loggers()
        for logger in self._loggers:
            if hasattr(logger, "log_hyperparams"):
                logger.log_hyperparams(self._hyperparams())
        self._bar = ProgressBar(self.enable_progress_bar and self.is_global_zero)
        self._recent_losses.clear()
        self._first_nonfinite_step = None
        # A loss on the CPU is read as it comes (loss.item(), 2 us a step in a W1 run, waits for nothing);
        # a GPU's are kept and read together at the next logging step: one sync there, not one a step.
        self._check_loss_now = strategy.devices[0].type == "cpu"
        self._multipliers = self.lr_plan.multipliers(self.global_step, start_epoch)
        self._lr_ramping = True  # the multipliers may still change (warmup); see _optimizer_step
        self._guarded_step = (self.on_nonfinite_loss == "skip" or self.gradient_clip_val is not None
                              or self._scaler is not None)
        self.should_stop = False
        previous_handler = self._install_sigterm_handler()
        try:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            model.on_fit_start()
            for epoch in range(start_epoch, self.max_epochs if self.max_epochs is not None else sys.maxsize):
                if self.should_stop or self._steps_exhausted():
                    break
                self.current_epoch = epoch
                self._train_epoch(model, epoch, start_sample if epoch == start_epoch else 0)
            model.on_fit_end()
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        self._flush_loggers()

    def _steps_exhausted(self) -> bool:
        return 0 <= self.max_steps <= self.global_step

    def _train_epoch(self, model: Module, epoch: int, start_sample: int) -> None:
        strategy, logs, bar = self._strategy, self._logs, self._bar
        steps = self._train.steps_per_epoch(start_sample)
        val_every = self._val_every(steps)
        model.train()
        model.on_train_epoch_start()
        bar.start(f"Epoch {epoch}", steps)
        self._epoch_sample = start_sample
        batch_idx = 0
        completed = True
        logs.context.stage = "train"
        # This loop runs every step: what does not change within an epoch is looked up once here, and
        # a tiny model's step costs 200-500 us, so each attribute lookup or call left in it shows.
        autocast, scaler = self._autocast(), self._scaler
        training_step, clear_step_values = strategy.training_step, logs.step_entries.clear
        # Gradients are synced on every backward unless some micro-batches accumulate without a sync.
        sync_gradients = strategy.sync_gradients if self._train.layout.accumulate_grad_batches > 1 else None
        check_loss_now, recent_losses, isfinite = self._check_loss_now, self._recent_losses, math.isfinite
        log_every, ckpt_every, max_steps = self.log_every_n_steps, self.ckpt_every_n_steps, self.max_steps
        bar_every, bar_steps = (bar.every if bar.bar is not None else 0), 0  # the bar, told every bar_every steps
        plain_optimizer = self._plain_optimizer(epoch)
        plan, batches = self._train.start_epoch(epoch, start_sample)
        for step_in_epoch, (step_samples, micro_batches) in enumerate(plan):
            clear_step_values()
            for counts, weights, is_last in micro_batches:  # one per accumulation step
                if sync_gradients is not None:
                    sync_gradients(is_last)
                if autocast is None:
                    loss = training_step(batches, counts, weights, batch_idx)
                else:
                    with autocast:
                        loss = training_step(batches, counts, weights, batch_idx)
                (loss if scaler is None else scaler.scale(loss)).backward()
                if not check_loss_now:
                    recent_losses.append((self.global_step, loss.detach()))
                elif not isfinite(loss.item()) and self._first_nonfinite_step is None:
                    self._first_nonfinite_step = self.global_step
                batch_idx += 1
            if plain_optimizer is None:
                self._optimizer_step(epoch)
            else:  # what a hand-written loop does, when that is all there is to do
                plain_optimizer.step()
                plain_optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
            self._epoch_sample += step_samples
            bar_steps += 1
            if bar_steps == bar_every:
                bar_every, bar_steps = bar.advance(bar_steps), 0
            step = self.global_step
            if step % log_every == 0:
                self._log_step(epoch)
            if val_every and (step_in_epoch + 1) % val_every == 0 and step_in_epoch + 1 < steps:
                self._validate_in_fit(model, epoch)
                logs.context.stage = "train"
            if ckpt_every and step % ckpt_every == 0:
                self._save_checkpoint(model, epoch_finished=False)
            if ((self._stop_signal and self._stop_requested()) or 0 <= max_steps <= step) and step_in_epoch + 1 < steps:
                completed = False
                break
        bar.advance(bar_steps)
        self._end_train_epoch(model, epoch, completed)

    def _plain_optimizer(self, epoch: int) -> torch.optim.Optimizer | None:
        """The optimizer, if for the whole epoch a step is just ``step()`` and ``zero_grad()``: one
        optimizer, an LR multiplier of 1 (k = 1, warmup over or none), and no clipping, GradScaler,
        NaN skipping or step-interval scheduler. Else None, and ``_optimizer_step`` does the rest."""
        if (self._guarded_step or len(self.optimizers) != 1 or not self.lr_plan.settled(self.global_step, epoch)
                or any(config.interval == "step" for config in self.lr_scheduler_configs)):
            return None
        self._multipliers, self._lr_ramping = self.lr_plan.multipliers(self.global_step, epoch), False
        return self.optimizers[0] if self._multipliers == [1.0] else None

    def _optimizer_step(self, epoch: int) -> None:
        scaler = self._scaler
        if self._guarded_step:  # on_nonfinite_loss="skip", gradient clipping or a GradScaler
            if self.on_nonfinite_loss == "skip" and self._skip_nonfinite_step():
                return
            if self.gradient_clip_val is not None:
                if scaler is not None:
                    for opt in self.optimizers:
                        scaler.unscale_(opt)
                if self.gradient_clip_algorithm == "norm":
                    torch.nn.utils.clip_grad_norm_(self._params, self.gradient_clip_val)
                else:
                    torch.nn.utils.clip_grad_value_(self._params, self.gradient_clip_val)
        if self._lr_ramping:  # after warmup the multipliers stay put: no need to ask the plan every step
            self._multipliers = self.lr_plan.multipliers(self.global_step, epoch)
            self._lr_ramping = not self.lr_plan.settled(self.global_step, epoch)
        for opt, multiplier in zip(self.optimizers, self._multipliers):
            scaled_step(opt, multiplier, functools.partial(scaler.step, opt) if scaler is not None else opt.step)
        if scaler is not None:
            scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.lr_scheduler_configs:
            step_schedulers(self.lr_scheduler_configs, "step", self.global_step, self._callback_values)

    def _skip_nonfinite_step(self) -> bool:
        """With on_nonfinite_loss='skip': all ranks agree (one all-reduce) and skip the step together."""
        bad = self._first_nonfinite_step is not None or not all(math.isfinite(float(x)) for _, x in self._recent_losses)
        self._recent_losses.clear()
        self._first_nonfinite_step = None
        bad = torch.tensor([float(bad)])
        dist.all_reduce(bad, "max")
        if bad.item() == 0:
            return False
        self.print(f"syncstep: non-finite loss at step {self.global_step} (epoch {self.current_epoch}) on some "
                   "rank; skipping this optimizer step on every rank.")
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self._scaler is not None:
            self._scaler.update()
        self.global_step += 1
        return True

    def _agree(self) -> None:
        """On every rank, with one all-reduce: whether any rank got SIGTERM, and the first step (since the
        last call) at which any rank's loss was NaN or infinite, which stops the run on every rank."""
        losses, bad_step = self._recent_losses, sys.maxsize
        if self._first_nonfinite_step is not None:  # found as it came (on the CPU)
            bad_step, self._first_nonfinite_step = self._first_nonfinite_step, None
        if losses and self.on_nonfinite_loss != "skip":  # on a GPU: one tensor, one sync ("skip": every step)
            values = [x for _, x in losses]
            try:
                finite = torch.stack(values).isfinite().reshape(-1)
            except RuntimeError:  # losses of different shapes ((), (1,)) or devices
                finite = torch.stack([x.float().reshape(()).cpu() for x in values]).isfinite()
            if not bool(finite.all()):
                bad_step = losses[int((~finite).nonzero()[0, 0])][0]
        losses.clear()
        # (step, rank) packed into one number, so that the minimum names both.
        found = bad_step * 1_000_000 + self.global_rank if bad_step != sys.maxsize else 2**62
        stop = int(self._stop_signal)
        if dist.initialized():
            packed = torch.tensor([found, -stop], dtype=torch.int64, device=self._reduce_device())
            found, stop = dist.all_reduce(packed, "min").tolist()
            stop = -stop
        self._stop_signal = bool(stop)
        if found != 2**62:
            step, rank = divmod(found, 1_000_000)
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at optimizer step {step} (first seen on rank {rank}); every "
                "rank stops here. Lower the learning rate, add warmup (warmup_epochs=...), clip gradients "
                "(gradient_clip_val=...), or pass on_nonfinite_loss='skip' to skip such steps on all ranks."
            )

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor summed over all ranks (through the GPU with NCCL); itself in one process."""
        if not dist.initialized():
            return tensor
        return dist.all_reduce(tensor.to(self._reduce_device())).cpu()

    def _reduce_device(self) -> torch.device:
        return self._strategy.devices[0] if self._strategy.devices[0].type == "cuda" else torch.device("cpu")

    def _log_step(self, epoch: int) -> None:
        self._agree()
        values = self._logs.step_values(self._sum_over_ranks)
        for name, opt, multiplier in zip(self._lr_names, self.optimizers, self._multipliers):
            lrs = effective_lrs(opt, multiplier)
            if len(lrs) == 1:
                values[f"lr-{name}"] = lrs[0]
            else:
                values.update({f"lr-{name}/pg{i + 1}": lr for i, lr in enumerate(lrs)})
        self._update_callback_metrics(values)
        if self.is_global_zero:
            self._log({"epoch": epoch, **values}, self.global_step)
            self._bar.show({k: v for k, v in values.items() if k in self._logs.prog_bar})

    def _val_every(self, steps: int) -> int:
        """Optimizer steps between validations inside an epoch (0: only at the epoch's end)."""
        if self._val_loader is None or self.val_check_interval is None:
            return 0
        if isinstance(self.val_check_interval, float):
            return max(1, int(steps * self.val_check_interval)) if self.val_check_interval < 1 else 0
        return self.val_check_interval

    def _end_train_epoch(self, model: Module, epoch: int, completed: bool) -> None:
        """Epoch metrics, validation, epoch schedulers, checkpoint.

        An epoch cut short (max_steps, SIGTERM) logs what it has and is checkpointed mid-epoch, but its
        epoch-interval schedulers and on_train_epoch_end wait for the epoch to really end, so that a
        resumed run steps them exactly once, as an uninterrupted run does.
        """
        self._agree()
        step_values = self._logs.step_values(self._sum_over_ranks)
        self._update_callback_metrics(step_values)
        epoch_values = self._logs.epoch_values(self._sum_over_ranks, dist.union_of_names)
        self._update_callback_metrics(epoch_values)
        if completed:
            model.on_train_epoch_end()
        if self.is_global_zero and epoch_values:
            self._log({"epoch": epoch, **epoch_values}, self.global_step)
        due = self.check_val_every_n_epoch and (epoch + 1) % self.check_val_every_n_epoch == 0
        if self._val_loader is not None and not self._stop_signal and ((completed and due) or self._steps_exhausted()):
            self._validate_in_fit(model, epoch)
        self._bar.show({k: v for k, v in self._callback_values.items() if k in self._logs.prog_bar})
        self._bar.close()
        if self.lr_scheduler_configs and completed:
            step_schedulers(self.lr_scheduler_configs, "epoch", epoch + 1, self._callback_values)
        due = self.ckpt_every_n_epochs and (epoch + 1) % self.ckpt_every_n_epochs == 0
        if self.enable_checkpointing and (self._stop_signal or (completed and due) or self._steps_exhausted()):
            self._save_checkpoint(model, epoch_finished=completed)
        self._flush_loggers()
        if self._stop_signal:
            self._bar.close()
            self.print(f"syncstep: SIGTERM received; checkpoint saved at step {self.global_step} in "
                       f"{self.checkpoint_dir}; exiting. Resume with trainer.fit(..., ckpt_path='last').")
            raise SystemExit(128 + signal.SIGTERM)

    def _validate_in_fit(self, model: Module, epoch: int) -> None:
        values = self._run_evaluation(self._val_loader, "validate")
        if self.is_global_zero:
            self._log({"epoch": epoch, **values}, self.global_step)
        model.train()

    # -- evaluation -------------------------------------------------------------------------------
    def _run_evaluation(self, loader: Any, stage: str) -> dict[str, float]:
        strategy, logs = self._strategy, self._logs
        model = strategy.runner.module
        data = EvalData(loader, strategy, self.use_distributed_sampler)
        was_training = model.training
        model.eval()
        logs.context.stage = stage
        saved_step = logs.step_entries[:]
        bar = ProgressBar(self.enable_progress_bar and self.is_global_zero)
        bar.start("Validation" if stage == "validate" else "Test", data.num_steps)
        with torch.no_grad(), self._autocast() or contextlib.nullcontext():
            for batch_idx, group in enumerate(data):
                strategy.evaluation_step(stage, [b for _, b in group], [c for c, _ in group], batch_idx)
                bar.update()
        bar.close()
        values = logs.epoch_values(self._sum_over_ranks, dist.union_of_names)
        logs.step_entries[:] = saved_step
        self._update_callback_metrics(values)
        hook = model.on_validation_epoch_end if stage == "validate" else model.on_test_epoch_end
        hook()
        model.train(was_training)
        if (stage != "validate" or self._stage != "fit") and values:
            self.print(f"{stage}: " + "  ".join(f"{k}={format_metric(v)}" for k, v in values.items()))
        return values

    # -- checkpoints ------------------------------------------------------------------------------
    def _hyperparams(self) -> dict[str, Any]:
        b = self.batch_plan
        return {
            "strategy": self.strategy_name, "accelerator": self.accelerator, "world_size": b.world_size,
            "num_nodes": self.num_nodes, "per_device_batch_size": b.per_device_batch_size,
            "accumulate_grad_batches": b.accumulate_grad_batches, "global_batch_size": b.global_batch_size,
            "reference_batch_size": b.reference_batch_size, "lr_scaling": self.lr_scaling,
            "lr_factors": [o.factor for o in self.lr_plan.optimizers], "precision": self.precision,
            "warmup_steps": self.lr_plan.warmup.length, "warmup_interval": self.lr_plan.warmup.interval,
        }

    def _checkpoint_state(self, model: Module, epoch_finished: bool) -> dict[str, Any]:
        from syncstep import __version__

        rng = dist.all_gather_object(rng_state())
        schedulers = [c.scheduler.state_dict() for c in self.lr_scheduler_configs]
        for i, state in enumerate(schedulers):
            ckpt.check_plain(state, f"lr scheduler {i} ({type(self.lr_scheduler_configs[i].scheduler).__name__})")
        epoch = self.current_epoch + 1 if epoch_finished else self.current_epoch
        return {
            "syncstep": {"version": __version__, "format": ckpt.FORMAT_VERSION},
            "state_dict": ckpt.strip_prefixes(model.state_dict()),
            "optimizer_states": [opt.state_dict() for opt in self.optimizers],
            "lr_schedulers": schedulers,
            "grad_scaler": self._scaler.state_dict() if self._scaler is not None else None,
            "loop": {"epoch": epoch, "global_step": self.global_step,
                     "epoch_sample": 0 if epoch_finished else self._epoch_sample},
            "world": {"strategy": self.strategy_name, "num_processes": self._env.world_size,
                      "world_size": self.batch_plan.world_size, **self._hyperparams()},
            "shuffle_seed": self._train.shuffle_seed,
            "rng": rng,
        }

    def _save_checkpoint(self, model: Module, epoch_finished: bool) -> None:
        if not self.enable_checkpointing:
            return
        self._agree()
        state = self._checkpoint_state(model, epoch_finished)
        if self.is_global_zero:
            directory = self.checkpoint_dir
            name = f"epoch={self.current_epoch}-step={self.global_step}.ckpt"
            path = os.path.join(directory, name)
            ckpt.remove_stale_temporaries(directory)
            ckpt.atomic_save(state, path)
            ckpt.atomic_link(path, os.path.join(directory, ckpt.LAST))
            for old in ckpt.step_checkpoints(directory)[self.keep_last:]:
                os.remove(old)
        dist.barrier()

    def _find_checkpoint(self, ckpt_path: str) -> tuple[str | None, dict | None]:
        if ckpt_path != "last":
            return ckpt_path, ckpt.load(ckpt_path)
        path, state, problems = ckpt.newest_valid(self.checkpoint_dir)
        for problem in problems:
            self.print(f"syncstep: skipping a checkpoint: {problem}")
        if state is None and problems:
            raise ckpt.CheckpointError(
                f"ckpt_path='last': no readable checkpoint in {self.checkpoint_dir}, although some exist "
                "(see above). Refusing to start from step 0 silently; delete them to start afresh."
            )
        if state is None:
            self.print(f"syncstep: ckpt_path='last' found no checkpoint in {self.checkpoint_dir}; "
                       "starting from scratch.")
        elif problems:
            self.print(f"syncstep: resuming from {path} instead (the newest readable checkpoint).")
        return path, state

    def _resume(self, model: Module, ckpt_path: str) -> tuple[int, int]:
        path, state = self._find_checkpoint(ckpt_path)
        if state is None:
            return 0, 0
        model.load_state_dict(state["state_dict"])
        if len(state["optimizer_states"]) != len(self.optimizers):
            raise ckpt.CheckpointError(
                f"{path} holds {len(state['optimizer_states'])} optimizer state(s), but configure_optimizers "
                f"returned {len(self.optimizers)}."
            )
        for opt, opt_state in zip(self.optimizers, state["optimizer_states"]):
            opt.load_state_dict(opt_state)
        for config, sched_state in zip(self.lr_scheduler_configs, state["lr_schedulers"]):
            config.scheduler.load_state_dict(sched_state)
        if self._scaler is not None and state.get("grad_scaler"):
            self._scaler.load_state_dict(state["grad_scaler"])
        loop, world = state["loop"], state["world"]
        self.global_step = loop["global_step"]
        self.current_epoch = loop["epoch"]
        self._train.shuffle_seed = state["shuffle_seed"]
        rng = state["rng"]
        same_world = world["num_processes"] == self._env.world_size
        set_rng_state(rng[self.global_rank] if same_world and self.global_rank < len(rng) else rng[0])
        b = self.batch_plan
        self.print(f"syncstep: resumed from {path}: epoch {loop['epoch']}, step {loop['global_step']}, "
                   f"{loop['epoch_sample']} samples into the epoch.")
        if world["global_batch_size"] != b.global_batch_size or world["world_size"] != b.world_size:
            old = ", ".join(f"{x:.6g}" for x in world.get("lr_factors", []))
            new = ", ".join(f"{o.factor:.6g}" for o in self.lr_plan.optimizers)
            self.print(
                f"syncstep: the world changed since the checkpoint: world size {world['world_size']} -> "
                f"{b.world_size}, global batch {world['global_batch_size']} -> {b.global_batch_size} "
                f"(accumulation {world['accumulate_grad_batches']} -> {b.accumulate_grad_batches}); "
                f"LR factor {old} -> {new}."
            )
        return loop["epoch"], loop["epoch_sample"]

    # -- preemption -------------------------------------------------------------------------------
    def _install_sigterm_handler(self) -> Any:
        """On SIGTERM (preemption, SLURM's warning), save a checkpoint at the next step, then stop."""
        if threading.current_thread() is not threading.main_thread():
            return None
        self._stop_signal = False

        def handler(signum: int, frame: Any) -> None:
            self._stop_signal = True

        return signal.signal(signal.SIGTERM, handler)

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM: at once in one process; on several, at the next
        logging step, where ``_agree`` has just exchanged the flag (with the NaN check, one all-reduce)."""
        if self._env.world_size == 1 or self.global_step % self.log_every_n_steps == 0:
            return self._stop_signal
        return False
