"""Calling hooks: the callbacks' and the Module's (and the DataModule's set-up hooks), in Lightning's order.

For every hook name, ``Hooks`` keeps only the functions that someone overrides, so that a hook nobody
defines is never called: the training loop asks ``hooks.per_batch`` once per epoch and takes its plain
path when no batch-level hook exists. The order is Lightning's: callbacks (in the order given, with
checkpoint callbacks moved last), then the Module; at ``on_train_epoch_end`` the "monitoring"
callbacks (ModelCheckpoint, EarlyStopping) run after the Module, so that they see what its hook logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from syncstep.callbacks.base import Callback
from syncstep.module import Module

# Hooks called once per training batch (micro-batch) or optimizer step: the loop's hot path.
BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward")
STEP_HOOKS = ("on_before_optimizer_step", "on_before_zero_grad")


def _overrides(obj: Any, name: str, base: type) -> bool:
    method = getattr(type(obj), name, None)
    return method is not None and method is not getattr(base, name, None)


def is_monitoring(callback: Callback) -> bool:
    from syncstep.callbacks.early_stopping import EarlyStopping
    from syncstep.callbacks.model_checkpoint import ModelCheckpoint

    return isinstance(callback, (ModelCheckpoint, EarlyStopping))


def order_callbacks(callbacks: list[Callback]) -> list[Callback]:
    """Lightning's order: as given, with checkpoint callbacks last (they should see everything else)."""
    from syncstep.callbacks.model_checkpoint import ModelCheckpoint

    return ([c for c in callbacks if not isinstance(c, ModelCheckpoint)]
            + [c for c in callbacks if isinstance(c, ModelCheckpoint)])


class Hooks:
    def __init__(self, trainer: Any, module: Module, callbacks: list[Callback], datamodule: Any = None) -> None:
        self.trainer, self.module, self.datamodule = trainer, module, datamodule
        self.callbacks = order_callbacks(callbacks)
        self._targets: dict[str, list[Callable[..., Any]]] = {}
        self.per_batch = any(self.targets(name) for name in BATCH_HOOKS)
        self.per_step = any(self.targets(name) for name in STEP_HOOKS)

    def targets(self, name: str, callbacks: list[Callback] | None = None, module: bool = True) -> list[Callable]:
        """The functions to call for hook ``name``: overridden callbacks' (bound to trainer and module),
        then the Module's, if overridden."""
        key = name if callbacks is None and module else None
        if key is not None and key in self._targets:
            return self._targets[key]
        trainer, pl_module = self.trainer, self.module
        found: list[Callable[..., Any]] = []
        for callback in self.callbacks if callbacks is None else callbacks:
            if _overrides(callback, name, Callback) and getattr(callback, "_hook_wanted", lambda _: True)(name):
                method = getattr(callback, name)
                found.append(lambda *args, _m=method, **kwargs: _m(trainer, pl_module, *args, **kwargs))
        if module and _overrides(pl_module, name, Module):
            found.append(getattr(pl_module, name))
        if key is not None:
            self._targets[key] = found
        return found

    def call(self, name: str, *args: Any, **kwargs: Any) -> None:
        for function in self.targets(name):
            function(*args, **kwargs)

    def call_module(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Only the Module's hook (configure_model, prepare_data, ...), whether overridden or not."""
        return getattr(self.module, name)(*args, **kwargs)

    def on_train_epoch_end(self, between: Callable[[], None]) -> None:
        """Non-monitoring callbacks and the Module, then ``between()`` (the trainer collects what they
        logged, steps the epoch schedulers), then ModelCheckpoint / EarlyStopping (Lightning's order)."""
        plain = [c for c in self.callbacks if not is_monitoring(c)]
        monitoring = [c for c in self.callbacks if is_monitoring(c)]
        context = self.trainer.metrics.store.context
        context.stage, context.count = "train_epoch_end", 1  # self.log here defaults to on_epoch=True
        for function in self.targets("on_train_epoch_end", plain):
            function()
        between()
        for function in self.targets("on_train_epoch_end", monitoring, module=False):
            function()

    def setup(self, stage: str) -> None:
        """prepare_data on each node's first process (the others wait), then setup(stage) everywhere."""
        trainer, datamodule = self.trainer, self.datamodule
        if trainer.local_rank == 0:
            if datamodule is not None:
                datamodule.prepare_data()
            self.module.prepare_data()
        trainer.strategy.barrier()
        if datamodule is not None:
            datamodule.trainer = trainer
            datamodule.setup(stage=stage)
        self.call("setup", stage=stage)

    def teardown(self, stage: str) -> None:
        if self.datamodule is not None:
            self.datamodule.teardown(stage=stage)
        self.call("teardown", stage=stage)

    def on_exception(self, error: BaseException) -> None:
        for callback in self.callbacks:
            if _overrides(callback, "on_exception", Callback):
                callback.on_exception(self.trainer, self.module, error)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dicts(self) -> dict[str, Any]:
        return {c.state_key: c.state_dict() for c in self.callbacks if _overrides(c, "state_dict", Callback)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.call("on_save_checkpoint", checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        for callback in self.callbacks:
            if callback.state_key in states:
                callback.load_state_dict(states[callback.state_key])
        self.call("on_load_checkpoint", checkpoint)
