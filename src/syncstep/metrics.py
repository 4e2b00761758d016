"""Logged values: collection (also from DP replica threads), reduction across ranks, and where they go.

A value logged with ``self.log`` is stored with a weight, the number of samples in the batch that
produced it. A step value is the weighted mean over what this process computed in the optimizer step
(every micro-batch, every DP replica). An epoch value is the weighted mean over every sample of the
epoch on every rank: per name, one all-reduce of (sum of value x weight, sum of weight).

Storing is cheap on the hot path (a list append); tensors are only turned into floats on logging steps
and at epoch ends, so logging does not add a device sync per step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

# Flush a name's epoch entries into a running (sum, weight) pair once this many have piled up.
_FOLD_EVERY = 2048


class _BatchContext(threading.local):
    """Per thread (DP replicas run in threads): the stage and the weight of the batch being run."""

    stage: str | None = None
    count: int = 1


def _scalar(name: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"self.log({name!r}, ...) got a tensor of shape {tuple(value.shape)}; log a scalar, "
                "e.g. its .mean()."
            )
        return value.detach()
    if isinstance(value, (int, float, bool)):
        return float(value)
    raise TypeError(f"self.log({name!r}, ...) takes a number or a one-element tensor, got {type(value).__name__}.")


def _is_metric(value: Any) -> bool:
    """A torchmetrics Metric (recognised without importing torchmetrics)."""
    return all(hasattr(value, name) for name in ("compute", "update", "reset")) and isinstance(value, torch.nn.Module)


def _weighted_sums(entries: list[tuple[Any, float]], device: torch.device) -> torch.Tensor:
    """(sum of value x weight, sum of weight) in float64 on ``device``."""
    values = torch.stack([torch.as_tensor(v).detach().to(device, torch.float64).reshape(()) for v, _ in entries])
    weights = torch.tensor([float(w) for _, w in entries], dtype=torch.float64, device=device)
    # A weight-0 entry (a padding batch) may hold anything; it must not turn the sum into NaN.
    values = torch.where(weights > 0, values, torch.zeros_like(values))
    return torch.stack([(values * weights).sum(), weights.sum()])


class LogStore:
    """What ``Module.log`` writes into; the trainer reads step and epoch values out of it."""

    def __init__(self) -> None:
        self.context = _BatchContext()
        self.step_entries: list[tuple[str, Any, float]] = []
        self.epoch_entries: dict[str, list[tuple[Any, float]]] = {}
        self.epoch_folded: dict[str, torch.Tensor] = {}
        self.metric_objects: dict[str, Any] = {}  # torchmetrics Metrics logged for the epoch: computed at its end
        self.forked: dict[str, str] = {}  # name_step / name_epoch -> name (callback_metrics has the plain name)
        self.prog_bar: set[str] = set()
        self.hidden: set[str] = set()  # logger=False
        self.sync_dist: set[str] = set()

    def log(self, name, value, on_step, on_epoch, prog_bar, logger, sync_dist, batch_size) -> None:
        # Called on every step: the common case, a one-element tensor logged per step in training, takes
        # the fewest branches (docs/benchmarks.md has what a step of a tiny model costs).
        context = self.context
        if on_step is None or on_epoch is None:
            training = context.stage == "train"
            if on_step is None:
                on_step = training
            if on_epoch is None:
                on_epoch = not training
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            if _is_metric(value):
                self._log_metric(name, value, on_step, on_epoch, prog_bar, logger)
                return
            value = _scalar(name, value)
        # A batch of count 0 is one a rank reruns only to join the others' collectives: it weighs nothing,
        # whatever batch_size says.
        weight = context.count if batch_size is None or not context.count else batch_size
        # A step value lives until the next step begins, read (.item()) only on logging steps: it is kept
        # as it is. An epoch value is kept all epoch: detached, so that it holds no autograd graph.
        if on_step and not on_epoch:
            self.step_entries.append((name, value, weight))
            step_name = epoch_name = name
        elif not on_step:
            if not on_epoch:
                return
            step_name = epoch_name = name
            self._add_epoch_entry(name, value, weight)
        else:
            step_name, epoch_name = f"{name}_step", f"{name}_epoch"
            self.step_entries.append((step_name, value, weight))
            self._add_epoch_entry(epoch_name, value, weight)
            if step_name not in self.forked:
                self.forked.update({step_name: name, epoch_name: name})
        if prog_bar and step_name not in self.prog_bar:
            self.prog_bar.update((step_name, epoch_name))
        if not logger:
            self.hidden.update((step_name, epoch_name))
        if sync_dist:
            self.sync_dist.add(step_name)

    def _log_metric(self, name: str, metric: Any, on_step: bool, on_epoch: bool, prog_bar: bool,
                    logger: bool) -> None:
        """A torchmetrics ``Metric``: its last forward value per step, ``compute()`` at the epoch's end
        (torchmetrics syncs its state over the ranks itself), then ``reset()`` (Lightning's handling)."""
        step_name, epoch_name = (f"{name}_step", f"{name}_epoch") if on_step and on_epoch else (name, name)
        if on_step:
            cache = getattr(metric, "_forward_cache", None)
            if isinstance(cache, torch.Tensor) and cache.numel() == 1:
                self.step_entries.append((step_name, cache.detach(), self.context.count))
        if on_epoch:
            self.metric_objects[epoch_name] = metric
        if on_step and on_epoch:
            self.forked.update({step_name: name, epoch_name: name})
        if prog_bar:
            self.prog_bar.update((step_name, epoch_name))
        if not logger:
            self.hidden.update((step_name, epoch_name))

    def _add_epoch_entry(self, name: str, value: Any, weight: float) -> None:
        entries = self.epoch_entries.setdefault(name, [])
        entries.append((value.detach() if isinstance(value, torch.Tensor) else value, weight))
        if len(entries) >= _FOLD_EVERY:
            self._fold(name)

    def _fold(self, name: str) -> None:
        sums = _weighted_sums(self.epoch_entries.pop(name), torch.device("cpu"))
        previous = self.epoch_folded.get(name)
        self.epoch_folded[name] = sums if previous is None else previous + sums

    def clear_step(self) -> None:
        self.step_entries.clear()

    def step_values(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """This step's values (weighted means); names logged with sync_dist are averaged over ranks.

        ``reduce`` sums a CPU tensor over ranks (a no-op in one process); every rank must call this.
        """
        grouped: dict[str, list[tuple[Any, float]]] = {}
        for name, value, weight in self.step_entries:
            grouped.setdefault(name, []).append((value, weight))
        out = {}
        for name in sorted(grouped):
            entries = grouped[name]
            if name in self.sync_dist:
                total, weight = reduce(_weighted_sums(entries, torch.device("cpu"))).tolist()
            else:  # plain floats: at most a few entries (micro-batches, DP replicas)
                weight = sum(w for _, w in entries)
                total = sum((v.item() if isinstance(v, torch.Tensor) else v) * w for v, w in entries if w > 0)
            if weight > 0:
                out[name] = total / weight
        return out

    def epoch_values(
        self,
        reduce: Callable[[torch.Tensor], torch.Tensor],
        all_names: Callable[[list[str]], list[str]],
    ) -> dict[str, float]:
        """Sample-weighted means over every rank; clears the epoch. Every rank must call it."""
        for name in list(self.epoch_entries):
            self._fold(name)
        objects, self.metric_objects = self.metric_objects, {}
        names = all_names(sorted(self.epoch_folded) + [f"\0{n}" for n in sorted(objects)])
        if not names:  # the same on every rank, so no rank waits in the all-reduce below
            return {}
        out = {}
        for marked in (n for n in names if n.startswith("\0")):  # every rank, same order: compute() syncs
            metric = objects.get(marked[1:])
            if metric is not None:
                out[marked[1:]] = float(metric.compute())
                metric.reset()
        names = [n for n in names if not n.startswith("\0")]
        if names:
            zero = torch.zeros(2, dtype=torch.float64)
            sums = reduce(torch.stack([self.epoch_folded.get(n, zero) for n in names]))
            out.update({n: float(s[0] / s[1]) for n, s in zip(names, sums) if s[1] > 0})
        self.epoch_folded.clear()
        return dict(sorted(out.items()))


def union_of_names(gather: Callable[[Any], list[Any]]) -> Callable[[list[str]], list[str]]:
    """The sorted union of every rank's names, through ``gather`` (ranks that saw no batch take part too)."""
    return lambda names: sorted(set().union(*gather(names)))


class Metrics:
    """The values of a run: what ``self.log`` collected (``store``), reduced over ranks, kept as the
    latest value of each name (``callback_metrics``) and sent to the loggers (rank 0 has them)."""

    def __init__(self) -> None:
        self.store = LogStore()
        self.values: dict[str, float] = {}  # the latest value of every name; callback_metrics reads these
        self._tensors: dict[str, torch.Tensor] = {}
        self._stale: set[str] = set()
        self.logged: dict[str, float] = {}
        self.loggers: list[Any] = []

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        """The latest value of every logged metric, as float64 tensors (Lightning's name and type)."""
        # Kept as floats and made into tensors when read: most runs never read the dict during training,
        # and a logging step should not pay for tensors nobody looks at.
        if self._stale:
            for name in self._stale:
                self._tensors[name] = torch.tensor(self.values[name], dtype=torch.float64)
            self._stale.clear()
        return self._tensors

    def update(self, values: dict[str, float]) -> None:
        """New latest values; ``name_step`` / ``name_epoch`` also set the plain ``name`` (as Lightning's)."""
        forked = self.store.forked
        plain = {forked[k]: v for k, v in values.items() if k in forked}
        self.values.update(values)
        self._stale.update(values)
        if plain:
            self.values.update(plain)
            self._stale.update(plain)

    def replace(self, values: dict[str, float]) -> None:
        """Put back an earlier set of latest values (after the sanity check, whose values are not kept)."""
        self.values.clear()  # (in place: the optimizer step's ReduceLROnPlateau reads this dict)
        self.values.update(values)
        self._tensors, self._stale = {}, set(values)

    def step_values(self, strategy: Any) -> dict[str, float]:
        """This step's values (every rank calls it: names logged with sync_dist are all-reduced)."""
        return self.store.step_values(strategy.all_reduce)

    def epoch_values(self, strategy: Any) -> dict[str, float]:
        """The epoch's sample-weighted means over every rank; clears the epoch (every rank calls it)."""
        return self.store.epoch_values(strategy.all_reduce, union_of_names(strategy.all_gather_object))

    def send(self, values: dict[str, float], step: int) -> None:
        """To every logger (none but on rank 0), without the names logged with logger=False."""
        shown = {k: v for k, v in values.items() if k not in self.store.hidden}
        self.logged.update(shown)
        for logger in self.loggers:
            logger.log_metrics(shown, step)

    def flush(self) -> None:
        for logger in self.loggers:
            if hasattr(logger, "flush"):
                logger.flush()

    def finalize(self) -> None:
        for logger in self.loggers:
            if hasattr(logger, "finalize"):
                logger.finalize()
        self.loggers = []
