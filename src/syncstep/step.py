"""One optimizer step, after the micro-batches' backward: the only place ``global_step`` advances.

    skip the step on every rank if a loss was non-finite   (on_nonfinite_loss="skip")
    unscale (fp16) and clip the gradients                   (gradient_clip_val)
    optimizer.step() with each LR x the plan's multiplier   (scale x warmup [x AdaScale's gain]; the
                                                            user's LRs put back)
    update the gradient scaler, zero the gradients
    global_step += 1, then the step-interval schedulers     (adascale: once per unit of tau, adascale.py;
                                                            batch_ramp: once per step of the starting
                                                            global batch, batch_ramp.py)

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
                 gradient_clip_algorithm: str, guards: Any, state: Any, metric_values: dict[str, float],
                 hooks: Any = None, adascale: Any = None) -> None:
        self.optimizers, self.scheduler_configs = optimizers, scheduler_configs
        self.lr_plan, self.lr_names, self.scaler = lr_plan, lr_names, scaler
        self.clip_val, self.clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.guards, self.state = guards, state
        self.metric_values = metric_values  # what ReduceLROnPlateau watches
        self.params = unique_parameters(optimizers)
        self.hooks = hooks if hooks is not None and hooks.per_step else None  # on_before_optimizer_step, ...
        self.guarded = guards.skip or gradient_clip_val is not None or scaler is not None or self.hooks is not None
        self.multipliers: list[float] = [1.0] * len(optimizers)  # of the step last taken (for logging)
        self.ramping = True  # whether the multipliers may still change (warmup)
        self.adascale = adascale  # lr_scaling="adascale": the measured gain, and progress tau (adascale.py)
        self.noise: Any = None  # the noise-scale meter, whose state checkpoints keep (noise_scale.py)
        self.ramp: Any = None  # batch_ramp: warmup and step schedulers on its clock (batch_ramp.py)

    def lr_clock(self) -> int:
        """The step the warmup is at: optimizer steps, or with a batch ramp, steps of the starting batch."""
        return self.state.global_step if self.ramp is None else self.ramp.clock

    def multipliers_now(self, epoch: int) -> list[float]:
        """The LR multipliers of the next step (the plan's, x AdaScale's gain if on)."""
        multipliers = self.lr_plan.multipliers(self.lr_clock(), epoch)
        return multipliers if self.adascale is None else self.adascale.apply(multipliers)

    def for_epoch(self, epoch: int) -> Callable[[], None]:
        """The function the loop calls once per optimizer step of ``epoch``."""
        state, plan = self.state, self.lr_plan
        self.multipliers = plan.multipliers(self.lr_clock(), epoch)
        self.ramping = not plan.settled(self.lr_clock(), epoch)
        plain = (not self.guarded and len(self.optimizers) == 1 and not self.ramping and self.multipliers == [1.0]
                 and self.adascale is None and self.ramp is None
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
                if self.ramp is not None:  # (the clock counts the samples; the schedulers wait, as without it)
                    self.ramp.advance([], self.metric_values)
                return
            if scaler is not None and (self.clip_val is not None or self.hooks is not None):
                for opt in self.optimizers:  # clipping and Lightning's hooks see unscaled gradients
                    scaler.unscale_(opt)
            if self.hooks is not None:
                for opt in self.optimizers:
                    self.hooks.call("on_before_optimizer_step", opt)
            if self.clip_val is not None:
                if self.clip_algorithm == "norm":
                    torch.nn.utils.clip_grad_norm_(self.params, self.clip_val)
                else:
                    torch.nn.utils.clip_grad_value_(self.params, self.clip_val)
        if self.ramping:  # after warmup the multipliers stay put: no need to ask the plan every step
            clock = self.lr_clock()
            self.multipliers = self.lr_plan.multipliers(clock, epoch)
            self.ramping = not self.lr_plan.settled(clock, epoch)
        multipliers = self.multipliers if self.adascale is None else self.adascale.apply(self.multipliers)
        for opt, multiplier in zip(self.optimizers, multipliers):
            scaled_step(opt, multiplier, functools.partial(scaler.step, opt) if scaler is not None else opt.step)
        if scaler is not None:
            scaler.update()
        for opt in self.optimizers:
            if self.hooks is not None:
                self.hooks.call("on_before_zero_grad", opt)
            opt.zero_grad(set_to_none=True)
        state.global_step += 1
        if self.adascale is not None:
            self.adascale.advance(self.scheduler_configs, self.metric_values)
        elif self.ramp is not None:
            self.ramp.advance(self.scheduler_configs, self.metric_values)
        elif self.scheduler_configs:
            step_schedulers(self.scheduler_configs, "step", state.global_step, self.metric_values)

    def end_epoch(self, epoch: int) -> None:
        """The epoch-interval schedulers, once the epoch has really ended (adascale: they follow tau)."""
        if self.scheduler_configs and self.adascale is None:
            step_schedulers(self.scheduler_configs, "epoch", epoch + 1, self.metric_values)

    def lr_values(self) -> dict[str, float]:
        """The LR each optimizer applied (after scaling and warmup), under Lightning's names."""
        multipliers = self.multipliers if self.adascale is None else self.adascale.apply(self.multipliers)
        return lr_values(self.lr_names, self.optimizers, multipliers)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs of the step besides the optimizers (whose state the strategy gathers,
        as it may be sharded): the schedulers' and the scaler's states."""
        state = {"lr_schedulers": [c.scheduler.state_dict() for c in self.scheduler_configs],
                 "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
        if self.noise is not None:  # (every rank calls this: the meter gathers each rank's running sums)
            state["noise_scale"] = self.noise.state_dict()
        if self.adascale is not None:
            state["adascale"] = self.adascale.state_dict()
        if self.ramp is not None:
            state["batch_ramp"] = self.ramp.state_dict()
        return state

    def load_extra_state(self, checkpoint: dict[str, Any], rank: int) -> None:
        """The noise scale's sums and averages, AdaScale's tau and gain and the batch ramp's batch and
        clock, when the checkpoint has them."""
        if self.noise is not None and checkpoint.get("noise_scale"):
            self.noise.load_state_dict(checkpoint["noise_scale"], rank)
        if self.adascale is not None and checkpoint.get("adascale"):
            self.adascale.load_state_dict(checkpoint["adascale"])
        if self.ramp is not None and checkpoint.get("batch_ramp"):
            self.ramp.load_state_dict(checkpoint["batch_ramp"])
        elif self.ramp is not None:  # a run without a ramp so far: its steps were all at the starting batch
            state = self.state  # (an epoch begun keeps its batch; one not begun is the ramp's to decide)
            self.ramp.clock = state.global_step
            self.ramp.decided = state.current_epoch if state.epoch_sample else state.current_epoch - 1


def lr_values(names: list[str], optimizers: list, multipliers: list[float]) -> dict[str, float]:
    """``lr-<name>`` (``lr-<name>/pg<i>`` for several param groups): each group's LR x its multiplier."""
    values = {}
    for name, opt, multiplier in zip(names, optimizers, multipliers):
        lrs = effective_lrs(opt, multiplier)
        if len(lrs) == 1:
            values[f"lr-{name}"] = lrs[0]
        else:
            values.update({f"lr-{name}/pg{i + 1}": lr for i, lr in enumerate(lrs)})
    return values


class SyncstepOptimizer:
    """What ``self.optimizers()`` returns in manual optimization: the user's optimizer, whose ``step()``
    applies the LR plan (scale x warmup, counted in this optimizer's own steps), the gradient scaler and
    the ``on_before_optimizer_step`` / ``on_before_zero_grad`` hooks, and advances ``global_step``
    (Lightning's meaning: every optimizer step counts). Everything else is the optimizer's own."""

    def __init__(self, optimizer: torch.optim.Optimizer, index: int, manual: ManualOptimization) -> None:
        self.__dict__.update(_optimizer=optimizer, _index=index, _manual=manual, steps=0)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "steps":
            self.__dict__["steps"] = value
        else:
            setattr(self._optimizer, name, value)

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        return self._manual.optimizer_step(self, closure, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._manual.hooks.call("on_before_zero_grad", self._optimizer)
        self._optimizer.zero_grad(set_to_none=set_to_none)


class ManualOptimization:
    """``automatic_optimization = False``: the user's training_step calls ``manual_backward`` and
    ``opt.step()``; syncstep keeps the gradients exact (each micro-batch's loss weighted by its share of
    the step's samples, DDP's gradient sync only on the last micro-batch) and the LR plan applied."""

    def __init__(self, *, optimizers: list[torch.optim.Optimizer], lr_plan: Any, scaler: Any, strategy: Any,
                 guards: Any, hooks: Any, state: Any) -> None:
        self.lr_plan, self.scaler, self.strategy, self.guards = lr_plan, scaler, strategy, guards
        self.hooks, self.state = hooks, state
        self.optimizers = [SyncstepOptimizer(opt, i, self) for i, opt in enumerate(optimizers)]
        self.weight = 1.0  # of the micro-batch being run (set by the loop)
        self.epoch = 0

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.guards.losses.append((self.state.global_step, loss.detach()))
        self.hooks.call("on_before_backward", loss)
        self.strategy.prepare_for_manual_backward(loss)
        weighted = loss if self.weight == 1.0 else loss * self.weight
        (weighted if self.scaler is None else self.scaler.scale(weighted)).backward(*args, **kwargs)
        self.hooks.call("on_after_backward")

    def optimizer_step(self, wrapped: SyncstepOptimizer, closure: Callable[[], Any] | None, **kwargs: Any) -> Any:
        optimizer, scaler = wrapped.optimizer, self.scaler
        result = closure() if closure is not None else None
        if scaler is not None:
            scaler.unscale_(optimizer)
        self.hooks.call("on_before_optimizer_step", optimizer)
        multiplier = self.lr_plan.multipliers(wrapped.steps, self.epoch)[wrapped._index]
        scaled_step(optimizer, multiplier,
                    functools.partial(scaler.step, optimizer) if scaler is not None else optimizer.step)
        if scaler is not None:
            scaler.update()
        wrapped.steps += 1
        self.state.global_step += 1
        return result

    def lr_values(self, names: list[str]) -> dict[str, float]:
        """The LR of each optimizer's last step."""
        multipliers = [self.lr_plan.multipliers(max(w.steps - 1, 0), self.epoch)[w._index] for w in self.optimizers]
        return lr_values(names, [w.optimizer for w in self.optimizers], multipliers)

    def state_dict(self) -> dict[str, Any]:
        return {"manual_optimizer_steps": [w.steps for w in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for wrapped, steps in zip(self.optimizers, state.get("manual_optimizer_steps") or []):
            wrapped.steps = steps
