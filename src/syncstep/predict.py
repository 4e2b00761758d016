"""``trainer.predict``: every sample predicted once across ranks, returned in dataset order on every rank.

Each replica predicts its exact shard (samples r, r + W, ..., no padding duplicates, as in
evaluation). To return the predictions as one process would have them, every rank's outputs are
gathered (on the CPU), split per sample, put back in dataset order and batched again with the
loader's batch size. That needs ``predict_step`` to return a tensor, or dicts / lists / tuples of
tensors, whose first dimension is the batch; for other outputs, or outputs too large to gather, use
``return_predictions=False`` with a ``BasePredictionWriter`` callback, which gets each rank's
predictions and their dataset indices.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from syncstep.callbacks.prediction_writer import BasePredictionWriter
from syncstep.data import EvalData
from syncstep.precision import autocast
from syncstep.progress import ProgressBar
from syncstep.strategies.common import apply_to_tensors


def predict(trainer: Any, loaders: list[Any], return_predictions: bool) -> list[list[Any]] | None:
    """Predictions per loader (a list of batches each), or None without ``return_predictions``."""
    strategy, hooks, config = trainer.strategy, trainer.hooks, trainer.config
    model = strategy.runner.module
    writers = [c for c in hooks.callbacks if isinstance(c, BasePredictionWriter)]
    model.eval()
    trainer.metrics.store.context.stage = "predict"
    hooks.call("on_predict_start")
    hooks.call("on_predict_epoch_start")
    batch_start, batch_end = hooks.targets("on_predict_batch_start"), hooks.targets("on_predict_batch_end")
    results = []
    for dataloader_idx, loader in enumerate(loaders):
        data = EvalData(loader, strategy, config.use_distributed_sampler, config.limit_predict_batches)
        local: list[tuple[list[int] | None, Any]] = []
        bar = ProgressBar(trainer._bar_enabled())
        bar.start("Predicting", data.num_steps)
        no_grad = torch.inference_mode() if config.inference_mode else torch.no_grad()
        try:
            with no_grad, autocast(config.precision, strategy.root_device) or contextlib.nullcontext():
                for batch_idx, group in enumerate(data):
                    batches, indices = [b for _, b in group], data.batch_indices(batch_idx)
                    for hook in batch_start:
                        hook(batches[0] if len(batches) == 1 else batches, batch_idx, dataloader_idx)
                    outputs = strategy.evaluation_step("predict", batches, [c for c, _ in group], batch_idx)
                    for batch, output, idx in zip(batches, outputs, indices):
                        for writer in writers:
                            if writer.interval in ("batch", "batch_and_epoch"):
                                writer.write_on_batch_end(trainer, model, output, idx, batch, batch_idx, dataloader_idx)
                        for hook in batch_end:
                            hook(output, batch, batch_idx, dataloader_idx)
                        if return_predictions or writers:
                            local.append((idx, apply_to_tensors(output, lambda t: t.detach().cpu())))
                    bar.update()
        finally:
            bar.close()
        for writer in writers:
            if writer.interval in ("epoch", "batch_and_epoch"):
                writer.write_on_epoch_end(trainer, model, [[o for _, o in local]], [[i for i, _ in local]])
        if return_predictions:
            batch_size = getattr(loader, "batch_size", None)
            results.append(_in_dataset_order(strategy.all_gather_object(local), batch_size))
    hooks.call("on_predict_epoch_end")
    hooks.call("on_predict_end")
    if not return_predictions:
        return None
    return results


def _in_dataset_order(gathered: list[list[tuple[list[int] | None, Any]]], batch_size: int | None) -> list[Any]:
    """Every rank's (indices, output) batches -> batches in dataset order of ``batch_size`` samples."""
    pieces = [item for rank in gathered for item in rank]
    if any(indices is None for indices, _ in pieces):  # the user's own loader (use_distributed_sampler=False)
        return [output for rank in gathered for _, output in rank]
    samples: dict[int, Any] = {}
    for indices, output in pieces:
        for position, index in enumerate(indices):
            samples[index] = _sample(output, position, len(indices))
    ordered = [samples[i] for i in sorted(samples)]
    size = batch_size or len(ordered) or 1
    return [_collate(ordered[i:i + size]) for i in range(0, len(ordered), size)]


def _sample(output: Any, position: int, batch: int) -> Any:
    if isinstance(output, torch.Tensor):
        if output.ndim == 0 or output.shape[0] != batch:
            raise ValueError(
                f"predict_step returned a tensor of shape {tuple(output.shape)} for a batch of {batch} samples; to "
                "put the predictions back in dataset order across ranks, syncstep needs the batch as the first "
                "dimension. Return per-sample outputs, or pass return_predictions=False and write them with a "
                "syncstep.callbacks.BasePredictionWriter."
            )
        return output[position]
    if isinstance(output, dict):
        return {k: _sample(v, position, batch) for k, v in output.items()}
    if isinstance(output, (list, tuple)) and len(output) == batch and not any(
            isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch for v in output):
        return output[position]  # one entry per sample (e.g. strings)
    if isinstance(output, (list, tuple)):
        return type(output)(_sample(v, position, batch) for v in output)
    raise ValueError(
        f"predict_step returned a {type(output).__name__}, which syncstep cannot split into samples to put the "
        "predictions back in dataset order. Return tensors (or dicts / lists of them) with the batch as the first "
        "dimension, or pass return_predictions=False and use a syncstep.callbacks.BasePredictionWriter."
    )


def _collate(samples: list[Any]) -> Any:
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(samples)
    if isinstance(first, dict):
        return {k: _collate([s[k] for s in samples]) for k in first}
    if isinstance(first, (list, tuple)) and all(type(s) is type(first) and len(s) == len(first) for s in samples) \
            and any(isinstance(v, torch.Tensor) for v in first):
        return type(first)(_collate([s[i] for s in samples]) for i in range(len(first)))
    return list(samples)
