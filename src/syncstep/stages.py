"""What a stage (fit / validate / test / predict) is run on: the model, the loaders, the checkpoint to
start from and the callbacks, resolved from the arguments as Lightning resolves them."""

from __future__ import annotations

import warnings
from typing import Any

from syncstep.callbacks.base import Callback
from syncstep.datamodule import DataModule
from syncstep.module import Module

# Lightning hooks a Module may define that syncstep never calls: a warning at fit, never silence.
UNCALLED_HOOKS = {
    "on_before_batch_transfer": "move or change the batch in training_step",
    "transfer_batch_to_device": "syncstep moves tensors inside tuples, lists, dicts and dataclasses itself",
    "on_after_batch_transfer": "change the batch in training_step",
    "optimizer_step": "syncstep steps the optimizer itself (with the LR plan); use on_before_optimizer_step, a "
                      "scheduler, or manual optimization",
    "optimizer_zero_grad": "syncstep zeroes the gradients after each optimizer step (set_to_none=True)",
    "configure_gradient_clipping": "use Trainer(gradient_clip_val=..., gradient_clip_algorithm=...)",
    "lr_scheduler_step": "syncstep steps your schedulers by their interval and frequency",
    "backward": "syncstep calls loss.backward() (through the gradient scaler); use on_before_backward",
    "on_validation_model_eval": "syncstep calls model.eval() before evaluation",
    "on_validation_model_train": "syncstep calls model.train() after evaluation",
    "on_validation_model_zero_grad": "",
    "on_test_model_eval": "", "on_test_model_train": "", "on_predict_model_eval": "",
}


def warn_uncalled_hooks(model: Module) -> None:
    for name, advice in UNCALLED_HOOKS.items():
        for cls in type(model).__mro__:
            if cls is Module:
                break
            if name in vars(cls):
                warnings.warn(f"{type(model).__name__}.{name} is a Lightning hook that syncstep does not call"
                              + (f": {advice}." if advice else "."), stacklevel=4)
                break


def split_datamodule(loaders: Any, datamodule: Any) -> tuple[Any, Any]:
    """Lightning allows ``fit(model, datamodule)``: a DataModule in the loaders' place."""
    if isinstance(loaders, DataModule):
        if datamodule is not None:
            raise ValueError("pass the DataModule once: as datamodule=, or in the loaders' place, not both.")
        return None, loaders
    return loaders, datamodule


def resolve_loaders(stage: str, given: Any, datamodule: Any, model: Module) -> Any:
    """The loaders of ``stage``: the ones given, else the DataModule's, else the Module's."""
    if given is not None:
        return given
    name = {"fit": "train", "validate": "val", "test": "test", "predict": "predict"}[stage] + "_dataloader"
    for source in (datamodule, model):
        if source is not None:
            loaders = getattr(source, name)()
            if loaders is not None:
                return loaders
    return None


def merge_callbacks(trainer_callbacks: list[Callback], model: Module) -> list[Callback]:
    """The Trainer's callbacks and the Module's ``configure_callbacks()``; a Module callback replaces the
    Trainer's callbacks of the same type (Lightning's rule)."""
    extra = model.configure_callbacks() or []
    extra = [extra] if isinstance(extra, Callback) else list(extra)
    replaced = {type(c) for c in extra}
    return [c for c in trainer_callbacks if type(c) not in replaced] + extra


def stage_model(trainer: Any, model: Module | None, stage: str) -> Module:
    """The model to run: the one given, else the one of the last fit (Lightning's ``trainer.test()``)."""
    if model is not None:
        return model
    if trainer.lightning_module is None:
        raise ValueError(f"{stage}() needs a model: pass one, or call fit() first and {stage}() uses the fitted model.")
    return trainer.lightning_module


def checkpoint_path(trainer: Any, ckpt_path: str | None) -> str | None:
    """``ckpt_path="best"``: the best checkpoint of the run's ModelCheckpoint."""
    if ckpt_path != "best":
        return ckpt_path
    callback = trainer.checkpoint_callback
    if callback is None or not callback.best_model_path:
        raise ValueError('ckpt_path="best" needs a ModelCheckpoint callback that has saved a checkpoint '
                         "(Trainer(callbacks=[ModelCheckpoint(monitor=...)]) and a fit before).")
    return callback.best_model_path
