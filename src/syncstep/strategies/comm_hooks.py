"""DDP communication hooks: what runs on each gradient bucket instead of the plain all-reduce.

``DDPStrategy(ddp_comm_hook=...)`` names one of torch's hooks
(``torch.distributed.algorithms.ddp_comm_hooks``):

- ``None``: the plain average (torch's ``allreduce_hook``; DDP's built-in C++ all-reduce when nothing
  wraps it, which computes the same sum faster);
- ``"fp16"`` / ``"bf16"``: each bucket cast to half precision, divided by the world size, summed in
  that precision, and cast back: half the bytes on the wire, gradients rounded to 11 (fp16) or 8
  (bf16) significant bits;
- ``"powersgd"``: a rank-``matrix_approximation_rank`` approximation of each gradient matrix, with
  error feedback (each rank adds back what compression dropped on the previous step) and warm start;
  plain all-reduce until ``start_powerSGD_iter``. Options are PowerSGDState's keyword arguments.

Composition. Several parts of syncstep may need to see the all-reduce (the noise-scale measurement
reads each bucket before and after it). DDP takes exactly one hook, so every part goes through
:func:`register`: ``build_comm_hook`` makes the inner ``(state, hook)``, and each ``wrap(state,
hook) -> (state, hook)`` in ``wrappers`` is applied in order, the last one outermost. Nothing else
calls ``register_comm_hook``, so no part silently replaces another.

Checkpoints. PowerSGD's state (each rank's error feedback, the warm-start P and Q, its iteration
count and random generator) is part of the run: without it a resumed run would compress differently
from an uninterrupted one. :func:`state_dict` / :func:`load_state_dict` turn it into plain tensors and
numbers (a safe, weights_only checkpoint) and back. The buffers are keyed by DDP's bucket index, so
an exact resume needs the same buckets: the same model, device count and ``bucket_cap_mb``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

HOOK_NAMES = (None, "fp16", "bf16", "powersgd")
# PowerSGDState's keyword arguments that a user may set (process_group is the strategy's)
POWERSGD_OPTIONS = ("matrix_approximation_rank", "start_powerSGD_iter", "min_compression_rate",
                    "use_error_feedback", "warm_start", "orthogonalization_epsilon", "random_seed",
                    "batch_tensors_with_same_shape")
# syncstep's default for start_powerSGD_iter: torch's 1000 would leave short runs uncompressed
DEFAULT_START_POWERSGD_ITER = 10

# (state, bucket: torch.distributed.GradBucket) -> Future[Tensor]. DDP checks a hook's signature: its
# second parameter must be named ``bucket``, and annotations, if any, must be real types (not strings,
# as ``from __future__ import annotations`` makes them): leave them out.
Hook = Callable[[Any, Any], Any]
Wrapper = Callable[[Any, Hook], tuple[Any, Hook]]


def check_options(name: Any, options: dict | None) -> dict:
    """The hook's options, checked (a ValueError / TypeError with the fix); used before any process starts."""
    if name not in HOOK_NAMES:
        raise ValueError(f"ddp_comm_hook={name!r} is not one of {list(HOOK_NAMES)} (None: the plain all-reduce; "
                         "'fp16'/'bf16': compressed all-reduce; 'powersgd': low-rank compression).")
    options = dict(options or {})
    if options and name != "powersgd":
        raise ValueError(f"ddp_comm_options={options} are PowerSGD's; ddp_comm_hook={name!r} takes none. Drop "
                         "them, or use ddp_comm_hook='powersgd'.")
    unknown = sorted(set(options) - set(POWERSGD_OPTIONS))
    if unknown:
        raise TypeError(f"unknown PowerSGD option(s) {unknown}; valid: {list(POWERSGD_OPTIONS)}.")
    if name == "powersgd":
        options.setdefault("start_powerSGD_iter", DEFAULT_START_POWERSGD_ITER)
        rank, start = options.get("matrix_approximation_rank", 1), options["start_powerSGD_iter"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"matrix_approximation_rank must be an int >= 1, got {rank!r}.")
        feedback = options.get("use_error_feedback", True) or options.get("warm_start", True)
        if isinstance(start, bool) or not isinstance(start, int) or start < (2 if feedback else 0):
            raise ValueError(
                f"start_powerSGD_iter must be an int >= 2 with error feedback or warm start (DDP rebuilds its "
                f"buckets after the first step, which would invalidate the memorised tensors), got {start!r}."
            )
    return options


def build_comm_hook(name: str | None, options: dict | None, process_group: Any) -> tuple[Any, Hook]:
    """``(state, hook)`` to register on DDP for the hook ``name`` with ``options`` over ``process_group``
    (None: the default group, as in torch's hooks).

    For no compression: torch's ``allreduce_hook`` with the process group as its state.
    """
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    options = check_options(name, options)
    if name is None:
        return process_group, default_hooks.allreduce_hook
    if name == "fp16":
        return process_group, default_hooks.fp16_compress_hook
    if name == "bf16":
        nccl = dist.get_backend(process_group) == "nccl"  # (None: the default group's backend)
        return process_group, default_hooks.bf16_compress_hook if nccl else bf16_allreduce_hook
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    return _stable_state_class()(process_group=process_group, **options), powerSGD_hook.powerSGD_hook


def bf16_allreduce_hook(process_group, bucket):  # (no annotations: see Hook above)
    """torch's ``bf16_compress_hook`` for any backend, under another name: DDP refuses torch's by name off NCCL
    (a check from the time NCCL alone reduced bf16), though gloo all-reduces bf16 too."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())

    def decompress(future):
        buffer.copy_(future.value()[0])  # in place: no second full-size buffer
        return buffer

    return dist.all_reduce(compressed, group=group, async_op=True).get_future().then(decompress)


class _OrderedBucket:
    """A bucket's gradients as one flat tensor in a fixed order (last parameter first), whatever order
    DDP's bucket holds them in, under an index that names its members."""

    def __init__(self, bucket: Any, positions: list[int], index: int) -> None:
        self.bucket, self.positions, self._index = bucket, positions, index
        grads = bucket.gradients()
        self.in_place = positions == list(range(len(positions)))  # already in order: no copies
        if self.in_place:
            self.flat, self.views = bucket.buffer(), grads
            return
        self.flat = torch.cat([grads[i].reshape(-1) for i in positions])
        self.views, offset = [], 0
        for i in positions:
            self.views.append(self.flat[offset:offset + grads[i].numel()].view_as(grads[i]))
            offset += grads[i].numel()

    def buffer(self) -> torch.Tensor:
        return self.flat

    def gradients(self) -> list[torch.Tensor]:
        return self.views

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self.bucket.is_last()

    def copy_back(self, future: Any) -> torch.Tensor:
        if self.in_place:
            return self.flat
        grads = self.bucket.gradients()
        for i, view in zip(self.positions, self.views):
            grads[i].copy_(view)
        return self.bucket.buffer()


def _stable_state_class() -> type:
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    global _StableState
    if _StableState is None:
        class StablePowerSGDState(PowerSGDState):
            """PowerSGDState, plus its buffers kept per parameter whenever DDP's buckets change (see
            ``in_parameter_order``), and so in checkpoints."""

            __slots__ = ("layouts", "per_parameter", "last_seen", "iteration")

            def __init__(self, **options: Any) -> None:
                super().__init__(**options)
                # bucket index -> [(parameter index, numel, (n, m, rank) if PowerSGD compresses it, else None)]
                self.layouts: dict[int, list[tuple[int, int, tuple | None]]] = {}
                self.per_parameter: dict[int, dict[str, torch.Tensor]] = {}  # "error", "p", "q" of a parameter
                self.last_seen: dict[int, int] = {}  # bucket index -> the backward that last used it
                self.iteration = 0

        _StableState = StablePowerSGDState
    return _StableState


_StableState: Any = None


def _layout(state: Any, ordered: _OrderedBucket, indices: list[int]) -> list[tuple[int, int, tuple | None]]:
    """What PowerSGD does with each tensor of the bucket (its own rule: compress an n x m matrix when
    (n + m) x rank x min_compression_rate < n x m)."""
    out = []
    for index, grad in zip(indices, ordered.views):
        n = grad.shape[0]
        m = grad.numel() // n
        rank = min(n, m, state.matrix_approximation_rank)
        compressed = (n + m) * rank * state.min_compression_rate < n * m
        out.append((index, grad.numel(), (n, m, rank) if compressed else None))
    return out


def _p_order(layout: list) -> list:
    """The compressed tensors in the order of PowerSGD's P and Q memory: grouped by shape, in the order
    each shape first appears (its shape_to_tensors dict), bucket order within a shape."""
    groups: dict[tuple, list] = {}
    for entry in layout:
        if entry[2] is not None:
            groups.setdefault(entry[2][:2], []).append(entry)
    return [entry for group in groups.values() for entry in group]


def _split(state: Any, key: int, into: dict, remove: bool) -> None:
    """Bucket ``key``'s error, P and Q cut into per-parameter pieces in ``into``."""
    layout = state.layouts[key]
    get = (lambda d: d.pop(key, None)) if remove else (lambda d: d.get(key))
    error, p, q = get(state.error_dict), get(state.p_memory_dict), get(state.q_memory_dict)
    if error is not None and error.numel() == sum(numel for _, numel, _ in layout):
        offset = 0
        for index, numel, _ in layout:
            into.setdefault(index, {})["error"] = error[offset:offset + numel].clone()
            offset += numel
    order = _p_order(layout)
    if p is not None and q is not None and p.numel() == sum(n * r for _, _, (n, _, r) in order):
        p_at = q_at = 0
        for index, _, (n, m, r) in order:
            into.setdefault(index, {}).update(p=p[p_at:p_at + n * r].clone(), q=q[q_at:q_at + m * r].clone())
            p_at, q_at = p_at + n * r, q_at + m * r


def _assemble(state: Any, key: int) -> None:
    """Bucket ``key``'s error, P and Q from the per-parameter pieces, where every member has its piece."""
    layout, store = state.layouts[key], state.per_parameter
    if state.use_error_feedback and all("error" in store.get(i, {}) for i, _, _ in layout):
        state.error_dict[key] = torch.cat([store[i].pop("error") for i, _, _ in layout])
    order = _p_order(layout)
    if state.warm_start and order and all("p" in store.get(i, {}) and "q" in store[i] for i, _, _ in order):
        state.p_memory_dict[key] = torch.cat([store[i].pop("p") for i, _, _ in order])
        state.q_memory_dict[key] = torch.cat([store[i].pop("q") for i, _, _ in order])
    for i, _, _ in layout:
        if not store.get(i, True):
            del store[i]


def in_parameter_order(hook: Hook, ddp_model: Any) -> Hook:
    """``hook`` (PowerSGD) with state that means the same in every run, whatever DDP's buckets.

    DDP first buckets the parameters in definition order and, after the first step, rebuilds the
    buckets in the order the gradients became ready. PowerSGD keys its error feedback and its P, Q by
    bucket index and lays them out in the bucket's order, so a run resumed from a checkpoint (whose
    first step has the initial buckets) would add each saved residual to the wrong gradients. So
    PowerSGD is shown each bucket's gradients last parameter first, under an index that names the
    bucket's members; and when a bucket it has no state for appears (DDP's buckets changed), the state
    of the buckets no longer in use is cut into per-parameter pieces and the new bucket's is put
    together from them. Checkpoints hold the per-parameter pieces (``state_dict``): an exact resume.

    Off NCCL, each bucket also waits for the previous one: PowerSGD issues its second and third
    all-reduce from callbacks, which gloo runs on its own threads as transfers finish, so with several
    buckets the ranks could issue them in different orders (a collective mismatch that aborts the job;
    torch's hook alone does this on a 2-bucket model).
    """
    import torch.distributed as dist

    index_of = {id(p): i for i, p in enumerate(ddp_model.parameters())}
    count = len(index_of) + 1
    serialize = dist.get_backend() != "nccl"
    previous: list[Any] = []  # the last bucket's future, off NCCL

    def ordered_hook(state, bucket):
        if previous:
            previous.pop().wait()
        indices = [index_of[id(p)] for p in bucket.parameters()]
        positions = sorted(range(len(indices)), key=lambda i: -indices[i])
        key = max(indices) * count + len(indices)  # the same members, the same index
        ordered = _OrderedBucket(bucket, positions, key)
        stable = hasattr(state, "per_parameter") and state.iter >= state.start_powerSGD_iter
        if stable:
            if key not in state.layouts:
                state.layouts[key] = _layout(state, ordered, [indices[i] for i in positions])
            if key not in state.error_dict and key not in state.p_memory_dict:  # new buckets: move the state over
                for old in [k for k in state.layouts if k != key and state.last_seen.get(k, -1) < state.iteration]:
                    _split(state, old, state.per_parameter, remove=True)
                _assemble(state, key)
            state.last_seen[key] = state.iteration
        future = hook(state, ordered).then(ordered.copy_back)
        if stable and bucket.is_last():
            state.iteration += 1
        if serialize and not bucket.is_last():
            previous.append(future)
        return future

    return ordered_hook


def register(ddp_model: Any, state: Any, hook: Hook, wrappers: Sequence[Wrapper] = ()) -> tuple[Any, Hook]:
    """Register ``hook`` on ``ddp_model``, wrapped by each of ``wrappers`` in order (the last outermost);
    returns the ``(state, hook)`` registered. The only place syncstep registers a communication hook.

    With no wrapper and torch's plain ``allreduce_hook``, nothing is registered: DDP's built-in
    all-reduce computes the same average without a Python call per bucket.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook is powerSGD_hook.powerSGD_hook:
        hook = in_parameter_order(hook, ddp_model)
    for wrap in wrappers:
        state, hook = wrap(state, hook)
    if hook is default_hooks.allreduce_hook:
        return state, hook
    ddp_model.register_comm_hook(state, hook)
    return state, hook


def state_dict(state: Any) -> dict | None:
    """The hook state a checkpoint must hold, as plain tensors and numbers (None: the hook has none).

    PowerSGD's error feedback and P, Q per parameter (index in ``model.parameters()``), so that they
    load into whatever buckets the resumed DDP has."""
    if not hasattr(state, "per_parameter"):
        return None
    pieces = {i: dict(entry) for i, entry in state.per_parameter.items()}
    for key in state.layouts:
        _split(state, key, pieces, remove=False)
    kind, keys, pos, has_gauss, cached = state.rng.get_state()
    return {
        "hook": "powersgd",
        "iter": state.iter,
        "per_parameter": {int(i): {k: v.detach().cpu() for k, v in entry.items()} for i, entry in pieces.items()},
        "rng": {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached)},
    }


def load_state_dict(state: Any, saved: dict | None, device: torch.device, error_feedback: bool = True) -> None:
    """Put what :func:`state_dict` returned back into ``state``, its tensors on ``device``;
    ``error_feedback=False``: without the saved residuals (they are each rank's own)."""
    if saved is None or not hasattr(state, "per_parameter"):
        return
    import numpy as np

    state.iter = int(saved["iter"])
    state.error_dict, state.p_memory_dict, state.q_memory_dict, state.layouts = {}, {}, {}, {}
    state.per_parameter = {int(i): {k: v.to(device) for k, v in entry.items() if error_feedback or k != "error"}
                           for i, entry in saved["per_parameter"].items()}
    rng = saved["rng"]
    state.rng.set_state(("MT19937", rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"],
                         rng["cached_gaussian"]))
