"""The benchmark suite (issue #6): syncstep against a hand-written PyTorch loop and Lightning, in one run.

    python benchmarks/run.py --publish  # the full suite (about 10 minutes on 2 cores), published (make bench)
    python benchmarks/run.py            # the same, written to benchmarks/out/ only (ignored by git)
    python benchmarks/run.py --quick    # a short run that checks the suite end to end (indicative numbers)
    python benchmarks/run.py --render benchmarks/results/cpu.json   # rewrite docs/benchmarks.md only

Every measurement is a fresh process (``workloads/*.py``). The implementations of a workload run
interleaved, A B C A B C ..., so that a slow minute of the machine hits all of them alike; we report
medians and min-max. Results go to ``benchmarks/out/`` (not tracked); with ``--publish`` (a full run
only) to ``benchmarks/results/cpu.json`` and ``docs/benchmarks.md``, the published figures.
 Lightning is skipped, with a note, where it is not installed (``make bench``
installs it into ``.venv-bench``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from report import paired_ratio, render_markdown

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKERS = HERE / "workloads"
PY = sys.executable

# (steps in all, warm-up steps left out of steps/s); rounds of A B C; import-time repetitions.
FULL = {"w1": (3050, 50), "w2": (65, 5), "w3": (55, 5), "rounds": 5, "import_rounds": 10}
QUICK = {"w1": (220, 20), "w2": (18, 3), "w3": (13, 3), "rounds": 2, "import_rounds": 3}

TARGETS = [  # (name, how it is computed, goal, comparison)
    ("W1 steps/s syncstep / hand-written", "ratio w1 syncstep hand-written", 0.97, ">="),
    ("W2 steps/s syncstep / hand-written", "ratio w2 syncstep hand-written", 0.99, ">="),
    ("W3 steps/s syncstep / hand-written (2 processes)", "ratio w3 syncstep-ddp hand-written-ddp", 0.99, ">="),
    ("W1 steps/s syncstep / Lightning", "ratio w1 syncstep lightning", 1.5, ">="),
    ("import syncstep after import torch, in-process (s)", "import", 0.2, "<="),
    ("start-up to first step: syncstep - hand-written, 1 process (s)", "startup w1 syncstep hand-written", 0.5, "<="),
    ("start-up to first step: syncstep - hand-written torchrun, 2 processes (s)",
     "startup w3 syncstep-ddp hand-written-ddp", 1.5, "<="),
]


@dataclass
class Case:
    name: str
    cmd: list[str]  # without --out
    env: dict[str, str] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def clean_env(**extra: str) -> dict[str, str]:
    """A fresh terminal's environment: no launcher variables leaking in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_", "GROUP_", "ROLE_", "PL_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")}
    env.update(extra)
    return env


def run_process(cmd: list[str], env: dict[str, str], cwd: str, log: Path, timeout: float) -> tuple[int, float]:
    """Run ``cmd`` in its own session (killed whole on timeout); returns (exit code, wall seconds)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = -9
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind (launched workers)
            except ProcessLookupError:
                pass
            proc.wait()
    return code, time.perf_counter() - start


def run_case(case: Case, round_index: int = 0, timeout: float = 600) -> None:
    """One measurement in a fresh process, in a fresh directory (logs and checkpoints land there)."""
    with tempfile.TemporaryDirectory(prefix="syncstep-bench-") as tmp:
        out = Path(tmp) / "result.json"
        t0 = time.time()
        code, wall = run_process(case.cmd + ["--out", str(out)], clean_env(**case.env), tmp, Path(tmp) / "log.txt",
                                 timeout)
        log = (Path(tmp) / "log.txt").read_text(errors="replace")
        if code != 0 or not out.exists():
            case.errors.append(f"exit {code}: ...{log[-1500:]}")
            print(f"  {case.name}: FAILED (exit {code})\n{log[-1500:]}", flush=True)
            return
        result = json.loads(out.read_text())
    result["startup_s"] = result["first_step_done"] - t0
    result["wall_s"] = wall
    result["round"] = round_index
    case.runs.append(result)
    print(f"  {case.name:<22} {result['steps_per_s']:9.2f} steps/s  start-up {result['startup_s']:.2f} s  "
          f"loss {result['final_loss']:.6f}", flush=True)


def worker(script: str, workload: str, steps: int, warmup: int, devices: int = 1, *extra: str) -> list[str]:
    return [PY, str(WORKERS / script), "--workload", workload, "--steps", str(steps), "--warmup", str(warmup),
            "--devices", str(devices), *extra]


def torchrun(nprocs: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nprocs}", "--standalone", "--monitor-interval=0.1"]


def cases_for(workload: str, steps: int, warmup: int, lightning: bool) -> list[Case]:
    args = (workload, steps, warmup)
    if workload != "w3":
        # One thread, as in W3: on 2 cores torch's 2 intra-op threads make every step wait for the slower of
        # two cores, so anything else running on the machine (even the suite's own bookkeeping) moves
        # steps/s by +-20% between runs (W2 ratios of 0.80 - 1.29 in earlier suites, Lightning's included).
        # One thread measures the same framework against the same compute, and gives CPU time per step too.
        env = {"OMP_NUM_THREADS": "1"}
        cases = [Case("hand-written", worker("handwritten.py", *args), env),
                 Case("syncstep", worker("syncstep_train.py", *args), env)]
        if workload == "w1":  # where overhead shows: how much of it is the bar and the loggers
            cases.append(Case("syncstep (bar, logger off)", worker("syncstep_train.py", *args, 1, "--lean"), env))
        if lightning:
            cases.append(Case("lightning", worker("lightning_train.py", *args), env))
        return cases
    # W3: 2 processes of 1 thread each against 1 process of 1 thread, same per-process batch.
    one = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cases = [
        Case("hand-written-ddp", torchrun(2) + worker("handwritten.py", *args)[1:], one),
        Case("syncstep-ddp", worker("syncstep_train.py", *args, 2), one),
        Case("hand-written", worker("handwritten.py", *args), one),
        Case("syncstep", worker("syncstep_train.py", *args), one),
    ]
    if lightning:
        cases += [Case("lightning-ddp", worker("lightning_train.py", *args, 2), one),
                  Case("lightning", worker("lightning_train.py", *args), one)]
    return cases


def interleave(cases: list[Case], rounds: int) -> None:
    """Round r runs every case once, starting at case r (mod the number of cases): no implementation
    always runs first, or right after the same neighbour, on a machine whose speed drifts."""
    for r in range(rounds):
        print(f" round {r + 1}/{rounds}", flush=True)
        for i in range(len(cases)):
            run_case(cases[(r + i) % len(cases)], r)


def spread(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarise(cases: list[Case]) -> dict:
    out = {}
    for case in cases:
        first = case.runs[0] if case.runs else {}
        out[case.name] = {
            "command": " ".join(Path(c).name if c == PY else c for c in case.cmd),
            "env": case.env,
            "steps_per_s": spread([r["steps_per_s"] for r in case.runs]),
            "rounds": [r.get("round") for r in case.runs],
            "startup_s": spread([r["startup_s"] for r in case.runs]),
            "cpu_us_per_step": spread([r["cpu_us_per_step"] for r in case.runs]),
            "final_loss": first.get("final_loss"),
            "param_checksum": first.get("param_checksum"),
            "losses_agree_across_rounds": len({r["final_loss"] for r in case.runs}) <= 1,
            "threads": first.get("threads"), "world_size": first.get("world_size"),
            "errors": case.errors,
        }
    return out


def loss_checks(name: str, results: dict, groups: list[tuple[str, list[str]]]) -> list[dict]:
    """Final loss and parameter checksum of each implementation against its hand-written reference."""
    checks = []
    for reference, others in groups:
        ref = results.get(reference, {})
        for other in others:
            got = results.get(other)
            if not got or got["final_loss"] is None or ref.get("final_loss") is None:
                continue
            loss_diff = abs(got["final_loss"] - ref["final_loss"])
            sum_diff = abs(got["param_checksum"] - ref["param_checksum"]) / max(1.0, abs(ref["param_checksum"]))
            checks.append({"workload": name, "implementation": other, "reference": reference,
                           "final_loss": got["final_loss"], "reference_loss": ref["final_loss"],
                           "loss_diff": loss_diff, "checksum_rel_diff": sum_diff,
                           "same_work": loss_diff <= 1e-4 * max(1.0, abs(ref["final_loss"])) and sum_diff <= 1e-5})
    return checks


def import_times(rounds: int) -> dict:
    """Wall time of ``python -c "import X"`` in fresh processes, interleaved; for syncstep also the time its
    own import takes once torch is imported, measured inside the process (what the target is about)."""
    timing = "import time; t = time.perf_counter(); import torch; a = time.perf_counter(); import {}; " \
             "print(a - t, time.perf_counter() - a)"
    modules = ["torch", "syncstep"] + (["lightning"] if importlib.util.find_spec("lightning") else [])
    walls: dict[str, list[float]] = {m: [] for m in modules}
    added: dict[str, list[float]] = {m: [] for m in modules if m != "torch"}
    for _ in range(rounds):
        for module in modules:
            with tempfile.TemporaryDirectory() as tmp:
                log = Path(tmp) / "log"
                code, wall = run_process([PY, "-c", timing.format(module)], clean_env(), tmp, log, 120)
                if code == 0:
                    walls[module].append(wall)
                    if module in added:
                        added[module].append(float(log.read_text().split()[-1]))
    out = {f"import {m}": spread(v) for m, v in walls.items()}
    out.update({f"import {m} after import torch (in-process)": spread(v) for m, v in added.items()})
    print("  " + "  ".join(f"{m} {v['median']:.2f} s" for m, v in out.items() if v["median"]), flush=True)
    return out


def breakdown(steps: int, warmup: int, rounds: int) -> dict:
    """Where a W1 step goes, hand-written and syncstep side by side (``workloads/breakdown.py``), interleaved;
    per part the median over the rounds. Also what ``import syncstep`` adds to ``import torch``."""
    parts: dict[str, dict[str, list[float]]] = {"hand-written": {}, "syncstep": {}}
    for _ in range(rounds):
        for implementation in parts:
            with tempfile.TemporaryDirectory(prefix="syncstep-bench-") as tmp:
                out = Path(tmp) / "result.json"
                cmd = [PY, str(WORKERS / "breakdown.py"), implementation] + worker("x", "w1", steps, warmup)[2:]
                code, _ = run_process(cmd + ["--out", str(out)], clean_env(OMP_NUM_THREADS="1"), tmp,
                                      Path(tmp) / "log.txt", 600)
                if code != 0 or not out.exists():
                    print(f"  breakdown {implementation}: FAILED (exit {code})", flush=True)
                    continue
                result = json.loads(out.read_text())
            for part, us in [("step", result["step_us"]), *result["parts_us_per_step"].items()]:
                parts[implementation].setdefault(part, []).append(us)
    medians = {impl: {part: statistics.median(v) for part, v in p.items()} for impl, p in parts.items()}
    print("  breakdown: " + "  ".join(f"{impl} {p.get('step', 0):.0f} us/step" for impl, p in medians.items()))
    return {"steps": steps, "rounds": rounds, "us_per_step": medians, "imports": import_profile()}


def import_profile(top: int = 8) -> list[tuple[str, float]]:
    """The modules that ``import syncstep`` loads after ``import torch``, by cumulative import time (ms)."""
    proc = subprocess.run([PY, "-X", "importtime", "-c", "import torch; import syncstep"], capture_output=True,
                          text=True, env=clean_env(), timeout=120)
    times, after_torch = [], False
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        if after_torch and not name.strip().startswith("torch"):
            times.append((name.strip(), int(parts[1]) / 1e3))
        after_torch = after_torch or name == " torch"
    return sorted(times, key=lambda item: -item[1])[:top]


def evaluate_targets(results: dict) -> list[dict]:
    def median(workload: str, impl: str, what: str) -> float | None:
        entry = results["throughput"].get(workload, {}).get(impl)
        return entry[what]["median"] if entry else None

    def paired(workload: str, a: str, b: str) -> float | None:
        return paired_ratio(results["throughput"].get(workload, {}), a, b)

    rows = []
    for name, how, goal, comparison in TARGETS:
        kind, *rest = how.split()
        value = None
        if kind == "ratio":
            value = paired(*rest)
        elif kind == "startup":
            a, b = median(rest[0], rest[1], "startup_s"), median(rest[0], rest[2], "startup_s")
            value = a - b if a is not None and b is not None else None
        elif kind == "import":
            value = results["import"].get("import syncstep after import torch (in-process)", {}).get("median")
        met = None if value is None else (value >= goal if comparison == ">=" else value <= goal)
        rows.append({"target": name, "value": value, "goal": f"{comparison} {goal}", "met": met})
    return rows


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    versions = {}
    for module in ("torch", "lightning", "syncstep", "tqdm", "tensorboard"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # not installed: the report says so
            versions[module] = None
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), **versions,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def run_suite(quick: bool) -> dict:
    settings = QUICK if quick else FULL
    lightning = importlib.util.find_spec("lightning") is not None
    results: dict = {"quick": quick, "machine": machine_info(), "settings": settings, "throughput": {},
                     "loss_checks": [], "lightning_installed": lightning}
    started = time.perf_counter()
    for workload in ("w1", "w2", "w3"):
        steps, warmup = settings[workload]
        print(f"{workload}: {steps} steps, {warmup} warm-up, {settings['rounds']} rounds", flush=True)
        cases = cases_for(workload, steps, warmup, lightning)
        interleave(cases, settings["rounds"])
        summary = summarise(cases)
        results["throughput"][workload] = summary
        names = list(summary)
        groups = [("hand-written", [n for n in names if n != "hand-written" and not n.endswith("-ddp")])]
        if workload == "w3":
            groups.append(("hand-written-ddp", [n for n in names if n.endswith("-ddp") and n != "hand-written-ddp"]))
        results["loss_checks"] += loss_checks(workload, summary, groups)
    print("import times", flush=True)
    results["import"] = import_times(settings["import_rounds"])
    results["targets"] = evaluate_targets(results)
    print("where a W1 step goes (1 thread)", flush=True)
    results["breakdown"] = breakdown(*settings["w1"], settings["rounds"])
    results["failures"] = [f"{w} {n}: {e}" for w, s in results["throughput"].items() for n, v in s.items()
                           for e in v["errors"]]
    results["suite_seconds"] = time.perf_counter() - started
    return results


def write_docs(results: dict, docs: Path) -> None:
    """Regenerate the doc, keeping the hand-filled "GPU check" section as it is."""
    gpu = None
    if docs.exists():
        text = docs.read_text()
        marker = text.find("\n## GPU check")
        if marker >= 0:
            gpu = text[marker + 1:]
    docs.write_text(render_markdown(results, gpu))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds: checks the suite, numbers indicative")
    p.add_argument("--out", help="results JSON (default benchmarks/out/cpu.json, cpu-quick.json with --quick)")
    p.add_argument("--publish", action="store_true",
                   help="write benchmarks/results/cpu.json and regenerate docs/benchmarks.md (full runs only)")
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown report to regenerate")
    p.add_argument("--render", metavar="JSON", help="only regenerate the Markdown from a results file")
    args = p.parse_args(argv)
    if args.render:
        write_docs(json.loads(Path(args.render).read_text()), Path(args.docs))
        return 0
    if args.publish and args.quick:
        p.error("--publish takes a full run: a --quick run's numbers are indicative only")
    default = HERE / ("results" if args.publish else "out") / ("cpu-quick.json" if args.quick else "cpu.json")
    out = Path(args.out or default)
    results = run_suite(args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    if args.publish:
        write_docs(results, Path(args.docs))
    print(f"\nresults: {out}" + (f"\nreport: {args.docs}" if args.publish else " (not published: pass --publish)")
          + f"  ({results['suite_seconds'] / 60:.1f} minutes)")
    for row in results["targets"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
        print(f"  {row['target']}: {value} (goal {row['goal']}) {verdict}")
    for check in results["loss_checks"]:
        if not check["same_work"]:
            print(f"  LOSS MISMATCH {check['workload']} {check['implementation']}: {check['final_loss']} vs "
                  f"{check['reference']} {check['reference_loss']}")
    return 1 if results["failures"] or not all(c["same_work"] for c in results["loss_checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
