"""Collectives that are no-ops in a single process, so the trainer has one code path at any world size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum / max / min of ``tensor`` over processes (in place, also returned)."""
    if initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor


def broadcast_object(make: Callable[[], T]) -> T:
    """``make()`` on rank 0, sent to every rank (``make`` runs nowhere else)."""
    if not initialized():
        return make()
    box: list[Any] = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def union_of_names(names: list[str]) -> list[str]:
    """The sorted union of every rank's list (ranks that saw no batch still take part)."""
    if not initialized():
        return names
    return sorted(set().union(*all_gather_object(names)))


def barrier() -> None:
    if initialized():
        dist.barrier()
