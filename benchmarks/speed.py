"""Issue 14's measurements: DDP communication hooks and torch.compile against hand-written DDP.

    python benchmarks/speed.py                  # W3 variants + compile on W1/W2, 2 rounds (~15 min on 2 cores)
    python benchmarks/speed.py --rounds 3 --only w3
    python benchmarks/speed.py --worker ...     # (one measured run; the driver starts these)

W3 (MLP 1024-2048-2048-10, per-process batch 64, SGD momentum, gloo, one thread per process), in
rounds that alternate the variants: hand-written DDP (torchrun, torch's recipe) and one hand-written
process; syncstep with its defaults (progress bar and loggers on), with ``ddp_comm_hook="bf16"``,
with ``"powersgd"`` (rank 1, from step 2, so every timed step is compressed) and with
``compile=True`` (inductor), each on 2 processes. Reported: steps/s (median and min-max over
rounds), the paired ratio against hand-written DDP of the same round, the scaling efficiency
(2-process steps/s over the same round's one hand-written process), the final loss (what the
compression costs) and the first step's time (compilation included).

Compile on W1 / W2 (one process, one thread): syncstep uncompiled against ``compile=True``; the
compile time is the compiled run's first two steps minus the uncompiled run's (the forward is
compiled in the first step's forward, the backward in its backward; steps after the warm-up are
timed as usual).

Results go to benchmarks/out/speed.json (not tracked) and are printed as Markdown tables for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "workloads"))

STEPS = {"w1": (400, 40), "w2": (65, 5), "w3": (55, 5)}  # (steps in all, warm-up steps not timed)
QUICK = {"w1": (40, 5), "w2": (10, 3), "w3": (10, 3)}  # --quick: checks that everything runs


# -- the syncstep worker ----------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    import syncstep
    from common import WORKLOADS, StepClock, loss_of, make_dataset, make_mlp, make_optimizer

    workload = WORKLOADS[args.workload]

    class MLP(syncstep.Module):
        def __init__(self, clock: StepClock):
            super().__init__()
            self.clock, self.net = clock, make_mlp(workload)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            self.clock.tick()
            loss = loss_of(self, batch)  # self(x): the forward compile=True compiles
            self.log("train_loss", loss, prog_bar=True)
            self.clock.last_loss = loss.detach()
            return loss

        def configure_optimizers(self):
            return make_optimizer(workload, self.parameters())

    dataset = make_dataset(workload, args.steps * workload.batch_size * args.devices)
    clock = StepClock()
    model = MLP(clock)
    strategy = "auto"
    if args.devices > 1:
        options = {"matrix_approximation_rank": 1, "start_powerSGD_iter": 2} if args.hook == "powersgd" else None
        strategy = syncstep.DDPStrategy(ddp_comm_hook=args.hook, ddp_comm_options=options)
    trainer = syncstep.Trainer(max_epochs=1, accelerator="cpu", devices=args.devices, strategy=strategy,
                               lr_scaling="none", compile=args.compile, default_root_dir=args.root)
    trainer.fit(model, DataLoader(dataset, batch_size=workload.batch_size, shuffle=False))
    if trainer.is_global_zero:
        clock.write(args.out, args, "syncstep", model.net, trainer.world_size)
        with open(args.out) as f:
            result = json.load(f)
        result["first_steps_s"] = clock.ticks[2] - clock.ticks[0]
        with open(args.out, "w") as f:
            json.dump(result, f)
    del torch  # (imported here so that the driver does not pay for it)


# -- the driver -------------------------------------------------------------------------------------


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_", "GROUP_", "ROLE_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    out.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT / "src"), **extra)
    return out


def cases(workload: str, steps: int, warmup: int) -> dict[str, list[str]]:
    common = ["--workload", workload, "--steps", str(steps), "--warmup", str(warmup)]
    hand = [sys.executable, str(HERE / "workloads" / "handwritten.py"), *common]
    ours = [sys.executable, str(Path(__file__).resolve()), "--worker", *common]
    if workload != "w3":
        return {"syncstep": ours, "syncstep compile=True": [*ours, "--compile"]}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return {
        "hand-written, 1 process": hand,
        "hand-written DDP": [*torchrun, *hand[1:]],
        "syncstep ddp": [*ours, "--devices", "2"],
        "syncstep ddp, bf16 hook": [*ours, "--devices", "2", "--hook", "bf16"],
        "syncstep ddp, powersgd (rank 1)": [*ours, "--devices", "2", "--hook", "powersgd"],
        "syncstep ddp, compile=True": [*ours, "--devices", "2", "--compile"],
    }


def run_rounds(workload: str, rounds: int, out_dir: Path, steps: int, warmup: int) -> dict[str, list[dict]]:
    commands = cases(workload, steps, warmup)
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    names = list(runs)
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]  # each round starts one later: no variant always first
            out = out_dir / f"{workload}-{len(runs[name])}-{abs(hash(name))}.json"
            cmd = [*commands[name], "--out", str(out)]
            if "--worker" in cmd:
                cmd += ["--root", str(out_dir / "root")]
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=env(), cwd=str(out_dir), capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0 or not out.exists():
                print(f"  {workload} {name}: FAILED ({proc.returncode})\n{proc.stdout[-2000:]}", flush=True)
                continue
            result = json.loads(out.read_text())
            result.update(round=r, wall_s=time.perf_counter() - started)
            runs[name].append(result)
            print(f"  {workload} round {r + 1} {name}: {result['steps_per_s']:.3f} steps/s, "
                  f"loss {result['final_loss']:.6f}", flush=True)
    return runs


def paired(runs: dict, a: str, b: str) -> float | None:
    first = {x["round"]: x["steps_per_s"] for x in runs.get(a, [])}
    second = {x["round"]: x["steps_per_s"] for x in runs.get(b, [])}
    ratios = [first[r] / second[r] for r in first if r in second]
    return statistics.median(ratios) if ratios else None


def table_w3(runs: dict) -> list[str]:
    # scaling efficiency: 2-process steps/s over one hand-written process's, same round and per-process
    # batch (benchmarks.md's definition: 1.0 is twice the samples per second)
    lines = ["| variant | steps/s (median) | min - max | vs hand-written DDP (paired) | scaling efficiency "
             "| first 2 steps (s) | final loss |", "|" + " --- |" * 7]
    for name, results in runs.items():
        if not results:
            lines.append(f"| {name} | failed | | | | | |")
            continue
        rates = [x["steps_per_s"] for x in results]
        two = results[0]["world_size"] == 2
        ratio = paired(runs, name, "hand-written DDP") if two else None
        efficiency = paired(runs, name, "hand-written, 1 process") if two else None
        first = statistics.median(x["first_steps_s"] for x in results) if "first_steps_s" in results[0] else None
        lines.append(f"| {name} | {statistics.median(rates):.3f} | {min(rates):.3f} - {max(rates):.3f} | "
                     f"{'' if ratio is None else f'{ratio:.3f}'} | "
                     f"{'' if efficiency is None else f'{efficiency:.3f}'} | "
                     f"{'' if first is None else f'{first:.2f}'} | {results[0]['final_loss']:.6f} |")
    return lines


def table_compile(workload: str, runs: dict) -> list[str]:
    eager, compiled = runs.get("syncstep", []), runs.get("syncstep compile=True", [])
    if not eager or not compiled:
        return [f"{workload}: a run failed"]
    rate = lambda rs: statistics.median(x["steps_per_s"] for x in rs)
    first = lambda rs: statistics.median(x["first_steps_s"] for x in rs)
    ratio = paired(runs, "syncstep compile=True", "syncstep")
    return [f"| {workload.upper()} | {rate(eager):.2f} | {rate(compiled):.2f} | {ratio:.3f} | "
            f"{first(compiled) - first(eager):.1f} | {eager[0]['final_loss']:.6f} | {compiled[0]['final_loss']:.6f} |"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--workload", default="w3")
    p.add_argument("--steps", type=int, default=55)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--hook", default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--root", default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", choices=["w1", "w2", "w3"], action="append")
    p.add_argument("--quick", action="store_true", help="a few steps: checks that every variant runs")
    p.add_argument("--render", metavar="JSON", help="only print the tables of an earlier run's speed.json")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.render:
        render(json.loads(Path(args.render).read_text()))
        return
    out_dir = HERE / "out" / "speed"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for workload in args.only or ["w3", "w1", "w2"]:
        results[workload] = run_rounds(workload, args.rounds, out_dir, *(QUICK if args.quick else STEPS)[workload])
        (HERE / "out" / "speed.json").write_text(json.dumps(results, indent=1))
    render(results)


def render(results: dict) -> None:
    print()
    if "w3" in results:
        print("\n".join(table_w3(results["w3"])))
    compile_rows = [row for w in ("w1", "w2") if w in results for row in table_compile(w, results[w])]
    if compile_rows:
        print("\n| workload | uncompiled steps/s | compiled steps/s | paired ratio | compile time (s) "
              "| final loss uncompiled | compiled |\n| --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(compile_rows))


if __name__ == "__main__":
    main()
