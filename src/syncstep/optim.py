"""What ``configure_optimizers`` returns (Lightning's forms), stepping the user's schedulers, and the
LR multiplier (scale x warmup) applied on top of them at optimizer-step time.

The multiplier never touches a scheduler: just before ``optimizer.step()`` each param group's LR is
multiplied, and just after it is put back. The user's scheduler keeps reading and writing its own,
unscaled LRs, so its state (and a checkpoint of it) is exactly what it would be without syncstep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

_SCHEDULER_KEYS = ("scheduler", "interval", "frequency", "monitor", "strict", "name")


@dataclass
class SchedulerConfig:
    scheduler: Any
    interval: str = "epoch"  # Lightning's default
    frequency: int = 1
    monitor: str | None = None
    strict: bool = True
    name: str | None = None


def _scheduler_config(item: Any, monitor: str | None = None) -> SchedulerConfig:
    if isinstance(item, dict):
        unknown = set(item) - set(_SCHEDULER_KEYS)
        if unknown or "scheduler" not in item:
            raise ValueError(
                f"a scheduler dict needs the key 'scheduler' and may have {_SCHEDULER_KEYS[1:]}; "
                f"got keys {sorted(item)}."
            )
        config = SchedulerConfig(**{"monitor": monitor, **item})
    else:
        config = SchedulerConfig(item, monitor=monitor)
    if config.interval not in ("step", "epoch"):
        raise ValueError(f"scheduler interval must be 'step' or 'epoch', got {config.interval!r}.")
    if not isinstance(config.frequency, int) or config.frequency < 1:
        raise ValueError(f"scheduler frequency must be an int >= 1, got {config.frequency!r}.")
    if isinstance(config.scheduler, ReduceLROnPlateau) and not config.monitor:
        raise ValueError(
            "ReduceLROnPlateau needs a metric to watch: return {'scheduler': scheduler, 'monitor': "
            "'val_loss'} (any name you self.log)."
        )
    if not hasattr(config.scheduler, "step"):
        raise TypeError(f"{type(config.scheduler).__name__} is not a learning-rate scheduler (it has no step()).")
    return config


def parse_optimizers(returned: Any) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    """Accept every form Lightning accepts from ``configure_optimizers``."""
    if isinstance(returned, Optimizer):
        return [returned], []
    if isinstance(returned, dict):
        return _from_dicts([returned])
    if isinstance(returned, (list, tuple)):
        items = list(returned)
        if len(items) == 2 and all(isinstance(x, (list, tuple)) for x in items):
            optimizers, schedulers = list(items[0]), [_scheduler_config(s) for s in items[1]]
            _check_optimizers(optimizers)
            return optimizers, schedulers
        if items and all(isinstance(x, dict) for x in items):
            return _from_dicts(items)
        if items and all(isinstance(x, Optimizer) for x in items):
            return items, []
    raise TypeError(
        "configure_optimizers must return an optimizer, a list of optimizers, ([optimizers], "
        "[schedulers]) or {'optimizer': ..., 'lr_scheduler': ...}; got "
        f"{type(returned).__name__}."
    )


def _from_dicts(items: list[dict]) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    optimizers, schedulers = [], []
    for item in items:
        if "optimizer" not in item:
            raise ValueError(f"the dict from configure_optimizers needs an 'optimizer' key; got {sorted(item)}.")
        optimizers.append(item["optimizer"])
        if item.get("lr_scheduler") is not None:
            schedulers.append(_scheduler_config(item["lr_scheduler"], item.get("monitor")))
    _check_optimizers(optimizers)
    return optimizers, schedulers


def _check_optimizers(optimizers: list) -> None:
    if not optimizers:
        raise ValueError("configure_optimizers returned no optimizer; syncstep needs one to train.")
    for opt in optimizers:
        if not isinstance(opt, Optimizer):
            raise TypeError(
                f"configure_optimizers returned {type(opt).__name__}, which is not a torch.optim.Optimizer."
            )


def step_schedulers(
    configs: list[SchedulerConfig], interval: str, count: int, metrics: dict[str, Any]
) -> None:
    """Step the schedulers of ``interval`` whose frequency divides ``count`` (steps or epochs done)."""
    for config in configs:
        if config.interval != interval or count % config.frequency:
            continue
        if isinstance(config.scheduler, ReduceLROnPlateau):
            value = metrics.get(config.monitor)
            if value is None:
                if config.strict:
                    raise ValueError(
                        f"ReduceLROnPlateau watches {config.monitor!r}, which was not logged by this point "
                        f"(logged: {sorted(metrics) or 'nothing'}). self.log it, or set 'strict': False."
                    )
                continue
            config.scheduler.step(float(value))
        else:
            config.scheduler.step()


def scaled_step(optimizer: Optimizer, multiplier: float, step: Callable[[], Any]) -> None:
    """Run ``step`` with every param group's LR multiplied by ``multiplier``, then put the LRs back."""
    if multiplier == 1.0:
        step()
        return
    groups = optimizer.param_groups
    lrs = [group["lr"] for group in groups]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr * multiplier
    try:
        step()
    finally:
        for group, lr in zip(groups, lrs):
            group["lr"] = lr


def effective_lrs(optimizer: Optimizer, multiplier: float) -> list[float]:
    return [float(group["lr"]) * multiplier for group in optimizer.param_groups]


def unique_parameters(optimizers: list[Optimizer]) -> list[torch.Tensor]:
    seen, params = set(), []
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def planned_steps(lr_plan: Any, steps_per_epoch: int, total_steps: int) -> Iterator[tuple[int, list, int, bool]]:
    """(epoch, LR multipliers, step schedulers' count after it, last step of its epoch) of every step."""
    per_epoch = max(steps_per_epoch, 1)
    for step in range(total_steps):
        epoch = step // per_epoch
        yield epoch, lr_plan.multipliers(step, epoch), step + 1, (step + 1) % per_epoch == 0


def simulate_lrs(optimizers: list[Optimizer], configs: list[SchedulerConfig], names: list[str],
                 params: list[torch.Tensor], steps: Iterable[tuple[int, list, int, bool]]) -> dict[str, list[float]]:
    """The effective LR (first param group) at every step of ``steps`` (``planned_steps``, or a batch ramp's),
    from copies of the optimizers and schedulers.

    The copies share the parameters (nothing big is copied) and leave the originals untouched.
    ReduceLROnPlateau depends on metrics not known in advance; it is taken as constant here.
    """
    import copy
    import warnings

    memo = {id(p): p for p in params}
    optimizers, configs = copy.deepcopy((optimizers, configs), memo)
    lrs: dict[str, list[float]] = {f"lr-{name}": [] for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        plain, count = [c for c in configs if not isinstance(c.scheduler, ReduceLROnPlateau)], 0
        for epoch, multipliers, count_after, epoch_ends in steps:
            for name, opt, multiplier in zip(names, optimizers, multipliers):
                lrs[f"lr-{name}"].append(float(opt.param_groups[0]["lr"]) * multiplier)
            for n in range(count + 1, count_after + 1):
                step_schedulers(plain, "step", n, {})
            count = count_after
            if epoch_ends:
                step_schedulers(plain, "epoch", epoch + 1, {})
    return lrs
