"""``LearningRateMonitor``: log the learning rate each optimizer applies (Lightning's names).

syncstep already logs ``lr-<Optimizer>`` at every logging step: the LR actually applied, after the
scaling rule and warmup, not the one in the optimizer's param group (which stays the user's). This
callback adds what Lightning's also offers: logging once per epoch (``logging_interval="epoch"``), and
momentum and weight decay (``lr-SGD-momentum``, ``lr-SGD-weight_decay``).
"""

from __future__ import annotations

from typing import Any

from syncstep.callbacks.base import Callback


class LearningRateMonitor(Callback):
    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False,
                 log_weight_decay: bool = False) -> None:
        if logging_interval not in (None, "step", "epoch"):
            raise ValueError(f"LearningRateMonitor(logging_interval={logging_interval!r}): use None, 'step' or "
                             "'epoch'.")
        self.logging_interval = logging_interval
        self.log_momentum, self.log_weight_decay = log_momentum, log_weight_decay

    def _hook_wanted(self, name: str) -> bool:
        # Per step only for momentum / weight decay (the LR itself is logged by the trainer).
        return name != "on_train_batch_end" or (self.logging_interval != "epoch"
                                                and (self.log_momentum or self.log_weight_decay))

    def stats(self, trainer: Any, with_lr: bool) -> dict[str, float]:
        values = dict(trainer.applied_lrs()) if with_lr else {}
        for name, opt in zip(trainer._plan.lr_names, trainer.optimizers):
            groups = opt.param_groups
            for i, group in enumerate(groups):
                suffix = "" if len(groups) == 1 else f"/pg{i + 1}"
                if self.log_momentum:
                    momentum = group.get("betas", (group.get("momentum", 0.0),))[0]
                    values[f"lr-{name}{suffix}-momentum"] = float(momentum)
                if self.log_weight_decay:
                    values[f"lr-{name}{suffix}-weight_decay"] = float(group.get("weight_decay", 0.0))
        return values

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.logging_interval == "epoch":
            trainer._log_values(self.stats(trainer, with_lr=True))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            trainer._log_values(self.stats(trainer, with_lr=False))
