"""The Linear Scaling Rule, measured (issue #4): accuracy and the early loss spike at global batch k x 32.

    python benchmarks/lr_scaling_study.py --publish         # the whole study, about 3 minutes on 2 CPU cores
    python benchmarks/lr_scaling_study.py --lr 0.2 --extra-lr   # skip the LR sweep and the second base LR
    python benchmarks/lr_scaling_study.py --lr 0.2 --rows adascale --seeds 3   # one row, fewer seeds
    python benchmarks/lr_scaling_study.py --lr 0.2 --rows linear ramp --publish-rows ramp   # add a row to
                                                                             # the published study

One device simulates k devices by its global batch: the DataLoader's batch is 32 x k and
``reference_batch_size=32``, so syncstep's factor is k, as on k devices with batch 32 each. At one seed
every k sees the same samples in the same order (syncstep shuffles by seed + epoch) from the same
initial weights. Five rows, the same number of epochs for all but adascale:

    none            Trainer(lr_scaling="none")                       the LR tuned at batch 32, unchanged
    linear          Trainer(lr_scaling="linear")                     LR x k from the first step
    linear+warmup   Trainer(lr_scaling="linear", warmup_epochs=2)    from the unscaled LR to LR x k over 2 epochs
    adascale        Trainer(lr_scaling="adascale",                   LR x the AdaScale gain r (1 <= r <= k) from
                            accumulate_grad_batches=k)               the measured noise scale; the cosine and the
                                                                     end of training follow tau = sum r, so the
                                                                     run takes as many epochs as it needs to make
                                                                     the k = 1 run's progress (at most k x 30)
    ramp            Trainer(lr_scaling="linear",                     starts at global batch 32 (2 x 16) and doubles
                            batch_ramp="noise",                      the accumulation at an epoch's start while the
                            batch_ramp_max=32 x k)                   batch < B_simple, up to 32 x k; LR x batch / 32

The adascale row feeds batches of 32 and accumulates k of them (the micro-batches are the small batches
its noise scale is measured from); the global batch and the order of the samples are those of the other
rows. The ramp row feeds batches of 16 (two per step at the start, for the same reason); its global
batch grows from 32 towards 32 x k, so it answers another question: how close to k = 1's accuracy, and
in how many steps, a run gets that starts at k = 1's batch and grows it only as the noise scale allows.

Model and optimizer: syncstep's own digits example (``syncstep.examples.digits.Classifier``: MLP
64-128-10, SGD momentum 0.9, cosine decay per epoch over the run), so that the study measures what the
demo trains; syncstep's multiplier applies on top of the cosine.

Base LR ("tuned at batch 32"): a sweep at k = 1 over a factor-2 grid picks the LR with the lowest
validation loss on an inner 80/20 split of the training set (the validation set of the table is not used
to tune). The study then runs at that LR and, with ``--extra-lr`` (default 0.05, the demo's LR), at
other base LRs that are as good at k = 1, because whether the rule holds depends on how far k x LR lands
from the largest stable LR.

Measured per run: the validation accuracy after the last epoch, and the early loss spike (see
``spike_metrics``) from the training loss of every optimizer step, recorded by a logger object. Writes
benchmarks/out/lr_scaling_study.{json,png} (with --publish: benchmarks/results/lr_scaling_study.json and
docs/img/lr_scaling_study.png) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import syncstep
from syncstep.examples.digits import Classifier, digits_loaders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_BATCH = 32
ROWS = ("none", "linear", "linear+warmup", "adascale", "ramp")
COLORS = {"none": "tab:gray", "linear": "tab:red", "linear+warmup": "tab:blue", "adascale": "tab:green",
          "ramp": "tab:purple"}


class StudyClassifier(Classifier):
    """The digits example without its per-epoch print (hundreds of runs would flood the output)."""

    def on_validation_epoch_end(self):
        pass


class Recorder:
    """A syncstep logger: keeps the training loss of every step and the validation values of every epoch."""

    def __init__(self) -> None:
        self.train_loss: dict[int, float] = {}
        self.val: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "train_loss" in metrics:
            # Logged once optimizer step `step` (1, 2, ...) is done: the loss of the batch it was computed
            # from, at the weights before it. So step 1 holds the loss at the initial weights.
            self.train_loss[step] = metrics["train_loss"]
        if "val_acc" in metrics:
            self.val[int(metrics["epoch"])] = {"val_acc": metrics["val_acc"], "val_loss": metrics["val_loss"],
                                               "step": step}


def spike_metrics(losses: list[float], window: int) -> dict[str, float]:
    """The early-training loss spike, from the per-step training losses (batch means, step 1, 2, ...).

    ``losses[0]`` is the loss of the first global batch at the initial weights (about ln 10 = 2.30). Over
    the first ``window`` steps (the first E epochs: the same samples at every k):

    - peak_ratio = max loss / losses[0]. 1.0: the loss never rose above where it started; the noise of a
      batch of 32 at the initial weights alone gives up to about 1.01. Above that, a spike.
    - peak_rise = max over t of (loss_t - min over s < t of loss_s), in nats: how far the loss climbed
      back above the best it had reached (this one also sees spikes that stay below the initial loss, but
      at small batches it mostly measures batch-to-batch noise, so the tables report peak_ratio).
    """
    early = losses[:window]
    best, rise = early[0], 0.0
    for value in early[1:]:
        rise = max(rise, value - best)
        best = min(best, value)
    return {"initial_loss": early[0], "peak_ratio": max(early) / early[0], "peak_rise": rise}


def train_once(*, k: int, row: str, lr: float, epochs: int, seed: int, warmup_epochs: float,
               train: DataLoader, val: DataLoader, spike_epochs: int) -> dict:
    """One run; returns its final accuracy, spike metrics, early losses and syncstep's start-up summary."""
    recorder = Recorder()
    trainer = syncstep.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, strategy="single",
        reference_batch_size=REFERENCE_BATCH,
        lr_scaling={"none": "none", "adascale": "adascale"}.get(row, "linear"),
        accumulate_grad_batches=k if row == "adascale" else 2 if row == "ramp" else None,
        warmup_epochs=warmup_epochs if row == "linear+warmup" else None,
        batch_ramp="noise" if row == "ramp" else None, batch_ramp_max=REFERENCE_BATCH * k if row == "ramp" else None,
        seed=seed, log_every_n_steps=1,
        enable_progress_bar=False, enable_checkpointing=False, logger=[recorder],
    )
    syncstep.seed_everything(seed)  # the initial weights: the same for every k and row at this seed
    model = StudyClassifier(lr, epochs)
    printed = io.StringIO()
    diverged = None
    with contextlib.redirect_stdout(printed):
        try:
            trainer.fit(model, train, val)
        except syncstep.NonFiniteLossError as error:
            diverged = str(error)
    global_batch = trainer.batch_plan.global_batch_size
    steps_per_epoch = math.ceil(len(train.dataset) / global_batch)  # as the start-up summary says
    losses = [recorder.train_loss[s] for s in sorted(recorder.train_loss)]
    window = spike_epochs * steps_per_epoch
    if row == "ramp":  # (its first epochs are at batch 32, whatever the batch at the end)
        window = recorder.val[min(spike_epochs, len(recorder.val)) - 1]["step"] if recorder.val else len(losses)
    last = max(recorder.val) if recorder.val else None  # (adascale: the epoch where tau reached its target)
    result = {
        "k": k, "row": row, "base_lr": lr, "seed": seed, "global_batch_size": global_batch,
        "steps_per_epoch": steps_per_epoch, "lr_factor": trainer.lr_plan.optimizers[0].factor,
        "warmup_steps": trainer.lr_plan.warmup.length, "diverged": diverged,
        "final_val_acc": None if diverged else recorder.val[last]["val_acc"],
        "final_val_loss": None if diverged else recorder.val[last]["val_loss"],
        "val_acc_by_step": [[v["step"], round(v["val_acc"], 5)] for _, v in sorted(recorder.val.items())],
        "optimizer_steps": trainer.global_step, "epochs_run": (last + 1) if last is not None else None,
        "early_train_loss": [round(x, 5) for x in losses[:window]],
        "summary": printed.getvalue().strip(),
    }
    if row == "adascale" and trainer.noise_scale is not None:
        noise = trainer.noise_scale
        result.update(final_gain=trainer._checkpointer.stepper.adascale.gain, b_simple=noise["b_simple"],
                      b_simple_history=[[b[0], round(b[3] / b[2], 2) if b[2] > 0 else None]
                                        for b in noise["history"][::max(1, len(noise["history"]) // 40)]])
    if row == "ramp":
        result["ramp_changes"] = [list(c) for c in trainer._checkpointer.stepper.ramp.changes]
    if diverged:  # NaN / inf loss: syncstep stops the run (on_nonfinite_loss="error")
        result.update(initial_loss=losses[0] if losses else None, peak_ratio=math.inf, peak_rise=math.inf)
    else:
        result.update(spike_metrics(losses, window))
    return result


def tune_base_lr(grid: list[float], seeds: list[int], epochs: int) -> tuple[float, list[dict]]:
    """The LR at batch 32 (k = 1, no scaling) with the lowest mean validation loss on an inner 80/20 split
    of the training set. Loss rather than accuracy: on 288 samples accuracy moves in steps of 0.35 points."""
    from sklearn.model_selection import train_test_split

    x, y = digits_loaders(REFERENCE_BATCH)[0].dataset.tensors
    fit_idx, check_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, stratify=y.numpy(),
                                          random_state=1)
    train = DataLoader(TensorDataset(x[fit_idx], y[fit_idx]), batch_size=REFERENCE_BATCH, shuffle=True)
    check = DataLoader(TensorDataset(x[check_idx], y[check_idx]), batch_size=128)
    sweep = []
    for lr in grid:
        runs = [train_once(k=1, row="none", lr=lr, epochs=epochs, seed=s, warmup_epochs=0, train=train, val=check,
                           spike_epochs=1) for s in seeds]
        finished = [r for r in runs if not r["diverged"]]
        entry = {"lr": lr, "diverged": len(runs) - len(finished),
                 "inner_val_loss": _stats([r["final_val_loss"] for r in finished]),
                 "inner_val_acc": _stats([r["final_val_acc"] for r in finished])}
        sweep.append(entry)
        loss, acc = entry["inner_val_loss"], entry["inner_val_acc"]
        print(f"  lr {lr:<7g} inner val loss {loss['mean']:.4f} ± {loss['std']:.4f}   "
              f"acc {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} %", flush=True)
    best = min((e for e in sweep if e["diverged"] == 0), key=lambda e: e["inner_val_loss"]["mean"])
    return best["lr"], sweep


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def steps_to(run: dict, target: float) -> int | None:
    """The optimizer step of the first epoch end whose validation accuracy reached ``target``."""
    return next((step for step, acc in run.get("val_acc_by_step", []) if acc >= target), None)


def summarize(runs: list[dict], rows: tuple[str, ...] = ROWS) -> list[dict]:
    """Per (row, k): accuracy, spike, the accuracy difference to k = 1 at the same seed (paired), and the
    optimizer steps to reach 97% of k = 1's mean final accuracy."""
    cells = []
    at_k1 = {(r["row"], r["seed"]): r["final_val_acc"] for r in runs if r["k"] == 1 and not r["diverged"]}
    for row in rows:
        k1 = [r["final_val_acc"] for r in runs if r["row"] == row and r["k"] == 1 and not r["diverged"]]
        target = 0.97 * statistics.fmean(k1) if k1 else None
        for k in sorted({r["k"] for r in runs}):
            group = [r for r in runs if r["row"] == row and r["k"] == k]
            if not group:
                continue
            finished = [r for r in group if not r["diverged"]]
            deltas = [r["final_val_acc"] - at_k1[row, r["seed"]] for r in finished if (row, r["seed"]) in at_k1]
            reached = [steps_to(r, target) for r in finished] if target else []
            cells.append({
                "row": row, "k": k, "base_lr": group[0]["base_lr"], "global_batch_size": group[0]["global_batch_size"],
                "lr_factor": group[0]["lr_factor"], "warmup_steps": group[0]["warmup_steps"],
                "steps_per_epoch": group[0]["steps_per_epoch"], "runs": len(group),
                "diverged": len(group) - len(finished),
                "final_val_acc": _stats([r["final_val_acc"] for r in finished]),
                "val_acc_minus_k1": _stats(deltas),
                "peak_ratio": _stats([r["peak_ratio"] for r in group]),  # inf for a diverged run
                "peak_rise": _stats([r["peak_rise"] for r in group]),
                "steps_to_97pct_of_k1": _stats([s for s in reached if s is not None]),
                "never_reached_97pct": sum(s is None for s in reached),
                "optimizer_steps": _stats([r["optimizer_steps"] for r in finished]),
                "final_gain": _stats([r["final_gain"] for r in finished if "final_gain" in r]),
                "final_global_batch": _stats([r["global_batch_size"] for r in finished]),
                "first_ramp_epoch": _stats([r["ramp_changes"][0][0] for r in finished if r.get("ramp_changes")]),
            })
    return cells


def _epoch(cell: dict) -> str:
    first = cell["first_ramp_epoch"]
    return f"{first['median']:.0f}" if first["n"] else "none"


def markdown_table(cells: list[dict], base_lr: float, warmup_epochs: float) -> str:
    ks = sorted({c["k"] for c in cells})
    by = {(c["row"], c["k"]): c for c in cells}
    rows = [row for row in ROWS if any(c["row"] == row for c in cells)]
    lines = [f"| base LR {base_lr:g} | " + " | ".join(f"k={k} (B={REFERENCE_BATCH * k})" for k in ks) + " |",
             "|---" + "|--:" * len(ks) + "|",
             "| LR after linear scaling | " + " | ".join(f"{base_lr * k:g}" for k in ks) + " |"]
    if "linear+warmup" in rows:
        lines.append(f"| warmup steps ({warmup_epochs:g} epochs) | "
                     + " | ".join(str(by["linear+warmup", k]["warmup_steps"]) for k in ks) + " |")
    if "adascale" in rows:
        gains = [by["adascale", k]["final_gain"] for k in ks]
        lines.append("| adascale gain r at the end (LR = base x r) | "
                     + " | ".join(f"{g['mean']:.2f}" if g["n"] else "1" for g in gains) + " |")
    for row in rows:
        parts = []
        for k in ks:
            c = by[row, k]
            acc = c["final_val_acc"]
            text = f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}" if acc["n"] else "—"
            delta = c["val_acc_minus_k1"]
            if k != 1 and delta["n"]:
                text += f" ({100 * delta['mean']:+.2f})"
            parts.append(text + (f" ({c['diverged']}/{c['runs']} NaN)" if c["diverged"] else ""))
        lines.append(f"| val acc %, {row} | " + " | ".join(parts) + " |")
    for row in rows:
        parts = [f"{by[row, k]['peak_ratio']['median']:.2f} (max {by[row, k]['peak_ratio']['max']:.2f})" for k in ks]
        lines.append(f"| peak ratio, {row} | " + " | ".join(parts) + " |")
    for row in rows:
        parts = []
        for k in ks:
            c = by[row, k]
            reached = c["steps_to_97pct_of_k1"]
            text = f"{reached['median']:.0f}" if reached["n"] else "—"
            parts.append(text + (f" ({c['never_reached_97pct']} never)" if c["never_reached_97pct"] else ""))
        lines.append(f"| steps to 97% of k=1 acc, {row} | " + " | ".join(parts) + " |")
    for row in ("adascale", "ramp"):
        if row in rows:
            lines.append(f"| optimizer steps in all, {row} | " + " | ".join(
                f"{by[row, k]['optimizer_steps']['median']:.0f}" for k in ks) + " |")
    if "ramp" in rows:
        lines.append("| ramp: global batch at the end (median; epoch of the first doubling) | " + " | ".join(
            f"{by['ramp', k]['final_global_batch']['median']:.0f} ({_epoch(by['ramp', k])})" for k in ks) + " |")
    return "\n".join(lines)


def plot(studies: list[dict], out_png: str, spike_epochs: int, warmup_epochs: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    acc_axes = [axes[0, 0], axes[0, 1]]
    spike_ax, curve_ax = axes[1, 0], axes[1, 1]
    ks = sorted({c["k"] for c in studies[0]["cells"]})
    rows = [row for row in ROWS if any(c["row"] == row for c in studies[0]["cells"])]
    for i, study in enumerate(studies):
        base_lr, cells, runs = study["base_lr"], study["cells"], study["runs"]
        style = "-" if i == 0 else "--"
        for row in rows:
            mine = [c for c in cells if c["row"] == row]
            if i < len(acc_axes):
                shown = [c for c in mine if c["final_val_acc"]["n"]]
                acc_axes[i].errorbar([c["k"] for c in shown], [100 * c["final_val_acc"]["mean"] for c in shown],
                                     yerr=[100 * c["final_val_acc"]["std"] for c in shown], marker="o", capsize=3,
                                     color=COLORS[row], label=row)
                points = [r for r in runs if r["row"] == row and not r["diverged"]]
                acc_axes[i].scatter([r["k"] for r in points], [100 * r["final_val_acc"] for r in points], s=7,
                                    color=COLORS[row], alpha=0.35)
            spike_ax.plot([c["k"] for c in mine], [c["peak_ratio"]["median"] for c in mine], style, marker="o",
                          color=COLORS[row], label=f"{row}, base LR {base_lr:g}")
            spike_ax.fill_between([c["k"] for c in mine], [c["peak_ratio"]["min"] for c in mine],
                                  [min(c["peak_ratio"]["max"], 1e3) for c in mine], color=COLORS[row], alpha=0.08)
        if i < len(acc_axes):
            acc_axes[i].set(title=f"final validation accuracy, base LR {base_lr:g} at batch {REFERENCE_BATCH}\n"
                                  f"(mean ± std and each seed)", ylabel="accuracy, %")
    for ax in acc_axes[len(studies):]:
        ax.axis("off")
    for ax in [*acc_axes[:len(studies)], spike_ax]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel(f"k (global batch = {REFERENCE_BATCH} x k, the same epochs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    spike_ax.set(title=f"early loss spike: max train loss / initial loss, first {spike_epochs} epochs\n"
                       "(median line, min-max band)", ylabel="peak ratio", yscale="log")
    spike_ax.axhline(1.0, color="0.5", linewidth=0.8)

    # Loss curves at the largest k and the first base LR, against samples seen; k = 1 is averaged over
    # groups of k steps, i.e. over the same samples as one step at k, so both curves have the same noise.
    study = studies[0]
    curve_k, runs = max(ks), study["runs"]
    seed = min(r["seed"] for r in runs)
    pick = {row: next(r for r in runs if r["k"] == curve_k and r["row"] == row and r["seed"] == seed) for row in rows}
    reference = next((r for r in runs if r["k"] == 1 and r["row"] == rows[0] and r["seed"] == seed), None)
    if reference is not None:
        raw = reference["early_train_loss"]
        grouped = [statistics.fmean(raw[i:i + curve_k]) for i in range(0, len(raw), curve_k)]
        curve_ax.plot([REFERENCE_BATCH * i / 1000 for i in range(0, len(raw), curve_k)], grouped, color="black",
                      linewidth=1, label=f"k=1 (mean over each {REFERENCE_BATCH * curve_k} samples)")
    samples_per_epoch = len(digits_loaders(REFERENCE_BATCH)[0].dataset)
    for row, run in pick.items():
        losses = run["early_train_loss"]
        if row == "ramp":  # (its batch grows: the samples before each step, epoch by epoch)
            x = ramp_samples(run, len(losses), samples_per_epoch)
        else:
            x = [run["global_batch_size"] * i for i in range(len(losses))]
        curve_ax.plot([v / 1000 for v in x], losses, marker="o", markersize=3, color=COLORS[row],
                      label=f"k={curve_k} {row}")
    curve_ax.axvspan(0, warmup_epochs * samples_per_epoch / 1000, color="tab:blue", alpha=0.08,
                     label=f"warmup ({warmup_epochs:g} epochs)")
    curve_ax.set(title=f"training loss per step, base LR {study['base_lr']:g}, first {spike_epochs} epochs, "
                       f"seed {seed}", xlabel="samples seen (thousands)", ylabel="train loss (batch mean)",
                 yscale="log")
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def ramp_samples(run: dict, steps: int, samples_per_epoch: int) -> list[int]:
    """The samples seen before each of a ramp run's first ``steps`` steps (its batch per epoch from
    ``ramp_changes``, an epoch's last step holding what is left)."""
    changes, batch, seen, x, epoch = dict(run["ramp_changes"]), REFERENCE_BATCH, 0, [], 0
    while len(x) < steps:
        batch = changes.get(epoch, batch)
        for begin in range(0, samples_per_epoch, batch):
            x.append(seen + begin)
        seen, epoch = seen + samples_per_epoch, epoch + 1
    return x[:steps]


def run_study(base_lr: float, args: argparse.Namespace) -> dict:
    runs = []
    micro, _ = digits_loaders(REFERENCE_BATCH)  # adascale: k micro-batches of 32 per step
    halves, _ = digits_loaders(REFERENCE_BATCH // 2)  # ramp: 2 micro-batches of 16 per step, then more
    for k in args.ks:
        train, val = digits_loaders(REFERENCE_BATCH * k)
        for row in args.rows:
            data = micro if row == "adascale" else halves if row == "ramp" else train
            cell = [train_once(k=k, row=row, lr=base_lr, epochs=args.epochs, seed=s, warmup_epochs=args.warmup_epochs,
                               train=data, val=val, spike_epochs=args.spike_epochs) for s in range(args.seeds)]
            runs += cell
            accs = [r["final_val_acc"] for r in cell if not r["diverged"]]
            nan = sum(1 for r in cell if r["diverged"])
            print(f"  k={k:<2} {row:<14} val acc {100 * statistics.fmean(accs) if accs else math.nan:6.2f} %   "
                  f"peak ratio max {max(r['peak_ratio'] for r in cell):7.2f}" + (f"   {nan} NaN" if nan else ""),
                  flush=True)
    cells = summarize(runs, tuple(args.rows))
    summaries = {f"k={r['k']} {r['row']}": r.pop("summary") for r in runs if r["seed"] == 0}
    for r in runs:
        r.pop("summary", None)
    return {"base_lr": base_lr, "cells": cells, "runs": runs, "summaries": summaries,
            "table_markdown": markdown_table(cells, base_lr, args.warmup_epochs)}


def _finite(obj):
    """inf / NaN (a diverged run) as null, so that the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_finite(value) for value in obj]
    return obj


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="global batch = 32 x k")
    p.add_argument("--epochs", type=int, default=30, help="the same number of epochs at every k (default 30)")
    p.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 per cell (default 8)")
    p.add_argument("--lr", type=float, default=None, help="base LR at batch 32; default: the sweep's pick")
    p.add_argument("--lr-grid", type=float, nargs="+", default=[0.0125, 0.025, 0.05, 0.1, 0.2, 0.4])
    p.add_argument("--tune-seeds", type=int, default=5, help="seeds per LR in the sweep (default 5)")
    p.add_argument("--extra-lr", type=float, nargs="*", default=[0.05],
                   help="further base LRs to study (default 0.05, the demo's); none: pass the flag alone")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (default: all)")
    p.add_argument("--warmup-epochs", type=float, default=2, help="for the linear+warmup row (default 2)")
    p.add_argument("--spike-epochs", type=int, default=5, help="the early window of the spike metric (default 5)")
    p.add_argument("--publish", action="store_true",
                   help="write the published files (benchmarks/results/, docs/img/) instead of benchmarks/out/")
    p.add_argument("--json", help="default benchmarks/out/lr_scaling_study.json (results/ with --publish)")
    p.add_argument("--png", help="default benchmarks/out/lr_scaling_study.png (docs/img/ with --publish)")
    args = p.parse_args(argv)
    json_dir, png_dir = (("benchmarks/results", "docs/img") if args.publish else ("benchmarks/out", "benchmarks/out"))
    args.json = args.json or os.path.join(ROOT, json_dir, "lr_scaling_study.json")
    args.png = args.png or os.path.join(ROOT, png_dir, "lr_scaling_study.png")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The model is tiny: one thread is faster than several here, and it makes every number independent of
    # the machine's core count.
    torch.set_num_threads(1)
    started = time.perf_counter()

    sweep, base_lr = None, args.lr
    if base_lr is None:
        print(f"base LR sweep at batch {REFERENCE_BATCH} (k = 1), {args.epochs} epochs, {args.tune_seeds} seeds, "
              "inner split of the training set:", flush=True)
        base_lr, sweep = tune_base_lr(args.lr_grid, list(range(args.tune_seeds)), args.epochs)
        print(f"  -> base LR {base_lr:g} (lowest inner validation loss)", flush=True)
    sweep_seconds = time.perf_counter() - started

    studies = []
    for lr in [base_lr, *(x for x in args.extra_lr if x != base_lr)]:
        print(f"base LR {lr:g}: {len(args.ks)} k x {len(args.rows)} rows x {args.seeds} seeds, {args.epochs} epochs",
              flush=True)
        studies.append(run_study(lr, args))
    seconds = time.perf_counter() - started

    plot(studies, args.png, args.spike_epochs, args.warmup_epochs)
    result = {
        "command": "python benchmarks/lr_scaling_study.py",
        "args": vars(args) | {"json": os.path.relpath(args.json, ROOT), "png": os.path.relpath(args.png, ROOT)},
        "reference_batch_size": REFERENCE_BATCH, "tuned_base_lr": base_lr if sweep else None, "lr_sweep": sweep,
        "model": "syncstep.examples.digits.Classifier: MLP 64-128-10, SGD momentum 0.9, cosine per epoch; "
                 "digits_loaders(32 x k): 1437 training / 360 validation digits",
        "metrics": {
            "final_val_acc": "validation accuracy after the last epoch (360 held-out digits)",
            "peak_ratio": f"max per-step training loss over the first {args.spike_epochs} epochs / loss of the "
                          "first batch at the initial weights; inf if the loss became NaN/inf",
            "peak_rise": f"max over the first {args.spike_epochs} epochs of (loss - lowest earlier loss), nats",
        },
        "studies": studies,
        "seconds": {"total": round(seconds, 1), "lr_sweep": round(sweep_seconds, 1)},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "syncstep": syncstep.__version__, "machine": platform.machine(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    for study in studies:  # keep the file small: early curves of k = 1 and the largest k only
        for r in study["runs"]:
            if r["k"] not in (1, max(args.ks)):
                del r["early_train_loss"]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    text = json.dumps(_finite(result), indent=1)
    # One line per list of numbers (the loss curves), not one line per number.
    text = re.sub(r"\[\s*(-?[\d.]+(?:,\s*-?[\d.]+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", "", m[1]) + "]", text)
    with open(args.json, "w") as f:
        f.write(text + "\n")
    for study in studies:
        print()
        print(study["table_markdown"])
    print(f"\nval acc: mean ± std over {args.seeds} seeds (in brackets: mean difference to k=1 at the same seed, "
          f"points); peak ratio: median (max). {args.epochs} epochs; warmup "
          f"{args.warmup_epochs:g} epochs. Took {seconds:.0f} s ({sweep_seconds:.0f} s of it the LR sweep).")
    print(f"wrote {os.path.relpath(args.json, ROOT)} and {os.path.relpath(args.png, ROOT)}")


if __name__ == "__main__":
    main()
