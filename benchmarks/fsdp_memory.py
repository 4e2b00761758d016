"""What each device holds under ddp and fsdp: parameters, gradients and optimizer state, counted from
the tensors themselves (each process's local shards under fsdp), on W3's model with AdamW.

    python benchmarks/fsdp_memory.py             # every case in turn (CPU, gloo), then a markdown table

The count is taken in the second optimizer step, just before ``optimizer.step()``: the gradients are
reduced and the optimizer state exists (AdamW creates it in its first step). These are the bytes of the
tensors, not the process's memory: allocator overhead, activations and fsdp's all-gathered unit
(freed after use) come on top.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workloads"))

import syncstep  # noqa: E402
from common import WORKLOADS, loss_of, make_dataset, make_mlp  # noqa: E402

CASES = [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]


def local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()


class MLP(syncstep.Module):
    def __init__(self, out: str):
        super().__init__()
        self.net, self.out = make_mlp(WORKLOADS["w3"]), out

    def training_step(self, batch, batch_idx):
        return loss_of(self.net, batch)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        opt.register_step_pre_hook(self.count)
        return opt

    def count(self, opt, args, kwargs) -> None:
        if self.global_step != 1:
            return
        params = list(self.parameters())
        row = {"rank": self.global_rank, "parameters": sum(local_bytes(p) for p in params),
               "gradients": sum(local_bytes(p.grad) for p in params),
               "optimizer": sum(local_bytes(v) for state in opt.state.values() for v in state.values()
                                if isinstance(v, torch.Tensor))}
        with open(f"{self.out}.rank{self.global_rank}", "w") as f:
            json.dump(row, f)


def worker(strategy: str, devices: int, out: str) -> None:
    workload = WORKLOADS["w3"]
    loader = DataLoader(make_dataset(workload, 4 * workload.batch_size * devices), batch_size=workload.batch_size)
    chosen = syncstep.FSDPStrategy(auto_wrap_policy={torch.nn.Linear}) if strategy == "fsdp" else "ddp"
    trainer = syncstep.Trainer(accelerator="cpu", devices=devices, strategy=chosen, max_steps=2, logger=False,
                               enable_progress_bar=False, enable_checkpointing=False, lr_scaling="none")
    trainer.fit(MLP(out), loader)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, devices in CASES:
            out = os.path.join(tmp, f"{strategy}{devices}")
            subprocess.run([sys.executable, __file__, "--worker", strategy, str(devices), out], check=True,
                           stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
            ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(devices)]
            rows.append((strategy, devices, ranks))
    mb = 1e6
    print("| strategy | processes | parameters | gradients | AdamW state | total per device | all devices |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for strategy, devices, ranks in rows:
        worst = max(ranks, key=lambda r: r["parameters"] + r["gradients"] + r["optimizer"])
        total = worst["parameters"] + worst["gradients"] + worst["optimizer"]
        everywhere = sum(r["parameters"] + r["gradients"] + r["optimizer"] for r in ranks)
        print(f"| {strategy} | {devices} | {worst['parameters'] / mb:.2f} MB | {worst['gradients'] / mb:.2f} MB | "
              f"{worst['optimizer'] / mb:.2f} MB | {total / mb:.2f} MB | {everywhere / mb:.2f} MB |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, metavar=("STRATEGY", "DEVICES", "OUT"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
    else:
        main()
