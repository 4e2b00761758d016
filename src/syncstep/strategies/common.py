"""Pieces every strategy uses: moving a batch, and a module whose forward runs the user's step."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

_HOOKS = {"train": "training_step", "validate": "validation_step", "test": "test_step", "predict": "predict_step"}


def takes_batch_idx(module: torch.nn.Module, hook: str) -> bool:
    """Whether the user's hook takes ``batch_idx`` (Lightning allows ``training_step(self, batch)``)."""
    try:
        parameters = list(inspect.signature(getattr(module, hook)).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere inside tuples, lists, dicts, namedtuples and dataclasses, moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)((k, move_to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: move_to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    return batch


def extract_loss(output: Any) -> torch.Tensor:
    """The loss from what ``training_step`` returned: a scalar tensor or a dict with "loss"."""
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = "None" if output is None else f"{type(output).__name__}"
        if isinstance(loss, torch.Tensor):
            got = f"a tensor of shape {tuple(loss.shape)}"
        raise ValueError(
            f"training_step must return the loss as a scalar tensor (or a dict with key 'loss'), got {got}. "
            "syncstep needs a loss on every step: skipping a step on one process would stall the others."
        )
    return loss


class StepRunner(torch.nn.Module):
    """``forward`` runs the user's step hook, so that DDP's forward hooks and DP's replication apply.

    It also tells ``Module.log`` (through a thread-local context) which stage and how many real
    samples the batch holds, which is how logged values get their weights.
    """

    def __init__(self, module: torch.nn.Module, log_context: Any) -> None:
        super().__init__()
        self.module = module
        self.log_context = log_context
        self.takes_batch_idx = {stage: takes_batch_idx(module, hook) for stage, hook in _HOOKS.items()}

    def forward(self, stage: str, batch: Any, batch_idx: int, count: int) -> Any:
        context = self.log_context
        context.stage, context.count = stage, count
        # self._modules["module"], not self.module: nn.Module's __getattr__ fallback is slow, every step.
        # (Looked up on each call: a DP replica runs its own copy of the module.)
        hook = getattr(self._modules["module"], _HOOKS[stage])
        return hook(batch, batch_idx) if self.takes_batch_idx[stage] else hook(batch)


def apply_to_tensors(data: Any, fn: Any) -> Any:
    """``fn`` applied to every tensor inside dicts, lists and tuples."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, dict):
        return type(data)((k, apply_to_tensors(v, fn)) for k, v in data.items())
    if isinstance(data, (list, tuple)):
        return type(data)(apply_to_tensors(v, fn) for v in data)
    return data


class OneProcess:
    """What the single-device and dp strategies share: one process, so nothing to launch or join, and
    every collective is the identity (the trainer calls them at any world size, with no ``if``)."""

    name: str
    devices: list[torch.device]
    num_processes = 1
    global_rank = 0
    local_rank = 0

    @property
    def root_device(self) -> torch.device:
        return self.devices[0]

    def launch(self) -> None:
        pass

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)

    def sync_gradients(self, enabled: bool) -> None:
        pass  # one process: there is nothing to synchronise

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def broadcast_object(self, make: Any) -> Any:
        return make()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def all_gather(self, data: Any) -> Any:
        return data  # one process: Lightning returns the data as it is, with no world dimension

    def prepare_for_manual_backward(self, loss: torch.Tensor) -> None:
        pass
