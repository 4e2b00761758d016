"""What a stage (fit / validate / test / predict) is run on: the model, the loaders, the checkpoint to
start from and the callbacks, resolved from the arguments as Lightning resolves them; ``running()``,
the set-up and tear-down around every stage; ``validate`` and ``test`` themselves."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from syncstep import compile as compile_model
from syncstep.callbacks.base import Callback
from syncstep.datamodule import DataModule
from syncstep.evaluation import evaluate
from syncstep.hooks import Hooks
from syncstep.launch import report_failure
from syncstep.loaders import inspect_loader
from syncstep.loggers import agree_on_versions
from syncstep.module import Module
from syncstep.resume import find_checkpoint, load_weights
from syncstep.strategies.common import StepRunner

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


def check_module(model: Any) -> Module:
    """The model to run (the Module inside a user's torch.compile), or a TypeError."""
    model = compile_model.unwrap(model)
    if not isinstance(model, Module):
        raise TypeError(
            f"Trainer needs a syncstep.Module, got {type(model).__name__}. Subclass syncstep.Module and "
            "define training_step and configure_optimizers."
        )
    return model


def check_loaders(config: Any, loaders: Any, what: str) -> None:
    if loaders is None or not config.use_distributed_sampler:
        return
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        inspect_loader(loader, what)


@contextlib.contextmanager
def running(trainer: Any, model: Module, stage: str, datamodule: Any = None) -> Iterator[None]:
    """One stage: the strategy's environment, the hooks' set-up and tear-down, the wrapped model."""
    strategy = trainer.strategy
    strategy.setup_environment()
    if not trainer._versions_agreed:
        agree_on_versions(trainer.loggers, strategy.broadcast_object)
        trainer._versions_agreed = True
    trainer.metrics.loggers = trainer.loggers if trainer.is_global_zero else []
    model._trainer = trainer
    trainer.lightning_module, trainer.datamodule = model, datamodule
    trainer.hooks = Hooks(trainer, model, merge_callbacks(trainer.callbacks, model), datamodule)
    trainer.state.stage = stage
    try:
        trainer.hooks.setup(stage)
        model.configure_model()  # before the strategy moves and wraps (fsdp: shards) the model
        if stage == "fit" and trainer.config.sync_batchnorm and strategy.num_processes > 1:
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        strategy.setup(StepRunner(model, trainer._logs.context))
        compile_model.apply(model, trainer.config.compile, strategy)  # after the strategy wrapped it (compile.py)
        yield
    except BaseException as error:
        if isinstance(error, Exception):
            trainer.hooks.on_exception(error)
        report_failure(error, rank=trainer.global_rank, world_size=trainer.world_size,
                       where=f"{stage} at epoch {trainer.current_epoch}, step {trainer.global_step}")
        raise
    finally:
        trainer.metrics.finalize()
        strategy.teardown()
        trainer.hooks.teardown(stage)
        trainer.state.stage = None


def evaluate_stage(trainer: Any, model: Module | None, loaders: Any, ckpt_path: str | None, stage: str,
                   datamodule: Any) -> list[dict]:
    """``validate()`` / ``test()``: one dict of epoch metrics per loader, also sent to the loggers."""
    model = check_module(stage_model(trainer, model, stage))
    loaders, datamodule = split_datamodule(loaders, datamodule)
    check_loaders(trainer.config, loaders, "dataloaders")
    trainer.strategy.launch()
    with running(trainer, model, stage, datamodule):
        load_stage_weights(trainer, model, ckpt_path, stage)
        loaders = resolve_loaders(stage, loaders, datamodule, model)
        if loaders is None:
            raise ValueError(f"{stage}() needs data: pass dataloaders= or datamodule=, or define "
                             f"{'val' if stage == 'validate' else 'test'}_dataloader().")
        check_loaders(trainer.config, loaders, "dataloaders")
        results = []
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            values = evaluate(trainer, loader, stage)
            if trainer.is_global_zero and values:  # (to the loggers too, as Lightning's)
                trainer.metrics.send({"epoch": trainer.current_epoch, **values}, trainer.global_step)
            results.append(values)
        return results


def load_stage_weights(trainer: Any, model: Module, ckpt_path: str | None, stage: str) -> None:
    """``validate`` / ``test`` / ``predict`` with ``ckpt_path``: the model's weights only."""
    if ckpt_path is None:
        return
    path, state = find_checkpoint(trainer.checkpoint_dir, checkpoint_path(trainer, ckpt_path), trainer.print)
    if state is not None:
        load_weights(trainer.strategy, model, [], path, state)
        trainer.print(f"syncstep: {stage} with the weights of {path}")
