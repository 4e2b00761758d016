"""A few minutes on a CUDA machine: is syncstep as fast as a hand-written loop there, and are dp and DDP exact?

    python -m syncstep.tools.gpu_check [--out gpu_check.json]     # or $OUT (a file, or a folder to write into)

1. Speed on one GPU: a small CNN and a small transformer, trained by syncstep (as users run it: progress
   bar, logger, default checkpointing) and by a hand-written loop (autocast, GradScaler for 16-bit), in
   fp32, bf16-mixed and 16-mixed, interleaved (A B B A A B ...); steady-state steps/s ratio syncstep /
   hand-written (median of the ratios of 7 rounds; 0.97 or more is ok). The data are read a batch at a
   time (``WholeBatches``), so that the CPU's data loading does not hide the framework's cost.
2. dp on every visible GPU (k, per-device batch b) against one GPU with batch k x b: the parameters after
   a few SGD steps must agree (lr_scaling="none", TF32 off).
3. DDP with NCCL, started by syncstep itself (devices = number of GPUs; with one GPU, a world of one),
   against the same one-GPU reference.

It prints one Markdown table and writes it as JSON. Each check runs on its own: one failure is a row of the
table, not a lost table. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import syncstep

DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TOLERANCE = 1e-4  # max |parameter difference| after the exactness checks' steps


def small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 10),
    )


class SmallTransformer(torch.nn.Module):
    """Two encoder layers, d_model 256, over sequences of 128 tokens of a 1000-word vocabulary."""

    def __init__(self, vocab: int = 1000, width: int = 256):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        layer = torch.nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def cnn_data(samples: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, 3, 32, 32, generator=g), torch.randint(0, 10, (samples,), generator=g))


def token_data(samples: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 1000, (samples, 128), generator=g),
                         torch.randint(0, 1000, (samples, 128), generator=g))


class WholeBatches(TensorDataset):
    """A TensorDataset that DataLoader reads a batch at a time (``__getitems__``: one indexing op per
    tensor) rather than sample by sample: 128 ``__getitem__`` calls and a collate cost ~1 ms of CPU, which
    made the steps of the speed check CPU-bound and spread them +-15 % from round to round."""

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        return [tuple(t[indices] for t in self.tensors)]


def first(samples: list) -> Any:
    return samples[0]


def loss_of(net: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    out = net(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# name: (network, data, batch size)
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int], TensorDataset], int]] = {
    "small CNN": (small_cnn, cnn_data, 128),
    "small transformer": (SmallTransformer, token_data, 32),
}


class Wrapped(syncstep.Module):
    def __init__(self, net: torch.nn.Module, on_step: Callable[..., None] | None = None):
        super().__init__()
        self.net, self.on_step = net, on_step

    def training_step(self, batch, batch_idx):
        if self.on_step is not None:
            self.on_step()
        loss = loss_of(self.net, batch)
        self.log("train_loss", loss, prog_bar=True)
        self.last_loss = loss.detach()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Ticks:
    """Timestamps at the start of each training step (batch on the GPU, before forward), in syncstep's
    training_step and at the same point of the hand-written loop; the two ends of the timed window wait
    for the GPU. A 16-mixed step that the grad scaler skips still counts: both loops do the same."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total, self.times = warmup, total, []

    def __call__(self) -> None:
        if len(self.times) in (self.warmup, self.total - 1):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def steps_per_s(self) -> float:
        return (self.total - 1 - self.warmup) / (self.times[self.total - 1] - self.times[self.warmup])


def seeded(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return make()


def hand_written(net: torch.nn.Module, loader: DataLoader, precision: str, ticks: Ticks | None = None) -> float:
    """The floor on one GPU; returns the last loss."""
    device = torch.device("cuda", torch.cuda.current_device())
    net.to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None
    dtype = DTYPES[precision]
    for batch in loader:
        batch = [t.to(device, non_blocking=True) for t in batch]
        if ticks is not None:
            ticks()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_of(net, batch)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def with_syncstep(net: torch.nn.Module, loader: DataLoader, precision: str, ticks: Ticks | None = None,
                  **trainer_args: Any) -> syncstep.Module:
    """syncstep with the defaults a user runs with; the bar goes to a buffer to keep the table readable."""
    model = Wrapped(net, ticks)
    with tempfile.TemporaryDirectory(prefix="syncstep-gpu-") as root, contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        trainer = syncstep.Trainer(max_epochs=1, accelerator="gpu", precision=precision, default_root_dir=root,
                                   **{"devices": 1, **trainer_args})
        trainer.fit(model, loader)
    return model


def check_speed(name: str, precision: str, warmup: int = 30, timed: int = 300, rounds: int = 7) -> dict:
    make, data, batch = MODELS[name]
    loader = DataLoader(WholeBatches(*data((warmup + timed) * batch).tensors), batch_size=batch, shuffle=False,
                        collate_fn=first)
    runs = {
        "hand-written": lambda ticks: hand_written(seeded(make), loader, precision, ticks),
        "syncstep": lambda ticks: float(with_syncstep(seeded(make), loader, precision, ticks).last_loss),
    }
    results: dict[str, list[float]] = {implementation: [] for implementation in runs}
    losses: dict[str, float] = {}
    for round_ in range(rounds):  # interleaved, A B B A A B ..., so that neither always goes first
        for implementation in list(runs)[:: 1 if round_ % 2 == 0 else -1]:
            gc.collect()  # garbage of the previous run is collected here, not in the timed steps
            ticks = Ticks(warmup, warmup + timed)
            losses[implementation] = runs[implementation](ticks)
            results[implementation].append(ticks.steps_per_s())
    hand, ours = statistics.median(results["hand-written"]), statistics.median(results["syncstep"])
    # The ratio: the median over rounds of each round's ratio (both ran back to back, on the same state of
    # the machine), steadier than the ratio of the medians.
    ratio = statistics.median(o / h for o, h in zip(results["syncstep"], results["hand-written"]))
    hand_loss, our_loss = losses["hand-written"], losses["syncstep"]
    label = "fp32" if precision == "32" else precision
    return {"check": f"speed, {name}", "setting": f"1 GPU, {label}, batch {batch}, {rounds} x {timed} timed steps",
            "syncstep": f"{ours:.1f} steps/s", "reference": f"{hand:.1f} steps/s (hand-written)",
            "result": f"ratio {ratio:.3f} (final loss {our_loss:.4f} vs {hand_loss:.4f})",
            "ok": ratio >= 0.97, "steps_per_s": results}


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p.detach().cpu() - q.detach().cpu()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def reference_params(k: int, batch: int, steps: int) -> torch.nn.Module:
    """One GPU, batch k x b, fp32: what dp and DDP on k devices must reproduce."""
    net = seeded(small_cnn)
    hand_written(net, DataLoader(cnn_data(steps * k * batch), batch_size=k * batch, shuffle=False), "32")
    return net


def check_dp(batch: int = 32, steps: int = 5) -> dict:
    k = torch.cuda.device_count()
    reference = reference_params(k, batch, steps)
    loader = DataLoader(cnn_data(steps * k * batch), batch_size=batch, shuffle=False)
    model = with_syncstep(seeded(small_cnn), loader, "32", strategy="dp", devices=k, lr_scaling="none",
                          enable_checkpointing=False, logger=False)
    difference = max_difference(model.net, reference)
    return {"check": "dp exactness", "setting": f"small CNN, {k} GPU(s) x batch {batch}, {steps} SGD steps, fp32",
            "syncstep": "dp", "reference": f"1 GPU, batch {k * batch}",
            "result": f"max abs param diff {difference:.1e}", "ok": difference <= TOLERANCE}


DDP_SCRIPT = """import sys
from syncstep.tools.gpu_check import ddp_worker

if __name__ == "__main__":
    ddp_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
"""


def ddp_worker(out: str, devices: int, batch: int, steps: int) -> None:
    """Run by the DDP check's script (and again in each process syncstep starts from it)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    loader = DataLoader(cnn_data(steps * devices * batch), batch_size=batch, shuffle=False)
    model = Wrapped(seeded(small_cnn))
    trainer = syncstep.Trainer(max_epochs=1, accelerator="gpu", devices=devices, strategy="ddp", lr_scaling="none",
                               enable_progress_bar=False, logger=False, enable_checkpointing=False)
    trainer.fit(model, loader)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    if trainer.is_global_zero:
        torch.save({"state_dict": model.net.state_dict(), "world_size": trainer.world_size, "backend": backend}, out)


def check_ddp(batch: int = 32, steps: int = 5) -> dict:
    k = torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="syncstep-gpu-") as tmp:
        script, out = os.path.join(tmp, "ddp_check.py"), os.path.join(tmp, "result.pt")
        with open(script, "w") as f:
            f.write(DDP_SCRIPT)
        # The child imports this syncstep, wherever it comes from (an install, or PYTHONPATH=src).
        here = os.path.dirname(os.path.dirname(os.path.abspath(syncstep.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, script, out, str(k), str(batch), str(steps)], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=240)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
        result = torch.load(out, weights_only=True)
    net = small_cnn()
    net.load_state_dict(result["state_dict"])
    difference = max_difference(net, reference_params(k, batch, steps))
    launched = "self-launched" if k > 1 else "a world of one, no launch"
    return {"check": "DDP exactness", "setting": f"small CNN, {k} process(es) x batch {batch}, {steps} SGD steps, "
            f"{launched}", "syncstep": f"ddp, backend {result['backend']}, world size {result['world_size']}",
            "reference": f"1 GPU, batch {k * batch}", "result": f"max abs param diff {difference:.1e}",
            "ok": difference <= TOLERANCE and result["backend"] == "nccl"}


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| check | setting | syncstep | reference | result | |", "|" + " --- |" * 6]
    for row in rows:
        verdict = "ok" if row["ok"] else ("**error**" if "error" in row else "**check**")
        lines.append(f"| {row['check']} | {row['setting']} | {row['syncstep']} | {row['reference']} | "
                     f"{row['result']} | {verdict} |")
    return "\n".join(lines)


def output_path(out: str | None) -> str | None:
    out = out or os.environ.get("OUT")
    if out and os.path.isdir(out):
        return os.path.join(out, "gpu_check.json")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m syncstep.tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON file (default $OUT; a folder gets gpu_check.json)")
    p.add_argument("--quick", action="store_true", help="one model, one precision: a smoke test")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 0
    started = time.perf_counter()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact comparisons
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    header = (f"syncstep {syncstep.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"{len(names)} x {names[0]}, {time.strftime('%Y-%m-%d')}")
    print(header, flush=True)
    checks: list[tuple[Callable[..., dict], tuple]] = [
        (check_speed, (name, precision)) for name in MODELS for precision in DTYPES
    ]
    if args.quick:
        checks = checks[:1]
    checks += [(check_dp, ()), (check_ddp, ())]
    rows = []
    for check, check_args in checks:
        try:
            row = check(*check_args)
        except Exception as error:
            traceback.print_exc()
            row = {"check": check.__name__, "setting": " ".join(check_args), "syncstep": "", "reference": "",
                   "result": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200],
                   "ok": False, "error": traceback.format_exc()[-3000:]}
        rows.append(row)
        print(f"  {row['check']} ({row['setting']}): {row['result']}", flush=True)
    table = markdown(rows, header)
    print("\n" + table)
    print(f"\n{sum(r['ok'] for r in rows)} of {len(rows)} checks ok, {time.perf_counter() - started:.0f} s")
    path = output_path(args.out)
    if path:
        with open(path, "w") as f:
            json.dump({"header": header, "rows": rows, "markdown": table}, f, indent=1)
        print(f"written: {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
