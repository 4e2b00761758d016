"""The ``syncstep`` command: demo, lr-plot, inspect, bench."""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import sys
from collections.abc import Iterator
from typing import Any


def _demo(argv: list[str]) -> int:
    from syncstep.examples.digits import main

    accuracy = main(argv)
    return 0 if accuracy is None or accuracy >= 0.95 else 1


class _PlanDrawn(Exception):
    """Raised by the stand-in ``fit`` of ``syncstep lr-plot`` to stop the script once the plan is drawn."""


@contextlib.contextmanager
def _fit_draws_the_plan(out_png: str) -> Iterator[None]:
    """While a script runs under ``syncstep lr-plot``, ``Trainer.fit`` draws the LR schedule and stops."""
    from syncstep.plots import plot_lr_schedule
    from syncstep.trainer import Trainer

    def draw(trainer: Trainer, model: Any, train_dataloaders: Any = None, *args: Any, **kwargs: Any) -> None:
        lrs = trainer.lr_schedule(model, train_dataloaders)
        print(trainer.plan_summary())
        plot_lr_schedule(lrs, out_png, steps_per_epoch=trainer._plan.steps_per_epoch)
        print(f"syncstep: LR schedule of {trainer.estimated_stepping_batches} steps written to {out_png}")
        raise _PlanDrawn

    real_fit = Trainer.fit
    Trainer.fit = draw
    try:
        yield
    finally:
        Trainer.fit = real_fit


def _lr_plot(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="syncstep lr-plot",
        description="Plot the LR schedule a training script will follow (scaling, warmup and its schedulers), "
        "without training: the script runs up to trainer.fit(), which draws the plan instead of training.",
    )
    p.add_argument("script", help="a training script that calls syncstep.Trainer(...).fit(...)")
    p.add_argument("--out", default="lr_schedule.png", help="PNG to write (default lr_schedule.png)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    args = p.parse_args(argv)
    if "--out" in args.args:
        print("syncstep lr-plot: note: --out after the script's name goes to the script; put it before the "
              "script to choose the PNG.", file=sys.stderr)
    sys.argv = [args.script, *args.args]
    try:
        with _fit_draws_the_plan(os.path.abspath(args.out)):
            runpy.run_path(args.script, run_name="__main__")
    except _PlanDrawn:
        return 0
    print(f"syncstep lr-plot: {args.script} never reached trainer.fit(); no plot written.", file=sys.stderr)
    return 1


def _inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="syncstep inspect", description="Show what a checkpoint holds (loaded safely).")
    p.add_argument("checkpoint")
    p.add_argument("--tensors", action="store_true", help="list every tensor of the model's state_dict")
    args = p.parse_args(argv)
    from syncstep.checkpoint import describe, load

    print(describe(args.checkpoint, load(args.checkpoint), tensors=args.tensors))
    return 0


def _bench(argv: list[str]) -> int:
    from syncstep.tools.bench import main

    return main(argv)


COMMANDS = {
    "demo": (_demo, "train a classifier on the bundled digits with DDP on 2 CPU processes"),
    "lr-plot": (_lr_plot, "plot the LR schedule a training script will follow, without training"),
    "inspect": (_inspect, "show a checkpoint's step, epoch, world size, batch and LR settings, tensors"),
    "bench": (_bench, "throughput at 1..N devices for a strategy: scaling efficiency, table and plot"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: syncstep COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsyncstep: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
