"""Run a list of training configurations in turn (under any launcher) and save what they produced.

Usage: python fit_configs.py configs.json   (syncstep starts the DDP processes itself)
       torchrun --nproc-per-node=2 fit_configs.py configs.json

A config with "fsdp": {options} trains with syncstep.FSDPStrategy(**options) (module classes by
their torch.nn name, e.g. "auto_wrap_policy": ["Linear"]); its parameters are saved gathered, and
each rank also saves how many elements of each parameter and optimizer state tensor it holds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import syncstep  # noqa: E402
from common import Tiny, dataset, loader  # noqa: E402


class Recorder:
    """A logger object (syncstep's logger protocol) that keeps every logged row."""

    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append({"step": step, **metrics})

    def finalize(self):
        pass


TRAINER_KEYS = (
    "devices", "strategy", "num_nodes", "accumulate_grad_batches", "global_batch_size", "lr_scaling",
    "reference_batch_size", "warmup_epochs", "warmup_steps", "warmup_interval", "warmup_type",
    "warmup_start_factor", "max_epochs", "max_steps", "seed", "gradient_clip_val", "precision",
    "enable_checkpointing", "ckpt_every_n_steps", "ckpt_every_n_epochs", "on_nonfinite_loss", "timeout",
    "val_check_interval", "keep_last", "noise_scale", "batch_ramp", "batch_ramp_factor", "log_every_n_steps",
)


def fsdp_strategy(options: dict) -> syncstep.FSDPStrategy:
    options = dict(options)
    for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
        if isinstance(options.get(key), list):
            options[key] = {getattr(torch.nn, name) for name in options[key]}
    return syncstep.FSDPStrategy(**options)


def whole(tensor):
    """A parameter as one process holds it (an fsdp DTensor gathered; every rank must call this)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_numel(tensor) -> int:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).numel()


def crash_in_sharded_save(rank: int, save: int, marker: str) -> None:
    """SIGKILL rank ``rank`` once it has written its shards of the ``save``-th sharded checkpoint: the
    checkpoint is then incomplete (no .metadata, no run state), as after a node failure mid-save."""
    from torch.distributed.checkpoint import FileSystemWriter

    real, calls = FileSystemWriter.write_data, [0]

    def write_data(self, plan, planner):
        future = real(self, plan, planner)
        calls[0] += 1
        if calls[0] == save and int(os.environ.get("RANK", "0")) == rank:
            future.wait()
            with open(marker, "w") as f:
                f.write(repr(time.monotonic()))
            os.kill(os.getpid(), signal.SIGKILL)
        return future

    FileSystemWriter.write_data = write_data


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        configs = json.load(f)
    for config in configs:
        recorder = Recorder()
        kwargs = {k: config[k] for k in TRAINER_KEYS if k in config}
        kwargs.setdefault("lr_scaling", "none")
        kwargs.setdefault("enable_checkpointing", False)
        if isinstance(kwargs.get("batch_ramp"), dict):  # (JSON's keys are strings; the epochs are ints)
            kwargs["batch_ramp"] = {int(epoch): size for epoch, size in kwargs["batch_ramp"].items()}
        kwargs.setdefault("log_every_n_steps", 1)
        if "fsdp" in config:
            kwargs["strategy"] = fsdp_strategy(config["fsdp"])
        if "crash_in_sharded_save" in config:
            crash = config["crash_in_sharded_save"]
            os.makedirs(config["root"], exist_ok=True)
            crash_in_sharded_save(crash["rank"], crash["save"], os.path.join(config["root"], "killed.txt"))
        trainer = syncstep.Trainer(
            accelerator="cpu", enable_progress_bar=False, logger=[recorder],
            default_root_dir=config.get("root", "."), **kwargs,
        )
        seed = int(os.environ.get("RANK", "0")) if config.get("seed_by_rank") else 0  # a careless init
        model = Tiny(lr=config.get("lr", 0.1), optimizer=config.get("optimizer", "sgd"), seed=seed,
                     batchnorm=config.get("batchnorm", False), scheduler=config.get("scheduler"),
                     fail=config.get("fail"), dropout=config.get("dropout", 0.0))
        train = loader(dataset(config["n"]), config["batch_size"], config.get("shuffle", False),
                       config.get("drop_last", False))
        val = loader(dataset(config["val_n"], seed=1), config.get("val_batch_size", 2)) if config.get("val_n") else None
        trainer.fit(model, train, val, ckpt_path=config.get("ckpt_path"))
        params = {k: whole(v.detach()).cpu().clone() for k, v in model.state_dict().items()}
        name = config["name"]
        torch.save(params, f"{name}.rank{trainer.global_rank}.pt")
        if "fsdp" in config:
            opt, names = trainer.optimizers[0], {id(p): n for n, p in model.named_parameters()}
            states = [(f"{names[id(p)]}.{k}", v) for p in opt.state for k, v in opt.state[p].items()
                      if isinstance(v, torch.Tensor) and v.ndim]
            torch.save({"params": {k: local_numel(p) for k, p in model.named_parameters()},
                        "optimizer": {k: local_numel(v) for k, v in states},
                        "optimizer_full": {k: v.numel() for k, v in states}},
                       f"{name}.shards{trainer.global_rank}.pt")
        results = {}
        if config.get("evaluate_n"):
            evaluate = loader(dataset(config["evaluate_n"], seed=2), config.get("eval_batch_size", 2))
            results = trainer.validate(model, evaluate)[0]
        if trainer.is_global_zero:
            lrs = [row[k] for row in recorder.rows for k in row if k.startswith("lr-")]
            torch.save({"params": params, "lrs": lrs, "rows": recorder.rows, "evaluate": results,
                        "summary": trainer.plan_summary(),
                        "global_step": trainer.global_step,
                        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}},
                       f"{name}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
