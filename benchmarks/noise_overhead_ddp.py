"""The cost of Trainer(noise_scale=True) on the DDP workload W3 (2 processes, MLP 1024-2048-2048-10,
batch 64 per process), paired rounds in fresh processes.

    python benchmarks/noise_overhead_ddp.py [--rounds 5] [--steps 55] [--warmup 5]

Each round runs syncstep (bar, loggers, checkpoints off) without and with ``noise_scale=True``, in
alternating order, as ``workloads/syncstep_train.py --devices 2`` (syncstep starts the processes); the
noise scale is then read by the DDP communication hook. Prints steps/s of each and the median of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def once(steps: int, warmup: int, noise: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, str(HERE / "workloads" / "syncstep_train.py"), "--workload", "w3", "--steps",
                   str(steps), "--warmup", str(warmup), "--devices", "2", "--lean", "--out", out,
                   *(["--noise-scale"] if noise else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        subprocess.run(command, check=True, cwd=tmp, env=env, capture_output=True, timeout=900)
        with open(out) as f:
            return json.load(f)["steps_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=55)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    plain, noise = [], []
    for r in range(args.rounds):
        for measure_noise in ((False, True) if r % 2 == 0 else (True, False)):
            (noise if measure_noise else plain).append(once(args.steps, args.warmup, measure_noise))
        print(f"round {r + 1}: {plain[-1]:.2f} vs {noise[-1]:.2f} steps/s", flush=True)
    ratios = [n / b for n, b in zip(noise, plain)]
    print(f"| W3, 2 processes, {args.rounds} paired rounds | steps/s (median) | min | max |")
    print("| --- | --- | --- | --- |")
    for name, values in (("syncstep (lean)", plain), ("syncstep (lean), noise_scale=True", noise)):
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print(f"steps/s with / without, per round: {', '.join(f'{x:.3f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
