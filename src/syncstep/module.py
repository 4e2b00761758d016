"""The user's model: a torch.nn.Module with Lightning's training hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from syncstep.trainer import Trainer


class Module(torch.nn.Module):
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
    """

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

    # Optional hooks, called on every rank.
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...

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
