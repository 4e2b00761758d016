"""The ``syncstep`` command: demo, lr-plot, inspect, bench."""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def _demo(argv: list[str]) -> int:
    from syncstep.examples.digits import main

    accuracy = main(argv)
    return 0 if accuracy is None or accuracy >= 0.95 else 1


def _lr_plot(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="syncstep lr-plot",
        description="Plot the LR schedule a training script will follow (scaling, warmup and its schedulers), "
        "without training: the script runs up to trainer.fit(), which draws the plan and exits.",
    )
    p.add_argument("script", help="a training script that calls syncstep.Trainer(...).fit(...)")
    p.add_argument("--out", default="lr_schedule.png", help="PNG to write (default lr_schedule.png)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    args = p.parse_args(argv)
    if "--out" in args.args:
        print("syncstep lr-plot: note: --out after the script's name goes to the script; put it before the "
              "script to choose the PNG.", file=sys.stderr)
    os.environ["SYNCSTEP_LR_PLOT"] = os.path.abspath(args.out)
    sys.argv = [args.script, *args.args]
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    if not os.path.exists(args.out):
        print(f"syncstep lr-plot: {args.script} never reached trainer.fit(); no plot written.", file=sys.stderr)
        return 1
    return 0


def _inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="syncstep inspect", description="Show what a checkpoint holds (loaded safely).")
    p.add_argument("checkpoint")
    p.add_argument("--tensors", action="store_true", help="list every tensor of the model's state_dict")
    args = p.parse_args(argv)
    from syncstep.checkpoint import describe, load

    print(describe(args.checkpoint, load(args.checkpoint), tensors=args.tensors))
    return 0


def _bench(argv: list[str]) -> int:
    from syncstep.bench import main

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
