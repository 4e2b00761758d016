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
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float = 120, env: dict | None = None, cwd: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or clean_env(), cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout} s; output:\n{out[-4000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the command left behind
        except ProcessLookupError:
            pass
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}; output:\n{out[-6000:]}")
    return result


def run_configs(tmp_path: Path, configs: list[dict], launcher: list[str] | None = None, timeout: float = 180,
                env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run scripts/fit_configs.py on ``configs`` (one process group, every config in turn)."""
    spec = tmp_path / f"configs-{free_port()}.json"
    spec.write_text(json.dumps(configs))
    cmd = (launcher or [sys.executable]) + [str(SCRIPTS / "fit_configs.py"), str(spec)]
    return run(cmd, timeout=timeout, env=env, cwd=str(tmp_path), check=check)


def load_result(path: Path) -> dict:
    return torch.load(path, weights_only=True)
