"""``TensorBoardLogger``: TensorBoard event files in ``save_dir/name/version_N`` (tensorboard imported
only when one is made)."""

from __future__ import annotations

import time
from typing import Any

from syncstep.loggers.base import DummyExperiment, VersionedDirectory, is_global_zero


class TensorBoardLogger(VersionedDirectory):
    """Lightning's arguments (``save_dir``, ``name``, ``version``, ``prefix``, ``sub_dir``; other keyword
    arguments go to ``SummaryWriter``); ``experiment`` is the ``SummaryWriter`` on rank 0.

    Each logging step becomes one event holding all its scalars (what ``add_scalar`` writes, one
    ``simple_value`` per name, at the step and the wall time it was logged). The events are built in
    batches, every ``write_every`` logging steps or ``write_secs`` seconds, and at every flush (each
    epoch's end) and at the end of the run: built from plain protos, not ``summary.scalar``, which goes
    through numpy and costs about twice as much (docs/benchmarks.md, benchmarks/log_step_cost.py).
    SummaryWriter itself then writes to disk every 120 s, as always.
    """

    def __init__(self, save_dir: str, name: str | None = "lightning_logs", version: int | str | None = None,
                 log_graph: bool = False, default_hp_metric: bool = True, prefix: str = "",
                 sub_dir: str | None = None, write_every: int = 20, write_secs: float = 10.0,
                 **writer_kwargs: Any) -> None:
        super().__init__(save_dir, name, version)
        self.prefix, self.sub_dir, self.writer_kwargs = prefix, sub_dir, writer_kwargs
        self.write_every, self.write_secs = write_every, write_secs
        self._writer: Any = None
        self._pending: list[tuple[int | None, float, dict[str, float]]] = []
        self._written_at = time.monotonic()

    @property
    def log_dir(self) -> str:
        import os

        base = super().log_dir
        return os.path.join(base, self.sub_dir) if self.sub_dir else base

    @property
    def experiment(self) -> Any:
        """The ``torch.utils.tensorboard.SummaryWriter`` (a do-nothing stand-in on ranks other than 0)."""
        if self._writer is None:
            if not is_global_zero():
                return DummyExperiment()
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir, **self.writer_kwargs)
        return self._writer

    writer = experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._pending.append((step, time.time(), dict(metrics)))
        if len(self._pending) >= self.write_every or time.monotonic() - self._written_at >= self.write_secs:
            self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        add = self.experiment.file_writer.add_summary
        prefix = f"{self.prefix}-" if self.prefix else ""
        for step, wall_time, metrics in self._pending:
            values = [Summary.Value(tag=prefix + name, simple_value=float(v))
                      for name, v in metrics.items() if name != "epoch"]
            if values:
                add(Summary(value=values), step, wall_time)
        self._pending.clear()
        self._written_at = time.monotonic()

    def log_hyperparams(self, params: Any = None, *args: Any, **kwargs: Any) -> None:
        params = dict(vars(params) if hasattr(params, "__dict__") and not isinstance(params, dict) else params or {})
        self.experiment.add_text("hparams", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def save(self) -> None:
        self._write()
        if self._writer is not None:
            self._writer.flush()

    flush = save

    def finalize(self, status: str = "success") -> None:
        """Write and close the event file; a later stage (test after fit) opens a new one in the same directory."""
        self._write()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
