"""The user's model: a torch.nn.Module with Lightning's training hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from syncstep.hparams import HyperparametersMixin, load_from_checkpoint

if TYPE_CHECKING:
    from syncstep.trainer import Trainer


class Module(HyperparametersMixin, torch.nn.Module):
    """Write ``training_step``, ``configure_optimizers`` and, if you evaluate, ``validation_step``.

    As in Lightning:

    - ``training_step(batch, batch_idx)`` returns the loss (a scalar tensor, or a dict with "loss").
      It should be the mean over the batch (PyTorch's default reduction): syncstep weights each batch by
      its size so that uneven final batches still give the exact mean over the step's samples.
    - ``validation_step`` / ``test_step`` log what they measure with ``self.log``; logged epoch values
      are sample-weighted means over every sample of the dataset, across all processes.
    - ``configure_optimizers`` returns an optimizer, a list of them, ``([optimizers], [schedulers])``
      or ``{"optimizer": ..., "lr_scheduler": ...}``; a scheduler may be a dict with "scheduler",
      "interval" ("step" / "epoch"), "frequency" and "monitor".

    Lightning's other hooks (setup, on_train_start, on_train_batch_end, on_before_backward, ...) are
    here too, called in Lightning's order (docs/from-lightning.md); ``automatic_optimization = False``
    turns on manual optimization (``self.optimizers()``, ``self.manual_backward(loss)``).
    """

    automatic_optimization: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trainer: Trainer | None = None
        self._device = torch.device("cpu")

    # -- the hooks a user writes -------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | dict:
        raise NotImplementedError(
            f"{type(self).__name__} must define training_step(self, batch, batch_idx) returning the loss."
        )

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} got validation data but defines no validation_step(self, batch, batch_idx)."
        )

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} got test data but defines no test_step(self, batch, batch_idx)."
        )

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} must define configure_optimizers(self), returning e.g. "
            "torch.optim.SGD(self.parameters(), lr=0.1)."
        )

    def configure_model(self) -> None:
        """Build or shard layers here (Lightning's hook); by default nothing.

        Called on every rank at the start of every fit / validate / test, before the strategy moves
        and wraps the model: so make it idempotent (skip layers that exist already). Under
        ``strategy="fsdp"``, the modules you pass to ``torch.distributed.fsdp.fully_shard`` here are
        the sharding (syncstep then only adds the root); if you call nothing, ``auto_wrap_policy``
        decides. The optimizer is built afterwards (configure_optimizers), over what this made.
        """

    def train_dataloader(self) -> Any:
        return None

    def val_dataloader(self) -> Any:
        return None

    def test_dataloader(self) -> Any:
        return None

    def predict_dataloader(self) -> Any:
        return None

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """What ``trainer.predict`` returns for a batch: by default ``self(batch)`` (or ``self(x)`` for an
        ``(x, y)`` batch)."""
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            batch = batch[0]
        return self(batch)

    # Optional hooks, called on every rank (Lightning's names and arguments).
    def prepare_data(self) -> None: ...
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...
    def configure_callbacks(self) -> Any:
        return []
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any: ...
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_before_backward(self, loss: torch.Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer: Any) -> None: ...
    def on_before_zero_grad(self, optimizer: Any) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...

    # -- what the hooks can use -------------------------------------------------------------------
    def log(
        self,
        name: str,
        value: Any,
        *,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        prog_bar: bool = False,
        logger: bool = True,
        sync_dist: bool = False,
        batch_size: int | None = None,
    ) -> None:
        """Record a scalar. Defaults as in Lightning: per step in training, per epoch in evaluation.

        Epoch values are sample-weighted means over all processes. Step values are this process's
        (rank 0's in the logs) unless ``sync_dist=True``, which averages them over processes.
        ``batch_size`` overrides the weight, which is otherwise the number of samples in the batch.
        With no trainer attached (calling a step by hand), ``log`` does nothing.
        """
        trainer = self._trainer
        if trainer is not None:
            trainer._logs.log(name, value, on_step, on_epoch, prog_bar, logger, sync_dist, batch_size)

    def log_dict(self, values: dict[str, Any], **kwargs: Any) -> None:
        for name, value in values.items():
            self.log(name, value, **kwargs)

    # -- manual optimization (automatic_optimization = False) --------------------------------------
    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        """The optimizer(s) of configure_optimizers: one, or a list. In manual optimization their
        ``step()`` applies syncstep's LR plan and counts the step."""
        trainer = self.trainer
        manual = trainer._manual
        opts = manual.optimizers if use_pl_optimizer and manual is not None else trainer.optimizers
        return opts[0] if len(opts) == 1 else list(opts)

    def lr_schedulers(self) -> Any:
        """The scheduler(s) of configure_optimizers (None, one, or a list); in manual optimization you
        step them yourself, as in Lightning."""
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        return None if not schedulers else schedulers[0] if len(schedulers) == 1 else schedulers

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``loss.backward()`` as syncstep needs it: weighted for exact means over the step's samples,
        through the gradient scaler, with DDP's gradient sync prepared, and the backward hooks."""
        manual = self.trainer._manual
        if manual is None:
            raise RuntimeError("manual_backward() is for manual optimization: set self.automatic_optimization = "
                               "False in __init__ (with automatic optimization, return the loss instead).")
        manual.backward(loss, *args, **kwargs)

    def toggle_optimizer(self, optimizer: Any) -> None:
        """Only ``optimizer``'s parameters require grad until ``untoggle_optimizer`` (Lightning's GAN idiom)."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._toggled = {p: p.requires_grad for opt in self.trainer.optimizers for group in opt.param_groups
                         for p in group["params"] if id(p) not in mine}
        for p in self._toggled:
            p.requires_grad = False

    def untoggle_optimizer(self, optimizer: Any) -> None:
        for p, requires_grad in getattr(self, "_toggled", {}).items():
            p.requires_grad = requires_grad
        self._toggled = {}

    def clip_gradients(self, optimizer: Any, gradient_clip_val: float | None = None,
                       gradient_clip_algorithm: str | None = None) -> None:
        """Clip the gradients of ``optimizer``'s parameters (after unscaling, with fp16)."""
        if gradient_clip_val is None:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)
        manual = self.trainer._manual
        if manual is not None and manual.scaler is not None:
            manual.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if (gradient_clip_algorithm or "norm") == "norm":
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)

    # -- across ranks ---------------------------------------------------------------------------
    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Every rank's ``data`` (tensors, or dicts / lists of them), stacked along a new first dimension
        of size world size; in one process the data as it is (both as in Lightning)."""
        return self.trainer.strategy.all_gather(data)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, **kwargs: Any) -> Module:
        """A new ``cls`` built from the checkpoint's saved hyperparameters (``kwargs`` override them) with the
        checkpoint's weights. The file is loaded safely (weights_only)."""
        if hparams_file is not None:
            raise ValueError("load_from_checkpoint(hparams_file=...) is not supported: syncstep keeps the "
                             "hyperparameters inside the checkpoint; pass overrides as keywords.")
        return load_from_checkpoint(cls, checkpoint_path, map_location=map_location, strict=strict, **kwargs)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank 0 only."""
        if self.global_rank == 0:
            print(*args, **kwargs)

    @property
    def trainer(self) -> Trainer:
        if self._trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a syncstep.Trainer yet.")
        return self._trainer

    @property
    def device(self) -> torch.device:
        """The device this replica computes on (a DP replica reports its own GPU)."""
        return self._device

    @property
    def global_rank(self) -> int:
        return 0 if self._trainer is None else self._trainer.global_rank

    @property
    def local_rank(self) -> int:
        return 0 if self._trainer is None else self._trainer.local_rank

    @property
    def current_epoch(self) -> int:
        return 0 if self._trainer is None else self._trainer.current_epoch

    @property
    def global_step(self) -> int:
        return 0 if self._trainer is None else self._trainer.global_step

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Module:
        # Keep ``self.device`` right after .to() / .cuda(), as Lightning does.
        result = super()._apply(fn, *args, **kwargs)
        for tensor in self.parameters():
            self._device = tensor.device
            break
        else:
            for tensor in self.buffers():
                self._device = tensor.device
                break
        return result
