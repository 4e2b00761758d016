"""Where this process stands (torchrun, SLURM or a plain ``python train.py``), and starting processes.

- Under ``torchrun`` (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR), and
  under SLURM's ``srun``, the processes exist already: we read our place from the environment.
- From a plain ``python train.py`` with ``devices > 1`` and ``strategy="ddp"``, syncstep starts the
  processes itself (``selflaunch.py``): the script runs again from the top in each worker, as it would
  under torchrun, and this process waits for them and exits with their status.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from syncstep import selflaunch

selflaunch.watch_launcher()  # in a self-launched worker: report uncaught errors, die with the launcher


@dataclass(frozen=True)
class Environment:
    source: str  # "local" (nothing launched us), "syncstep" (self_launch), "torchrun" or "slurm"
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
    if "SYNCSTEP_FILE_STORE" in env:  # started by syncstep's own launcher (self_launch)
        world = int(env["WORLD_SIZE"])
        return Environment("syncstep", world, int(env["RANK"]), int(env["LOCAL_RANK"]), world, 0, 1)
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
    if env.num_nodes == 1:
        # One machine: keep gloo's and NCCL's own connections on the loopback interface.
        name = _loopback_interface()
        if name:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
    # torch.distributed.nn.functional binds `group=group.WORLD` as a default argument when imported; DDP
    # imports it, and after init that pins the process group for the life of the process, so
    # destroy_process_group() at exit cannot stop gloo's threads and the group is torn down during
    # interpreter shutdown instead, where a gloo thread can abort the process ("terminate called without
    # an active exception"). Imported now, before the group exists, the defaults are None.
    import torch.distributed.nn.functional  # noqa: F401

    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if env.source == "local":  # strategy="ddp" on one device, nothing launched: a world of one
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    elif env.source == "syncstep":
        kwargs.update(store=dist.FileStore(os.environ["SYNCSTEP_FILE_STORE"], env.world_size),
                      rank=env.global_rank, world_size=env.world_size)
    elif os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        # A job restarted by `torchrun --max-restarts`: torch's env:// rendezvous, but with this attempt's
        # keys kept apart. The store still holds the dead workers' addresses, and a new worker that read
        # one before its peer had overwritten it would connect to nobody.
        from torch.distributed.rendezvous import rendezvous

        store, rank, world_size = next(rendezvous("env://", timeout=timeout))
        attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
        kwargs.update(store=dist.PrefixStore(f"syncstep/attempt{attempt}", store), rank=rank, world_size=world_size)
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


def _script_at_import() -> str | None:
    script = sys.argv[0] if sys.argv else ""
    return os.path.abspath(script) if script not in ("", "-c", "-m") and os.path.isfile(script) else None


# Resolved when syncstep is imported, before the script can os.chdir() elsewhere: the workers run this
# file again from this directory.
_SCRIPT, _START_DIRECTORY = _script_at_import(), os.getcwd()


def can_self_launch() -> str | None:
    """Why the script cannot be started again in worker processes, or None if it can."""
    script = sys.argv[0] if sys.argv else ""
    if not script or script in ("-c", "-m"):
        return "it is not running from a script file (an interactive session, a notebook or python -c)"
    if _SCRIPT is None and _main_module() is None:
        return (f"its path {script!r} (sys.argv[0]) does not name a file from the directory it started in "
                f"({_START_DIRECTORY}): did the script os.chdir() before importing syncstep? Import syncstep "
                "first, or run it by its absolute path")
    runner = _main_module() or os.path.basename(script)
    if runner.startswith(("pytest", "py.test", "_pytest", "ipykernel", "jupyter")):
        return f"it is running under {runner.split('.')[0]}"
    return None


def self_launch(nprocs: int) -> None:
    """Run this script in ``nprocs`` worker processes on this machine and wait for them; never returns
    (selflaunch.py). They start from the directory the script started in, whatever it chdir()ed to."""
    selflaunch.self_launch(nprocs, _SCRIPT or sys.argv[0], _START_DIRECTORY)


def report_failure(error: BaseException, *, rank: int, world_size: int, where: str) -> None:
    """Name the rank and where it failed, and hand the error to the launcher (ours, or torchrun's file)."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return
    if isinstance(error, OSError) and error.errno == errno.ENOSPC and hasattr(error, "add_note"):
        error.add_note("syncstep: the disk is full (ENOSPC). Logs and checkpoints go under Trainer(default_root_dir"
                       "=...): free some space there or point it at another disk; the checkpoints already written "
                       "are intact (each is written whole, then renamed into place).")
    if "find_unused_parameters=True" in str(error) and hasattr(error, "add_note"):  # DDP's advice, in our terms
        error.add_note('syncstep: some parameters got no gradient in a step; DDP must look for them, which is '
                       'Trainer(strategy="ddp_find_unused_parameters_true") (syncstep builds the '
                       'DistributedDataParallel itself, so find_unused_parameters=True cannot be passed to it).')
    if world_size > 1:
        print(f"syncstep: rank {rank} failed in {where}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    selflaunch.write_error_file(rank, error)
    if os.environ.get("TORCHELASTIC_ERROR_FILE") and isinstance(error, Exception):
        try:
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(error)
        except Exception:  # the report is a courtesy; the original error must propagate
            import traceback

            traceback.print_exc()
