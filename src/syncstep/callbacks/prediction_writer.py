"""``BasePredictionWriter``: write predictions per rank as they come, for outputs too large to gather."""

from __future__ import annotations

from typing import Any

from syncstep.callbacks.base import Callback


class BasePredictionWriter(Callback):
    """Subclass and implement ``write_on_batch_end`` and/or ``write_on_epoch_end`` (Lightning's names).

    ``batch_indices`` are the dataset indices of the samples each rank predicted: with syncstep's exact
    sharding every sample is predicted once, on one rank, with no padding duplicates.
    """

    def __init__(self, write_interval: str = "batch") -> None:
        if write_interval not in ("batch", "epoch", "batch_and_epoch"):
            raise ValueError(f"write_interval={write_interval!r}: use 'batch', 'epoch' or 'batch_and_epoch'.")
        self.interval = write_interval

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Any, batch_indices: list[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement write_on_batch_end for write_interval="
                                  f"{self.interval!r}.")

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: list[Any],
                           batch_indices: list[Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement write_on_epoch_end for write_interval="
                                  f"{self.interval!r}.")
