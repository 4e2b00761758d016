"""syncstep's own launcher: ``python train.py`` with ``devices > 1`` runs the script again in one worker
process per device on this machine, and this process (the launcher) watches them.

- The workers meet through a ``torch.distributed.FileStore`` in a private temporary directory (mode
  0700), not torchrun's TCPStore, which listens on every network interface: a single-machine run opens
  no port to the network, and two runs at once on one machine never share a rendezvous.
- A worker never outlives the launcher: on Linux each worker asks the kernel for SIGKILL when its
  parent dies (``prctl(PR_SET_PDEATHSIG)``, set between fork and exec, so it covers the whole life of
  the worker); elsewhere a watchdog thread in the worker checks its parent once a second. So a
  launcher killed with SIGKILL leaves no worker training and writing checkpoints behind (the next
  launch removes the rendezvous directory it could not remove itself).
- SIGTERM and SIGHUP to the launcher are forwarded to the workers as SIGTERM, which they answer by
  agreeing to stop, writing a checkpoint and exiting (guards.py); they get ``GRACE_AFTER_SIGNAL``
  seconds for it, then SIGKILL, and the launcher says which ranks it had to kill. SIGINT (Ctrl-C) is
  forwarded as it is.
- Every worker is polled every 50 ms, so a failed rank is noticed within that, whichever rank it is.
  The others are then stopped (SIGTERM, SIGKILL ``GRACE_AFTER_FAILURE`` seconds later: they are most
  likely blocked in a collective with the dead rank and have nothing to save), and the launcher names
  the rank that failed first: one killed by a signal nobody here sent, else the earliest error any
  rank recorded (``write_error_file``: inside the Trainer, or uncaught anywhere in the script), else
  the first to exit. The launcher exits with that rank's status (128 + N for a rank killed by signal N).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

GRACE_AFTER_SIGNAL = 30.0  # seconds the workers get to checkpoint and exit after a forwarded SIGTERM
GRACE_AFTER_INTERRUPT = 10.0  # after a forwarded SIGINT (no checkpoint to write)
GRACE_AFTER_FAILURE = 3.0  # after a rank failed: the others only need to print what they were doing
POLL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1
_DIR_PREFIX = "syncstep-launch-"


# -- in the launcher ---------------------------------------------------------------------------------
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "prctl") else None
    except OSError:
        return None


def _die_with_parent(libc: Any, parent: int) -> Any:
    """A ``preexec_fn``: the worker gets SIGKILL when the launcher dies (kept across exec)."""

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died between fork and prctl
            os._exit(1)

    return preexec


def remove_stale_rendezvous(directory: str | None = None) -> None:
    """Delete the rendezvous directories of launchers that are gone (killed before they could)."""
    import shutil

    directory = directory or tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(directory) if n.startswith(_DIR_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(os.path.join(path, "launcher.pid")) as f:
                pid = int(f.read())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):
            pass  # another user's, or one being set up right now


class Workers:
    """The worker processes of one launch, polled together."""

    def __init__(self, command: list[str], env: dict[str, str], nprocs: int, cwd: str | None) -> None:
        libc = _libc()
        preexec = _die_with_parent(libc, os.getpid()) if libc is not None else None
        env = dict(env, SYNCSTEP_LAUNCHER_PID=str(os.getpid()), SYNCSTEP_PARENT_DEATH_SIGNAL=str(int(bool(libc))))
        self.procs = [subprocess.Popen(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=cwd,
                                       preexec_fn=preexec) for r in range(nprocs)]
        self.exited_at: dict[int, float] = {}  # rank -> when this launcher first saw it exited

    def poll(self) -> None:
        for rank, proc in enumerate(self.procs):  # every worker, each time
            if rank not in self.exited_at and proc.poll() is not None:
                self.exited_at[rank] = time.time()

    def codes(self) -> dict[int, int]:
        return {r: self.procs[r].returncode for r in self.exited_at}

    def running(self) -> list[int]:
        return [r for r in range(len(self.procs)) if r not in self.exited_at]

    def stop(self, signum: int, grace: float, interrupted: Any = None) -> list[int]:
        """Send ``signum`` to the running workers, SIGKILL those still running ``grace`` s later (or when
        ``interrupted()`` turns true); the ranks it had to kill."""
        for rank in self.running():
            try:
                self.procs[rank].send_signal(signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline and not (interrupted and interrupted()):
            time.sleep(POLL_SECONDS)
            self.poll()
        killed = self.running()
        for rank in killed:
            self.procs[rank].kill()
        for proc in self.procs:
            proc.wait()
        self.poll()
        return killed


def self_launch(nprocs: int, script: str, cwd: str | None) -> None:
    """Run ``script`` (or ``python -m`` the main module) in ``nprocs`` workers on this machine from
    ``cwd``, wait for them and exit with their status; never returns."""
    import shutil

    if "OMP_NUM_THREADS" not in os.environ:
        # Share the cores out between the workers (torchrun would set 1).
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nprocs))
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    target = ["-m", spec.name.removesuffix(".__main__")] if spec is not None else [script]
    command = [sys.executable, "-u", *target, *sys.argv[1:]]
    remove_stale_rendezvous()
    workdir = tempfile.mkdtemp(prefix=_DIR_PREFIX)  # mode 0700: only this user can join
    with open(os.path.join(workdir, "launcher.pid"), "w") as f:
        f.write(str(os.getpid()))
    print(
        f"syncstep: starting {nprocs} processes on this machine (OMP_NUM_THREADS="
        f"{os.environ['OMP_NUM_THREADS']} each); the script runs again from the top in each of them, and "
        "this process waits for them.",
        file=sys.stderr,
        flush=True,
    )
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:  # acted on by the loop below, not in the handler
        received.append(signum)

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    # PYTHONFAULTHANDLER: a worker that crashes in C++ (SIGSEGV, SIGABRT) still prints where Python was.
    env = dict(os.environ, SYNCSTEP_FILE_STORE=os.path.join(workdir, "store"), SYNCSTEP_ERROR_DIR=workdir,
               WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
               PYTHONFAULTHANDLER=os.environ.get("PYTHONFAULTHANDLER", "1"))
    try:
        workers = Workers(command, env, nprocs, cwd)
        code = _supervise(workers, workdir, received)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


def _supervise(workers: Workers, workdir: str, received: list[int]) -> int:
    """Wait for the workers; stop them all on a signal or a failure; the exit status of the run."""
    while True:
        workers.poll()
        if received:
            return _forward(workers, received)
        codes = workers.codes()
        if any(code != 0 for code in codes.values()):
            return _report_failure(workers, workdir)
        if len(codes) == len(workers.procs):
            return 0
        time.sleep(POLL_SECONDS)


def _forward(workers: Workers, received: list[int]) -> int:
    signum = received[0]
    name = signal.Signals(signum).name
    first = len(received)
    if signum == signal.SIGINT:
        forward, grace = signal.SIGINT, GRACE_AFTER_INTERRUPT
    else:  # SIGTERM, SIGHUP: the workers checkpoint and exit
        forward, grace = signal.SIGTERM, GRACE_AFTER_SIGNAL
    killed = workers.stop(forward, grace, interrupted=lambda: len(received) > first)
    if killed:
        why = "a second signal came" if len(received) > first else f"they had not exited {grace:.0f} s after it"
        print(f"syncstep: {name} received; forwarded {signal.Signals(forward).name} to the workers, and killed "
              f"rank(s) {killed} because {why}. They may not have written their checkpoint: the last checkpoint "
              "is older than this point.", file=sys.stderr, flush=True)
    stopped = (0, 128 + forward, -forward)
    failed = {r: code for r, code in workers.codes().items() if r not in killed and code not in stopped}
    if failed:  # e.g. the checkpoint could not be written
        print(f"syncstep: {name} received; rank(s) {sorted(failed)} failed while stopping (exit codes "
              f"{sorted(failed.values())}): see their output above; their checkpoint may be missing.",
              file=sys.stderr, flush=True)
    return 128 + signum


def _report_failure(workers: Workers, workdir: str) -> int:
    # What exited on its own before we stop the rest: a rank killed by a signal we did not send is the
    # root cause; otherwise the earliest error a rank recorded (write_error_file), else the first exit.
    died = {r: code for r, code in workers.codes().items() if code != 0}
    running = workers.running()
    workers.stop(signal.SIGTERM, GRACE_AFTER_FAILURE)
    errors = read_error_files(workdir)
    killed = sorted((workers.exited_at[r], r) for r, code in died.items() if code < 0)
    if killed:
        rank = killed[0][1]
        what = f"was killed by {signal.Signals(-died[rank]).name}"
    elif errors:
        # Not an error that a rank still running had caught earlier (and went on): only ones that ended a
        # process, or are ending it (recorded by the excepthook), count.
        errors = {r: e for r, e in errors.items() if r in died or e.get("uncaught")} or errors
        rank = min(errors, key=lambda r: errors[r]["time"])
        what = f"failed first: {errors[rank]['error'].rstrip('.')}"
    else:
        rank = min(died, key=lambda r: workers.exited_at[r])
        what = f"exited with code {died[rank]}"
    code = died.get(rank, 1)  # (a rank that was still ending with its error when we stopped it: 1)
    code = code if code > 0 else 128 - code
    still = f" (still running then, so stopped by syncstep: rank(s) {running})" if running else ""
    hint = ""
    if "imed out" in what and running:
        hint = f" A collective timed out: rank(s) {running} never reached it; look at what they were doing."
    print(f"syncstep: rank {rank} {what}; the other processes were stopped{still}. Its traceback, if any, is "
          f"above (lines prefixed [rank{rank}]).{hint}", file=sys.stderr, flush=True)
    return code


# -- in a worker -------------------------------------------------------------------------------------
_reported: list[tuple[BaseException, float]] = []  # the error last recorded by this process, and when


def write_error_file(rank: int, error: BaseException, uncaught: bool = False) -> None:
    """Record a rank's failure, and when it happened, for the launcher, which names the rank that failed
    first. A later failure replaces it (the earlier one was caught, or this one would not happen);
    ``uncaught``: it is ending the process (from the excepthook; the same error keeps its time)."""
    directory = os.environ.get("SYNCSTEP_ERROR_DIR")
    if not directory:
        return
    when = next((t for e, t in _reported if e is error), time.time())
    _reported[:] = [(error, when)]
    notes = "".join(f" {note}" for note in getattr(error, "__notes__", ()))
    try:
        with open(os.path.join(directory, f"error-rank{rank}.json"), "w") as f:
            json.dump({"time": when, "uncaught": uncaught, "error": f"{type(error).__name__}: {error}{notes}"}, f)
    except OSError:
        pass


def read_error_files(directory: str) -> dict[int, dict]:
    errors = {}
    for name in os.listdir(directory):
        if name.startswith("error-rank") and name.endswith(".json"):
            try:
                with open(os.path.join(directory, name)) as f:
                    errors[int(name[10:-5])] = json.load(f)
            except (OSError, ValueError):
                pass
    return errors


def watch_launcher() -> None:
    """In a self-launched worker: record an uncaught error anywhere in the script (before or after fit),
    and, where the kernel's parent-death signal is not available, exit when the launcher is gone."""
    launcher = os.environ.get("SYNCSTEP_LAUNCHER_PID")
    if not launcher or "RANK" not in os.environ:
        return
    rank, previous_hook = int(os.environ["RANK"]), sys.excepthook

    def excepthook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        if not isinstance(error, (KeyboardInterrupt, SystemExit)):
            write_error_file(rank, error, uncaught=True)  # (one that fit() reported keeps the time it happened)
        previous_hook(kind, error, tb)

    sys.excepthook = excepthook
    if os.environ.get("SYNCSTEP_PARENT_DEATH_SIGNAL") == "1" or os.getppid() != int(launcher):
        return  # the kernel kills us with the launcher; or we are a worker's own child (a DataLoader's)

    def watch() -> None:
        while os.getppid() == int(launcher):
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="syncstep-launcher-watchdog", daemon=True).start()
