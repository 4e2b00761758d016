"""Run state in and out of checkpoints: what is saved, when a save runs, finding one, and resuming.

``checkpoint.py`` keeps the file format (atomic writes, safe loads); this module decides what a
checkpoint of a fit holds and puts it back. A checkpoint is written after every rank has agreed on
the guards (a NaN found since the last agreement stops the run before it is saved) and gathered its
RNG state. The model's and optimizers' state come from the strategy (``gather_state``: fsdp gathers
its shards to rank 0), and rank 0 writes the one file while the other ranks wait at a barrier; or,
with fsdp's ``state_dict_type="sharded"``, every rank writes its own shards into a checkpoint
directory (``sharded_checkpoint.py``). Either format loads into any strategy at any world size.

Faults: a fit that checkpoints holds a lock on the checkpoint directory (``ckpt.lock_directory``), so a
second run into the same one stops at start-up with a message instead of overwriting its checkpoints.
A write that failed on rank 0 (a full disk) is agreed by every rank, which all raise the same
``CheckpointError``, with the previous checkpoints untouched. The checkpoint records the training set's
length and the optimizers' classes, so that a resume on different data or another optimizer says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from syncstep import checkpoint as ckpt
from syncstep import sharded_checkpoint
from syncstep.rng import rng_state, set_rng_state


def find_checkpoint(directory: str, ckpt_path: str, print_fn: Callable[..., None]) -> tuple[str | None, dict | None]:
    """(path, state) for ``ckpt_path``: a file, or "last" for the newest readable one in ``directory``."""
    if ckpt_path != "last":
        return ckpt_path, ckpt.load(ckpt_path)
    path, state, problems = ckpt.newest_valid(directory)
    for problem in problems:
        print_fn(f"syncstep: skipping a checkpoint: {problem}")
    if state is None and problems:
        raise ckpt.CheckpointError(
            f"ckpt_path='last': no readable checkpoint in {directory}, although some exist "
            "(see above). Refusing to start from step 0 silently; delete them to start afresh."
        )
    if state is None:
        print_fn(f"syncstep: ckpt_path='last' found no checkpoint in {directory}; starting from scratch.")
    elif problems:
        print_fn(f"syncstep: resuming from {path} instead (the newest readable checkpoint).")
    return path, state


def load_weights(strategy: Any, model: Any, optimizers: list, path: str, state: dict) -> None:
    """The checkpoint's model state (and, if ``optimizers`` are given, theirs) into the running model,
    whichever format the checkpoint has and however the strategy holds the model."""
    if len(state["optimizer_states"]) < len(optimizers):
        raise ckpt.CheckpointError(
            f"{path} holds {len(state['optimizer_states'])} optimizer state(s), but configure_optimizers "
            f"returned {len(optimizers)}."
        )
    if sharded_checkpoint.is_sharded(state):
        sharded_checkpoint.load(model, optimizers, path, state)
    else:
        strategy.load_state(model, optimizers, state["state_dict"], state["optimizer_states"][:len(optimizers)])


def meta_state(model: Any) -> dict[str, Any]:
    """What any syncstep checkpoint holds besides tensors: the format and the saved hyperparameters."""
    from syncstep import __version__

    hparams = dict(getattr(model, "hparams", {}) or {})
    ckpt.check_plain(hparams, "the saved hyperparameters")
    return {"syncstep": {"version": __version__, "format": ckpt.FORMAT_VERSION}, "hyper_parameters": hparams}


def save_weights(trainer: Any, model: Any, path: str) -> None:
    """Weights and hyperparameters only (``trainer.save_checkpoint`` outside a fit); every rank calls it."""
    state = meta_state(model)
    state["state_dict"], _ = trainer.strategy.gather_state(model, [])
    if trainer.is_global_zero:
        ckpt.atomic_save(state, os.path.abspath(path))
    trainer.strategy.barrier()


def restart_checkpoint(ckpt_path: str | None, enable_checkpointing: bool, print_fn: Callable[..., None]) -> str | None:
    """Under ``torchrun --max-restarts``, a restarted job carries on from its last checkpoint."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if ckpt_path is None and restarts > 0 and enable_checkpointing:
        print_fn(f"syncstep: torchrun restart {restarts}: resuming from the last checkpoint.")
        return "last"
    return ckpt_path


class Checkpointer:
    """Saves and restores one fit: the model, the optimizer step's state, the run state, data and RNG,
    the callbacks' state and what on_save_checkpoint adds."""

    def __init__(self, *, trainer: Any, model: Any, stepper: Any, train_data: Any, hyperparams: dict,
                 manual: Any = None) -> None:
        self.trainer, self.model, self.stepper, self.train_data = trainer, model, stepper, train_data
        self.config, self.strategy, self.state = trainer.config, trainer.strategy, trainer.state
        self.hyperparams, self.manual = hyperparams, manual
        self.directory = self.config.checkpoint_dir
        self.epoch_finished = False  # set by the loop once an epoch's end (schedulers included) is done
        self.lock: int | None = None
        if self.config.enable_checkpointing:
            def lock() -> str | None:
                self.lock, why = ckpt.lock_directory(self.directory)
                return why

            why = self.strategy.broadcast_object(lock)  # rank 0 writes the files; every rank learns its verdict
            if why:
                raise ckpt.CheckpointError(why)

    def close(self) -> None:
        """At the end of the fit: let another run use the directory."""
        ckpt.unlock_directory(self.lock)
        self.lock = None

    def save(self, guards: Any, epoch_finished: bool) -> None:
        """Write ``epoch=E-step=S.ckpt`` and point ``last.ckpt`` at it (every rank calls this)."""
        if not self.config.enable_checkpointing:
            return
        guards.agree()
        name = f"epoch={self.state.current_epoch}-step={self.state.global_step}.ckpt"
        path = os.path.join(self.directory, name)
        if self.strategy.global_rank == 0:
            ckpt.remove_stale_temporaries(self.directory)
        failure = None
        try:
            self._write(self._run_state(epoch_finished), path)
            if self.strategy.global_rank == 0:
                ckpt.atomic_copy(path, os.path.join(self.directory, ckpt.LAST))
                for old in ckpt.step_checkpoints(self.directory)[self.config.keep_last:]:
                    ckpt.remove(old)
        except ckpt.CheckpointError as error:  # the disk refused (atomic writes: nothing partial is left)
            failure = str(error)
        self._agree_on(failure)

    def _agree_on(self, failure: str | None) -> None:
        """The barrier after a save, and the save's outcome: on every rank, raise the failure any rank met."""
        import torch

        if self.strategy.num_processes > 1:
            failed = self.strategy.all_reduce(torch.tensor([int(failure is not None)]), "max").item()
            if failed:
                failures = self.strategy.all_gather_object(failure)
                rank = next(r for r, f in enumerate(failures) if f is not None)
                failure = f"on rank {rank}: {failures[rank]}"
        if failure is not None:
            raise ckpt.CheckpointError(failure)

    def save_to(self, path: str, weights_only: bool = False) -> None:
        """``trainer.save_checkpoint(path)``: the run's state (or only the weights) at ``path``; every rank
        calls it (ModelCheckpoint does so on every rank)."""
        path = os.path.abspath(path)
        failure = None
        try:
            if weights_only:
                state = meta_state(self.model)
                state["state_dict"], _ = self.strategy.gather_state(self.model, [])
                if self.strategy.global_rank == 0:
                    ckpt.atomic_save(state, path)
            else:
                self._write(self._run_state(self.epoch_finished), path)
        except ckpt.CheckpointError as error:  # the disk refused: every rank learns it (as in save)
            failure = str(error)
        self._agree_on(failure)

    def _write(self, state: dict[str, Any], path: str) -> None:
        """The model's and optimizers' tensors added to ``state`` and written: one file from rank 0, or every
        rank's shards (fsdp's state_dict_type="sharded")."""
        strategy, optimizers = self.strategy, self.stepper.optimizers
        if strategy.state_dict_type == "sharded":
            sharded_checkpoint.save(strategy, self.model, optimizers, state, path)
        else:
            state["state_dict"], state["optimizer_states"] = strategy.gather_state(self.model, optimizers)
            if strategy.global_rank == 0:
                ckpt.atomic_save(state, path)

    def _run_state(self, epoch_finished: bool) -> dict[str, Any]:
        """Everything a checkpoint holds but the model's and optimizers' tensors."""
        rng = self.strategy.all_gather_object(rng_state())
        step_state = self.stepper.state_dict()
        for i, state in enumerate(step_state["lr_schedulers"]):
            scheduler = self.stepper.scheduler_configs[i].scheduler
            ckpt.check_plain(state, f"lr scheduler {i} ({type(scheduler).__name__})")
        hooks = self.trainer.hooks
        step_state.pop("optimizer_states", None)
        checkpoint = {
            **meta_state(self.model),
            **step_state,
            "loop": self.state.state_dict(epoch_finished),
            "world": {"strategy": self.strategy.name, "num_processes": self.strategy.num_processes,
                      "world_size": self.strategy.world_size, **self.hyperparams},
            "shuffle_seed": self.train_data.shuffle_seed,
            "data": {"num_samples": self.train_data.num_samples},
            "optimizer_classes": [type(opt).__name__ for opt in self.stepper.optimizers],
            "rng": rng,
            "callbacks": hooks.state_dicts(),
        }
        if self.manual is not None:
            checkpoint.update(self.manual.state_dict())
        strategy_state = self.strategy.extra_state()  # (ddp: PowerSGD's error feedback)
        if strategy_state is not None:
            checkpoint["strategy"] = strategy_state
        if self.trainer.datamodule is not None:
            checkpoint["datamodule"] = self.trainer.datamodule.state_dict()
        hooks.on_save_checkpoint(checkpoint)
        ckpt.check_plain({k: v for k, v in checkpoint.items() if k != "rng"},
                         "the checkpoint (callbacks' state_dict, on_save_checkpoint additions)")
        return checkpoint

    def restore(self, ckpt_path: str) -> tuple[int, int]:
        """Load ``ckpt_path`` ("last" or a file) into the run; returns (epoch, samples into it) to start at."""
        path, state = find_checkpoint(self.directory, ckpt_path, self.trainer.print)
        if state is None:
            return 0, 0
        optimizers = self.stepper.optimizers
        if len(state["optimizer_states"]) != len(optimizers):
            raise ckpt.CheckpointError(
                f"{path} holds {len(state['optimizer_states'])} optimizer state(s), but configure_optimizers "
                f"returned {len(optimizers)}."
            )
        saved = state.get("optimizer_classes") or []
        for i, (old, opt) in enumerate(zip(saved, optimizers)):
            if old != type(opt).__name__:
                raise ckpt.CheckpointError(
                    f"{path} holds the state of a {old} optimizer, but configure_optimizers now returns a "
                    f"{type(opt).__name__} (optimizer {i}); its state cannot go into another optimizer. Resume "
                    f"with a {old}, or start a new fit from the weights only (model.load_state_dict("
                    "torch.load(path, weights_only=True)['state_dict'])) without ckpt_path."
                )
        load_weights(self.strategy, self.model, optimizers, path, state)
        self.strategy.load_extra_state(state.get("strategy"), self.trainer.print)
        self.trainer.hooks.on_load_checkpoint(state)
        if self.manual is not None:
            self.manual.load_state_dict(state)
        if self.trainer.datamodule is not None and state.get("datamodule"):
            self.trainer.datamodule.load_state_dict(state["datamodule"])
        for config, sched_state in zip(self.stepper.scheduler_configs, state["lr_schedulers"]):
            config.scheduler.load_state_dict(sched_state)
        if self.stepper.scaler is not None and state.get("grad_scaler"):
            self.stepper.scaler.load_state_dict(state["grad_scaler"])
        loop, world = state["loop"], state["world"]
        self.state.load_state_dict(loop)
        self.train_data.shuffle_seed = state["shuffle_seed"]
        rng, rank = state["rng"], self.strategy.global_rank
        same_world = world["num_processes"] == self.strategy.num_processes
        set_rng_state(rng[rank] if same_world and rank < len(rng) else rng[0])
        self.trainer.print(f"syncstep: resumed from {path}: epoch {loop['epoch']}, step {loop['global_step']}, "
                           f"{loop['epoch_sample']} samples into the epoch.")
        batch, lr = self.trainer.batch_plan, self.trainer.lr_plan
        if world["global_batch_size"] != batch.global_batch_size or world["world_size"] != batch.world_size:
            old = ", ".join(f"{x:.6g}" for x in world.get("lr_factors", []))
            new = ", ".join(f"{o.factor:.6g}" for o in lr.optimizers)
            self.trainer.print(
                f"syncstep: the world changed since the checkpoint: world size {world['world_size']} -> "
                f"{batch.world_size}, global batch {world['global_batch_size']} -> {batch.global_batch_size} "
                f"(accumulation {world['accumulate_grad_batches']} -> {batch.accumulate_grad_batches}); "
                f"LR factor {old} -> {new}."
            )
        self.stepper.load_extra_state(state, self.strategy.global_rank)  # (after: a batch ramp re-plans)
        return loop["epoch"], self._data_changed(state, loop)

    def _data_changed(self, state: dict, loop: dict) -> int:
        """Where to start in the resumed epoch: where the checkpoint was, unless the training set changed
        size, when its order is another permutation and the rest of the epoch cannot be found in it: then
        the epoch starts again from its beginning on the new data (and says so)."""
        old, new = (state.get("data") or {}).get("num_samples"), self.train_data.num_samples
        if old is None or old == new or not self.train_data.distributed_sampler:
            return loop["epoch_sample"]
        if loop["epoch_sample"] == 0:
            self.trainer.print(f"syncstep: the training set has {new} samples, the checkpoint's run had {old}; "
                               f"epoch {loop['epoch']} starts on the new data.")
            return 0
        self.trainer.print(
            f"syncstep: the training set has {new} samples, the checkpoint's run had {old}, and it stopped "
            f"{loop['epoch_sample']} samples into epoch {loop['epoch']}: which samples remain cannot be known "
            f"in the new data, so epoch {loop['epoch']} starts again from its beginning (global step "
            f"{loop['global_step']} stays). Resume from a checkpoint saved at an epoch's end to avoid this."
        )
        return 0
