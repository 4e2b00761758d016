"""Where this process stands (torchrun, SLURM or a plain ``python train.py``), and starting processes.

- Under ``torchrun`` (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR), and
  under SLURM's ``srun``, the processes exist already: we read our place from the environment.
- From a plain ``python train.py`` with ``devices > 1`` and ``strategy="ddp"``, syncstep starts the
  processes itself: the script runs again from the top in each worker, as it would under torchrun,
  and this process waits for them and exits with their status. The workers meet through a
  ``torch.distributed.FileStore`` in a private directory rather than torchrun's TCPStore, because a
  TCPStore listens on every network interface and a single-machine run should open no port to the
  network. When one worker dies or raises, the others are stopped at once (as torchrun does) and the
  failed rank's traceback is shown, instead of a hang on a collective.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch


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
    """Run this script in ``nprocs`` worker processes on this machine and wait for them; never returns.

    The workers meet through a FileStore in a private temporary directory, so the launch opens no
    network port at all (torchrun's TCPStore listens on every interface); gloo's own connections stay
    on the loopback interface. If a worker fails or is killed, the others are stopped at once
    (SIGTERM, then SIGKILL after a grace period) and this process exits with the failure's code.
    """
    import signal
    import tempfile
    import time

    if "OMP_NUM_THREADS" not in os.environ:
        # Share the cores out between the workers (torchrun would set 1).
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nprocs))
    module = _main_module()
    target = ["-m", module.removesuffix(".__main__")] if module else [sys.argv[0]]
    command = [sys.executable, "-u", *target, *sys.argv[1:]]
    workdir = tempfile.mkdtemp(prefix="syncstep-launch-")  # mode 0700: only this user can join
    print(
        f"syncstep: starting {nprocs} processes on this machine (OMP_NUM_THREADS="
        f"{os.environ['OMP_NUM_THREADS']} each); the script runs again from the top in each of them, and "
        "this process waits for them.",
        file=sys.stderr,
        flush=True,
    )
    # PYTHONFAULTHANDLER: a worker that crashes in C++ (SIGSEGV, SIGABRT) still prints where Python was.
    base = dict(os.environ, SYNCSTEP_FILE_STORE=os.path.join(workdir, "store"), SYNCSTEP_ERROR_DIR=workdir,
                WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                PYTHONFAULTHANDLER=os.environ.get("PYTHONFAULTHANDLER", "1"))
    workers = [subprocess.Popen(command, env=dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in range(nprocs)]

    def stop(signum: int = signal.SIGTERM, grace: float = 10.0) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)
        deadline = time.monotonic() + grace
        for worker in workers:
            try:
                worker.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    def forward(signum: int, frame: object) -> None:  # Ctrl-C or a scheduler's SIGTERM: pass it on
        stop(signum, grace=30.0)
        _remove(workdir)
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    failure = None
    while failure is None and any(w.poll() is None for w in workers):
        failure = next(((r, w.returncode) for r, w in enumerate(workers) if w.returncode not in (None, 0)), None)
        time.sleep(0.05)
    if failure is None:
        failure = next(((r, w.returncode) for r, w in enumerate(workers) if w.returncode != 0), None)
    if failure is not None:
        # Collect what exited on its own before we stop the rest: a rank killed by a signal we did not
        # send is the root cause; otherwise the earliest error a rank recorded (see write_error_file).
        died = {r: w.returncode for r, w in enumerate(workers) if w.returncode not in (None, 0)}
        running = [r for r, w in enumerate(workers) if w.returncode is None]
        stop()
        errors = read_error_files(workdir)
        killed = [r for r, code in died.items() if code < 0]
        if killed:
            rank, what = killed[0], f"was killed by {signal.Signals(-died[killed[0]]).name}"
        elif errors:
            rank = min(errors.items(), key=lambda item: item[1]["time"])[0]
            what = f"failed first: {errors[rank]['error']}"
        else:
            rank, what = failure[0], f"exited with code {failure[1]}"
        still = f" (still running then, so stopped by syncstep: rank(s) {running})" if running else ""
        hint = ""
        if "imed out" in what and running:
            hint = f" A collective timed out: rank(s) {running} never reached it; look at what they were doing."
        print(f"syncstep: rank {rank} {what}; the other processes were stopped{still}. Its traceback, if any, is "
              f"above (lines prefixed [rank{rank}]).{hint}", file=sys.stderr, flush=True)
    _remove(workdir)
    sys.exit(0 if failure is None else (failure[1] if failure[1] > 0 else 128 - failure[1]))


def write_error_file(rank: int, error: BaseException) -> None:
    """Record a rank's failure for the launcher, which names the first rank that failed."""
    import json
    import time

    directory = os.environ.get("SYNCSTEP_ERROR_DIR")
    if not directory:
        return
    try:
        with open(os.path.join(directory, f"error-rank{rank}.json"), "w") as f:
            json.dump({"time": time.time(), "error": f"{type(error).__name__}: {error}"}, f)
    except OSError:
        pass


def read_error_files(directory: str) -> dict[int, dict]:
    import json

    errors = {}
    for name in os.listdir(directory):
        if name.startswith("error-rank") and name.endswith(".json"):
            try:
                with open(os.path.join(directory, name)) as f:
                    errors[int(name[10:-5])] = json.load(f)
            except (OSError, ValueError):
                pass
    return errors


def _remove(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def report_failure(error: BaseException, *, rank: int, world_size: int, where: str) -> None:
    """Name the rank and where it failed, and hand the error to the launcher (ours, or torchrun's file)."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return
    if world_size > 1:
        print(f"syncstep: rank {rank} failed in {where}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    write_error_file(rank, error)
    if os.environ.get("TORCHELASTIC_ERROR_FILE") and isinstance(error, Exception):
        try:
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(error)
        except Exception:  # the report is a courtesy; the original error must propagate
            import traceback

            traceback.print_exc()
