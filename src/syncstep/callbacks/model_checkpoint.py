"""``ModelCheckpoint``: keep the best checkpoints by a logged metric (Lightning's arguments and meaning).

Each file is a whole syncstep checkpoint (``trainer.save_checkpoint``: atomic, loaded safely,
resumable with ``fit(ckpt_path=...)`` and readable by ``Module.load_from_checkpoint``). This callback
is separate from the trainer's own resumable checkpoints (``Trainer(enable_checkpointing=...)`` in
``default_root_dir/checkpoints/``): by default it writes into the log directory's ``checkpoints/``.

Every rank takes the same decision: the monitored value is rank 0's (broadcast when a save is due;
epoch metrics are identical on every rank anyway), and every rank joins the save.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from syncstep.callbacks.base import Callback

_FIELD = re.compile(r"\{([^{}:]+)(:[^{}]*)?\}")


class ModelCheckpoint(Callback):
    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = None,
                 verbose: bool = False, save_last: bool | None = None, save_top_k: int = 1,
                 save_weights_only: bool = False, mode: str = "min", auto_insert_metric_name: bool = True,
                 every_n_train_steps: int | None = None, train_time_interval: Any = None,
                 every_n_epochs: int | None = None, save_on_train_epoch_end: bool | None = None,
                 enable_version_counter: bool = True) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint(mode={mode!r}): use 'min' or 'max'.")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k!r}) must be an int >= -1 (-1 keeps every one).")
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k}, monitor=None): without a metric to rank by "
                             "only the latest checkpoint (1), all of them (-1) or none (0) can be kept.")
        if train_time_interval is not None:
            raise ValueError("ModelCheckpoint(train_time_interval=...) is a Lightning option syncstep does not "
                             "support; use every_n_train_steps or every_n_epochs.")
        if every_n_train_steps and every_n_epochs:
            raise ValueError("ModelCheckpoint: pass every_n_train_steps or every_n_epochs, not both.")
        self.dirpath = os.path.abspath(dirpath) if dirpath else None
        self.filename, self.monitor, self.verbose = filename, monitor, verbose
        self.save_last, self.save_top_k, self.save_weights_only = save_last, save_top_k, save_weights_only
        self.mode, self.auto_insert_metric_name = mode, auto_insert_metric_name
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_epochs = 1 if every_n_epochs is None and not every_n_train_steps else (every_n_epochs or 0)
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.enable_version_counter = enable_version_counter
        self.best_k_models: dict[str, float] = {}
        self.best_model_path = ""
        self.kth_best_model_path = ""
        self.last_model_path = ""
        self._best_score: float | None = None
        self._last_saved_step = 0  # nothing to save before the first optimizer step

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode,
                                        every_n_train_steps=self.every_n_train_steps,
                                        every_n_epochs=self.every_n_epochs)

    @property
    def best_model_score(self) -> Any:
        """The best monitored value so far (a tensor, as in Lightning), or None."""
        import torch

        return None if self._best_score is None else torch.tensor(self._best_score)

    # -- when -----------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        if self.dirpath == os.path.abspath(trainer.checkpoint_dir):
            raise ValueError(
                f"ModelCheckpoint(dirpath={self.dirpath!r}) is the directory of the trainer's own resumable "
                "checkpoints, which it prunes by keep_last; give ModelCheckpoint another directory."
            )

    def _saves_on_train_epoch_end(self, trainer: Any) -> bool:
        if self.save_on_train_epoch_end is not None:
            return self.save_on_train_epoch_end
        return not trainer._fit_validates

    def _hook_wanted(self, name: str) -> bool:
        # A batch hook costs every step its call: only ask for it when saving every N steps.
        return name != "on_train_batch_end" or bool(self.every_n_train_steps)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._saves_on_train_epoch_end(trainer) and self._epoch_due(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.stage == "fit" and not trainer.sanity_checking and not self._saves_on_train_epoch_end(trainer) \
                and self._epoch_due(trainer):
            self._save(trainer)

    def _epoch_due(self, trainer: Any) -> bool:
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # -- what -----------------------------------------------------------------------------------
    def _save(self, trainer: Any) -> None:
        if trainer.global_step == self._last_saved_step:
            return  # the same state twice (e.g. a validation at the end of an epoch that just saved)
        self._last_saved_step = trainer.global_step
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics.update(epoch=trainer.current_epoch, step=trainer.global_step)
        # One decision for every rank: rank 0's values (epoch metrics are the same everywhere anyway).
        metrics = trainer.strategy.broadcast_object(lambda: metrics)
        if self.monitor is not None and self.monitor not in metrics:
            raise KeyError(
                f"ModelCheckpoint(monitor={self.monitor!r}) could not find {self.monitor!r} among the logged "
                f"metrics: {sorted(k for k in metrics if k not in ('epoch', 'step'))}. Log it with self.log, or "
                "fix the name (values logged with on_step and on_epoch have _step and _epoch names too)."
            )
        if self.save_top_k != 0:
            self._save_top_k(trainer, metrics)
        if self.save_last:
            last = self._path(self.CHECKPOINT_NAME_LAST, metrics, versioned=False)
            trainer.save_checkpoint(last, weights_only=self.save_weights_only)
            self.last_model_path = last

    def _save_top_k(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self.monitor is None:
            path = self._path(self.filename, metrics)
            trainer.save_checkpoint(path, weights_only=self.save_weights_only)
            if self.save_top_k == 1:
                for old in list(self.best_k_models):
                    self._remove(trainer, old)
            self.best_k_models[path] = float(metrics["step"])
            self.best_model_path = self.kth_best_model_path = path
            return
        score = metrics[self.monitor]
        if math.isnan(score):
            score = math.inf if self.mode == "min" else -math.inf
        full = self.save_top_k != -1 and len(self.best_k_models) >= self.save_top_k
        if full and not self._better(score, self.best_k_models[self.kth_best_model_path]):
            if self.verbose:
                trainer.print(f"Epoch {trainer.current_epoch}, global step {trainer.global_step}: "
                              f"{self.monitor!r} was not in top {self.save_top_k}")
            return
        path = self._path(self.filename, metrics)
        trainer.save_checkpoint(path, weights_only=self.save_weights_only)
        if full:
            self._remove(trainer, self.kth_best_model_path)
        self.best_k_models[path] = score
        ranked = sorted(self.best_k_models, key=self.best_k_models.get, reverse=self.mode == "max")
        self.best_model_path, self.kth_best_model_path = ranked[0], ranked[-1]
        self._best_score = self.best_k_models[self.best_model_path]
        if self.verbose:
            trainer.print(f"Epoch {trainer.current_epoch}, global step {trainer.global_step}: {self.monitor!r} "
                          f"reached {score:.5f} (best {self._best_score:.5f}), saving model to {path!r} as top "
                          f"{self.save_top_k}")

    def _better(self, score: float, than: float) -> bool:
        return score < than if self.mode == "min" else score > than

    def _remove(self, trainer: Any, path: str) -> None:
        self.best_k_models.pop(path, None)
        if trainer.is_global_zero and os.path.exists(path) and path != self.last_model_path:
            os.remove(path)

    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None) -> str:
        """``filename`` with its ``{name}`` / ``{name:format}`` fields filled from ``metrics``
        (Lightning's rule: ``{epoch}`` becomes ``epoch=3`` unless auto_insert_metric_name=False)."""
        template = filename or self.filename or "{epoch}-{step}"

        def fill(match: re.Match) -> str:
            name, spec = match.group(1), match.group(2) or ""
            value = metrics.get(name, 0)
            if isinstance(value, float) and value.is_integer() and not spec and name in ("epoch", "step"):
                value = int(value)
            text = format(value, spec[1:]) if spec else str(value)
            return f"{name}{self.CHECKPOINT_EQUALS_CHAR}{text}" if self.auto_insert_metric_name else text

        return _FIELD.sub(fill, template)

    def _path(self, filename: str | None, metrics: dict[str, Any], versioned: bool = True) -> str:
        name = self.format_checkpoint_name(metrics, filename)
        path = os.path.join(self.dirpath, name + self.FILE_EXTENSION)
        version = 1
        while versioned and self.enable_version_counter and path in self.best_k_models | {self.last_model_path: 0}:
            path = os.path.join(self.dirpath, f"{name}-v{version}{self.FILE_EXTENSION}")
            version += 1
        return path

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best_model_score": self._best_score, "best_model_path": self.best_model_path,
                "kth_best_model_path": self.kth_best_model_path, "best_k_models": dict(self.best_k_models),
                "last_model_path": self.last_model_path, "dirpath": self.dirpath}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath") == self.dirpath or self.dirpath is None:
            self.best_k_models = dict(state_dict.get("best_k_models", {}))
            self.best_model_path = state_dict.get("best_model_path", "")
            self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
            self.last_model_path = state_dict.get("last_model_path", "")
            self._best_score = state_dict.get("best_model_score")
