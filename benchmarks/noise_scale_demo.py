"""The gradient noise scale of the demo over training, measured and by brute force (issue 11).

    python benchmarks/noise_scale_demo.py --publish     # both world sizes, about a minute on 2 CPU cores

The demo (``syncstep.examples.digits.Classifier``, batch 32 per replica, LR 0.05 scaled linearly, a
1-epoch warmup, 20 epochs) with ``Trainer(noise_scale=True)`` at W = 2 and 8 replicas, simulated on one
device by W micro-batches of 32 per step (the small batches the estimator uses are then the
micro-batches; tests/test_noise_scale.py checks that the DDP hook reads the same per-replica gradients
as one process computes). At the end of every few epochs a callback computes the exact B_simple =
tr(Sigma) / |G|^2 at the current weights from every training sample's gradient (torch.func), to set
against the running estimate. Writes benchmarks/out/noise_scale_demo.{json,png} (with --publish:
benchmarks/results/ and docs/img/).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time

import torch
import torch.nn.functional as F

import syncstep
from syncstep.examples.digits import Classifier, digits_loaders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Quiet(Classifier):
    def on_validation_epoch_end(self):
        pass


class Exact(syncstep.Callback):
    """At the end of every ``every``-th epoch: B_simple, |G|^2 and tr(Sigma) over the whole training set."""

    def __init__(self, data, every: int) -> None:
        self.x, self.y = data.tensors
        self.every, self.points = every, []

    def on_train_epoch_end(self, trainer, module):
        if (trainer.current_epoch + 1) % self.every:
            return
        net = module.net
        params = {k: v.detach() for k, v in net.named_parameters()}

        def loss(p, xi, yi):
            return F.cross_entropy(torch.func.functional_call(net, p, (xi[None],)), yi[None])

        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, self.x, self.y)
        flat = torch.cat([g.reshape(len(self.x), -1) for g in grads.values()], dim=1).double()
        mean = flat.mean(0)
        grad_sq, trace = float(mean.square().sum()), float((flat - mean).square().sum(1).mean())
        self.points.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "grad_sq": grad_sq,
                            "trace_sigma": trace, "b_simple": trace / grad_sq,
                            "estimate": float(trainer.callback_metrics["noise_scale/b_simple"])})


def run(w: int, epochs: int, every: int, seed: int) -> dict:
    train, val = digits_loaders(32)
    exact = Exact(train.dataset, every)
    trainer = syncstep.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, accumulate_grad_batches=w,
                               reference_batch_size=32, warmup_epochs=1, noise_scale=True, log_every_n_steps=5,
                               seed=seed, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                               callbacks=[exact])
    syncstep.seed_everything(seed)
    model = Quiet(0.05, epochs)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.fit(model, train, val)
    result = trainer.noise_scale
    return {"replicas": w, "global_batch_size": 32 * w, "exact": exact.points,
            "history": [[round(x, 6) if x == x else None for x in b] for b in result["history"]],
            "final": {k: result[k] for k in ("b_simple", "trace_sigma", "grad_sq", "ci")},
            "val_acc": float(trainer.callback_metrics["val_acc"]),
            "report": printed.getvalue().strip().splitlines()[-3:]}


def plot(runs: list[dict], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.8))
    for ax, r in zip(axes, runs):
        h = [b for b in r["history"] if b[5] is not None]
        steps = [b[0] for b in h]
        ax.scatter(steps, [b[3] / b[2] if b[2] and b[2] > 0 else float("nan") for b in h], s=5, color="tab:gray",
                   alpha=0.4, label="each block of 5 steps")
        ax.plot(steps, [b[5] if b[5] < 1e12 else float("nan") for b in h], color="tab:purple",
                label="moving average (syncstep)")
        ax.fill_between(steps, [max(b[6], 1e-3) if b[6] is not None else float("nan") for b in h],
                        [min(b[7], 1e9) if b[7] is not None else float("nan") for b in h], color="tab:purple",
                        alpha=0.15, label="its 95% interval")
        ax.scatter([p["step"] for p in r["exact"]], [p["b_simple"] for p in r["exact"]], marker="x", color="black",
                   zorder=3, label="exact, every sample's gradient")
        finite = [v for v in [b[5] for b in h] + [p["b_simple"] for p in r["exact"]] if 0 < v < 1e12]
        ax.set_ylim(min(finite) / 3, max(finite) * 3)
        ax.set(title=f"demo at {r['replicas']} replicas (global batch {r['global_batch_size']})",
               xlabel="optimizer step", ylabel="B_simple (log scale)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 8])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--every", type=int, default=4, help="exact values every N epochs (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--publish", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    json_dir, png_dir = ("benchmarks/results", "docs/img") if args.publish else ("benchmarks/out", "benchmarks/out")
    started = time.perf_counter()
    runs = [run(w, args.epochs, args.every, args.seed) for w in args.replicas]
    seconds = time.perf_counter() - started
    out_png = os.path.join(ROOT, png_dir, "noise_scale_demo.png")
    out_json = os.path.join(ROOT, json_dir, "noise_scale_demo.json")
    os.makedirs(os.path.dirname(out_json), exist_ok=True)
    with open(out_json, "w") as f:
        json.dump({"command": "python benchmarks/noise_scale_demo.py", "args": vars(args), "runs": runs,
                   "seconds": round(seconds, 1), "torch": torch.__version__}, f, indent=1)
    for r in runs:
        print(f"W = {r['replicas']} (global batch {r['global_batch_size']}), val acc {100 * r['val_acc']:.2f} %")
        print("| step | epoch | exact B_simple | syncstep's moving average | exact tr(Sigma) | exact abs(G)^2 |")
        print("|--:|--:|--:|--:|--:|--:|")
        for pt in r["exact"]:
            print(f"| {pt['step']} | {pt['epoch'] + 1} | {pt['b_simple']:.1f} | {pt['estimate']:.1f} | "
                  f"{pt['trace_sigma']:.4g} | {pt['grad_sq']:.4g} |")
    plot(runs, out_png)
    print(f"took {seconds:.0f} s; wrote {os.path.relpath(out_json, ROOT)} and {os.path.relpath(out_png, ROOT)}")


if __name__ == "__main__":
    main()
