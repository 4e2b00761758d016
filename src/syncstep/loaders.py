"""The user's DataLoader: what syncstep reads from it (``inspect_loader``), and the same loader rebuilt
around syncstep's batch sampler with everything else the user chose kept (``rebuild_loader``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

_LOADER_SETTINGS = (
    "num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
    "generator", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order",
)


@dataclass(frozen=True)
class LoaderInfo:
    dataset: object
    batch_size: int
    shuffle: bool
    drop_last: bool
    custom_sampler: Sampler | None


def inspect_loader(loader: DataLoader, what: str) -> LoaderInfo:
    """Read what syncstep needs from a user's DataLoader, or explain why it cannot be sharded."""
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"the {what} must be a torch.utils.data.DataLoader, got {type(loader).__name__}. Wrap your "
            "dataset: DataLoader(dataset, batch_size=..., shuffle=...)."
        )
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            f"the {what} wraps an IterableDataset, which syncstep cannot split across replicas exactly. "
            "Use a map-style Dataset, or give each rank its own part of the stream (by trainer.global_rank, "
            "and torch.utils.data.get_worker_info() with num_workers > 0) and pass "
            "Trainer(use_distributed_sampler=False, max_steps=N): a stream without a length has no epochs."
        )
    batch_sampler = loader.batch_sampler
    if loader.batch_size is None or type(batch_sampler) is not BatchSampler:
        raise ValueError(
            f"the {what} uses a custom batch_sampler (or batch_size=None); syncstep builds the batches "
            "itself so that replicas split each step exactly. Pass batch_size= (and a sampler= if you "
            "need a custom order), or pass Trainer(use_distributed_sampler=False) to use your loader as is."
        )
    sampler = loader.sampler
    shuffle = isinstance(sampler, RandomSampler)
    if shuffle and (sampler.replacement or sampler._num_samples is not None):
        custom: Sampler | None = sampler
    else:
        custom = None if isinstance(sampler, (RandomSampler, SequentialSampler)) else sampler
    return LoaderInfo(loader.dataset, loader.batch_size, shuffle, loader.drop_last, custom)


def rebuild_loader(loader: DataLoader, batch_sampler: Sampler[list[int]], seed: int = 0) -> DataLoader:
    """A DataLoader like the user's (workers, collate, pinning, ...) but with our batch sampler.

    It gets a generator of its own: a DataLoader without one draws its workers' base seed from the
    global RNG each time it is iterated, which would make a resumed run's dropout masks differ.
    """
    settings = {name: getattr(loader, name) for name in _LOADER_SETTINGS if hasattr(loader, name)}
    if not settings.get("num_workers"):
        for name in ("prefetch_factor", "persistent_workers", "timeout", "worker_init_fn", "multiprocessing_context"):
            settings.pop(name, None)
    settings["generator"] = torch.Generator().manual_seed(seed)
    if settings.get("num_workers") and settings.get("worker_init_fn") is None \
            and os.environ.get("PL_SEED_WORKERS") == "1":
        from syncstep.rng import seed_worker

        settings["worker_init_fn"] = seed_worker
    return DataLoader(loader.dataset, batch_sampler=batch_sampler, **settings)


def sampler_order(sampler: Sampler, epoch: int) -> list[int]:
    """This epoch's indices from a user's own sampler (the trainer takes rank 0's, so all ranks agree)."""
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    return [int(i) for i in sampler]
