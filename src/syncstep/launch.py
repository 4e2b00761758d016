"""Where this process stands (torchrun, SLURM or a plain ``python train.py``), and starting processes.

- Under ``torchrun`` (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR), and
  under SLURM's ``srun``, the processes exist already: we read our place from the environment.
- From a plain ``python train.py`` with ``devices > 1`` and ``strategy="ddp"``, syncstep starts the
  processes itself with ``torch.distributed.run`` (the code behind ``torchrun``), run in this
  process: the script runs again from the top in each worker, as it would under torchrun, and this
  process waits for them and exits with their status. Its rendezvous listens on 127.0.0.1 only.

``torch.distributed.run`` also gives us failure handling: when one worker dies or raises, the others
are stopped at once and the failed rank's traceback is reported, instead of a hang on a collective.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class Environment:
    source: str  # "local" (nothing launched us), "torchrun" or "slurm"
    world_size: int = 1
    global_rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1


def _slurm_managed(env: dict) -> bool:
    # An interactive allocation (srun --pty bash, salloc) is not a launcher: Lightning's rule.
    if "SLURM_NTASKS" not in env or "SLURM_PROCID" not in env:
        return False
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return False
    return int(env["SLURM_NTASKS"]) > 1


def detect_environment(env: dict | None = None) -> Environment:
    env = dict(os.environ if env is None else env)
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        rank = int(env["RANK"])
        node_rank = int(env.get("GROUP_RANK", rank // max(local_world, 1)))
        return Environment("torchrun", world, rank, int(env["LOCAL_RANK"]), local_world, node_rank,
                           max(world // max(local_world, 1), 1))
    if _slurm_managed(env):
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        return Environment("slurm", world, int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")),
                           world // max(nodes, 1), int(env.get("SLURM_NODEID", "0")), nodes)
    return Environment("local")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``gpu[07-09,12],cpu01`` -> ``gpu07``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    match = re.match(r"^(.*?)\[([^\]]+)\](.*)$", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _export_slurm_rendezvous(env: Environment) -> None:
    """torch.distributed's env:// reads MASTER_ADDR/PORT, RANK, WORLD_SIZE; SLURM sets other names."""
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        os.environ["MASTER_ADDR"] = first_slurm_host(nodelist)
    if "MASTER_PORT" not in os.environ:
        # Same port on every task of the job, different between jobs (Lightning picks it the same way).
        os.environ["MASTER_PORT"] = str(15000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_RANK=str(env.local_rank), LOCAL_WORLD_SIZE=str(env.local_world_size))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loopback_interface() -> str | None:
    for _, name in socket.if_nameindex():
        if name == "lo" or name.startswith("lo"):
            return name
    return None


def init_process_group(env: Environment, device: torch.device, timeout: timedelta) -> None:
    """Join the job's process group: NCCL on CUDA, gloo on the CPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if env.source == "slurm":
        _export_slurm_rendezvous(env)
    if device.type == "cpu" and env.num_nodes == 1 and "GLOO_SOCKET_IFNAME" not in os.environ:
        # One machine: keep gloo's connections on the loopback interface, never the network.
        name = _loopback_interface()
        if name:
            os.environ["GLOO_SOCKET_IFNAME"] = name
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if env.source == "local":  # strategy="ddp" on one device, nothing launched: a world of one
        kwargs.update(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    import atexit

    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _main_module() -> str | None:
    """The module name when the program was started with ``python -m name``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else None


def can_self_launch() -> str | None:
    """Why the script cannot be started again in worker processes, or None if it can."""
    script = sys.argv[0] if sys.argv else ""
    if not script or script in ("-c", "-m") or not os.path.isfile(script):
        return "it is not running from a script file (an interactive session, a notebook or python -c)"
    runner = _main_module() or os.path.basename(script)
    if runner.startswith(("pytest", "py.test", "_pytest", "ipykernel", "jupyter")):
        return f"it is running under {runner.split('.')[0]}"
    return None


def self_launch(nprocs: int) -> None:
    """Run this script in ``nprocs`` worker processes via torch.distributed.run; never returns."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 (with a warning); share the cores out between the workers instead.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nprocs))
    print(
        f"syncstep: starting {nprocs} processes (torch.distributed.run on 127.0.0.1, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}); the script runs again in each of them, "
        "and this process waits for them.",
        file=sys.stderr,
        flush=True,
    )
    args = parse_args(
        [
            f"--nproc-per-node={nprocs}",
            "--nnodes=1",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0",
            f"--rdzv-id={uuid.uuid4()}",
            "--max-restarts=0",
            "--monitor-interval=0.1",
            *(["--module", _main_module().removesuffix(".__main__")] if _main_module() else [sys.argv[0]]),
            *sys.argv[1:],
        ]
    )
    try:
        run(args)
    except ChildFailedError as failure:
        print(failure.format_msg(), file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)
