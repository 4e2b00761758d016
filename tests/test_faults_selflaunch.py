"""selflaunch.py's supervision with stand-in workers (plain ``python -c`` processes, no torch), so that its
rules are checked in about a second each: every worker polled, the failed rank named and its status
returned (137 for SIGKILL), a worker that ignores the forwarded SIGTERM killed after the grace and
reported, a SIGTERM-ed run's status. The real launches are in test_faults_launcher.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from syncstep import selflaunch

SLEEPER = "import time; time.sleep(60)"
DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


# selflaunch.py loaded by its path: it needs only the standard library, and `import syncstep` would load torch
RECORD = (f"import importlib.util\nspec = importlib.util.spec_from_file_location('sl', {selflaunch.__file__!r})\n"
          "sl = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(sl)\n")


def workers(by_rank: dict[int, str], tmp_path) -> selflaunch.Workers:
    """Stand-in workers, each running the code given for its RANK."""
    code = "import os\n" + "\n".join(f"if os.environ['RANK'] == '{r}':\n    exec({c!r})" for r, c in by_rank.items())
    env = dict(os.environ, SYNCSTEP_ERROR_DIR=str(tmp_path))
    return selflaunch.Workers([sys.executable, "-c", code], env, len(by_rank), str(tmp_path))


def test_a_failed_rank_1_is_noticed_while_rank_0_runs_and_its_status_returned(tmp_path, capsys):
    started = time.monotonic()
    code = selflaunch._supervise(workers({0: SLEEPER, 1: "import sys; sys.exit(3)"}, tmp_path), str(tmp_path), [])
    assert code == 3 and time.monotonic() - started < 20  # (rank 0 would sleep 60 s)
    assert "rank 1 exited with code 3" in capsys.readouterr().err


def test_a_rank_killed_by_sigkill_is_named_and_the_run_exits_137(tmp_path, capsys):
    kill = "import os, signal, time; time.sleep(0.5); os.kill(os.getpid(), signal.SIGKILL)"
    code = selflaunch._supervise(workers({0: SLEEPER, 1: kill}, tmp_path), str(tmp_path), [])
    assert code == 137
    assert "rank 1 was killed by SIGKILL" in capsys.readouterr().err


def test_the_earliest_recorded_error_is_named_not_a_follow_on(tmp_path, capsys):
    # rank 1 records the cause and takes a while to exit; rank 0 records a follow-on error later, exits first
    first = RECORD + "import time\nsl.write_error_file(1, RuntimeError('the real cause'), True)\ntime.sleep(1)\nexit(1)"
    follow = RECORD + "import time\ntime.sleep(0.5)\nsl.write_error_file(0, OSError('closed by peer'), True)\nexit(1)"
    code = selflaunch._supervise(workers({0: follow, 1: first}, tmp_path), str(tmp_path), [])
    assert code == 1
    assert "rank 1 failed first: RuntimeError: the real cause" in capsys.readouterr().err


def test_a_worker_deaf_to_sigterm_is_killed_after_the_grace_and_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(selflaunch, "GRACE_AFTER_SIGNAL", 1.0)
    group = workers({0: SLEEPER, 1: DEAF}, tmp_path)
    time.sleep(0.5)  # (let rank 1 ignore SIGTERM before it comes)
    started = time.monotonic()
    code = selflaunch._forward(group, [signal.SIGHUP])
    assert code == 128 + signal.SIGHUP and time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "SIGHUP received; forwarded SIGTERM to the workers, and killed rank(s) [1]" in err, err
    assert "last checkpoint is older" in err
    assert all(proc.poll() is not None for proc in group.procs)
