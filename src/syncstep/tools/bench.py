"""``syncstep bench``: throughput of a model at 1..N devices, scaling efficiency, and where a step's time goes.

    syncstep bench                                            # the built-in MLP, ddp, on the cores / GPUs here
    syncstep bench --model train.py:Classifier --data train.py:make_dataset --strategy ddp --max-devices 4

Throughput. For n = 1..N devices, syncstep's Trainer trains ``--warmup`` + ``--steps`` optimizer steps
(progress bar, logger and checkpoints off) and we time the last ``--steps`` (at each optimizer step,
through an optimizer post-hook). ddp runs in n fresh processes started by torchrun; on the CPU each
gets cores / n threads, as syncstep's own launcher does. dp runs in this process, its replicas in
threads. The per-device batch stays the same, so n devices take n times the samples per step (weak
scaling), and the scaling efficiency is samples/s at n / (n x samples/s at 1); 1.0 is ideal.

Where the time goes. A hand-instrumented loop on the same model and data, with torch.distributed used
directly (not DDP), times one step in parts: data loading (next batch, moved to the device), compute
(forward and backward), gradient sync (one all-reduce of all gradients; DDP overlaps it with backward,
so this is the most it can cost) and the optimizer step. For dp on GPUs, sync is the parameter
broadcast and the gradient reduction to the first GPU; for dp on the CPU the replicas share their
parameters, so there is nothing to sync, and one step computes every replica's batch on the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from itertools import cycle
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import syncstep
from syncstep.optim import parse_optimizers
from syncstep.strategies.common import extract_loss, move_to_device

PARTS = ("data", "compute", "sync", "optimizer")


class BuiltinMLP(syncstep.Module):
    """The built-in model: an MLP on synthetic data (the benchmark suite's W2 by default)."""

    def __init__(self, sizes: tuple[int, ...] = (1024, 2048, 2048, 10)):
        super().__init__()
        layers: list[torch.nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.sizes = sizes
        self.net = torch.nn.Sequential(*layers[:-1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def load_object(spec: str) -> Any:
    """``path/to/file.py:Name`` -> the object ``Name`` defined in that file."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise ValueError(f"{spec!r}: give a Python file and a name in it, as path/to/file.py:Name.")
    if not os.path.isfile(path):
        raise ValueError(f"{spec!r}: no file {path!r} (relative to {os.getcwd()}).")
    loader_spec = importlib.util.spec_from_file_location(f"_syncstep_bench_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise ValueError(f"{spec!r}: {path} defines no {name!r}.")
    return getattr(module, name)


def make_model(args: argparse.Namespace) -> syncstep.Module:
    if args.model == "builtin":
        torch.manual_seed(0)
        return BuiltinMLP(tuple(args.sizes))
    model = load_object(args.model)()
    if not isinstance(model, syncstep.Module):
        raise TypeError(f"{args.model} made a {type(model).__name__}; syncstep bench needs a syncstep.Module.")
    return model


def make_loader(args: argparse.Namespace, model: syncstep.Module, devices: int) -> DataLoader:
    """The training data at the per-device batch: --data, else the model's train_dataloader(), else synthetic."""
    if args.data:
        data = load_object(args.data)()
    elif args.model != "builtin" and model.train_dataloader() is not None:
        data = model.train_dataloader()
    elif args.model == "builtin":
        samples = (args.warmup + args.steps) * args.batch_size * devices
        generator = torch.Generator().manual_seed(1234)
        x = torch.randn(samples, args.sizes[0], generator=generator)
        data = TensorDataset(x, torch.randint(0, args.sizes[-1], (samples,), generator=generator))
    else:
        raise ValueError(f"{args.model} defines no train_dataloader(); pass --data path/to/file.py:function "
                         "returning a Dataset or a DataLoader.")
    if isinstance(data, DataLoader):
        return data
    if not isinstance(data, Dataset):
        raise TypeError(f"--data must return a torch Dataset or DataLoader, got {type(data).__name__}.")
    return DataLoader(data, batch_size=args.batch_size, shuffle=False, drop_last=True)


class Clock:
    """Wall time that waits for the GPU first, so that each part is charged what it queued."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def time_trainer(args: argparse.Namespace, devices: int, device: torch.device) -> dict[str, float]:
    """Steady-state steps/s of syncstep's Trainer at ``devices``, and the global batch it ran."""
    model = make_model(args)
    loader = make_loader(args, model, devices)
    clock, ticks = Clock(device), []
    total = args.warmup + args.steps
    configure = model.configure_optimizers

    def tick(*_: Any) -> None:
        # Only the two ends of the timed window wait for the GPU; steps in between run as they would.
        ticks.append(clock() if len(ticks) in (args.warmup - 1, total - 1) else time.perf_counter())

    def configure_and_time() -> Any:
        returned = configure()
        parse_optimizers(returned)[0][0].register_step_post_hook(tick)
        return returned

    model.configure_optimizers = configure_and_time
    with tempfile.TemporaryDirectory(prefix="syncstep-bench-") as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = syncstep.Trainer(
            max_steps=total, accelerator=args.accelerator, devices=devices, strategy=args.strategy,
            precision=args.precision, enable_progress_bar=False, logger=False, enable_checkpointing=False,
            default_root_dir=root,
        )
        with contextlib.redirect_stdout(sys.stderr):
            trainer.fit(model, loader)
    if len(ticks) < total:
        raise RuntimeError(f"the data gave only {len(ticks)} optimizer steps; {total} are needed. Give more "
                           "data or fewer --steps / --warmup.")
    # ticks[k] is the end of step k: the timed steps are warmup .. total - 1.
    steps_per_s = args.steps / (ticks[total - 1] - ticks[args.warmup - 1])
    return {"steps_per_s": steps_per_s, "global_batch_size": trainer.batch_plan.global_batch_size}


def time_parts(args: argparse.Namespace, devices: int, device: torch.device) -> dict[str, float]:
    """Seconds per step in data, compute, sync and optimizer, from a hand-instrumented loop."""
    model = make_model(args).to(device)
    model.train()
    optimizer = parse_optimizers(model.configure_optimizers())[0][0]
    batches = cycle(make_loader(args, model, devices))
    params = [p for p in model.parameters() if p.requires_grad]
    distributed = args.strategy.startswith("ddp") and torch.distributed.is_initialized()
    dp = args.strategy == "dp"
    dp_gpus = [torch.device("cuda", i) for i in range(devices)] if dp and device.type == "cuda" else []
    # dp on the CPU runs its replicas in threads on the same cores: one step computes all of their batches.
    replicas = devices if dp and device.type == "cpu" else 1
    clock = Clock(device)
    autocast = contextlib.nullcontext() if args.precision == "32" else torch.autocast(
        device.type, dtype=torch.bfloat16 if args.precision.startswith("bf16") else torch.float16)
    sums = dict.fromkeys(PARTS, 0.0)
    for i in range(args.warmup + args.steps):
        t0 = clock()
        group = [move_to_device(next(batches), device) for _ in range(replicas)]
        t1 = clock()
        for batch in group:
            with autocast:
                loss = extract_loss(model.training_step(batch, i))
            loss.backward()
        t2 = clock()
        grads = [p.grad for p in params if p.grad is not None]
        if distributed:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= torch.distributed.get_world_size()
        elif len(dp_gpus) > 1:
            # Stand-ins for the other replicas' gradients (DP computes them there), copied untimed; then
            # what DP does each step: broadcast the parameters, reduce the gradients onto the first GPU.
            others = [[g.to(gpu) for g in grads] for gpu in dp_gpus[1:]]
            t2 = clock()
            torch.nn.parallel.replicate(model, dp_gpus)
            torch.cuda.comm.reduce_add_coalesced([grads, *others], destination=device.index)
        t3 = clock()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = clock()
        if i >= args.warmup:
            for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                sums[part] += seconds
    return {part: total / args.steps for part, total in sums.items()}


def measure(args: argparse.Namespace, devices: int) -> dict[str, Any]:
    """Both measurements at ``devices``, in this process (a ddp worker, or dp's one process)."""
    if args.accelerator == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    result: dict[str, Any] = {"devices": devices, "threads": torch.get_num_threads()}
    result.update(time_trainer(args, devices, device))
    try:
        result["parts"] = time_parts(args, devices, device)
    except Exception as error:  # a user's training_step that needs a trainer: keep the throughput
        result["parts"] = None
        result["parts_error"] = f"{type(error).__name__}: {error}"
    return result


def launch_ddp(args: argparse.Namespace, devices: int) -> dict[str, Any]:
    """One torchrun of ``devices`` processes running :func:`measure`; rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="syncstep-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={devices}", "--standalone",
               "--monitor-interval=0.1", "-m", "syncstep.tools.bench", "--worker", out, "--devices", str(devices),
               *forwarded(args)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        if args.accelerator == "cpu":
            threads = args.threads_per_process or max(1, (os.cpu_count() or 1) // devices)
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"ddp with {devices} processes failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        with open(out) as f:
            return json.load(f)


def forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--strategy", args.strategy, "--accelerator", args.accelerator,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--precision", args.precision, "--sizes", *map(str, args.sizes)]
    return out + (["--data", args.data] if args.data else [])


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["steps_per_s"] * rows[0]["global_batch_size"]
    head = (f"{'devices':>7} {'threads':>7} {'steps/s':>9} {'samples/s':>10} {'speed-up':>8} {'efficiency':>10}  "
            f"| {'data ms':>8} {'compute ms':>10} {'sync ms':>8} {'optim ms':>8} {'sum ms':>8} {'step ms':>8}")
    lines = [head, "-" * len(head)]
    for row in rows:
        samples = row["steps_per_s"] * row["global_batch_size"]
        line = (f"{row['devices']:>7} {row['threads']:>7} {row['steps_per_s']:>9.2f} {samples:>10.1f} "
                f"{samples / base:>8.2f} {samples / base / row['devices']:>10.2f}  |")
        parts = row.get("parts")
        if parts:
            ms = [parts[p] * 1e3 for p in PARTS]
            line += "".join(f" {v:>{w}.2f}" for v, w in zip(ms, (8, 10, 8, 8)))
            line += f" {sum(ms):>8.2f} {1e3 / row['steps_per_s']:>8.2f}"
        else:
            line += f" (split not measured: {row.get('parts_error', '')})"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], title: str, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = [r["devices"] for r in rows]
    samples = [r["steps_per_s"] * r["global_batch_size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(devices, samples, marker="o", label="measured")
    left.plot(devices, [samples[0] * d for d in devices], linestyle="--", color="gray", label="ideal (linear)")
    for d, s in zip(devices, samples):
        left.annotate(f"{s / samples[0] / d:.0%}", (d, s), textcoords="offset points", xytext=(4, -12), fontsize=8)
    left.set(title="throughput (labels: scaling efficiency)", xlabel="devices", ylabel="samples/s", xticks=devices)
    left.legend()
    left.grid(alpha=0.3)
    bottom = [0.0] * len(rows)
    for part in PARTS:
        heights = [(r["parts"] or {}).get(part, 0.0) * 1e3 for r in rows]
        right.bar(devices, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    right.plot(devices, [1e3 / r["steps_per_s"] for r in rows], "k_", markersize=30, label="syncstep step")
    right.set(title="one step, in parts (ms)", xlabel="devices", ylabel="ms per step", xticks=devices)
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="syncstep bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", default="builtin", help="'builtin' (an MLP) or path/to/file.py:ClassName "
                   "(a syncstep.Module built with no arguments)")
    p.add_argument("--data", help="path/to/file.py:function returning a Dataset (or a DataLoader) for training; "
                   "default: the model's train_dataloader(), or synthetic data for the built-in model")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "dp"])
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
    p.add_argument("--max-devices", type=int, help="N (default: the GPUs here, or the CPU cores)")
    p.add_argument("--batch-size", type=int, default=64, help="per-device batch for a Dataset (default 64)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per device count (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, at least 1 (default 5)")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 2048, 10],
                   help="layer widths of the built-in MLP (default 1024 2048 2048 10)")
    p.add_argument("--threads-per-process", type=int, help="CPU ddp: threads per process (default cores / n)")
    p.add_argument("--out", default="syncstep_bench.png", help="PNG plot (default syncstep_bench.png)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.add_argument("--timeout", type=float, default=600, help="seconds for each ddp launch (default 600)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.accelerator in ("auto", "gpu"):
        args.accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:  # one process of a torchrun started by launch_ddp
        result = measure(args, args.devices)
        if int(os.environ.get("RANK", "0")) == 0:
            with open(args.worker, "w") as f:
                json.dump(result, f)
        return 0
    cuda = args.accelerator == "cuda"
    available = torch.cuda.device_count() if cuda else (os.cpu_count() or 1)
    n_max = args.max_devices or available
    if n_max > available:
        print(f"syncstep bench: {n_max} devices asked for, but this machine has {available} "
              f"{'GPUs' if cuda else 'CPU cores'}; beyond that devices share hardware and the numbers say "
              "little about scaling.", file=sys.stderr)
        if cuda:
            return 2
    try:  # the user's files are read here once, so that a mistake shows before any process starts
        model = make_model(args)
        make_loader(args, model, 1)
    except (ValueError, TypeError, ImportError, SyntaxError) as error:
        print(f"syncstep bench: {error}", file=sys.stderr)
        return 2
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    what = "built-in MLP " + "-".join(map(str, args.sizes)) if args.model == "builtin" else args.model
    title = (f"syncstep bench: {what} ({millions:.1f} M parameters), strategy {args.strategy} on {args.accelerator} "
             f"({available} {'GPUs' if cuda else 'cores'}), precision {args.precision}, "
             f"{args.steps} timed steps after {args.warmup}")
    print(title, flush=True)
    rows = []
    for n in range(1, n_max + 1):
        try:
            row = launch_ddp(args, n) if args.strategy == "ddp" else measure(args, n)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            print(f"syncstep bench: {error}", file=sys.stderr)
            if not rows:
                return 1
            break
        rows.append(row)
        print(f"  {n} device(s): {row['steps_per_s']:.2f} steps/s", flush=True)
    print(table(rows))
    if args.strategy == "dp" and not cuda and n_max > 1:
        print("note: dp on the CPU runs its replicas in threads of one process; it is not meant to be faster.")
    sync = {"ddp": "one all-reduce of all gradients, not overlapped with backward as in DDP, so an upper bound",
            "dp": "the parameter broadcast and the gradient reduction onto the first GPU" if cuda else
            "none: the replicas share their parameters"}[args.strategy]
    print(f"sync: {sync}. step ms: syncstep's measured step; sum ms: the instrumented loop's parts.")
    plot(rows, title, args.out)
    print(f"plot: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
