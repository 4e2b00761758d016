"""Running syncstep scripts in real processes, with hard timeouts and nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).parent / "scripts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh terminal: no launcher variables leaking in from the test run."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_", "GROUP_", "ROLE_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a crash in C++ still shows the Python stack of every thread
    env.update(extra)
    return env


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (launchers may put workers in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(pid: int) -> None:
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(cmd: list[str], timeout: float = 120, env: dict | None = None, cwd: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or clean_env(), cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout} s; output:\n{out[-4000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the command left behind in its group
        except ProcessLookupError:
            pass
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}; output:\n{out[-6000:]}")
    return result


def run_together(commands: list[tuple[list[str], dict]], cwd: str, timeout: float = 150) -> list[tuple[int, str]]:
    """Start several commands at once (e.g. one torchrun agent per "node"); (returncode, output) each."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for cmd, env in commands]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            kill_tree(proc.pid)
        raise AssertionError(f"commands did not finish within {timeout} s") from None
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def run_configs(tmp_path: Path, configs: list[dict], launcher: list[str] | None = None, timeout: float = 180,
                env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run scripts/fit_configs.py on ``configs`` (one process group, every config in turn)."""
    spec = tmp_path / f"configs-{free_port()}.json"
    spec.write_text(json.dumps(configs))
    cmd = (launcher or [sys.executable]) + [str(SCRIPTS / "fit_configs.py"), str(spec)]
    return run(cmd, timeout=timeout, env=env, cwd=str(tmp_path), check=check)


def load_result(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# -- comparing parameters, and the DDP configurations several test modules run -----------------------

ATOL = 1e-6


def assert_params_close(actual: dict, expected: dict, atol: float = ATOL) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def assert_same_on_every_rank(tmp_path, name: str, world: int = 2) -> dict:
    ranks = [torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=True) for r in range(world)]
    for other in ranks[1:]:
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], other[key]), f"{name}: {key} differs between ranks"
    return ranks[0]


BASE = {"devices": 2, "strategy": "ddp", "lr": 0.1}

CONFIGS = [
    # 2 processes x batch 4 against one process with batch 8; 5 steps, fixed order.
    {**BASE, "name": "plain", "n": 40, "batch_size": 4, "max_steps": 5},
    # accumulate_grad_batches=2 against batch 16.
    {**BASE, "name": "accum", "n": 80, "batch_size": 4, "accumulate_grad_batches": 2, "max_steps": 5},
    # Shuffled, 37 samples (the last step holds 5), 2 epochs, and an evaluation of 7 samples.
    {**BASE, "name": "shuffled", "n": 37, "batch_size": 4, "shuffle": True, "seed": 3, "max_epochs": 2,
     "evaluate_n": 7, "val_n": 5},
    # 33 samples: the last step holds 1, so rank 1 runs a weight-0 batch to join the all-reduce.
    {**BASE, "name": "lonely", "n": 33, "batch_size": 4, "max_epochs": 1},
    # Device invariance: global batch 8 from 2 processes x 4 (accumulation derived: 1); LR scaled, warmup.
    {**BASE, "name": "invariant", "n": 48, "batch_size": 4, "global_batch_size": 8, "lr_scaling": "auto",
     "warmup_steps": 6, "max_epochs": 2, "shuffle": True, "seed": 5, "scheduler": "step", "optimizer": "sgd_momentum"},
]
