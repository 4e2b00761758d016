"""What every logger shares: Lightning's ``Logger`` interface, and where a run's logs go.

A logger is any object with ``log_metrics(metrics, step)``; ``log_hyperparams(params)``, ``save()``,
``finalize(status)``, ``log_dir``, ``name``, ``version`` and ``experiment`` are used when present, so
Lightning's own loggers (W&B, MLflow, ...) work when installed. The trainer calls logger methods on
global rank 0 only; logger objects exist on every rank (``trainer.logger`` works everywhere), and the
version directory is chosen on rank 0 and given to every rank.
"""

from __future__ import annotations

import os
from typing import Any


class Logger:
    """The base of syncstep's loggers (Lightning's ``Logger`` methods, all optional but log_metrics)."""

    @property
    def name(self) -> str | None:
        return None

    @property
    def version(self) -> int | str | None:
        return None

    @property
    def save_dir(self) -> str | None:
        return None

    @property
    def log_dir(self) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        raise NotImplementedError

    def log_hyperparams(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> None: ...

    def save(self) -> None: ...

    def finalize(self, status: str = "success") -> None:
        self.save()

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None: ...


class VersionedDirectory(Logger):
    """``save_dir/name/version_N``, N one more than the highest there (Lightning's layout)."""

    def __init__(self, save_dir: str, name: str | None, version: int | str | None) -> None:
        self._save_dir = os.path.abspath(os.fspath(save_dir))
        self._name = name or ""
        self._version = version

    @property
    def name(self) -> str:
        return self._name

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        return os.path.join(self._save_dir, self._name)

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = next_version(self.root_dir)
        return self._version

    @property
    def log_dir(self) -> str:
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        return os.path.join(self.root_dir, version) if version else self.root_dir

    def _set_version(self, version: int | str) -> None:
        """The trainer gives every rank rank 0's version (so all ranks agree on one directory)."""
        self._version = version


class DummyExperiment:
    """What ``logger.experiment`` is on ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def next_version(root: str) -> int:
    existing = []
    if os.path.isdir(root):
        for entry in os.listdir(root):
            if entry.startswith("version_") and entry[8:].isdigit():
                existing.append(int(entry[8:]))
    return max(existing, default=-1) + 1


def next_version_dir(root: str) -> str:
    """``root/version_N`` with N one more than the highest there, as Lightning names its runs."""
    return os.path.join(root, f"version_{next_version(root)}")


def is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0
