"""One optimizer step, after the micro-batches' backward: the only place ``global_step`` advances.

    skip the step on every rank if a loss was non-finite   (on_nonfinite_loss="skip")
    unscale (fp16) and clip the gradients                   (gradient_clip_val)
    optimizer.step() with each LR x the plan's multiplier   (scale x warmup; the user's LRs put back)
    update the gradient scaler, zero the gradients
    global_step += 1, then the step-interval schedulers

When for a whole epoch a step is nothing but ``step()`` and ``zero_grad()`` (one optimizer, LR
multiplier 1, no clipping, scaler, skipping or step-interval scheduler), the loop gets a function that
does just that, as a hand-written loop would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from syncstep.optim import effective_lrs, scaled_step, step_schedulers, unique_parameters


class OptimizerStep:
    def __init__(self, *, optimizers: list[torch.optim.Optimizer], scheduler_configs: list, lr_plan: Any,
                 lr_names: list[str], scaler: torch.amp.GradScaler | None, gradient_clip_val: float | None,
                 gradient_clip_algorithm: str, guards: Any, state: Any, metric_values: dict[str, float]) -> None:
        self.optimizers, self.scheduler_configs = optimizers, scheduler_configs
        self.lr_plan, self.lr_names, self.scaler = lr_plan, lr_names, scaler
        self.clip_val, self.clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.guards, self.state = guards, state
        self.metric_values = metric_values  # what ReduceLROnPlateau watches
        self.params = unique_parameters(optimizers)
        self.guarded = guards.skip or gradient_clip_val is not None or scaler is not None
        self.multipliers: list[float] = [1.0] * len(optimizers)  # of the step last taken (for logging)
        self.ramping = True  # whether the multipliers may still change (warmup)

    def for_epoch(self, epoch: int) -> Callable[[], None]:
        """The function the loop calls once per optimizer step of ``epoch``."""
        state, plan = self.state, self.lr_plan
        self.multipliers = plan.multipliers(state.global_step, epoch)
        self.ramping = not plan.settled(state.global_step, epoch)
        plain = (not self.guarded and len(self.optimizers) == 1 and not self.ramping and self.multipliers == [1.0]
                 and not any(config.interval == "step" for config in self.scheduler_configs))
        if not plain:
            return functools.partial(self.step, epoch)
        step, zero_grad = self.optimizers[0].step, self.optimizers[0].zero_grad

        def plain_step() -> None:  # what a hand-written loop does, when that is all there is to do
            step()
            zero_grad(set_to_none=True)
            state.global_step += 1

        return plain_step

    def step(self, epoch: int) -> None:
        scaler, state = self.scaler, self.state
        if self.guarded:
            if self.guards.skip and self.guards.skip_step():
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                state.global_step += 1
                return
            if self.clip_val is not None:
                if scaler is not None:
                    for opt in self.optimizers:
                        scaler.unscale_(opt)
                if self.clip_algorithm == "norm":
                    torch.nn.utils.clip_grad_norm_(self.params, self.clip_val)
                else:
                    torch.nn.utils.clip_grad_value_(self.params, self.clip_val)
        if self.ramping:  # after warmup the multipliers stay put: no need to ask the plan every step
            self.multipliers = self.lr_plan.multipliers(state.global_step, epoch)
            self.ramping = not self.lr_plan.settled(state.global_step, epoch)
        for opt, multiplier in zip(self.optimizers, self.multipliers):
            scaled_step(opt, multiplier, functools.partial(scaler.step, opt) if scaler is not None else opt.step)
        if scaler is not None:
            scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        state.global_step += 1
        if self.scheduler_configs:
            step_schedulers(self.scheduler_configs, "step", state.global_step, self.metric_values)

    def end_epoch(self, epoch: int) -> None:
        """The epoch-interval schedulers, once the epoch has really ended."""
        if self.scheduler_configs:
            step_schedulers(self.scheduler_configs, "epoch", epoch + 1, self.metric_values)

    def lr_values(self) -> dict[str, float]:
        """The LR each optimizer applied (after scaling and warmup), under Lightning's names."""
        values = {}
        for name, opt, multiplier in zip(self.lr_names, self.optimizers, self.multipliers):
            lrs = effective_lrs(opt, multiplier)
            if len(lrs) == 1:
                values[f"lr-{name}"] = lrs[0]
            else:
                values.update({f"lr-{name}/pg{i + 1}": lr for i, lr in enumerate(lrs)})
        return values

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs of the step besides the optimizers (whose state the strategy gathers,
        as it may be sharded): the schedulers' and the scaler's states."""
        return {"lr_schedulers": [c.scheduler.state_dict() for c in self.scheduler_configs],
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
