"""Lightning's small utilities under their names: ``rank_zero_only``, ``seed_everything``."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from syncstep.rng import seed_everything


def _rank() -> int:
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def rank_zero_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A function that runs on global rank 0 only (None elsewhere), as Lightning's decorator."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if rank_zero_only.rank == 0:
            return fn(*args, **kwargs)
        return None

    return wrapped


rank_zero_only.rank = _rank()


@rank_zero_only
def rank_zero_info(*args: Any, **kwargs: Any) -> None:
    print(*args, **kwargs)


rank_zero_warn = rank_zero_only(lambda message, *args, **kwargs: __import__("warnings").warn(message, stacklevel=2))

__all__ = ["rank_zero_info", "rank_zero_only", "rank_zero_warn", "seed_everything"]
