"""Logged values: collection (also from DP replica threads), reduction across ranks, and where they go.

A value logged with ``self.log`` is stored with a weight, the number of samples in the batch that
produced it. A step value is the weighted mean over what this process computed in the optimizer step
(every micro-batch, every DP replica). An epoch value is the weighted mean over every sample of the
epoch on every rank: per name, one all-reduce of (sum of value x weight, sum of weight).

Storing is cheap on the hot path (a list append); tensors are only turned into floats on logging steps
and at epoch ends, so logging does not add a device sync per step.
"""

from __future__ import annotations

import csv
import math
import os
import threading
import time
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
        self.prog_bar: set[str] = set()
        self.hidden: set[str] = set()  # logger=False
        self.sync_dist: set[str] = set()

    def log(self, name, value, on_step, on_epoch, prog_bar, logger, sync_dist, batch_size) -> None:
        # Called on every step (a few hundred us on a tiny model): the common case, a one-element tensor
        # logged per step in training, takes the fewest branches.
        context = self.context
        if on_step is None or on_epoch is None:
            training = context.stage == "train"
            if on_step is None:
                on_step = training
            if on_epoch is None:
                on_epoch = not training
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            value = _scalar(name, value)
        weight = context.count if batch_size is None else batch_size
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
        if prog_bar and step_name not in self.prog_bar:
            self.prog_bar.update((step_name, epoch_name))
        if not logger:
            self.hidden.update((step_name, epoch_name))
        if sync_dist:
            self.sync_dist.add(step_name)

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
        names = all_names(sorted(self.epoch_folded))
        if not names:  # the same on every rank, so no rank waits in the all-reduce below
            return {}
        zero = torch.zeros(2, dtype=torch.float64)
        sums = reduce(torch.stack([self.epoch_folded.get(n, zero) for n in names]))
        self.epoch_folded.clear()
        return {n: float(s[0] / s[1]) for n, s in zip(names, sums) if s[1] > 0}


# ---------------------------------------------------------------------------------------------------
# Where values go: metrics.csv, TensorBoard, the progress bar. Only rank 0 creates these.


class CSVLogger:
    """``metrics.csv`` with one row per logging step or epoch end; columns grow as names appear.

    The file is rewritten whole (to a temporary file, then renamed) on each flush, so it is never half
    written and new columns need no special case; rows are few (one per log_every_n_steps).
    """

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.path = os.path.join(log_dir, "metrics.csv")
        self.rows: list[dict[str, float]] = []
        self.columns: list[str] = ["epoch", "step"]
        self._dirty = False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **metrics}
        for name in row:
            if name not in self.columns:
                self.columns.append(name)
        self.rows.append(row)
        self._dirty = True

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, "hparams.txt"), "w") as f:
            for key, value in params.items():
                f.write(f"{key}: {value}\n")

    def flush(self) -> None:
        if not self._dirty:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)
        self._dirty = False

    def finalize(self) -> None:
        self.flush()


class TensorBoardLogger:
    """TensorBoard event files next to metrics.csv (imported only when used).

    Each logging step becomes one event holding all its scalars (what ``add_scalar`` writes, one
    ``simple_value`` per name, at the step and the wall time it was logged). The events are built in
    batches, every ``write_every`` logging steps or ``write_secs`` seconds, and at every flush (each
    epoch's end) and at the end of the run. Built one at a time (with ``summary.scalar``, which goes
    through numpy), between training steps that have pushed this code out of the CPU's caches, an event
    cost 138 us on average; built this way, 57 us (benchmarks/log_step_cost.py). SummaryWriter itself
    then writes to disk every 120 s, as always.
    """

    def __init__(self, log_dir: str, write_every: int = 20, write_secs: float = 10.0) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)
        self._summary = Summary
        self.write_every, self.write_secs = write_every, write_secs
        self._pending: list[tuple[int, float, dict[str, float]]] = []
        self._written_at = time.monotonic()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._pending.append((step, time.time(), dict(metrics)))
        if len(self._pending) >= self.write_every or time.monotonic() - self._written_at >= self.write_secs:
            self._write()

    def _write(self) -> None:
        summary, value = self._summary, self._summary.Value
        add = self.writer.file_writer.add_summary
        for step, wall_time, metrics in self._pending:
            values = [value(tag=name, simple_value=float(v)) for name, v in metrics.items() if name != "epoch"]
            if values:
                add(summary(value=values), step, wall_time)
        self._pending.clear()
        self._written_at = time.monotonic()

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.writer.add_text("hparams", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def flush(self) -> None:
        self._write()
        self.writer.flush()

    def finalize(self) -> None:
        self._write()
        self.writer.close()


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def next_version_dir(root: str) -> str:
    """``root/version_N`` with N one more than the highest there, as Lightning names its runs."""
    existing = []
    if os.path.isdir(root):
        for entry in os.listdir(root):
            if entry.startswith("version_") and entry[8:].isdigit():
                existing.append(int(entry[8:]))
    return os.path.join(root, f"version_{max(existing, default=-1) + 1}")


def format_metric(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


class ProgressBar:
    """A tqdm bar per epoch on rank 0, showing the values logged with ``prog_bar=True``.

    tqdm is told of finished steps every ``every`` steps, and ``every`` adapts so that this happens
    about 20 times a second at most (tqdm redraws at most 10 times a second anyway), rather than a tqdm
    call on every step of a model whose steps take a few hundred microseconds.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.pending, self.every = 0, 1
        self.postfix: dict[str, float] | None = None  # values to show, not yet handed to tqdm
        self.postfix_at = 0.0
        self.advanced_at = 0.0

    def start(self, description: str, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=description, dynamic_ncols=True, leave=True, unit="step")
        self.pending, self.every, self.advanced_at = 0, 1, time.monotonic()

    def update(self) -> None:
        """One step done (the training loop counts its steps itself and calls ``advance``)."""
        self.pending += 1
        if self.pending >= self.every:
            self.advance(self.pending)
            self.pending = 0

    def advance(self, steps: int) -> int:
        """``steps`` more steps done; call it every ``every`` steps. Returns ``every``, which may change."""
        if self.bar is not None and steps:
            now = time.monotonic()
            if now - self.advanced_at < 0.05:  # more often than 20 times a second: wait longer
                self.every = min(self.every * 2, 1 << 20)
            elif now - self.advanced_at > 0.2 and self.every > 1:
                self.every //= 2
            self.advanced_at = now
            # tqdm redraws at most every 0.1 s (mininterval): values logged in between would be formatted
            # for nothing, so they are handed over only as often (25 us each time: log_step_cost.py).
            if self.postfix is not None and now - self.postfix_at >= self.bar.mininterval:
                self._set_postfix()
            self.bar.update(steps)
        return self.every

    def show(self, values: dict[str, float]) -> None:
        """Show ``values`` after the bar (from its next redraw on)."""
        if self.bar is not None and values:
            self.postfix = values

    def _set_postfix(self) -> None:
        self.bar.set_postfix({k: format_metric(v) for k, v in self.postfix.items()}, refresh=False)
        self.postfix, self.postfix_at = None, time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            if self.postfix is not None:
                self._set_postfix()
            if self.pending:
                self.bar.update(self.pending)
            self.bar.close()
            self.bar = None
        self.pending = 0
        self.postfix = None
