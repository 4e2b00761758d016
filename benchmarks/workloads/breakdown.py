"""Where one step's time goes: timers around each part of a real run, hand-written loop or syncstep.

    python breakdown.py hand-written --workload w1 --steps 2050 --warmup 50 --out parts.json
    python breakdown.py syncstep --workload w1 ...

The torch work both loops do (fetching the batch, forward and loss, backward, the optimizer step and
zero_grad) is timed the same way in both; for syncstep also its own parts (the logging step every
log_every_n_steps, the strategy's call around training_step, the progress bar, self.log, and the
optimizer-step wrapper when a step needs more than step() and zero_grad()). What no
timer covers is the loop's own bookkeeping. Each timer costs about 0.3 us per call; only steps of the
timed window (after warm-up) count.
"""

from __future__ import annotations

import collections
import functools
import json
import sys
import time

import torch
from torch.utils.data import dataloader

import common

calls: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)  # label: [(start, seconds)]
clocks: list[common.StepClock] = []


def timed(owner: object, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            calls[label].append((start, time.perf_counter() - start))

    setattr(owner, name, wrapper)


def main() -> None:
    implementation = sys.argv.pop(1)
    timed(dataloader._BaseDataLoaderIter, "__next__", "data: next batch")
    timed(common, "loss_of", "forward + loss")
    timed(torch.Tensor, "backward", "backward")
    timed(torch.optim.SGD, "step", "optimizer step")
    timed(torch.optim.Optimizer, "zero_grad", "zero_grad")
    write = common.StepClock.write
    common.StepClock.write = lambda self, *a, **k: (clocks.append(self), write(self, *a, **k))
    if implementation == "syncstep":
        import syncstep_train as worker

        from syncstep import loop, module, progress, step
        from syncstep.strategies import single

        timed(loop.FitLoop, "log_step", "syncstep: logging step (every log_every_n_steps)")
        timed(single.SingleDeviceStrategy, "training_step", "syncstep: strategy.training_step")
        timed(module.Module, "log", "syncstep: self.log")
        # Only when a step is more than step() and zero_grad() (LR multiplier, clipping, ...): not in W1.
        timed(step.OptimizerStep, "step", "syncstep: OptimizerStep.step")
        timed(progress.ProgressBar, "advance", "syncstep: progress bar")
    else:
        import handwritten as worker
    worker.main()
    args = common.parse_args()
    # Only calls inside the timed window of steady-state steps count, as for steps/s.
    ticks = clocks[0].ticks
    begin, end, steps = ticks[args.warmup], ticks[-1], len(ticks) - 1 - args.warmup
    us = {label: sum(s for t, s in spans if begin <= t < end) / steps * 1e6 for label, spans in calls.items()}
    if implementation == "syncstep":  # take out what nests inside these timers
        nested = us["data: next batch"] + us["forward + loss"] + us["syncstep: self.log"]
        us["syncstep: strategy.training_step"] -= nested
        if "syncstep: OptimizerStep.step" in us:
            us["syncstep: OptimizerStep.step"] -= us["optimizer step"] + us["zero_grad"]
    step = (end - begin) / steps * 1e6
    us["loop bookkeeping (no timer)"] = step - sum(us.values())
    with open(args.out) as f:
        result = json.load(f)
    result["parts_us_per_step"] = us
    result["step_us"] = step
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
