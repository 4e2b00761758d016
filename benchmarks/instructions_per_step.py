"""Machine instructions per training step (callgrind), for comparing two versions of syncstep exactly.

    python benchmarks/instructions_per_step.py [--short 100 --long 600] [--lean]     # ~5 minutes on 2 cores

Runs W1 (overhead.py's MLP, batch 32, 1 thread, syncstep's defaults or, with --lean, bar and loggers
off) under ``valgrind --tool=callgrind`` for ``--short`` and for ``--long`` steps, both at once, and
prints (instructions of the long run - instructions of the short run) / (long - short): the cost of a
step with the start-up (imports, set-up) taken out. Unlike wall time, the count does not move with
the load of a shared machine; compare versions with ``PYTHONPATH=<checkout>/src``. Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def one_run(steps: int, lean: bool) -> None:
    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, HERE)
    import overhead
    import syncstep

    torch.set_num_threads(1)
    overhead.MODEL.update(name="w1", batch_size=32)
    extra = dict(enable_progress_bar=False, logger=False) if lean else {}
    with tempfile.TemporaryDirectory() as root:
        trainer = syncstep.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=root, lr_scaling="none",
                                   enable_checkpointing=False, **extra)
        trainer.fit(overhead.MLP(), DataLoader(overhead.data(steps - overhead.WARMUP), batch_size=32, shuffle=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--short", type=int, default=100)
    p.add_argument("--long", type=int, default=600)
    p.add_argument("--lean", action="store_true", help="progress bar and loggers off")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: the run valgrind watches
    args = p.parse_args()
    if args.one:
        one_run(args.one, args.lean)
        return
    with tempfile.TemporaryDirectory() as out:
        procs = {steps: subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.{steps}", sys.executable, __file__,
             "--one", str(steps)] + (["--lean"] if args.lean else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for steps in (args.short, args.long)}
        counts = {}
        for steps, proc in procs.items():
            err = proc.communicate()[1]
            match = re.search(r"I\s+refs:\s+([\d,]+)", err)
            if proc.returncode or not match:
                raise SystemExit(f"callgrind run of {steps} steps failed:\n{err[-2000:]}")
            counts[steps] = int(match.group(1).replace(",", ""))
    import syncstep

    per_step = (counts[args.long] - counts[args.short]) / (args.long - args.short)
    print(f"syncstep {os.path.dirname(syncstep.__file__)}: {per_step:,.0f} instructions per step "
          f"({'bar and loggers off' if args.lean else 'defaults'}; {args.short} and {args.long} steps: "
          f"{counts[args.short]:,} and {counts[args.long]:,})")


if __name__ == "__main__":
    main()
