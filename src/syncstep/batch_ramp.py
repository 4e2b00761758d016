"""``batch_ramp``: grow the global batch at epoch boundaries, by the noise scale or by a schedule.

McCandlish et al. (2018) find the useful batch grows as training goes on: the gradient noise scale
B_simple rises as the loss falls, and a global batch well below it wastes steps (each one could have
averaged more samples for nearly the same per-sample progress). The ramp follows that:

    batch_ramp="noise"        at the start of every epoch after the first, the accumulation doubles if
                              the global batch G is below batch_ramp_factor x B_simple (the moving
                              average of noise_scale.py, measured during the epochs before); one
                              doubling per epoch, never above batch_ramp_max (default: the epoch's
                              samples)
    batch_ramp={epoch: G}     the global batch from that epoch on (each a multiple of per-device batch
                              x world size; the keys are epochs, 0 the configured start)

What follows a change, and why:

    layout         the epoch is cut into steps of the new G (data.py: the same permutation, so the
                   samples seen per epoch do not change; only how many share a step)
    LR             re-derived by the active rule at the new k = G / reference batch (linear: x 2 per
                   doubling) and printed in one line
    clock          warmup and the step-interval schedulers count steps of the starting global batch
                   G0 (samples / G0, each epoch's short last step counting as one, as it does in a run
                   without the ramp); a step of 4 x G0 advances them by 4. Epoch schedulers step once
                   per epoch as always; max_epochs therefore trains the same samples in fewer steps.
                   max_steps still counts optimizer steps.
    checkpoint     the current accumulation, the clock and the changes so far; a resume continues the
                   ramp where it was (bitwise at the same device count; on another one the global
                   batch is kept, so it must be divisible by per-device batch x the new world size)

Not with lr_scaling="adascale" (its progress tau already counts what a bigger batch is worth), manual
optimization or use_distributed_sampler=False (the ramp re-cuts the epoch's layout).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

from syncstep.optim import step_schedulers
from syncstep.plan import nearest_multiples, plan_lr


def check_argument(batch_ramp: Any, factor: Any, maximum: Any = None) -> Any:
    """``batch_ramp`` checked on its own (TrainerConfig); a schedule comes back as a sorted tuple of pairs."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"batch_ramp_factor must be a number > 0 (the c in G < c x B_simple), got {factor!r}.")
    if maximum is not None:
        if isinstance(maximum, bool) or not isinstance(maximum, int) or maximum < 1:
            raise ValueError(f"batch_ramp_max must be a global batch size (an int >= 1), got {maximum!r}.")
        if batch_ramp != "noise":
            raise ValueError("batch_ramp_max caps the noise ramp (batch_ramp='noise'); a schedule names its "
                             "batches itself.")
    if batch_ramp is None or batch_ramp == "noise":
        return batch_ramp
    if not isinstance(batch_ramp, dict) or not batch_ramp:
        raise ValueError(f"batch_ramp must be None, 'noise' or a dict {{epoch: global batch size}}, e.g. "
                         f"{{0: 32, 5: 64, 10: 128}}; got {batch_ramp!r}.")
    for epoch, size in batch_ramp.items():
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"batch_ramp's keys are epochs (ints >= 0); got {epoch!r}.")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_ramp[{epoch}] must be a global batch size (an int >= 1), got {size!r}.")
    return tuple(sorted(batch_ramp.items()))


class BatchRamp:
    """The ramp of one fit: decides each epoch's global batch, and keeps the clock in starting-batch steps."""

    def __init__(self, *, spec: Any, factor: float, maximum: int | None, batch: Any, num_samples: int, meter: Any,
                 state: Any, apply: Callable[..., str], print_fn: Callable[[str], None]) -> None:
        self.spec, self.factor, self.meter, self.state = spec, factor, meter, state
        self.apply, self.print = apply, print_fn  # apply(accumulation): re-cut, re-derive; returns the LR line
        self.unit = batch.per_device_batch_size * batch.world_size  # one micro-batch over all replicas
        self.start_batch = batch.global_batch_size  # G0: the clock's unit
        self.global_batch = batch.global_batch_size
        self.ceiling = min(num_samples, maximum or num_samples)  # the noise ramp's: the epoch, or batch_ramp_max
        self.clock = 0  # steps at the starting batch the run has made (warmup and step schedulers)
        self.decided = 0  # the last epoch whose batch is decided (epoch 0: the configured batch)
        self.changes: list[tuple[int, int]] = []  # (epoch, global batch) of every change
        self.step_samples = self.global_batch  # of the step being taken (the loop sets it)
        if isinstance(spec, tuple):
            for epoch, size in spec:
                self._check_size(size, f"batch_ramp[{epoch}]")
            if spec[0][0] == 0 and spec[0][1] != self.start_batch:
                raise ValueError(
                    f"batch_ramp[0]={spec[0][1]}, but the run starts at global batch {self.start_batch} (per-device "
                    f"batch {batch.per_device_batch_size} x world size {batch.world_size} x accumulation "
                    f"{batch.accumulate_grad_batches}). Set the start with global_batch_size={spec[0][1]}, or "
                    "drop the key 0.")

    def _check_size(self, size: int, what: str) -> None:
        if size % self.unit:
            raise ValueError(f"{what}={size} is not a multiple of per-device batch x world size = {self.unit}, so no "
                             f"whole number of accumulation steps gives it; nearest: "
                             f"{nearest_multiples(size, self.unit)}.")

    # -- at the start of an epoch (every rank, with the same numbers) -------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Decide ``epoch``'s global batch (once: a resumed epoch keeps the batch it was started with)."""
        if epoch <= self.decided:
            return
        self.decided = epoch
        target, why = self._target(epoch)
        if target == self.global_batch:
            return
        old = self.global_batch
        self.global_batch = target
        self.changes.append((epoch, target))
        lrs = self.apply(target // self.unit)
        self.print(f"syncstep: batch ramp, epoch {epoch}: global batch {old} -> {target} (accumulation "
                   f"{old // self.unit} -> {target // self.unit}; {why}); {lrs}")

    def _target(self, epoch: int) -> tuple[int, str]:
        if isinstance(self.spec, tuple):
            size = next((size for start, size in reversed(self.spec) if start <= epoch), self.global_batch)
            return size, "the schedule"
        grad_sq, trace = self.meter.current()
        if math.isnan(grad_sq):
            return self.global_batch, "no noise estimate yet"
        b_simple = trace / grad_sq if grad_sq > 0 else math.inf
        doubled = 2 * self.global_batch
        if self.global_batch < self.factor * b_simple and doubled <= self.ceiling:
            return doubled, f"B_simple {b_simple:.4g}: {self.global_batch} < {self.factor:g} x B_simple"
        return self.global_batch, "at the noise scale"

    # -- after every optimizer step -------------------------------------------------------------------
    def advance(self, scheduler_configs: list, metric_values: dict) -> None:
        """The clock: the starting-batch steps that the samples of this step are (the epoch's samples so
        far, in steps of G0, rounded up at its short end); the step schedulers once per step passed."""
        before, after = self.state.epoch_sample, self.state.epoch_sample + self.step_samples
        old = self.clock
        self.clock += -(-after // self.start_batch) - -(-before // self.start_batch)
        for count in range(old + 1, self.clock + 1):
            step_schedulers(scheduler_configs, "step", count, metric_values)

    def state_dict(self) -> dict[str, Any]:
        return {"global_batch": self.global_batch, "start_batch": self.start_batch, "clock": self.clock,
                "decided": self.decided, "changes": [list(c) for c in self.changes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock, self.decided = state["clock"], state["decided"]
        self.start_batch = state["start_batch"]
        self.changes = [tuple(c) for c in state["changes"]]
        if state["global_batch"] != self.global_batch:
            self._check_size(state["global_batch"], "the checkpoint's ramped global batch")
            old, self.global_batch = self.global_batch, state["global_batch"]
            lrs = self.apply(self.global_batch // self.unit, resumed=True)
            self.print(f"syncstep: batch ramp resumed at global batch {self.global_batch} (started at {old}); {lrs}")


def scheduled_steps(config: Any, plan: Any) -> Iterator[tuple[int, list, int, bool]]:
    """``Trainer.lr_schedule`` with a schedule ramp: (epoch, LR multipliers, step schedulers' count after it,
    last step of its epoch) of every step, each epoch cut at its batch, by the ramp's own decisions."""
    current = [plan.batch]

    def apply(accumulation: int, resumed: bool = False) -> str:
        current[0] = dataclasses.replace(plan.batch, accumulate_grad_batches=accumulation)
        return ""

    state = SimpleNamespace(epoch_sample=0)
    ramp = BatchRamp(spec=config.batch_ramp, factor=1.0, maximum=None, batch=plan.batch,
                     num_samples=plan.train.layout.num_samples, meter=None, state=state, apply=apply,
                     print_fn=lambda line: None)
    step = 0
    for epoch in range(config.max_epochs) if config.max_epochs is not None else itertools.count():
        ramp.start_epoch(epoch)
        batch = current[0]
        lr = plan_lr(plan.optimizers, config.lr_scaling, batch, plan.lr.warmup)
        layout = dataclasses.replace(plan.train.layout, accumulate_grad_batches=batch.accumulate_grad_batches)
        steps, state.epoch_sample = layout.num_steps(0), 0
        for i in range(steps):
            if 0 <= config.max_steps <= step:
                return
            multipliers = lr.multipliers(ramp.clock, epoch)
            ramp.step_samples = min(layout.global_batch_size, layout.num_samples - state.epoch_sample)
            ramp.advance([], {})
            state.epoch_sample += ramp.step_samples
            step += 1
            yield epoch, multipliers, ramp.clock, i == steps - 1


def summary_line(config: Any, plan: Any) -> str | None:
    """The start-up summary's line on the ramp (None without one)."""
    spec = config.batch_ramp
    if spec is None:
        return None
    if isinstance(spec, tuple):
        how = "global batch " + ", ".join(f"{size} from epoch {epoch}" for epoch, size in spec)
    else:
        most = f", up to {config.batch_ramp_max}" if config.batch_ramp_max else ""
        how = (f"noise: at each epoch's start the accumulation doubles while the global batch < "
               f"{config.batch_ramp_factor:g} x B_simple{most}")
    return (f"  batch ramp: {how}; LR re-derived at each change; warmup and step schedulers count steps of the "
            f"starting global batch {plan.batch.global_batch_size}")


def build(config: Any, strategy: Any, plan: Any, meter: Any, model: Any, state: Any,
          apply: Callable[..., str], print_fn: Callable[[str], None]) -> BatchRamp | None:
    """The ramp of a fit, or None; refuses what it cannot ramp, with the reason."""
    if config.batch_ramp is None:
        return None
    if config.lr_scaling == "adascale":
        raise ValueError("batch_ramp and lr_scaling='adascale' both decide what a bigger batch is worth (AdaScale "
                         "by its gain and progress tau); use one: lr_scaling='linear' / 'sqrt' with the ramp, or "
                         "AdaScale at a fixed batch.")
    if not model.automatic_optimization:
        raise ValueError("batch_ramp needs automatic optimization: with automatic_optimization = False your "
                         "training_step steps the optimizers and the accumulation is yours to change.")
    if not plan.train.distributed_sampler:
        raise ValueError("batch_ramp re-cuts each epoch into steps, which it cannot do with "
                         "use_distributed_sampler=False (your DataLoader decides the batches); drop one of them.")
    if config.batch_ramp == "noise" and meter is None:
        from syncstep.noise_scale import measurable

        _, _, _, why = measurable(strategy, plan.batch)
        raise ValueError(f"batch_ramp='noise' grows the batch by the measured gradient noise scale, which is not "
                         f"measurable with {why}; or give the ramp as a schedule, batch_ramp={{epoch: global batch}}.")
    return BatchRamp(spec=config.batch_ramp, factor=config.batch_ramp_factor, maximum=config.batch_ramp_max,
                     batch=plan.batch,
                     num_samples=plan.train.layout.num_samples, meter=meter, state=state, apply=apply,
                     print_fn=print_fn)
