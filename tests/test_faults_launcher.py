"""syncstep's own launcher under faults, in real processes: SIGTERM, SIGHUP, SIGINT and SIGKILL to the
launcher (the workers must checkpoint where asked and never outlive it), and a rank that fails while
another is busy, or outside the Trainer (the report must name it, within seconds).

The script is run by a relative path after copying it here, and chdir()s before fit, as a user's may.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from common import reference_sgd
from helpers import SCRIPTS, assert_params_close, clean_env, free_port, kill_tree


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(directory, scenario: dict) -> tuple[subprocess.Popen, float]:
    """Start one scenario in two self-launched processes, its script copied to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCRIPTS / "fault_scenarios.py", directory / "fault_scenarios.py")
    spec = f"spec-{free_port()}.json"
    (directory / spec).write_text(json.dumps([scenario]))
    env = clean_env(PYTHONPATH=os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]))
    # Output to a file, not a pipe: waiting for a pipe's end would wait for orphaned workers too.
    with open(directory / f"{scenario['name']}.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "fault_scenarios.py", spec], cwd=directory, env=env, text=True,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, time.monotonic()


def finish(directory, scenario: dict, proc: subprocess.Popen, started: float,
           timeout: float = 120) -> tuple[int, str, float, list[int]]:
    """Wait for a launch; (exit status, output, seconds, the workers' pids), having checked that no worker
    outlived the launcher by more than a few seconds."""
    output = directory / f"{scenario['name']}.out"
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        raise AssertionError(f"the launch did not end within {timeout} s:\n{output.read_text()[-4000:]}") from None
    finally:
        pids = [int((directory / f"{scenario['name']}.pid{r}").read_text()) for r in (0, 1)
                if (directory / f"{scenario['name']}.pid{r}").exists()]
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 10  # the workers' own exit, at most this long after the launcher's
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in pids if alive(pid)]
        try:
            os.killpg(proc.pid, 9)  # whatever is left in the group (only on a failure below)
        except ProcessLookupError:
            pass
        for pid in survivors:  # (an orphan has left the group if it made a session of its own)
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    out = output.read_text()
    assert not survivors, f"workers {survivors} outlived the launcher:\n{out[-3000:]}"
    assert len(pids) == 2, out[-3000:]
    return proc.returncode, out, elapsed, pids


def launch(tmp_path, scenario: dict) -> tuple[int, str, float, list[int]]:
    return finish(tmp_path, scenario, *start(tmp_path, scenario))


SLOW = {"n": 800, "batch_size": 4, "sleep": 0.25, "chdir": "elsewhere",
        "trainer": {"enable_checkpointing": True, "log_every_n_steps": 50, "max_epochs": 1}}


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_or_sighup_to_the_launcher_checkpoints_soon_whatever_the_logging_interval(tmp_path, signal_name,
                                                                                          code):
    code_seen, out, _, _ = launch(tmp_path, {**SLOW, "name": "stop", "signal": {"step": 3, "name": signal_name}})
    assert code_seen == code, out[-3000:]
    assert "received; checkpoint saved at step" in out, out[-3000:]
    last = torch.load(tmp_path / "stop" / "checkpoints" / "last.ckpt", weights_only=True)
    # sent during step 3; agreed within about 1 s (4 steps of 0.25 s), not at the logging step 50
    assert 4 <= last["loop"]["global_step"] <= 10, last["loop"]
    assert "killed" not in out, out[-3000:]


def test_sigint_to_the_launcher_stops_every_worker(tmp_path):
    code, out, elapsed, _ = launch(tmp_path, {**SLOW, "name": "interrupt", "signal": {"step": 3, "name": "SIGINT"}})
    assert code == 130, out[-3000:]
    assert "KeyboardInterrupt" in out and "killed rank" not in out, out[-3000:]  # they stopped by themselves


def test_sigkill_to_the_launcher_takes_the_workers_with_it(tmp_path):
    # (launch asserts that both workers are gone within 10 s; unkilled, they would train 200 s more)
    code, out, _, _ = launch(tmp_path, {**SLOW, "name": "orphans", "signal": {"step": 3, "name": "SIGKILL"}})
    assert code == -9, out[-3000:]


def test_a_killed_rank_is_noticed_while_rank_0_is_busy_and_exits_137(tmp_path):
    scenario = {"name": "busy", "n": 400, "batch_size": 4, "busy": {"rank": 0, "step": 2, "seconds": 100},
                "fail": {"rank": 1, "step": 2, "kind": "kill"}}
    code, out, elapsed, _ = launch(tmp_path, scenario)
    assert code == 137, out[-3000:]
    assert "syncstep: rank 1 was killed by SIGKILL" in out, out[-3000:]
    assert elapsed < 80, elapsed  # before: only once rank 0 was done (100 s; the launch's limit is 120 s)


def test_a_rank_failing_after_fit_is_named_while_another_launch_runs_undisturbed(tmp_path):
    """Two launches at once on one machine: one fails after fit (rank 1 raises while rank 0 validates, so
    rank 0 gets gloo's follow-on error); the other, with its own rendezvous, trains exactly."""
    failing = {"name": "after", "n": 16, "batch_size": 4, "fail_after_fit": {"rank": 1}}
    neighbour = {"name": "neighbour", "n": 40, "batch_size": 4, "sleep": 0.1}
    runs = [(tmp_path / "a", failing, *start(tmp_path / "a", failing)),
            (tmp_path / "b", neighbour, *start(tmp_path / "b", neighbour))]
    (code, out, _, _), (neighbour_code, neighbour_out, _, _) = [finish(*run) for run in runs]
    assert code == 1, out[-3000:]
    assert "syncstep: rank 1 failed first: RuntimeError: injected failure after fit on rank 1" in out, out[-3000:]
    assert neighbour_code == 0, neighbour_out[-3000:]
    ranks = [torch.load(tmp_path / "b" / f"neighbour.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_params_close(ranks[0], reference_sgd(n=40, global_batch=8, steps=5, lr=0.1))
    assert_params_close(ranks[1], ranks[0], atol=0)
