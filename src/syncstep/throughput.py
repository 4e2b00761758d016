"""Live throughput: samples/s, optimizer steps/s, the slowest rank, MFU; logged at logging steps.

At every logging step (``log_every_n_steps``) the loggers get, for the window since the previous one:

- ``throughput/samples_per_sec``, ``throughput/steps_per_sec``: samples (all replicas) and optimizer
  steps over the wall time of the window;
- ``throughput/rank_time_max`` (seconds per step), ``throughput/slowest_rank`` and
  ``throughput/rank_time_median``: each rank's *own* time per step, the part before its backward
  joins the gradient all-reduce: fetching its batches and running ``training_step``. Ranks wait for
  each other inside backward, so a step's wall time is the same on every rank and cannot name a
  straggler; the time before backward can. A slow data loader, a slow ``training_step`` or a busy
  CPU shows up as one rank's time far above the median;
- ``throughput/mfu`` with ``Trainer(flops_per_sample=...)``: the model FLOPs the run achieves over the
  devices' peak (``peak_flops_per_device``, or PEAK_FLOPS below for a known GPU and precision).

The per-rank times travel in the all-reduce the logging step already makes (``Guards.agree``): each
rank puts its time in its own slot and a huge number in the others', and the minimum over ranks is
every rank's time. No extra collective. At the end of fit one line sums up the whole run.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

_NOT_MINE = 2**62  # in another rank's slot: the minimum over ranks is that rank's own value
_MICROSECONDS = 1_000_000

# Dense peak FLOP/s per device by (name fragment, precision); the first matching fragment wins.
PEAK_FLOPS = {
    ("H200", "bf16-mixed"): 989e12, ("H200", "16-mixed"): 989e12, ("H200", "32"): 67e12,
    ("H100", "bf16-mixed"): 989e12, ("H100", "16-mixed"): 989e12, ("H100", "32"): 67e12,
    ("A100", "bf16-mixed"): 312e12, ("A100", "16-mixed"): 312e12, ("A100", "32"): 19.5e12,
}


def peak_flops(device: Any, precision: str) -> float | None:
    """The device's dense peak FLOP/s at ``precision`` if it is a GPU in PEAK_FLOPS, else None."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v for (fragment, p), v in PEAK_FLOPS.items() if fragment in name and p == precision), None)


class Throughput:
    def __init__(self, strategy: Any, *, flops_per_sample: float | None = None,
                 peak_flops_per_device: float | None = None, precision: str = "32") -> None:
        self.strategy = strategy
        self.world = strategy.num_processes
        self.flops_per_sample = flops_per_sample
        self.peak = peak_flops_per_device
        if flops_per_sample is not None and self.peak is None:
            self.peak = peak_flops(strategy.root_device, precision)
        self.busy = 0.0  # this rank's seconds in fetching batches and training_step (the loop adds to it)
        self.samples = 0  # samples of every replica (the loop adds each step's)
        self.last: dict[str, float] = {}
        self.start(0)

    def start(self, global_step: int) -> None:
        """At the start of fit (after a resume): the run's and the first window's start."""
        self.started = self.window_start = time.perf_counter()
        self.first_step = self.window_step = global_step
        self.busy = self.window_busy = 0.0
        self.samples = self.window_samples = 0
        self.rank_busy: list[float] | None = None  # every rank's total, as of the last logging step

    def payload(self, global_step: int) -> list[int]:
        """What this rank adds to the logging step's all-reduce: its time per step over the window and
        over the run, in microseconds, each in this rank's slot."""
        steps = max(1, global_step - self.window_step)
        mine = [round((self.busy - self.window_busy) / steps * _MICROSECONDS), round(self.busy * _MICROSECONDS)]
        out = [_NOT_MINE] * (2 * self.world)
        rank = self.strategy.global_rank
        out[rank], out[self.world + rank] = mine
        return out

    def values(self, reduced: list[int], global_step: int) -> dict[str, float]:
        """The window's figures from the all-reduced payload; starts the next window."""
        now = time.perf_counter()
        elapsed, steps = now - self.window_start, global_step - self.window_step
        samples = self.samples - self.window_samples
        per_rank = [t / _MICROSECONDS for t in reduced[:self.world]]
        self.rank_busy = [t / _MICROSECONDS for t in reduced[self.world:2 * self.world]]
        self.window_start, self.window_step = now, global_step
        self.window_busy, self.window_samples = self.busy, self.samples
        if steps <= 0 or elapsed <= 0:
            return {}
        out = {"throughput/samples_per_sec": samples / elapsed, "throughput/steps_per_sec": steps / elapsed}
        if self.world > 1:  # (one process: the loop does not time its steps, and there is no straggler)
            slowest = max(range(self.world), key=per_rank.__getitem__)
            out.update({"throughput/rank_time_max": per_rank[slowest], "throughput/slowest_rank": float(slowest),
                        "throughput/rank_time_median": statistics.median(per_rank)})
        if self.flops_per_sample is not None and self.peak:
            out["throughput/mfu"] = samples / elapsed * self.flops_per_sample / (self.peak * self.strategy.world_size)
        self.last = out
        return out

    def summary(self, global_step: int) -> str | None:
        """One line for the end of fit: the whole run's rates, and the slowest rank as of the last log."""
        elapsed, steps = time.perf_counter() - self.started, global_step - self.first_step
        if steps <= 0 or elapsed <= 0:
            return None
        line = (f"syncstep: throughput: {self.samples / elapsed:.4g} samples/s, {steps / elapsed:.4g} steps/s "
                f"over {steps} steps in {elapsed:.3g} s (start-up and compilation included)")
        if self.rank_busy and self.world > 1 and self.window_step > self.first_step:
            logged = self.window_step - self.first_step
            per_step = [t / logged for t in self.rank_busy]
            slowest = max(range(self.world), key=per_step.__getitem__)
            line += (f"; slowest rank {slowest}: {per_step[slowest]:.3g} s/step before backward (median "
                     f"{statistics.median(per_step):.3g})")
        if self.flops_per_sample is not None:
            if self.peak:
                mfu = self.samples / elapsed * self.flops_per_sample / (self.peak * self.strategy.world_size)
                line += f"; MFU {100 * mfu:.3g}%"
            else:
                line += "; MFU unknown (pass peak_flops_per_device=...)"
        return line + "."
