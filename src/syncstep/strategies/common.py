"""Pieces the strategies share: moving a batch, a module whose forward runs the user's step, what the
one-process strategies share (``OneProcess``) and what the process-per-device ones share
(``ProcessPerDevice``: launching, the process group, the collectives)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from syncstep.checkpoint import strip_prefixes
from syncstep.launch import Environment, can_self_launch, init_process_group, self_launch

T = TypeVar("T")

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
    state_dict_type = "full"
    forward_is_collective = False

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

    def gather_state(self, model: torch.nn.Module, optimizers: list) -> tuple[dict, list[dict]]:
        return plain_state(model, optimizers)

    def load_state(self, model: torch.nn.Module, optimizers: list, model_state: dict, optimizer_states: list) -> None:
        load_plain_state(model, optimizers, model_state, optimizer_states)

    def summary_lines(self, optimizers: list) -> list[str]:
        return []

    def extra_state(self) -> dict | None:
        return None

    def load_extra_state(self, saved: dict | None, print_fn: Any = print) -> None:
        pass

    def register_comm_hook(self, wrappers: list) -> None:
        """DDP's gradient communication hook (strategies/ddp.py); nothing to register here."""

    def all_gather(self, data: Any) -> Any:
        return data  # one process: Lightning returns the data as it is, with no world dimension

    def prepare_for_manual_backward(self, loss: torch.Tensor) -> None:
        pass


def plain_state(model: torch.nn.Module, optimizers: list) -> tuple[dict, list[dict]]:
    """The model's and optimizers' state dicts as they are (every tensor whole in every process)."""
    return strip_prefixes(model.state_dict()), [opt.state_dict() for opt in optimizers]


def load_plain_state(model: torch.nn.Module, optimizers: list, model_state: dict, optimizer_states: list) -> None:
    model.load_state_dict(model_state)
    for opt, state in zip(optimizers, optimizer_states):
        opt.load_state_dict(state)


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class ProcessPerDevice:
    """What ddp and fsdp share: one process per device, started by a launcher or by ``launch`` itself,
    a process group, and collectives that put a tensor where the backend needs it."""

    name: str
    state_dict_type = "full"  # what a checkpoint holds: every tensor whole ("sharded": fsdp's option)
    forward_is_collective = False  # whether every forward must run on every rank (fsdp's all-gathers)

    def __init__(self, *, accelerator: str, device_ids: list[int] | None, num_devices: int, num_nodes: int,
                 env: Environment, timeout: timedelta, **_: Any) -> None:
        self.env, self.timeout = env, timeout
        self.num_devices = num_devices
        launched = env.source != "local"
        self.global_rank, self.local_rank = env.global_rank, env.local_rank
        cuda = accelerator != "cpu"
        self.devices = [torch.device("cuda", device_ids[self.local_rank]) if cuda else torch.device("cpu")]
        # The k of the global batch, known before any process starts (a launcher's world is checked
        # against it in strategies/select.py); the processes are the replicas.
        self.world_size = num_devices * num_nodes
        self.num_processes = env.world_size if launched else 1
        self.gradient_averaging = self.world_size
        self.replicas = [self.global_rank]
        # NCCL only reduces tensors on the GPU; gloo takes CPU tensors.
        self.collective_device = self.root_device if self.root_device.type == "cuda" else torch.device("cpu")

    @property
    def root_device(self) -> torch.device:
        return self.devices[0]

    def launch(self) -> None:
        """From a plain ``python train.py`` with devices > 1, start the processes (this one never returns)."""
        if self.env.source != "local" or self.num_devices == 1:
            return  # already launched, or one process: a world of one
        why = can_self_launch()
        if why:
            raise ValueError(
                f"strategy={self.name!r} with devices={self.num_devices} needs {self.num_devices} processes (one "
                f"per device), and syncstep cannot start them itself because {why}. Run the script with python, "
                f"or with torchrun --nproc-per-node={self.num_devices} script.py."
            )
        self_launch(self.num_devices)

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)
        init_process_group(self.env, self.root_device, self.timeout)
        if not dist.is_initialized():  # pragma: no cover - init_process_group raises instead
            raise RuntimeError("the process group did not start")

    def _move(self, batch: Any) -> Any:
        return batch if self.devices[0].type == "cpu" else move_to_device(batch, self.devices[0])

    # -- collectives: every rank calls them, in the same order --------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum / max / min over the processes; the result is on ``tensor``'s device (in place if it can)."""
        if not dist.is_initialized():
            return tensor
        moved = tensor.to(self.collective_device)
        dist.all_reduce(moved, op=_OPS[op])
        return moved if moved.device == tensor.device else moved.to(tensor.device)

    def broadcast_object(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, sent to every rank (``make`` runs nowhere else)."""
        if not dist.is_initialized():
            return make()
        box: list[Any] = [make() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: T) -> list[T]:
        if not dist.is_initialized():
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def register_comm_hook(self, wrappers: list) -> None:
        """DDP's gradient communication hook (strategies/ddp.py); nothing to register here."""

    def all_gather(self, data: Any) -> Any:
        """Every rank's tensors stacked along a new first dimension (on the collective device and back)."""
        if not dist.is_initialized():
            return data

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            local = tensor.detach().to(self.collective_device).contiguous()
            out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(out, local)
            return torch.stack(out).to(tensor.device)

        return apply_to_tensors(data, gather)

    def prepare_for_manual_backward(self, loss: torch.Tensor) -> None:
        pass  # (DDP's reducer needs it; fsdp's hooks do not)

    def extra_state(self) -> dict | None:
        return None  # (ddp: its communication hook's state)

    def load_extra_state(self, saved: dict | None, print_fn: Any = print) -> None:
        pass
