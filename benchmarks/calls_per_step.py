"""Python calls per training step, counted (not timed): what the framework adds to each step.

    python benchmarks/calls_per_step.py [--steps 2000] [--model linear|w1]

Trains ``overhead.py``'s model (Linear(64, 10) on batches of 2 by default) with syncstep's defaults and
with the progress bar and loggers off, and counts, with ``sys.setprofile``, the Python function calls
and the calls into C (builtins, torch ops) made between the training step of step 200 and that of the
last step, divided by the number of steps; logging steps are included, at the default 1 in 50. Counts
do not depend on how busy the machine is, so two versions can be compared exactly: run it with
``PYTHONPATH=<other checkout>/src`` for the other one. (The progress bar adapts how often it is told of
steps to the clock, so its share varies by a few hundredths of a call a step.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from torch.utils.data import DataLoader

import overhead
import syncstep

START = 200


def count(steps: int, lean: bool) -> tuple[float, float]:
    counts = {"call": 0, "c_call": 0}
    state = {"step": 0}

    def profile(frame, event, arg):
        if event in counts:
            counts[event] += 1

    class Counted(overhead.MLP):
        def training_step(self, batch, batch_idx):
            state["step"] += 1
            if state["step"] == START:
                sys.setprofile(profile)
            elif state["step"] == steps:
                sys.setprofile(None)
            return super().training_step(batch, batch_idx)

    model = Counted()
    extra = dict(enable_progress_bar=False, logger=False) if lean else {}
    with tempfile.TemporaryDirectory() as root:
        trainer = syncstep.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=root, lr_scaling="none",
                                   enable_checkpointing=False, **extra)
        trainer.fit(model, DataLoader(overhead.data(steps - overhead.WARMUP), batch_size=overhead.MODEL["batch_size"],
                                      shuffle=True))
    sys.setprofile(None)
    n = steps - START
    return counts["call"] / n, counts["c_call"] / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--model", choices=("w1", "linear"), default="linear")
    args = p.parse_args()
    overhead.MODEL.update(name=args.model, batch_size=32 if args.model == "w1" else 2)
    torch.set_num_threads(1)
    print(f"syncstep {syncstep.__file__}, {args.steps - START} counted steps, model {args.model}")
    print("| setting | Python calls / step | C calls / step |")
    print("| --- | --- | --- |")
    for name, lean in (("defaults", False), ("bar and loggers off", True)):
        python_calls, c_calls = count(args.steps, lean)
        print(f"| {name} | {python_calls:.2f} | {c_calls:.2f} |")


if __name__ == "__main__":
    main()
