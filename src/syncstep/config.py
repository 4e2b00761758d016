"""Every Trainer argument in one frozen dataclass, validated once, before any process starts.

``Trainer(**arguments)`` builds a :class:`TrainerConfig`; nothing else in syncstep checks the user's
arguments again. What depends on the data (the per-device batch, the number of steps) is checked when
``fit()`` sees it, in ``plan.py``; what depends on the machine (GPUs, the launcher) in
``strategies/select.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from datetime import timedelta
from typing import Any

from syncstep.batch_ramp import check_argument as check_batch_ramp
from syncstep.compile import check_option as check_compile_option
from syncstep.plan import LR_SCALING_RULES, check_warmup_arguments
from syncstep.precision import PRECISIONS
from syncstep.strategies.ddp import DDPStrategy
from syncstep.strategies.fsdp import FSDPStrategy

# Names users bring from other trainers, Lightning 1.x and our own design note.
ALIASES = {
    "num_epochs": "max_epochs", "epochs": "max_epochs", "n_epochs": "max_epochs",
    "strategies": "strategy", "gpus": "devices", "num_devices": "devices", "nodes": "num_nodes",
    "accumulate_grad_batch": "accumulate_grad_batches", "gradient_accumulation_steps": "accumulate_grad_batches",
    "grad_clip": "gradient_clip_val", "clip_grad_norm": "gradient_clip_val", "lr_scale": "lr_scaling",
    "root_dir": "default_root_dir",
}

# Lightning Trainer arguments syncstep does not have, each with what to do instead.
LIGHTNING_UNSUPPORTED = {
    "profiler": "profile with torch.profiler around trainer.fit(), or py-spy",
    "plugins": "precision and environments are Trainer arguments here (precision=, num_nodes=)",
    "barebones": "syncstep's loop has no optional overhead to switch off; see docs/benchmarks.md",
    "overfit_batches": "use limit_train_batches=N with a DataLoader of the same N batches (shuffle=False)",
    "reload_dataloaders_every_n_epochs": "rebuild the DataLoader and call fit again (ckpt_path='last')",
    "max_time": "use max_steps / max_epochs, or set trainer.should_stop = True in a callback that checks the time",
    "model_registry": "save checkpoints with ModelCheckpoint and load them with Module.load_from_checkpoint",
    "val_check_batch": "use val_check_interval",
}
NONFINITE_POLICIES = ("error", "skip")
DEFAULT_MAX_EPOCHS = 1000  # Lightning's, when neither max_epochs nor max_steps is given


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """What the user asked for. Each field is a ``Trainer`` argument of the same name and default."""

    max_epochs: int | None = None
    """Epochs to train; with neither this nor ``max_steps``, 1000 (said at start-up)."""
    max_steps: int = -1
    """Optimizer steps to train, -1 for no limit; whichever of the two limits comes first ends fit."""
    accelerator: str = "auto"
    """"cpu", "gpu" / "cuda", or "auto" (a GPU if one is visible)."""
    devices: int | str | list[int] = "auto"
    """Devices on this node: an int, a list of GPU indices, or "auto"."""
    strategy: str | FSDPStrategy | DDPStrategy = "auto"
    """"single", "dp", "ddp", "ddp_find_unused_parameters_true", "fsdp", ``syncstep.FSDPStrategy(...)``
    (fsdp with options) or ``syncstep.DDPStrategy(...)`` (ddp with options: communication hook, buckets);
    auto: single for one device, else ddp."""
    num_nodes: int | str = 1
    """Machines; must match what torchrun or SLURM started. "auto": whatever the launcher started, which
    under elastic torchrun (``--nnodes=MIN:MAX``) may change from one restart to the next: each restart
    resumes from the last checkpoint on the new world size (fix ``global_batch_size`` to keep the same
    run; without it the LR is re-derived for the new global batch, and said so)."""
    precision: str | int = "32"
    """"32", "bf16-mixed" or "16-mixed" (with a gradient scaler); normalised to one of these."""
    accumulate_grad_batches: int | None = None
    """Micro-batches per optimizer step (default 1, or derived from ``global_batch_size``)."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all replicas; accumulation is derived from the device count."""
    lr_scaling: str = "auto"
    """"linear", "sqrt", "none", or "auto" (linear for SGD-like optimizers, sqrt for adaptive ones)."""
    reference_batch_size: int | None = None
    """The batch the LR in configure_optimizers was tuned for (default: the per-device batch)."""
    noise_scale: bool = False
    """Measure the gradient noise scale B_simple (noise_scale.py): ddp on 2+ devices, or accumulation >= 2."""
    batch_ramp: str | dict | None = None
    """Grow the global batch at epoch starts (batch_ramp.py): "noise" (double the accumulation while the
    global batch < batch_ramp_factor x B_simple; measures the noise scale) or {epoch: global batch}."""
    batch_ramp_factor: float = 1.0
    """batch_ramp="noise": the c in "grow while the global batch < c x B_simple"."""
    batch_ramp_max: int | None = None
    """batch_ramp="noise": the largest global batch it may reach (default: the epoch's samples)."""
    warmup_epochs: float | None = None
    """Warmup length in epochs (0.5 = half an epoch)."""
    warmup_steps: float | None = None
    """Warmup length in optimizer steps at the reference batch; a float in (0, 1) is a fraction of the run."""
    warmup_interval: str = "step"
    """"step": the warmup multiplier changes every step; "epoch": once per epoch."""
    warmup_type: str = "linear"
    """"linear", "exponential" or "constant"."""
    warmup_start_factor: float | None = None
    """Where the warmup starts, as a fraction of the scaled LR; None: at the unscaled LR."""
    gradient_clip_val: float | None = None
    """Clip gradients (after unscaling) to this norm or value."""
    gradient_clip_algorithm: str = "norm"
    """"norm" (clip_grad_norm_) or "value" (clip_grad_value_)."""
    val_check_interval: int | float | None = None
    """Validate every N optimizer steps (int) or fraction of an epoch (float in (0, 1])."""
    check_val_every_n_epoch: int | None = 1
    """Validate at the end of every N-th epoch."""
    log_every_n_steps: int = 50
    """How often step values and the LR go to the loggers and the progress bar."""
    seed: int | None = None
    """Seeds Python, NumPy and torch on every rank, and the data order (0 if unset)."""
    default_root_dir: str | None = None
    """Where ``syncstep_logs/`` and ``checkpoints/`` go (default: the current directory); made absolute."""
    enable_progress_bar: bool = True
    """A tqdm bar on rank 0."""
    logger: Any = True
    """True (CSV, and TensorBoard if installed), "csv", "tensorboard", False, or logger objects."""
    enable_checkpointing: bool = True
    """Atomic checkpoints in ``checkpoints/`` plus ``last.ckpt``."""
    ckpt_every_n_epochs: int | None = 1
    """Checkpoint at the end of every N-th epoch."""
    ckpt_every_n_steps: int | None = None
    """Also checkpoint every N optimizer steps."""
    keep_last: int = 2
    """Step checkpoints to keep (the most recently written)."""
    on_nonfinite_loss: str = "error"
    """"error": every rank stops at the first NaN/inf loss; "skip": such steps are skipped on every rank."""
    use_distributed_sampler: bool = True
    """False: use the DataLoader as it is (you shard the data yourself)."""
    timeout: float | timedelta = 300.0
    """Collective timeout in seconds (or a timedelta); normalised to a timedelta."""
    callbacks: Any = None
    """A ``syncstep.Callback`` or a list of them (Lightning's callbacks: ModelCheckpoint, EarlyStopping, ...)."""
    min_epochs: int | None = None
    """Train at least this many epochs, even if a callback asks to stop earlier."""
    min_steps: int | None = None
    """Train at least this many optimizer steps, even if a callback asks to stop earlier."""
    limit_train_batches: int | float | None = None
    """Batches per replica per epoch: an int, or a fraction of the epoch (float); None: all."""
    limit_val_batches: int | float | None = None
    """Validation batches per replica (int) or fraction (float); 0 turns validation off."""
    limit_test_batches: int | float | None = None
    """Test batches per replica (int) or fraction (float)."""
    limit_predict_batches: int | float | None = None
    """Prediction batches per replica (int) or fraction (float)."""
    num_sanity_val_steps: int = 0
    """Validation batches run before training to catch bugs early (Lightning's default is 2; -1: all)."""
    fast_dev_run: bool | int = False
    """True or N: run N (1) batches of training and validation, no loggers, no checkpoints, and stop."""
    enable_model_summary: bool = True
    """Print the model's layers and parameter counts at the start of fit (rank 0)."""
    deterministic: bool | str | None = None
    """True: torch.use_deterministic_algorithms(True); "warn": only warn about non-deterministic ops."""
    benchmark: bool | None = None
    """torch.backends.cudnn.benchmark (None: leave it as it is)."""
    inference_mode: bool = True
    """Evaluate and predict under torch.inference_mode (False: torch.no_grad)."""
    sync_batchnorm: bool = False
    """Turn BatchNorm layers into SyncBatchNorm when there are several processes (GPUs)."""
    detect_anomaly: bool = False
    """torch.autograd's anomaly detection during fit (slow; for debugging NaNs)."""
    compile: bool | dict = False
    """torch.compile the model's forward (what ``self(x)`` runs) after the strategy wrapped it: True, or a
    dict of torch.compile's arguments ({"mode": "max-autotune"}). Under ddp the graph is split at DDP's
    bucket boundaries, so the all-reduce still overlaps backward. Not with dp (see compile.py)."""
    flops_per_sample: float | None = None
    """Model FLOPs of one training sample (forward and backward, ~6 x parameters x tokens for a
    transformer): the loggers then get ``throughput/mfu`` (throughput.py)."""
    peak_flops_per_device: float | None = None
    """Peak FLOP/s of one device for the MFU (default: syncstep's table for an H100 / H200 / A100 at the precision)."""

    max_epochs_defaulted: bool = dataclasses.field(default=False, init=False)
    """Whether ``max_epochs`` is the default 1000 because neither limit was given."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # a frozen dataclass normalises its own fields here, and only here
        if self.max_epochs is not None and (not _is_int(self.max_epochs) or self.max_epochs < 0):
            raise ValueError(f"max_epochs must be an int >= 0, got {self.max_epochs!r}.")
        if not _is_int(self.max_steps) or self.max_steps < -1:
            raise ValueError(f"max_steps must be an int >= 0, or -1 for no limit; got {self.max_steps!r}.")
        if self.max_epochs is None and self.max_steps == -1:
            set_(self, "max_epochs", DEFAULT_MAX_EPOCHS)
            set_(self, "max_epochs_defaulted", True)
        if not isinstance(self.strategy, (str, FSDPStrategy, DDPStrategy)):
            got = self.strategy
            hint = (f" Pass an instance: strategy={got.__name__}()." if got in (FSDPStrategy, DDPStrategy) else
                    " syncstep's other strategies are chosen by name, e.g. strategy='ddp'." if hasattr(got, "setup")
                    else "")
            raise TypeError(
                "strategy must be a name ('auto', 'single', 'dp', 'ddp', 'fsdp', ...) or syncstep.FSDPStrategy(...), "
                "syncstep.DDPStrategy(...), "
                f"got {got!r}.{hint}"
            )
        if self.num_nodes != "auto":
            _positive_int("num_nodes", self.num_nodes, allow_none=False)
        for name in ("accumulate_grad_batches", "global_batch_size", "reference_batch_size",
                     "check_val_every_n_epoch", "ckpt_every_n_epochs", "ckpt_every_n_steps"):
            _positive_int(name, getattr(self, name))
        _positive_int("log_every_n_steps", self.log_every_n_steps, allow_none=False)
        _positive_int("keep_last", self.keep_last, allow_none=False)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not supported; use '32', 'bf16-mixed' or '16-mixed'.")
        set_(self, "precision", PRECISIONS[self.precision])
        if not isinstance(self.noise_scale, bool):
            raise ValueError(f"noise_scale must be True or False, got {self.noise_scale!r}.")
        if self.lr_scaling not in LR_SCALING_RULES:
            raise ValueError(f"lr_scaling={self.lr_scaling!r} is not one of {LR_SCALING_RULES}.")
        set_(self, "batch_ramp", check_batch_ramp(self.batch_ramp, self.batch_ramp_factor, self.batch_ramp_max))
        check_warmup_arguments(warmup_steps=self.warmup_steps, warmup_epochs=self.warmup_epochs,
                               interval=self.warmup_interval, kind=self.warmup_type,
                               start_factor=self.warmup_start_factor)
        clip = self.gradient_clip_val
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
            raise ValueError(f"gradient_clip_val must be a number > 0, got {clip!r}.")
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got {self.gradient_clip_algorithm!r}."
            )
        interval = self.val_check_interval
        if interval is not None and not (
            (_is_int(interval) and interval >= 1) or (isinstance(interval, float) and 0 < interval <= 1)
        ):
            raise ValueError(
                f"val_check_interval must be an int >= 1 (optimizer steps) or a float in (0, 1] (a fraction "
                f"of the epoch), got {interval!r}."
            )
        if self.on_nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite_loss must be 'error' or 'skip', got {self.on_nonfinite_loss!r}.")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}.")
        timeout = self.timeout
        if not isinstance(timeout, timedelta):
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ValueError(f"timeout must be seconds > 0 or a timedelta, got {timeout!r}.")
            set_(self, "timeout", timedelta(seconds=timeout))
        set_(self, "default_root_dir", os.path.abspath(self.default_root_dir or os.getcwd()))
        for name in ("min_epochs", "min_steps"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
        for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
            value = getattr(self, name)
            if value is not None and not ((_is_int(value) and value >= 0)
                                          or (isinstance(value, float) and 0.0 <= value <= 1.0)):
                raise ValueError(f"{name} must be an int >= 0 (batches) or a float in [0, 1] (a fraction), got "
                                 f"{value!r}.")
        if not _is_int(self.num_sanity_val_steps) or self.num_sanity_val_steps < -1:
            raise ValueError(f"num_sanity_val_steps must be an int >= -1, got {self.num_sanity_val_steps!r}.")
        if self.deterministic not in (None, True, False, "warn"):
            raise ValueError(f"deterministic must be True, False, None or 'warn', got {self.deterministic!r}.")
        dev = self.fast_dev_run
        if not isinstance(dev, bool) and (not _is_int(dev) or dev < 0):
            raise ValueError(f"fast_dev_run must be a bool or an int >= 0, got {dev!r}.")
        if dev:
            n = 1 if dev is True else dev
            for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
                set_(self, name, n)
            set_(self, "max_steps", n)
            set_(self, "max_epochs", 1)
            set_(self, "max_epochs_defaulted", False)
            set_(self, "num_sanity_val_steps", 0)
            set_(self, "val_check_interval", None)
            set_(self, "logger", False)
            set_(self, "enable_checkpointing", False)
        callbacks = self.callbacks
        if callbacks is not None and not isinstance(callbacks, (list, tuple)):
            callbacks = [callbacks]
        from syncstep.callbacks.base import Callback

        for callback in callbacks or ():
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks=[...] takes syncstep.Callback objects, got {type(callback).__name__}. "
                                "Subclass syncstep.Callback (Lightning's hook names and arguments).")
        set_(self, "callbacks", list(callbacks or ()))
        set_(self, "compile", check_compile_option(self.compile))
        for name in ("flops_per_sample", "peak_flops_per_device"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name} must be a number > 0 (FLOPs), or None; got {value!r}.")

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.default_root_dir, "checkpoints")


def argument_names() -> list[str]:
    """The Trainer's arguments, in order."""
    return [f.name for f in dataclasses.fields(TrainerConfig) if f.init]


def unknown_arguments(unknown: dict) -> TypeError:
    """One error for every unknown argument, each with the name the user probably meant (or, for a
    Lightning argument syncstep lacks, that it is one and what to do instead)."""
    valid = argument_names()
    hints = []
    for name in unknown:
        if name in LIGHTNING_UNSUPPORTED:
            hints.append(f"{name!r} is a Lightning argument syncstep does not support; {LIGHTNING_UNSUPPORTED[name]}")
            continue
        guess = ALIASES.get(name) or next(iter(difflib.get_close_matches(name, valid, n=1, cutoff=0.75)), None)
        hints.append(f"unknown argument {name!r}" + (f"; did you mean {guess!r}?" if guess else ""))
    text = "; ".join(hints)
    return TypeError(f"Trainer(): {text}{'' if text.endswith('?') else '.'} Valid arguments: {', '.join(valid)}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
