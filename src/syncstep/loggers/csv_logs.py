"""``CSVLogger``: metrics.csv (and hparams.json) in ``save_dir/name/version_N``."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from syncstep.loggers.base import VersionedDirectory


class CSVLogger(VersionedDirectory):
    """``metrics.csv`` with one row per logging step or epoch end; columns grow as names appear.

    Lightning's arguments (``save_dir``, ``name``, ``version``, ``prefix``, ``flush_logs_every_n_steps``).
    The file is rewritten whole (to a temporary file, then renamed) on each flush, at every epoch's end
    and every ``flush_logs_every_n_steps`` logged rows, so it is never half written and new columns
    need no special case. Hyperparameters go to ``hparams.json`` (Lightning writes YAML).
    """

    def __init__(self, save_dir: str, name: str | None = "lightning_logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(save_dir, name, version)
        self.prefix, self.flush_every = prefix, flush_logs_every_n_steps
        self.rows: list[dict[str, float]] = []
        self.columns: list[str] = ["epoch", "step"]
        self._dirty = False

    @property
    def experiment(self) -> CSVLogger:
        return self

    @property
    def metrics_file_path(self) -> str:
        return os.path.join(self.log_dir, "metrics.csv")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": step, **({f"{self.prefix}-{k}" if self.prefix and k != "epoch" else k: v
                                 for k, v in metrics.items()})}
        for name in row:
            if name not in self.columns:
                self.columns.append(name)
        self.rows.append(row)
        self._dirty = True
        if self.flush_every and len(self.rows) % self.flush_every == 0:
            self.save()

    def log_hyperparams(self, params: Any = None, *args: Any, **kwargs: Any) -> None:
        params = dict(vars(params) if hasattr(params, "__dict__") and not isinstance(params, dict) else params or {})
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, "hparams.json"), "w") as f:
            json.dump(params, f, indent=1, default=str)

    def save(self) -> None:
        if not self._dirty:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.metrics_file_path)
        self._dirty = False

    flush = save

    def finalize(self, status: str = "success") -> None:
        self.save()
