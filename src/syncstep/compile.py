"""``Trainer(compile=True | {...})``: torch.compile applied to the model's forward, after the strategy.

What is compiled is the Module's ``__call__`` (what ``self(x)`` in ``training_step`` runs), in place
(``nn.Module.compile``): the Module stays the same object, so its hooks, ``self.log`` and its
``state_dict`` are untouched; checkpoints hold the plain names, never ``_orig_mod.``.

It is applied after the strategy has moved and wrapped the model, which is torch's recommendation
for DDP: the forward runs inside DDP's forward, where dynamo splits the graph at DDP's bucket
boundaries (its "DDPOptimizer"), so each bucket's all-reduce still starts as soon as its part of
backward is done instead of after the whole compiled backward. Under fsdp the sharded units are
compiled as they are (FSDP2 supports it). Under dp it is refused: DataParallel copies the module to
every GPU on every step, and a compiled ``__call__`` is bound to the original, so the copies would
all compute on the first GPU's parameters.

A module the user compiled (``torch.compile(model)``, an ``OptimizedModule`` around a
``syncstep.Module``) is accepted: ``unwrap`` returns the Module inside, with the user's compile
settings kept, and ``apply`` compiles its forward with them, as above.
"""

from __future__ import annotations

from typing import Any

import torch

# torch.compile's keyword arguments (besides the model)
COMPILE_OPTIONS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")
_USER_COMPILE = "_syncstep_compile_context"  # on the Module: the dynamo context of the user's torch.compile


def check_option(value: Any) -> Any:
    """``compile=`` as given: a bool or a dict of torch.compile's keyword arguments (TypeError otherwise)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(COMPILE_OPTIONS))
        if unknown:
            raise TypeError(f"compile={value!r}: {unknown} are not torch.compile arguments; valid keys: "
                            f"{list(COMPILE_OPTIONS)}.")
        return dict(value)
    raise TypeError(f"compile must be True, False or a dict of torch.compile's arguments (e.g. "
                    f"{{'mode': 'max-autotune'}}), got {value!r}.")


def unwrap(model: Any) -> Any:
    """The ``syncstep.Module`` inside a user's ``torch.compile(module)``; anything else as it is."""
    from torch._dynamo.eval_frame import OptimizedModule

    if not isinstance(model, OptimizedModule):
        return model
    inner = model._orig_mod
    object.__setattr__(inner, _USER_COMPILE, model.dynamo_ctx)
    return inner


def apply(model: torch.nn.Module, option: bool | dict, strategy: Any) -> None:
    """Compile ``model``'s forward in place, once, if ``compile=`` asked for it or the user compiled it."""
    user = model.__dict__.get(_USER_COMPILE)
    if not option and user is None:
        return
    if strategy.name == "dp":
        raise ValueError(
            "compile=True (or a torch.compile'd model) does not work with strategy='dp': DataParallel copies the "
            "module to every GPU on every step, and the compiled forward would run on the original's parameters "
            "in every copy. Use strategy='ddp' (one process per GPU; faster than dp anyway), or compile=False."
        )
    cap = getattr(getattr(strategy, "options", None), "bucket_cap_mb", None)  # (DDPStrategy's)
    if cap is not None and cap < 1:
        raise ValueError(
            f"compile=True with DDPStrategy(bucket_cap_mb={cap}): torch's DDP optimizer, which splits the compiled "
            "graph at DDP's buckets, needs every bucket at least as large as DDP's first one (1 MiB). Use "
            "bucket_cap_mb >= 1, or compile=False."
        )
    if model._compiled_call_impl is not None:  # an earlier stage (fit, then test) compiled it already
        return
    if user is not None:
        model._compiled_call_impl = user(model._call_impl)
    else:
        model.compile(**({} if option is True else option))
