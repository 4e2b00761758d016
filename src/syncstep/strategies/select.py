"""Which strategy runs, on which devices: the user's ``accelerator``, ``devices``, ``strategy`` and
``num_nodes`` checked against the machine and the launcher, before any process starts."""

from __future__ import annotations

import difflib
import os
from typing import Any

import torch

from syncstep.launch import Environment


def resolve_devices(accelerator: str, devices: Any, env: Environment) -> tuple[str, list[int] | None, int]:
    """(accelerator, GPU indices or None, number of devices on this node), or a ValueError with the fix."""
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        close = difflib.get_close_matches(str(accelerator), ["auto", "cpu", "gpu", "cuda"], n=1)
        raise ValueError(
            f"accelerator={accelerator!r} is not supported; use 'auto', 'cpu' or 'gpu' ('cuda')"
            + (f"; did you mean {close[0]!r}?" if close else ".")
        )
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        accelerator = "cuda"
    launched = env.source != "local"
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"accelerator={'gpu'!r} but no CUDA GPU is visible (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
            "Use accelerator='cpu', or 'auto' to pick what is there."
        )
    if accelerator == "cpu":
        if isinstance(devices, (list, tuple)):
            raise ValueError(
                f"devices={list(devices)} lists device indices, which select GPUs; on the CPU pass a "
                "number of processes (ddp) or replicas (dp), e.g. devices=2."
            )
        if devices == "auto":
            return "cpu", None, env.local_world_size if launched else 1
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ValueError(f"devices must be 'auto', an int >= 1 or a list of GPU indices; got {devices!r}.")
        return "cpu", None, devices
    count = torch.cuda.device_count()
    if devices == "auto" or devices == -1:
        ids = list(range(env.local_world_size if launched and devices == "auto" else count))
    elif isinstance(devices, (list, tuple)):
        ids = list(devices)
        if not ids or len(set(ids)) != len(ids) or any(not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"devices={ids} must be a non-empty list of distinct GPU indices.")
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        ids = list(range(devices))
    else:
        raise ValueError(f"devices must be 'auto', an int >= 1 or a list of GPU indices; got {devices!r}.")
    if max(ids) >= count:
        raise ValueError(
            f"devices={devices!r} needs GPU {max(ids)}, but only {count} GPU{'s' * (count != 1)} "
            f"{'is' if count == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Use devices={count} or fewer."
        )
    return "cuda", ids, len(ids)


def resolve_strategy(strategy: str, n: int, nodes: int, env: Environment) -> str:
    """The strategy's registry name, checked against the devices, nodes and launcher."""
    from syncstep.strategies import STRATEGIES

    names = ["auto", *STRATEGIES]
    if strategy not in names:
        close = difflib.get_close_matches(str(strategy), names, n=1)
        raise ValueError(
            f"strategy={strategy!r} is not one of {names}" + (f"; did you mean {close[0]!r}?" if close else ".")
        )
    if strategy == "auto":
        strategy = "single" if n == 1 and nodes == 1 and env.world_size == 1 else "ddp"
    if strategy == "single" and (n > 1 or nodes > 1):
        raise ValueError(
            f"strategy='single' runs on one device, but devices={n} x num_nodes={nodes}; use 'ddp', 'fsdp' or 'dp'."
        )
    if strategy == "dp":
        if nodes > 1:
            raise ValueError(
                "strategy='dp' runs in one process on one machine, so num_nodes must be 1; for several "
                "machines use strategy='ddp'."
            )
        if env.world_size > 1:
            raise ValueError(
                f"strategy='dp' is one process, but this is process {env.global_rank} of {env.world_size} "
                f"started by {env.source}. Use strategy='ddp' with a launcher, or run dp with plain python."
            )
        return strategy
    if env.source != "local":
        if env.num_nodes != nodes:
            raise ValueError(
                f"num_nodes={nodes}, but {env.source} started {env.num_nodes} node(s) "
                f"({env.world_size} processes, {env.local_world_size} per node). Pass num_nodes={env.num_nodes}, or "
                f"num_nodes='auto' to take whatever the launcher starts (elastic torchrun: --nnodes=MIN:MAX)."
            )
        if env.local_world_size != n:
            raise ValueError(
                f"devices={n}, but {env.source} started {env.local_world_size} process(es) on this node. "
                f"Pass devices={env.local_world_size} (or 'auto'), or start {n} per node "
                f"(torchrun --nproc-per-node={n}; SLURM --ntasks-per-node={n})."
            )
    elif nodes > 1:
        raise ValueError(
            f"num_nodes={nodes}, but this process was not started by torchrun or SLURM. Start one launcher "
            f"per machine: torchrun --nnodes={nodes} --nproc-per-node={n} --rdzv-backend=c10d "
            "--rdzv-endpoint=HOST:PORT train.py (or srun under SLURM)."
        )
    return strategy


def select_strategy(config: Any, env: Environment) -> Any:
    """The strategy object for ``config`` in this process's ``env`` (nothing is started yet).

    ``config.strategy`` is a name, or the user's ``FSDPStrategy(...)`` / ``DDPStrategy(...)``: its options
    go to the running fsdp / ddp strategy built here with the devices.
    """
    from syncstep.strategies import STRATEGIES, DDPStrategy, FSDPStrategy

    accelerator, device_ids, num_devices = resolve_devices(config.accelerator, config.devices, env)
    requested, options = config.strategy, {}
    if isinstance(requested, FSDPStrategy):
        requested, options = "fsdp", {"options": requested}
    elif isinstance(requested, DDPStrategy):
        requested, options = "ddp", {"options": requested}
    # "auto": the nodes the launcher started (elastic torchrun: this attempt's; one without a launcher)
    nodes = (env.num_nodes if env.source != "local" else 1) if config.num_nodes == "auto" else config.num_nodes
    name = resolve_strategy(requested, num_devices, nodes, env)
    return STRATEGIES[name](accelerator=accelerator, device_ids=device_ids, num_devices=num_devices,
                            num_nodes=nodes, env=env, timeout=config.timeout,
                            precision=config.precision, **options)
