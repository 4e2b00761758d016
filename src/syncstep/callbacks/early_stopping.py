"""``EarlyStopping``: stop when a logged metric stops improving (Lightning's arguments and meaning).

It checks after each validation in fit (or at each training epoch's end when the fit does not
validate). The value it reads is rank 0's, broadcast, so every rank decides the same; it stops the
run with ``trainer.should_stop = True``, which every rank honours at the same step.
"""

from __future__ import annotations

import math
from typing import Any

from syncstep.callbacks.base import Callback


class EarlyStopping(Callback):
    def __init__(self, monitor: str, min_delta: float = 0.0, patience: int = 3, verbose: bool = False,
                 mode: str = "min", strict: bool = True, check_finite: bool = True,
                 stopping_threshold: float | None = None, divergence_threshold: float | None = None,
                 check_on_train_epoch_end: bool | None = None, log_rank_zero_only: bool = False) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping(mode={mode!r}): use 'min' or 'max'.")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping(patience={patience!r}) must be an int >= 0.")
        self.monitor, self.min_delta, self.patience = monitor, abs(float(min_delta)), patience
        self.verbose, self.mode, self.strict, self.check_finite = verbose, mode, strict, check_finite
        self.stopping_threshold, self.divergence_threshold = stopping_threshold, divergence_threshold
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stopping_reason_message: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def _checks_on_train_epoch_end(self, trainer: Any) -> bool:
        if self.check_on_train_epoch_end is not None:
            return self.check_on_train_epoch_end
        return not trainer._fit_validates

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._checks_on_train_epoch_end(trainer):
            self._check(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.stage == "fit" and not trainer.sanity_checking and not self._checks_on_train_epoch_end(trainer):
            self._check(trainer)

    def _improved(self, current: float) -> bool:
        if self.mode == "min":
            return current < self.best_score - self.min_delta
        return current > self.best_score + self.min_delta

    def _check(self, trainer: Any) -> None:
        metrics = trainer.callback_metrics
        value = float(metrics[self.monitor]) if self.monitor in metrics else None
        # Every rank takes rank 0's value, so every rank decides the same.
        current = trainer.strategy.broadcast_object(lambda: value)
        if current is None:
            if self.strict:
                raise KeyError(
                    f"EarlyStopping(monitor={self.monitor!r}) could not find {self.monitor!r} among the logged "
                    f"metrics: {sorted(metrics)}. Log it with self.log, or pass strict=False to skip the check."
                )
            return
        stop, reason = False, None
        if self.check_finite and not math.isfinite(current):
            stop, reason = True, f"Monitored metric {self.monitor} = {current} is not finite."
        elif self.stopping_threshold is not None and self._beyond(current, self.stopping_threshold):
            stop, reason = True, f"Stopping threshold reached: {self.monitor} = {current} (threshold " \
                                 f"{self.stopping_threshold})."
        elif self.divergence_threshold is not None and self._beyond(self.divergence_threshold, current):
            stop, reason = True, f"Divergence threshold reached: {self.monitor} = {current} (threshold " \
                                 f"{self.divergence_threshold})."
        elif self._improved(current):
            previous, self.best_score, self.wait_count = self.best_score, current, 0
            if self.verbose:
                trainer.print(f"Metric {self.monitor} improved: {previous:.3f} -> {current:.3f}.")
        else:
            self.wait_count += 1
            if self.wait_count >= self.patience:
                stop, reason = True, (f"Monitored metric {self.monitor} did not improve in the last "
                                      f"{self.wait_count} checks. Best score: {self.best_score:.3f}.")
        if stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
            trainer.should_stop = True
            # Said whatever verbose is: a run that ends early says why (never silently).
            trainer.print(f"syncstep: EarlyStopping at epoch {trainer.current_epoch}: {reason} Signaling "
                          "the trainer to stop.")

    def _beyond(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def state_dict(self) -> dict[str, Any]:
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch, "best_score": self.best_score,
                "patience": self.patience}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = state_dict["wait_count"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.best_score = state_dict["best_score"]
