"""Loggers with Lightning's names and arguments; any object with ``log_metrics(metrics, step)`` works too."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from syncstep.loggers.base import DummyExperiment, Logger, next_version_dir
from syncstep.loggers.csv_logs import CSVLogger
from syncstep.loggers.tensorboard import TensorBoardLogger

__all__ = ["CSVLogger", "DummyExperiment", "Logger", "TensorBoardLogger", "make_loggers", "next_version_dir",
           "tensorboard_available"]


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def make_loggers(wanted: Any, root_dir: str) -> list[Any]:
    """The logger objects of ``Trainer(logger=wanted)`` (on every rank; only rank 0 calls them).

    True: CSV, and TensorBoard if installed, both in ``root_dir/syncstep_logs/version_N``.
    """
    if wanted in (False, None):
        return []
    if wanted is True:
        wanted = ["csv", "tensorboard"] if tensorboard_available() else ["csv"]
    loggers: list[Any] = []
    for item in wanted if isinstance(wanted, (list, tuple)) else [wanted]:
        if item == "csv":
            loggers.append(CSVLogger(root_dir, name="syncstep_logs"))
        elif item == "tensorboard":
            if not tensorboard_available():
                raise ValueError("logger='tensorboard' needs the tensorboard package: pip install tensorboard.")
            loggers.append(TensorBoardLogger(root_dir, name="syncstep_logs"))
        elif hasattr(item, "log_metrics"):
            loggers.append(item)
        else:
            raise ValueError(
                f"logger={item!r}: use True, False, 'csv', 'tensorboard', a logger object (syncstep.loggers."
                "CSVLogger, TensorBoardLogger, Lightning's loggers) or any object with log_metrics(metrics, step)."
            )
    return loggers


def agree_on_versions(loggers: list[Any], broadcast_object: Any) -> None:
    """Rank 0 picks each versioned logger's directory; every rank takes the same (``trainer.log_dir``).
    Loggers of the same ``save_dir/name`` with no version of their own share one version, as the
    default CSV and TensorBoard pair does."""
    ours = [lg for lg in loggers if hasattr(lg, "_set_version")]

    def choose() -> list[Any]:
        chosen: dict[str, Any] = {}
        versions = []
        for logger in ours:
            if logger._version is None:
                root = os.path.join(logger.save_dir, logger.name)
                if root not in chosen:
                    chosen[root] = logger.version
                versions.append(chosen[root])
            else:
                versions.append(logger._version)
        return versions

    for logger, version in zip(ours, broadcast_object(choose)):
        logger._set_version(version)
