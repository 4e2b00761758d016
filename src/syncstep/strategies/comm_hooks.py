"""DDP communication hooks: the all-reduce (or a compressed one) and the wrappers that observe it.

DDP takes one communication hook per model, so every feature that needs one goes through ``register``:
``build_comm_hook`` gives the inner hook (here only the plain all-reduce, torch's
``default_hooks.allreduce_hook``), and each wrapper ``wrap(state, hook) -> (state, hook)`` puts itself
around it (the noise scale reads each bucket before and after). Nothing replaces another silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

Wrapper = Callable[[Any, Callable], tuple[Any, Callable]]


def build_comm_hook(name: str | None, options: dict | None, process_group: Any) -> tuple[Any, Callable]:
    """(state, hook) of the inner communication: ``None`` / "none" is the plain all-reduce of the mean."""
    if name in (None, "none"):
        return process_group, default_hooks.allreduce_hook
    raise ValueError(f"unknown DDP communication hook {name!r}; this build knows only 'none' (plain all-reduce).")


def register(ddp_model: Any, state: Any, hook: Callable, wrappers: Sequence[Wrapper] = ()) -> None:
    """Wrap ``hook`` in each of ``wrappers`` (the first innermost) and register the result on ``ddp_model``."""
    for wrap in wrappers:
        state, hook = wrap(state, hook)
    ddp_model.register_comm_hook(state, hook)
