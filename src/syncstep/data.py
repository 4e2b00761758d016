"""Which samples each replica sees: training steps and exact evaluation shards.

Training. One epoch is one permutation of the dataset, the same on every rank and independent of the
world size (seed + epoch). Optimizer step s takes the next G = b x W x A samples of it; micro-batch a
of that step takes the next b x W, and replica r takes every W-th of those, starting at r. So the
union of one step's batches over all replicas is exactly the batch a single device would see with
batch size G, whatever W is, and a run can resume at any sample offset on any world size.

A final step may hold fewer samples. Its batches are weighted by their real size (see ``loss_weight``)
so that the step's gradient is still the mean over the samples it has. If a replica has no sample in
the last micro-batch, it reruns the micro-batch's samples with weight 0, so that every process still
joins the gradient all-reduce (a DDP requirement) and nothing is counted twice.

Evaluation. Replica r takes samples r, r + W, r + 2W, ... with no padding, so every sample is counted
exactly once; the stock DistributedSampler pads with duplicates instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import (
    Sampler,
)

from syncstep.loaders import inspect_loader, rebuild_loader, sampler_order
from syncstep.plan import BatchPlan


def epoch_order(num_samples: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation: identical on every rank and at every world size."""
    if not shuffle:
        return list(range(num_samples))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


@dataclass(frozen=True)
class StepLayout:
    """How one epoch is cut into optimizer steps, micro-batches and replica batches."""

    num_samples: int  # in the epoch
    per_device_batch_size: int
    world_size: int
    accumulate_grad_batches: int
    drop_last: bool = False

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.world_size * self.accumulate_grad_batches

    def num_steps(self, start_sample: int = 0) -> int:
        remaining = max(self.num_samples - start_sample, 0)
        if self.drop_last:
            return remaining // self.global_batch_size
        return math.ceil(remaining / self.global_batch_size)

    def micro_batches(self, order: list[int], step: int, start_sample: int = 0) -> list[list[list[int]]]:
        """Indices of step ``step``: a list over micro-batches of a list over replicas (may be empty)."""
        g, chunk = self.global_batch_size, self.per_device_batch_size * self.world_size
        begin = start_sample + step * g
        samples = order[begin : min(begin + g, self.num_samples)]
        return [
            [samples[a : a + chunk][r :: self.world_size] for r in range(self.world_size)]
            for a in range(0, len(samples), chunk)
        ]


def loss_weight(count: int, step_samples: int, gradient_averaging: int) -> float:
    """Factor on a batch's mean loss so that the step's gradient is the mean over its samples.

    DDP averages gradients over ``gradient_averaging`` processes, so a batch of n samples out of N in the
    step gets weight n x P / N; for full batches this is 1 / accumulate_grad_batches, as usual.
    """
    return count * gradient_averaging / step_samples


class TrainBatchSampler(Sampler[list[int]]):
    """Yields this process's batches of one epoch in loop order: step, micro-batch, replica.

    ``set_epoch`` lays the epoch out once; the DataLoader iterates the batches and the trainer the same
    plan (with the sample counts), so both agree however far ahead the loader's workers prefetch.
    """

    def __init__(self, layout: StepLayout, replicas: list[int]):
        self.layout, self.replicas = layout, replicas
        self.full_steps = 0  # leading steps in which every replica gets a whole batch
        self.tail: list[tuple[int, list[list[tuple[int, list[int]]]]]] = []  # the rest (at most one step)
        self.batches: list[list[int]] = []

    def set_epoch(self, order: list[int], start_sample: int = 0) -> None:
        """Lay out the epoch: ``full_steps`` whole steps, then ``tail``, per step (samples in the step on all
        replicas, per micro-batch a list over our replicas of (real sample count, indices to load)).

        A replica with no sample gets the micro-batch's samples with count 0 (see the module docstring).
        DP drops such replicas itself; DDP must run them. Whole steps are cut with one slice per batch
        (this runs once per epoch, over every sample).
        """
        layout, replicas = self.layout, self.replicas
        world, g = layout.world_size, layout.global_batch_size
        chunk = layout.per_device_batch_size * world
        num_steps = layout.num_steps(start_sample)
        self.full_steps = max(0, min(num_steps, (layout.num_samples - start_sample) // g))
        end = start_sample + self.full_steps * g
        self.batches = [order[begin + r : begin + chunk : world]
                        for begin in range(start_sample, end, chunk) for r in replicas]
        self.tail = []
        for step in range(self.full_steps, num_steps):
            micro, step_samples = [], 0
            for shards in layout.micro_batches(order, step, start_sample):
                everything = None if all(shards) else [i for shard in shards for i in shard]
                micro.append([(len(shards[r]), shards[r] or everything) for r in replicas])
                step_samples += sum(len(shard) for shard in shards)
            self.tail.append((step_samples, micro))
            self.batches += [indices for replica_batches in micro for _, indices in replica_batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


class EvalBatchSampler(Sampler[list[int]]):
    """Replica r's batches of samples r, r + W, ...: every sample once, no padding."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int, replica: int):
        self.indices = list(range(replica, num_samples, world_size))
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i : i + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)


# ---------------------------------------------------------------------------------------------------
# What the trainer iterates: per optimizer step the micro-batches, each with (count, batch) per replica.


class TrainData:
    """The training loader rebuilt around our batch sampler, and the per-step plan that goes with it."""

    def __init__(self, loader: Any, seed: int | None, replicas_per_process: int, distributed_sampler: bool,
                 broadcast_object: Callable[[Callable[[], Any]], Any], rank: int = 0) -> None:
        """``broadcast_object(make)`` runs ``make`` on rank 0 and gives its result to every rank (the
        strategy's; in one process simply ``make()``). An empty training set, or one whose length differs
        from rank 0's, is refused here, before any step (a rank with more samples would wait for ever in
        a collective the others never join); the length travels with the seed, so it costs nothing."""
        self.loader, self.distributed_sampler = loader, distributed_sampler
        self.broadcast_object = broadcast_object
        self.replicas_per_process = replicas_per_process
        if distributed_sampler:
            info = inspect_loader(loader, "train_dataloaders")
            self.info = info
            self.per_device_batch_size = info.batch_size
            self.num_samples = len(info.custom_sampler) if info.custom_sampler is not None else len(info.dataset)
        else:
            self.info = None
            self.per_device_batch_size = loader.batch_size
            if not isinstance(self.per_device_batch_size, int):
                raise ValueError("with use_distributed_sampler=False, the DataLoader needs an int batch_size.")
            self.num_samples = 0  # unknown: the loader decides
        # None: a stream without a length (an IterableDataset), trained for max_steps (set_layout)
        self.loader_batches = _length(loader) if not distributed_sampler else None
        if (self.num_samples if distributed_sampler else self.loader_batches) == 0:
            raise ValueError(
                "the training set is empty (its DataLoader yields no batch), so there is nothing to train on; "
                "check how the dataset is built (a wrong path or filter often gives 0 samples)."
            )
        # Rank 0's seed, so that every rank shuffles the same way (0 unless Trainer(seed=...)), and its length.
        self.shuffle_seed, samples = broadcast_object(lambda: (seed if seed is not None else 0, self.num_samples))
        if samples != self.num_samples:
            raise ValueError(
                f"the training set has {self.num_samples} samples on rank {rank} but {samples} on rank 0; every "
                "rank must build the same dataset (syncstep splits it between them). Look for rank-dependent "
                "code or data (a download or cache still being written, a per-rank file)."
            )
        self.layout: StepLayout | None = None
        self.sampler: TrainBatchSampler | None = None
        self.replicas: list[int] = []
        self.built: Any = None

    def set_layout(self, batch: BatchPlan, limit: int | float | None = None, max_steps: int = -1) -> None:
        """Cut epochs into steps for ``batch``; ``limit`` (limit_train_batches) trains each epoch on the
        leading samples of its permutation only. A stream without a length is one epoch of ``max_steps``."""
        if not self.distributed_sampler and self.loader_batches is None:
            if max_steps < 0:
                raise ValueError(
                    "the training DataLoader has no length (an IterableDataset without __len__), so an epoch "
                    "has no end: pass Trainer(max_steps=N), and give every rank a stream of at least N x "
                    "accumulate_grad_batches batches (each rank iterates its own loader)."
                )
            self.loader_batches = max_steps * self.replicas_per_process * batch.accumulate_grad_batches
        drop_last = self.info.drop_last if self.info else False
        samples = limit_samples(self.num_samples, batch.per_device_batch_size, batch.world_size, limit)
        self.layout = StepLayout(samples, batch.per_device_batch_size, batch.world_size,
                                 batch.accumulate_grad_batches, drop_last)

    def set_accumulation(self, batch: BatchPlan, limit: int | float | None, max_steps: int) -> None:
        """A batch ramp's new accumulation: the next epochs are cut into steps of ``batch``."""
        self.set_layout(batch, limit, max_steps)
        if self.sampler is not None:
            self.sampler.layout = self.layout

    def set_replicas(self, replicas: list[int], gradient_averaging: int) -> None:
        self.replicas, self.gradient_averaging = replicas, gradient_averaging
        if self.distributed_sampler:
            self.sampler = TrainBatchSampler(self.layout, replicas)
            self.built = rebuild_loader(self.loader, self.sampler)

    def steps_per_epoch(self, start_sample: int) -> int:
        if not self.distributed_sampler:
            return math.ceil(self.loader_batches / (self.replicas_per_process * self.layout.accumulate_grad_batches))
        return self.layout.num_steps(start_sample)

    def _order(self, epoch: int) -> list[int]:
        info = self.info
        if info.custom_sampler is not None:
            return self.broadcast_object(lambda: sampler_order(info.custom_sampler, epoch))
        return epoch_order(self.num_samples, info.shuffle, self.shuffle_seed, epoch)

    def start_epoch(self, epoch: int, start_sample: int) -> tuple[list, Iterator]:
        """The epoch's plan and an iterator over this process's batches, in the order the plan uses them.

        The plan is a list over optimizer steps of (samples in the step, micro-batches), a micro-batch
        being (sample counts, loss weights, is_last), one count and weight per replica this process feeds.
        """
        if not self.distributed_sampler:
            return self._plan_as_is(), iter(self.loader)
        self.sampler.set_epoch(self._order(epoch), start_sample)
        self.built.generator.manual_seed(self.shuffle_seed + epoch)  # workers' seeds: per epoch, resumable
        layout, sampler = self.layout, self.sampler
        # Whole steps all look alike: one shared entry, so the plan costs nothing per step.
        counts = (layout.per_device_batch_size,) * len(self.replicas)
        whole = [(counts, tuple(loss_weight(c, layout.global_batch_size, self.gradient_averaging) for c in counts),
                  a == layout.accumulate_grad_batches - 1) for a in range(layout.accumulate_grad_batches)]
        plan = [(layout.global_batch_size, whole)] * sampler.full_steps
        for step_samples, step in sampler.tail:
            last = len(step) - 1
            micro = []
            for a, replicas in enumerate(step):
                counts = tuple(count for count, _ in replicas)
                weights = tuple(loss_weight(c, step_samples, self.gradient_averaging) for c in counts)
                micro.append((counts, weights, a == last))
            plan.append((step_samples, micro))
        return plan, iter(self.built)

    def _plan_as_is(self) -> list:
        """use_distributed_sampler=False: the user's loader as it is, full-batch weights (1 / A)."""
        per_micro, accumulation = self.replicas_per_process, self.layout.accumulate_grad_batches
        b, nominal = self.per_device_batch_size, self.layout.global_batch_size
        batches, plan = self.loader_batches, []
        while batches > 0:
            micro = []
            for _ in range(accumulation):
                n = min(per_micro, batches)
                if n == 0:
                    break
                batches -= n
                counts = (b,) * n
                micro.append((counts, tuple(loss_weight(c, nominal, self.gradient_averaging) for c in counts), False))
            micro[-1] = micro[-1][:2] + (True,)
            plan.append((nominal, micro))
        return plan


def _length(loader: Any) -> int | None:
    """len(loader), or None for a loader over a stream that has no length."""
    try:
        return len(loader)
    except TypeError:
        return None


def limit_samples(num_samples: int, batch_size: int, world_size: int, limit: int | float | None) -> int:
    """How many leading samples a ``limit_*_batches`` leaves: N batches per replica (int), or that fraction
    of each replica's batches (float), as Lightning counts them; None: all."""
    if limit is None:
        return num_samples
    per_step = batch_size * world_size
    batches = limit if isinstance(limit, int) else int(math.ceil(num_samples / per_step) * limit)
    return min(num_samples, batches * per_step)


class EvalData:
    """Exact evaluation batches: per step, (sample count, batch) for each replica this process feeds.

    ``limit`` (``limit_val_batches`` and the like) keeps the leading samples of the dataset, so that
    each replica evaluates at most that many batches and the samples are still counted once.

    Where a forward is a collective (fsdp gathers parameters in it), every rank runs the same number
    of steps: a rank whose shard has run out reruns its last batch with count 0, which the logged
    values weigh as nothing (as a training step's weight-0 batch).
    """

    def __init__(self, loader: Any, strategy: Any, distributed_sampler: bool, limit: int | float | None = None) -> None:
        self.replicas = strategy.replicas
        self.lockstep = strategy.forward_is_collective
        self.loader = loader
        if not distributed_sampler:
            self.samplers = None
            self.num_steps = limit_samples(len(loader), 1, 1, limit)  # batches of the loader as it is
        else:
            info = inspect_loader(loader, "evaluation dataloader")
            if info.custom_sampler is not None:
                raise ValueError("evaluation loaders must not use a custom sampler: every sample is evaluated once.")
            n = limit_samples(len(info.dataset), info.batch_size, strategy.world_size, limit)
            self.samplers = [EvalBatchSampler(n, info.batch_size, strategy.world_size, r) for r in self.replicas]
            self.loaders = [rebuild_loader(loader, s) for s in self.samplers]
            self.num_steps = max(len(s) for s in self.samplers)
        if self.lockstep:
            self.num_steps = max(strategy.all_gather_object(self.num_steps))

    def batch_indices(self, step: int) -> list[list[int] | None]:
        """The dataset indices of each of this process's replicas' batch at ``step`` (None: not known)."""
        if self.samplers is None:
            return [None for _ in self.replicas]
        return [s.indices[step * s.batch_size:(step + 1) * s.batch_size] for s in self.samplers
                if step * s.batch_size < len(s.indices)]

    def __iter__(self) -> Iterator[list[tuple[int, Any]]]:
        if not self.lockstep:
            yield from self._own_steps()
            return
        steps, last = self._own_steps(), None
        for _ in range(self.num_steps):
            group = next(steps, None)
            if group:
                last = group
                yield group
            else:  # this rank's shard is done (or empty): a batch of weight 0 joins the others' forward
                last = last or [(0, next(iter(self.loader)))]
                yield [(0, batch) for _, batch in last]

    def _own_steps(self) -> Iterator[list[tuple[int, Any]]]:
        if self.samplers is None:
            batches = iter(self.loader)
            for _ in range(self.num_steps):
                group = [b for _, b in zip(self.replicas, batches)]
                if not group:
                    return
                yield [(_batch_size(b), b) for b in group]
            return
        iterators = [iter(loader) for loader in self.loaders]
        sizes = [[len(b) for b in sampler] for sampler in self.samplers]
        for i in range(self.num_steps):
            group = [(sizes[r][i], next(iterators[r])) for r in range(len(iterators)) if i < len(sizes[r])]
            yield group


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 1
