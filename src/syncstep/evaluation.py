"""Evaluation (validation inside fit, ``validate()``, ``test()``): every sample counted exactly once.

Each replica evaluates its own shard (``data.EvalData``: samples r, r + W, ..., no padding), under
``torch.no_grad`` and the run's autocast; the epoch values are sample-weighted means over every rank.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from syncstep.data import EvalData
from syncstep.precision import autocast
from syncstep.progress import ProgressBar, format_metric


def evaluate(trainer: Any, loader: Any, stage: str) -> dict[str, float]:
    """Run ``validation_step`` (stage "validate") or ``test_step`` (stage "test") over ``loader``."""
    strategy, metrics = trainer.strategy, trainer.metrics
    logs = metrics.store
    model = strategy.runner.module
    data = EvalData(loader, strategy, trainer.config.use_distributed_sampler)
    was_training = model.training
    model.eval()
    logs.context.stage = stage
    saved_step = logs.step_entries[:]  # a validation inside an epoch must not eat the step's values
    bar = ProgressBar(trainer.config.enable_progress_bar and trainer.is_global_zero)
    bar.start("Validation" if stage == "validate" else "Test", data.num_steps)
    try:
        with torch.no_grad(), autocast(trainer.config.precision, strategy.root_device) or contextlib.nullcontext():
            for batch_idx, group in enumerate(data):
                strategy.evaluation_step(stage, [b for _, b in group], [c for c, _ in group], batch_idx)
                bar.update()
    finally:
        bar.close()
    values = metrics.epoch_values(strategy)
    logs.step_entries[:] = saved_step
    metrics.update(values)
    hook = model.on_validation_epoch_end if stage == "validate" else model.on_test_epoch_end
    hook()
    model.train(was_training)
    if (stage != "validate" or trainer.state.stage != "fit") and values:
        trainer.print(f"{stage}: " + "  ".join(f"{k}={format_metric(v)}" for k, v in values.items()))
    return values
