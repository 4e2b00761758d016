"""The plan of a fit, derived once before any step: the optimizers, the data layout, the batch and LR
arithmetic (plan.py's pure functions, fed with what the model, loader, config and strategy say), and
the start-up summary and hyperparameters that report it. ``Trainer.lr_schedule`` uses it without any
process group."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from syncstep import batch_ramp, noise_scale
from syncstep.adascale import reference_steps
from syncstep.data import TrainData
from syncstep.module import Module
from syncstep.optim import SchedulerConfig, parse_optimizers
from syncstep.plan import (
    BatchPlan,
    LRPlan,
    double_clipping,
    optimizer_names,
    plan_batch,
    plan_lr,
    resolve_warmup,
    summary,
)


@dataclass(frozen=True)
class FitPlan:
    """Optimizers, the data layout and the batch / LR arithmetic, derived once, before any step."""

    optimizers: list
    scheduler_configs: list[SchedulerConfig]
    train: TrainData
    batch: BatchPlan
    lr: LRPlan
    lr_names: list[str]
    steps_per_epoch: int
    total_steps: int


def plan_fit(config: Any, strategy: Any, model: Module, loader: Any, broadcast_object: Any) -> FitPlan:
    """The plan of a fit of ``model`` on ``loader``; ``lr_schedule()`` uses it without any process group."""
    optimizers, scheduler_configs = parse_optimizers(model.configure_optimizers())
    check_optimizer_parameters(model, optimizers)
    train = TrainData(loader, config.seed, len(strategy.replicas), config.use_distributed_sampler, broadcast_object,
                      strategy.global_rank)
    batch = plan_batch(train.per_device_batch_size, strategy.world_size, config.accumulate_grad_batches,
                       config.global_batch_size, config.reference_batch_size)
    train.set_layout(batch, config.limit_train_batches, config.max_steps)
    steps_per_epoch = train.steps_per_epoch(0)
    total = steps_per_epoch * config.max_epochs if config.max_epochs is not None else config.max_steps
    total = min(total, config.max_steps) if config.max_steps >= 0 else total
    warmup = resolve_warmup(warmup_steps=config.warmup_steps, warmup_epochs=config.warmup_epochs,
                            interval=config.warmup_interval, kind=config.warmup_type,
                            start_factor=config.warmup_start_factor, steps_per_epoch=steps_per_epoch,
                            total_steps=total, batch=batch)
    lr = plan_lr(optimizers, config.lr_scaling, batch, warmup)
    clipped_twice = double_clipping(optimizers, config.gradient_clip_val)
    if clipped_twice:
        warnings.warn(clipped_twice, stacklevel=2)
    return FitPlan(optimizers, scheduler_configs, train, batch, lr, optimizer_names(optimizers), steps_per_epoch,
                   total)


def check_optimizer_parameters(model: Module, optimizers: list) -> None:
    """Every parameter an optimizer steps must be one of the model's, as the strategy left them."""
    own = {id(p) for p in model.parameters()}
    for i, opt in enumerate(optimizers):
        foreign = sum(id(p) not in own for group in opt.param_groups for p in group["params"])
        if foreign:
            raise ValueError(
                f"optimizer {i} ({type(opt).__name__}) holds {foreign} tensor(s) that are not parameters of the "
                "model. Build the optimizer inside configure_optimizers, from self.parameters(): the strategy "
                "sets the model up first, and strategy='fsdp' replaces every parameter with its shard, so an "
                "optimizer made earlier (in __init__, say) would step the old, unsharded tensors and train nothing."
            )


def plan_summary(config: Any, strategy: Any, plan: FitPlan) -> str:
    return summary(strategy=strategy.name, accelerator=strategy.root_device.type, devices=strategy.num_devices,
                   num_nodes=strategy.world_size // strategy.num_devices, batch=plan.batch, lr=plan.lr,
                   steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps,
                   requested_rule=config.lr_scaling, max_epochs=config.max_epochs,
                   adascale_target=reference_steps(config, plan) if config.lr_scaling == "adascale" else None,
                   extra=[*strategy.summary_lines(plan.optimizers),
                          *filter(None, [noise_scale.summary_line(config, strategy, plan.batch),
                                         batch_ramp.summary_line(config, plan)])])


def hyperparameters(config: Any, strategy: Any, plan: FitPlan) -> dict[str, Any]:
    """The run's settings, as the loggers' hyperparameters and a checkpoint's "world" section."""
    b, lr = plan.batch, plan.lr
    return {
        "strategy": strategy.name, "accelerator": strategy.root_device.type, "world_size": b.world_size,
        "num_nodes": strategy.world_size // strategy.num_devices, "per_device_batch_size": b.per_device_batch_size,
        "accumulate_grad_batches": b.accumulate_grad_batches, "global_batch_size": b.global_batch_size,
        "reference_batch_size": b.reference_batch_size, "lr_scaling": config.lr_scaling,
        "lr_factors": [o.factor for o in lr.optimizers], "precision": config.precision,
        "warmup_steps": lr.warmup.length, "warmup_interval": lr.warmup.interval,
        "batch_ramp": None if config.batch_ramp is None else str(config.batch_ramp),
    }
