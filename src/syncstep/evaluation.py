"""Evaluation (validation inside fit, ``validate()``, ``test()``): every sample counted exactly once.

Each replica evaluates its own shard (``data.EvalData``: samples r, r + W, ..., no padding), under
``torch.inference_mode`` (or ``no_grad``) and the run's autocast; the epoch values are sample-weighted
means over every rank. Hooks, in Lightning's order: on_{stage}_start, on_{stage}_epoch_start, per
batch on_{stage}_batch_start / _end (only if someone defines them), on_{stage}_epoch_end (values it
logs are reduced too), on_{stage}_end.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from syncstep.data import EvalData
from syncstep.precision import autocast
from syncstep.progress import ProgressBar, format_metric

_NAMES = {"validate": "validation", "test": "test"}


def evaluate(trainer: Any, loader: Any, stage: str, *, limit: int | float | None = None,
             sanity: bool = False) -> dict[str, float]:
    """Run ``validation_step`` (stage "validate") or ``test_step`` (stage "test") over ``loader``.

    ``sanity``: the sanity check before fit: nothing it logs is kept.
    """
    strategy, metrics, hooks, config = trainer.strategy, trainer.metrics, trainer.hooks, trainer.config
    logs = metrics.store
    model = strategy.runner.module
    name = _NAMES[stage]
    if limit is None:
        limit = config.limit_val_batches if stage == "validate" else config.limit_test_batches
    data = EvalData(loader, strategy, config.use_distributed_sampler, limit)
    was_training = model.training
    model.eval()
    saved_step = logs.step_entries[:]  # a validation inside an epoch must not eat the step's values
    saved_values = dict(metrics.values) if sanity else None
    hooks.call(f"on_{name}_start")
    logs.context.stage = stage
    hooks.call(f"on_{name}_epoch_start")
    batch_start, batch_end = hooks.targets(f"on_{name}_batch_start"), hooks.targets(f"on_{name}_batch_end")
    bar = ProgressBar(trainer._bar_enabled() and not sanity)
    bar.start("Validation" if stage == "validate" else "Test", data.num_steps)
    no_grad = torch.inference_mode() if config.inference_mode else torch.no_grad()
    try:
        with no_grad, autocast(config.precision, strategy.root_device) or contextlib.nullcontext():
            for batch_idx, group in enumerate(data):
                batches = [b for _, b in group]
                for hook in batch_start:
                    hook(batches[0] if len(batches) == 1 else batches, batch_idx)
                outputs = strategy.evaluation_step(stage, batches, [c for c, _ in group], batch_idx)
                for hook in batch_end:
                    hook(outputs[0] if len(outputs) == 1 else outputs, batches[0] if len(batches) == 1 else batches,
                         batch_idx)
                bar.update()
    finally:
        bar.close()
    values = metrics.epoch_values(strategy)
    metrics.update(values)
    logs.context.stage, logs.context.count = f"{stage}_epoch_end", 1
    hooks.call(f"on_{name}_epoch_end")
    more = metrics.epoch_values(strategy)  # what on_{stage}_epoch_end logged
    metrics.update(more)
    values.update(more)
    logs.step_entries[:] = saved_step
    hooks.call(f"on_{name}_end")
    model.train(was_training)
    if sanity:
        metrics.replace(saved_values)
        return {}
    if (stage != "validate" or trainer.state.stage != "fit") and values:
        trainer.print(f"{stage}: " + "  ".join(f"{k}={format_metric(v)}" for k, v in values.items()))
    return values
