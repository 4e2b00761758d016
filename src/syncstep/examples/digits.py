"""The demo: a small classifier on scikit-learn's bundled digits (1797 8x8 images, no download).

    syncstep demo                       # DDP on 2 CPU processes (syncstep starts them)
    syncstep demo --devices 4 --strategy dp --epochs 5
    python -m syncstep.examples.digits  # the same, as a plain script

The LR in configure_optimizers (0.05) is the one tuned for one device with batch 32; syncstep scales
it for the global batch (x2 on 2 devices) and warms up to it over the first epoch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import syncstep


class Classifier(syncstep.Module):
    def __init__(self, lr: float = 0.05, epochs: int = 20):
        super().__init__()
        self.lr, self.epochs = lr, epochs
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def on_validation_epoch_end(self):
        if self.trainer.stage == "fit":
            metrics = self.trainer.callback_metrics
            self.print(f"epoch {self.current_epoch}: val_acc={float(metrics['val_acc']):.4f} "
                       f"val_loss={float(metrics['val_loss']):.4f}")

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        # Cosine decay over the run, per epoch; syncstep's scaling and warmup apply on top of it.
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)]


def digits_loaders(batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """80/20 split of the digits, stratified and fixed (random_state=0), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)

    def tensors(a, b):
        return TensorDataset(torch.tensor(a / 16.0, dtype=torch.float32), torch.tensor(b, dtype=torch.long))

    return (DataLoader(tensors(x_train, y_train), batch_size=batch_size, shuffle=True),
            DataLoader(tensors(x_val, y_val), batch_size=128))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="syncstep demo", description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=2, help="processes (ddp) or replicas (dp); default 2")
    p.add_argument("--strategy", default="ddp", help="ddp (default), dp, single or auto")
    p.add_argument("--accelerator", default="cpu", help="cpu (default), gpu or auto")
    p.add_argument("--epochs", type=int, default=20, help="default 20")
    p.add_argument("--batch-size", type=int, default=32, help="per-device batch; default 32")
    p.add_argument("--root", default="syncstep_demo", help="where logs, checkpoints and plots go")
    p.add_argument("--lr", type=float, default=0.05, help="LR for one device at batch 32 (scaled for the global batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress-bar", action="store_true")
    return p


def main(argv: list[str] | None = None) -> float:
    args = parser().parse_args(argv)
    syncstep.seed_everything(args.seed)
    train, val = digits_loaders(args.batch_size)
    trainer = syncstep.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
        warmup_epochs=1, seed=args.seed, default_root_dir=args.root, enable_progress_bar=not args.no_progress_bar,
        log_every_n_steps=5, noise_scale=True,
    )
    model = Classifier(args.lr, args.epochs)
    if trainer.is_global_zero:
        # The LR schedule this run will follow (computed without training), as a picture.
        from syncstep.plots import plot_lr_schedule

        preview = syncstep.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=args.devices,
                                   strategy=args.strategy, warmup_epochs=1, seed=args.seed, logger=False)
        lrs = preview.lr_schedule(Classifier(args.lr, args.epochs), train)
        lr_png = plot_lr_schedule(lrs, os.path.join(args.root, "lr_schedule.png"),
                                  steps_per_epoch=preview.estimated_stepping_batches // args.epochs)
    trainer.fit(model, train, val)
    accuracy = trainer.validate(model, val)[0]["val_acc"]
    if trainer.is_global_zero:
        from syncstep.plots import plot_metrics

        png = plot_metrics(os.path.join(trainer.log_dir, "metrics.csv"), os.path.join(args.root, "demo.png"))
        noise = ""
        if trainer.noise_scale is not None:  # (measurable with ddp on 2+ devices, see the start-up summary)
            from syncstep.plots import plot_noise_scale

            noise_png = plot_noise_scale(trainer.noise_scale["history"], os.path.join(args.root, "noise_scale.png"))
            noise = f", {noise_png} (gradient noise scale)"
        print(f"final validation accuracy: {accuracy:.4f} on {len(val.dataset)} held-out digits "
              f"({'reached' if accuracy >= 0.95 else 'BELOW'} the 0.95 target)")
        print(f"plots: {png} (loss and accuracy), {lr_png} (LR schedule){noise}; metrics: "
              f"{trainer.log_dir}/metrics.csv")
    return accuracy


if __name__ == "__main__":
    main()
