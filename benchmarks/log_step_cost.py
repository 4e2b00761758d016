"""What a logging step costs, piece by piece, in a W1-like run (every ``log_every_n_steps``, 50 by default).

    python benchmarks/log_step_cost.py [--steps 20000] [--runs 3]

Trains ``overhead.py``'s Linear(64, 10) on batches of 2 with syncstep's defaults (progress bar, CSV and
TensorBoard loggers), with a timer around each piece of the logging step, and prints the median and mean
microseconds per call over the last two thirds of the calls. A piece that does its work in batches (the
TensorBoard logger writes its events every 20 logging steps) shows a small median and a larger mean: the
mean is what it costs on average.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch

import overhead
from syncstep import guards, loggers, loop, metrics, progress, step

TIMED = [
    (loop.FitLoop, "log_step"), (guards.Guards, "agree"), (metrics.Metrics, "update"),
    (metrics.Metrics, "send"), (metrics.LogStore, "step_values"), (step.OptimizerStep, "lr_values"),
    (progress.ProgressBar, "show"), (loggers.CSVLogger, "log_metrics"), (loggers.TensorBoardLogger, "log_metrics"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    times: dict[str, list[int]] = collections.defaultdict(list)

    def timer(function, key):
        def timed(*a, **k):
            start = time.perf_counter_ns()
            try:
                return function(*a, **k)
            finally:
                times[key].append(time.perf_counter_ns() - start)
        return timed

    for cls, name in TIMED:
        setattr(cls, name, timer(getattr(cls, name), f"{cls.__name__}.{name}"))
    overhead.MODEL.update(name="linear", batch_size=2)
    torch.set_num_threads(1)
    dataset = overhead.data(args.steps)
    for _ in range(args.runs):
        overhead.ours(dataset, lean=False)
    print(f"\n{args.runs} runs of {args.steps} steps (Linear(64, 10), batch 2), syncstep defaults", file=sys.stderr)
    print("| piece | calls | median us | mean us |")
    print("| --- | --- | --- | --- |")
    for key, values in times.items():
        values = values[len(values) // 3:]
        print(f"| {key} | {len(values)} | {statistics.median(values) / 1000:.1f} | "
              f"{statistics.mean(values) / 1000:.1f} |")


if __name__ == "__main__":
    main()
