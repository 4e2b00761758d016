"""Fit with DDP, then report at exit how many gloo threads are still alive (Linux /proc).

Usage: python exit_threads.py   (syncstep starts 2 processes)

The report is an atexit handler registered before syncstep's own, so it runs after syncstep has
destroyed the process group: a group that is really gone has no gloo threads left.
"""

from __future__ import annotations

import atexit
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import syncstep  # noqa: E402
from common import Tiny, dataset, loader  # noqa: E402


def gloo_threads() -> int:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return sum("gloo" in name for name in names)


def report() -> None:
    print(f"rank {os.environ.get('RANK', 'launcher')}: gloo threads at exit: {gloo_threads()}", flush=True)


if __name__ == "__main__":
    atexit.register(report)
    trainer = syncstep.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, lr_scaling="none",
                               enable_progress_bar=False, enable_checkpointing=False, logger=False)
    model = Tiny(lr=0.1)
    trainer.fit(model, loader(dataset(16), 4), loader(dataset(6, seed=1), 2))
    print(f"rank {trainer.global_rank}: gloo threads after fit: {gloo_threads()}", flush=True)
