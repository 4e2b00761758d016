"""PNG plots of a run's metrics and of an LR schedule (matplotlib, imported only here)."""

from __future__ import annotations

import csv
import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_png: str) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def read_metrics(csv_path: str) -> list[dict[str, float]]:
    with open(csv_path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def plot_metrics(csv_path: str, out_png: str, loss: str = "train_loss", metric: str = "val_acc") -> str:
    """Training loss per logged step and a validation metric per epoch, side by side."""
    rows = read_metrics(csv_path)
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [(r["step"], r[loss]) for r in rows if loss in r]
    if steps:
        left.plot(*zip(*steps), color="tab:blue")
    left.set(title=f"{loss} (per logged step)", xlabel="optimizer step", ylabel=loss)
    left.grid(alpha=0.3)
    first: dict[float, float] = {}
    for r in rows:
        if metric in r:
            first.setdefault(r["epoch"], r[metric])  # the fit's value of the epoch, not a later validate()'s
    epochs = list(first.items())
    if epochs:
        right.plot([e + 1 for e, _ in epochs], [v for _, v in epochs], marker="o", color="tab:green")
    right.set(title=f"{metric} (per epoch)", xlabel="epoch", ylabel=metric)
    right.grid(alpha=0.3)
    return _save(plt, fig, out_png)


def plot_lr_schedule(lrs: dict[str, list[float]], out_png: str, steps_per_epoch: int | None = None,
                     title: str = "learning rate per optimizer step") -> str:
    """The effective LR (after scaling and warmup) of each optimizer at every step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, values in lrs.items():
        ax.plot(range(len(values)), values, label=name)
    if steps_per_epoch:
        total = max((len(v) for v in lrs.values()), default=0)
        for boundary in range(steps_per_epoch, total, steps_per_epoch):
            ax.axvline(boundary, color="0.85", linewidth=0.8, zorder=0)
    ax.set(title=title, xlabel="optimizer step", ylabel="learning rate")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, out_png)


def plot_noise_scale(history: list, out_png: str, reference: list | None = None) -> str:
    """B_simple over training (``trainer.noise_scale["history"]``): each block's estimate, the moving
    average with its 95% interval, and optional exact values [(step, B_simple), ...]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    steps = [b[0] for b in history]
    blocks = [b[3] / b[2] if b[2] > 0 else float("nan") for b in history]
    ax.scatter(steps, blocks, s=6, color="tab:gray", alpha=0.4, label="each block of steps")
    ax.plot(steps, [b[5] for b in history], color="tab:purple", label="moving average")
    low = [b[6] for b in history]
    high = [min(b[7], 1e9) for b in history]
    ax.fill_between(steps, low, high, color="tab:purple", alpha=0.15, label="95% interval")
    if reference:
        ax.scatter(*zip(*reference), marker="x", color="black", zorder=3, label="exact (all samples)")
    finite = [v for v in [*(b[5] for b in history), *(r[1] for r in reference or ())] if v == v and v < 1e9]
    if finite:
        ax.set_ylim(0, 2 * max(finite))  # (single blocks scatter widely; the average sets the scale)
    ax.set(title="gradient noise scale B_simple = tr(Sigma) / |G|^2", xlabel="optimizer step", ylabel="B_simple")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(plt, fig, out_png)
