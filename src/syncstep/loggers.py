"""Where logged values go: metrics.csv and TensorBoard (rank 0 only), and any object with
``log_metrics(metrics, step)``."""

from __future__ import annotations

import csv
import os
import time
from typing import Any


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
    epoch's end) and at the end of the run: built from plain protos, not ``summary.scalar``, which goes
    through numpy and costs about twice as much (docs/benchmarks.md, benchmarks/log_step_cost.py).
    SummaryWriter itself then writes to disk every 120 s, as always.
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


def make_loggers(wanted: Any, root_dir: str, is_global_zero: bool) -> tuple[str | None, list[Any]]:
    """The log directory and the loggers of ``Trainer(logger=wanted)``; none on ranks other than 0."""
    if not is_global_zero or wanted in (False, None):
        return None, []
    log_dir = next_version_dir(os.path.join(root_dir, "syncstep_logs"))
    if wanted is True:
        wanted = ["csv", "tensorboard"] if tensorboard_available() else ["csv"]
    loggers: list[Any] = []
    for item in wanted if isinstance(wanted, (list, tuple)) else [wanted]:
        if item == "csv":
            loggers.append(CSVLogger(log_dir))
        elif item == "tensorboard":
            if not tensorboard_available():
                raise ValueError("logger='tensorboard' needs the tensorboard package: pip install tensorboard.")
            loggers.append(TensorBoardLogger(log_dir))
        elif hasattr(item, "log_metrics"):
            loggers.append(item)
        else:
            raise ValueError(
                f"logger={item!r}: use True, False, 'csv', 'tensorboard', or an object with "
                "log_metrics(metrics, step)."
            )
    return log_dir, loggers
