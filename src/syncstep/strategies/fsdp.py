"""Fully sharded data parallel on torch's FSDP2 (``torch.distributed.fsdp.fully_shard``), ZeRO-3.

Still data parallelism, so everything ddp does holds: one process per device, each replica its own
part of every step's samples, gradients averaged, the same batch and LR arithmetic, evaluation and
guards. What differs is where the model lives. Every parameter becomes a DTensor cut along its first
dimension into W pieces, one per process; so each device holds 1/W of the parameters, of the
gradients (reduce-scattered in backward instead of all-reduced) and of the optimizer state (the
optimizer is built in ``configure_optimizers``, after sharding, over the shards). A sharded unit's
parameters are all-gathered just before its forward and freed after it, and again for its backward:
a forward is a collective, so every rank must run every forward (``forward_is_collective``:
evaluation gives a rank with no batch left a batch of weight 0, as training already does).

Sharding, in ``setup``: if the user's ``configure_model()`` called ``fully_shard`` itself, that is
the sharding; otherwise every module that ``auto_wrap_policy`` picks becomes a unit, bottom-up.
Activation checkpointing wraps the modules of ``activation_checkpointing_policy``. The StepRunner,
whose forward runs the user's step hook, is always the root unit: whatever ``training_step`` calls,
the parameters left outside the units are gathered around it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from syncstep.checkpoint import CheckpointError
from syncstep.strategies.common import ProcessPerDevice, StepRunner, extract_loss

DEFAULT_MIN_NUM_PARAMS = 100_000_000  # torch's size_based_auto_wrap_policy default
_ROOT = "_syncstep_fsdp_root"  # on the user's module: (root unit, world size) once it is sharded
_WRAPPERS = ("_checkpoint_wrapped_module", "_orig_mod")


def _class_set(value: Any, what: str) -> Any:
    if value is None or callable(value) and not isinstance(value, type):
        return value
    if isinstance(value, type):
        value = {value}
    if isinstance(value, (set, frozenset, list, tuple)) and value and all(
            isinstance(c, type) and issubclass(c, torch.nn.Module) for c in value):
        return frozenset(value)
    raise TypeError(
        f"{what} must be a set of torch.nn.Module classes (e.g. {{Block}}), a function module -> bool"
        f"{', an int (a parameter count)' if what == 'auto_wrap_policy' else ''} or None; got {value!r}."
    )


@dataclasses.dataclass(frozen=True)
class FSDPStrategy:
    """``Trainer(strategy=FSDPStrategy(...))``: what fsdp shards and how (Lightning's names).

    ``strategy="fsdp"`` is ``FSDPStrategy()``. Precision comes from the Trainer's ``precision``:
    "bf16-mixed" computes with bf16 copies of the parameters and reduces gradients in fp32 (FSDP2's
    ``MixedPrecisionPolicy``); the sharded parameters the optimizer steps stay fp32.
    """

    auto_wrap_policy: Any = None
    """Which submodules become units of their own (gathered one at a time, so the peak memory is one
    unit's full parameters): a set of module classes (``{TransformerBlock}``, the usual choice); a
    function ``module -> bool``; an int N, torch's size rule: bottom-up, every submodule whose
    parameters not already in a unit number at least N; None: the size rule with N = 100,000,000
    (torch's ``size_based_auto_wrap_policy`` default). The module itself and whatever no unit takes
    form the root unit. Ignored when ``configure_model`` shards the model itself."""
    activation_checkpointing_policy: Any = None
    """Module classes (or a function ``module -> bool``) whose activations are recomputed in backward
    instead of kept (torch's ``checkpoint_wrapper``, non-reentrant): less memory, one more forward."""
    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in CPU memory (FSDP2's
    ``CPUOffloadPolicy``): the optimizer steps on the CPU, each unit is copied to the GPU for use."""
    state_dict_type: str = "full"
    """"full": checkpoints are the one-file format of every strategy, gathered to rank 0 (needs the
    model and optimizer state to fit in rank 0's CPU memory); "sharded": each rank writes its own
    shards into a checkpoint directory (torch.distributed.checkpoint), loadable at any world size."""
    reshard_after_forward: bool = True
    """Free a unit's gathered parameters after its forward (gather again for backward). False keeps
    them until backward: fewer all-gathers, more memory (ZeRO-2-like for the parameters)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        policy = self.auto_wrap_policy
        if isinstance(policy, int) and not isinstance(policy, bool):
            if policy < 1:
                raise ValueError(f"auto_wrap_policy as a parameter count must be >= 1, got {policy}.")
        else:
            set_(self, "auto_wrap_policy", _class_set(policy, "auto_wrap_policy"))
        set_(self, "activation_checkpointing_policy",
             _class_set(self.activation_checkpointing_policy, "activation_checkpointing_policy"))
        if self.state_dict_type not in ("full", "sharded"):
            raise ValueError(f"state_dict_type must be 'full' or 'sharded', got {self.state_dict_type!r}.")
        for name in ("cpu_offload", "reshard_after_forward"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")


def _matches(policy: Any) -> Callable[[torch.nn.Module], bool]:
    return (lambda m: isinstance(m, tuple(policy))) if isinstance(policy, frozenset) else policy


def clean_name(name: str) -> str:
    """A parameter's name as state dicts spell it: without activation checkpointing's or compile's wrappers."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def pick_units(model: torch.nn.Module, policy: Any) -> list[tuple[str, torch.nn.Module]]:
    """The submodules to shard as units of their own, children before parents (fully_shard's order)."""
    candidates = [(name, m) for name, m in model.named_modules() if m is not model]
    candidates.reverse()  # named_modules lists a parent before its children
    if isinstance(policy, frozenset) or callable(policy):
        match = _matches(policy)
        return [(name, m) for name, m in candidates if match(m)]
    min_params = DEFAULT_MIN_NUM_PARAMS if policy is None else policy
    taken: set[int] = set()
    units = []
    for name, module in candidates:
        own = [p for p in module.parameters() if id(p) not in taken]
        if sum(p.numel() for p in own) >= min_params:
            units.append((name, module))
            taken.update(id(p) for p in own)
    return units


def checkpoint_activations(model: torch.nn.Module, policy: Any) -> list[str]:
    """Wrap the modules ``policy`` picks in torch's checkpoint_wrapper (non-reentrant); their names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    match = _matches(policy)
    names = [clean_name(n) for n, m in model.named_modules() if m is not model and match(m)]
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(model, check_fn=lambda m: m is not model and match(m),
                                   checkpoint_wrapper_fn=wrapper)
    return names


def _broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values into every rank's ``tensors``, one flat broadcast per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


class FSDP(ProcessPerDevice):
    """The running fsdp strategy, built by strategies/select.py from an :class:`FSDPStrategy`."""

    name = "fsdp"
    forward_is_collective = True

    def __init__(self, *, options: FSDPStrategy | None = None, precision: str = "32", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = options if options is not None else FSDPStrategy()
        self.state_dict_type = self.options.state_dict_type
        if precision == "16-mixed":
            raise ValueError(
                "strategy='fsdp' does not support precision='16-mixed': fp16 needs a gradient scaler that "
                "agrees on inf/NaN over all the gradient shards, which syncstep has only for ddp. Use "
                "precision='bf16-mixed' (no scaler needed), or strategy='ddp' for fp16."
            )
        self.precision = precision
        self.runner: StepRunner | None = None  # the root unit
        self.units: list[str] = []  # names of the modules sharded as units (for the summary)
        self.checkpointed: list[str] = []
        self.buffers: list[torch.Tensor] = []

    # -- sharding --------------------------------------------------------------------------------
    def setup(self, runner: StepRunner) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        model = runner.module
        sharded = model.__dict__.get(_ROOT)
        if sharded is not None:  # an earlier fit / validate of this model sharded it: use that sharding
            root, world = sharded
            if world != self.world_size:
                raise ValueError(
                    f"this model was sharded over {world} processes by an earlier run, and cannot be resharded "
                    f"in place for {self.world_size}. Build a new model (and load a checkpoint into it)."
                )
            root.log_context = runner.log_context
            self.runner = root
            # What constructing DDP again does for ddp: every rank continues from rank 0's buffers.
            self.buffers = [b for b in model.buffers() if b.numel()]
            if self.buffers:
                _broadcast_from_rank0(self.buffers)
            return
        params = list(model.parameters())
        if not params:
            raise ValueError(
                f"strategy='fsdp' shards the model's parameters, but {type(model).__name__} has none (after "
                "configure_model). Create the layers in __init__ or configure_model, or use strategy='ddp'."
            )
        device = self.root_device
        model.to(device)
        user_sharded = any(isinstance(m, FSDPModule) for m in model.modules())
        if not any(isinstance(p, DTensor) for p in params):
            from syncstep.strategies.ddp import warn_if_parameters_differ

            warn_if_parameters_differ(model, device)
            # As DDP does at construction: every rank starts from rank 0's parameters and buffers.
            _broadcast_from_rank0([*params, *model.buffers()])
        options = self.options
        if options.activation_checkpointing_policy is not None:
            self.checkpointed = checkpoint_activations(model, options.activation_checkpointing_policy)
        kwargs: dict[str, Any] = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),)),
                                  "reshard_after_forward": options.reshard_after_forward}
        if self.precision == "bf16-mixed":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if options.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        if user_sharded:
            self.units = [clean_name(n) for n, m in model.named_modules() if isinstance(m, FSDPModule)]
        else:
            units = pick_units(model, options.auto_wrap_policy)
            for _, module in units:
                fully_shard(module, **kwargs)
            self.units = [clean_name(n) for n, _ in reversed(units)]
        fully_shard(runner, **kwargs)
        self.runner = runner
        object.__setattr__(model, _ROOT, (runner, self.world_size))  # not a submodule: no cycle in modules()
        # DDP broadcasts rank 0's buffers (BatchNorm statistics) before every forward; so does fsdp,
        # so that every rank evaluates with the same statistics and checkpoints hold what ddp's do.
        self.buffers = [b for b in model.buffers() if b.numel()]

    # -- one step --------------------------------------------------------------------------------
    def sync_gradients(self, enabled: bool) -> None:
        # FSDP2's own switch: without sync, each unit keeps its full gradient and accumulates into it;
        # the last micro-batch's backward reduce-scatters the sum.
        self.runner.set_requires_gradient_sync(enabled)

    manual = False  # manual optimization: training_step's output is returned as it is

    def training_step(
        self, batches: Iterator[Any], counts: tuple[int, ...], weights: tuple[float, ...], batch_idx: int
    ) -> torch.Tensor:
        if self.buffers:
            _broadcast_from_rank0(self.buffers)
        output = self.runner("train", self._move(next(batches)), batch_idx, counts[0])
        if self.manual:
            return output
        loss = extract_loss(output)
        weight = weights[0]
        return loss if weight == 1.0 else loss * weight

    def evaluation_step(self, stage: str, batches: list[Any], counts: list[int], batch_idx: int) -> list[Any]:
        # Through the root unit (not the inner module, as ddp may): its forward gathers the parameters.
        return [self.runner(stage, self._move(batches[0]), batch_idx, counts[0])]

    def teardown(self) -> None:
        pass  # the model stays sharded; a later validate / test on it uses the same sharding

    # -- checkpoints: "full", every tensor whole (gathered to rank 0) -----------------------------------
    def gather_state(self, model: torch.nn.Module, optimizers: list) -> tuple[dict, list[dict]]:
        """Rank 0: the state dicts one process would hold (optimizer states keyed by index, as
        ``optimizer.state_dict()``); other ranks: empty dicts. Every rank must call it."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        return model_state, [indexed_optimizer_state(get_optimizer_state_dict(model, opt, options=options))
                             for opt in optimizers]

    def load_state(self, model: torch.nn.Module, optimizers: list, model_state: dict, optimizer_states: list) -> None:
        """Whole tensors (on every rank) into the shards."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        for opt, state in zip(optimizers, optimizer_states):
            set_optimizer_state_dict(model, opt, named_optimizer_state(model, opt, state), options=options)

    # -- the start-up summary ----------------------------------------------------------------------
    def summary_lines(self, optimizers: list) -> list[str]:
        params = {id(p): (tuple(p.shape), p.dtype.itemsize, state_values_per_parameter(opt))
                  for opt in optimizers for group in opt.param_groups for p in group["params"]}
        memory = sharded_memory(list(params.values()), self.world_size)
        units = ", ".join(self.units[:6]) + (f", ... ({len(self.units)} in all)" if len(self.units) > 6 else "")
        how = [f"root + {len(self.units)} unit{'s' * (len(self.units) != 1)}" + (f" ({units})" if units else "")
               if self.runner is not None else "units chosen when fit sets the model up"]
        if self.checkpointed:
            how.append(f"activation checkpointing on {len(self.checkpointed)} module(s)")
        if self.precision == "bf16-mixed":
            how.append("bf16 compute, fp32 gradient reduction")
        if self.options.cpu_offload:
            how.append("shards kept in CPU memory (cpu_offload)")
        return [f"  fsdp: every parameter in {self.world_size} shard{'s' * (self.world_size != 1)}; {'; '.join(how)}; "
                f"checkpoints {self.state_dict_type}", memory]


# -- arithmetic and conversions (pure functions) -------------------------------------------------------

def state_values_per_parameter(opt: torch.optim.Optimizer) -> int | None:
    """How many tensors the size of a parameter ``opt`` keeps per parameter, or None if unknown."""
    group = opt.param_groups[0]
    name = type(opt).__name__
    if name in ("Adam", "AdamW"):
        return 3 if group.get("amsgrad") else 2
    if name == "SGD":
        return 1 if group.get("momentum", 0) else 0
    if name == "RMSprop":
        return 1 + bool(group.get("momentum", 0)) + bool(group.get("centered"))
    if name in ("Adagrad", "Rprop"):
        return 1 if name == "Adagrad" else 2
    if name in ("Adadelta", "Adamax", "NAdam", "RAdam"):
        return 2
    return None


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= 10 * size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def sharded_memory(params: list[tuple[tuple[int, ...], int, int | None]], world_size: int) -> str:
    """Per-device bytes of parameters, gradients and optimizer state under fsdp, against ddp's.

    ``params``: (shape, bytes per element, optimizer state tensors of its size) for each parameter.
    FSDP2 cuts dim 0 into ``world_size`` pieces of ceil(d0 / W) rows (the last padded), so a device
    holds ceil(d0 / W) x the other dims of each parameter; the same of its gradient (the parameter's
    dtype) and of each optimizer state tensor. ddp holds every one whole.
    """
    full = local = state_full = state_local = 0
    unknown = False
    for shape, size, states in params:
        whole = math.prod(shape) * size
        piece = (math.ceil(shape[0] / world_size) * math.prod(shape[1:]) if shape else 1) * size
        full, local = full + whole, local + piece
        if states is None:
            unknown = True
        else:
            state_full, state_local = state_full + states * whole, state_local + states * piece
    return (f"  per device: parameters {_bytes(local)} (ddp: {_bytes(full)}), gradients {_bytes(local)} "
            f"(ddp: {_bytes(full)}), optimizer state {_bytes(state_local)} (ddp: {_bytes(state_full)})"
            + (" (an optimizer of unknown state left out)" if unknown else ""))


def indexed_optimizer_state(state: dict) -> dict:
    """A state dict keyed by parameter name (torch.distributed.checkpoint's) -> keyed by position, as
    ``optimizer.state_dict()`` and every other strategy's checkpoint have it. Empty stays empty."""
    if not state:
        return {}
    order = [fqn for group in state["param_groups"] for fqn in group["params"]]
    index = {fqn: i for i, fqn in enumerate(order)}
    return {"state": {index[fqn]: value for fqn, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[fqn] for fqn in group["params"]]}
                             for group in state["param_groups"]]}


def named_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> dict:
    """The inverse of :func:`indexed_optimizer_state` for ``opt`` over ``model``'s parameters."""
    names = {id(p): clean_name(n) for n, p in model.named_parameters()}
    order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(order) or len(state["param_groups"]) != len(opt.param_groups):
        raise CheckpointError(
            f"the checkpoint's {type(opt).__name__} state covers {len(saved)} parameters in "
            f"{len(state['param_groups'])} group(s), but the optimizer has {len(order)} in "
            f"{len(opt.param_groups)}: configure_optimizers must build the same optimizer as the saved run."
        )
    return {"state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in state["param_groups"]]}
