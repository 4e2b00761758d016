"""Hyperparameters: ``self.save_hyperparameters()``, ``self.hparams`` and ``load_from_checkpoint``.

The saved hyperparameters go into every checkpoint as plain data (``"hyper_parameters"``), so the
checkpoint still loads with ``weights_only=True``. A value that is not plain data (an ``nn.Module``
passed to ``__init__``, a custom object) is left out with a warning that names it, as Lightning
recommends (``save_hyperparameters(ignore=[...])``); give it again to ``load_from_checkpoint``.
"""

from __future__ import annotations

import inspect
import types
import warnings
from typing import Any

import torch


class AttributeDict(dict):
    """A dict whose keys are also attributes: ``self.hparams.lr`` (Lightning's type)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as error:
            raise AttributeError(f"no hyperparameter {key!r}; saved: {sorted(self)}") from error

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def _init_arguments(obj: Any, frame: types.FrameType | None) -> dict[str, Any]:
    """The arguments of every ``__init__`` of ``obj`` on the stack, the subclass's last (they win)."""
    frames = []
    while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is obj:
        frames.append(frame)
        frame = frame.f_back
    found: dict[str, Any] = {}
    for f in reversed(frames):  # base classes' __init__ are deeper in the stack
        info = inspect.getargvalues(f)
        for name in info.args[1:]:
            found[name] = info.locals[name]
        if info.keywords:
            found.update(info.locals[info.keywords])
    return found


class HyperparametersMixin:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hparams = AttributeDict()

    def save_hyperparameters(self, *args: Any, ignore: str | list[str] | None = None, frame: Any = None,
                             logger: bool = True) -> None:
        """Keep the ``__init__`` arguments (all of them, or the names given, or one dict given) in
        ``self.hparams``, in every checkpoint, and in the loggers' hyperparameters."""
        ignored = {ignore} if isinstance(ignore, str) else set(ignore or ())
        if len(args) == 1 and isinstance(args[0], dict):
            chosen = dict(args[0])
        elif len(args) == 1 and hasattr(args[0], "__dict__") and not isinstance(args[0], str):
            chosen = dict(vars(args[0]))  # an argparse.Namespace
        else:
            init = _init_arguments(self, frame or inspect.currentframe().f_back)
            names = list(args) or list(init)
            missing = [n for n in names if n not in init]
            if missing:
                raise ValueError(f"save_hyperparameters({', '.join(map(repr, missing))}): not arguments of "
                                 f"{type(self).__name__}.__init__ (its arguments: {sorted(init)}).")
            chosen = {n: init[n] for n in names}
        kept = AttributeDict()
        for name, value in chosen.items():
            if name in ignored:
                continue
            if not _plain(value):
                warnings.warn(
                    f"save_hyperparameters(): {name!r} is a {type(value).__name__}, not plain data, so it is not "
                    f"kept in checkpoints (they load with weights_only=True). Pass save_hyperparameters(ignore="
                    f"[{name!r}]) to silence this, and give it again: {type(self).__name__}.load_from_checkpoint("
                    f"path, {name}=...).",
                    stacklevel=2,
                )
                continue
            kept[name] = value
        self._hparams = kept
        self._log_hyperparams = logger

    @property
    def hparams(self) -> AttributeDict:
        if not hasattr(self, "_hparams"):
            object.__setattr__(self, "_hparams", AttributeDict())
        return self._hparams

    @property
    def hparams_initial(self) -> AttributeDict:
        return AttributeDict(self.hparams)


def load_from_checkpoint(cls: type, checkpoint_path: str, map_location: Any = None, strict: bool | None = None,
                         **overrides: Any) -> Any:
    """Build ``cls`` from the checkpoint's hyperparameters (updated with ``overrides``) and load its weights."""
    from syncstep import checkpoint as ckpt

    state = ckpt.load(str(checkpoint_path))
    arguments = {**(state.get("hyper_parameters") or {}), **overrides}
    signature = inspect.signature(cls.__init__)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if not takes_any:
        arguments = {k: v for k, v in arguments.items() if k in signature.parameters}
    try:
        model = cls(**arguments)
    except TypeError as error:
        raise TypeError(
            f"{cls.__name__}.load_from_checkpoint({checkpoint_path!r}) could not build the model from the saved "
            f"hyperparameters {sorted(state.get('hyper_parameters') or {})} and the overrides {sorted(overrides)}: "
            f"{error}. Arguments left out of save_hyperparameters must be given here as keywords."
        ) from None
    model.load_state_dict(state["state_dict"], strict=True if strict is None else strict)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    model.on_load_checkpoint(state)
    return model
