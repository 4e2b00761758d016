"""Two-process runs for tests/test_speed.py, one launch for all of them (syncstep starts the processes).

Usage: python speed_ddp.py SCENARIO [SCENARIO ...]   (in the directory the results go to)

hooks      one step with each of the fp16 / bf16 communication hooks: every rank's batch and the
           gradients DDP leaves after backward (hooks.<hook>.rank<r>.pt); fp16 again with
           noise_scale=True, with the noise meter's norms of the step (hooks.fp16_noise.rank<r>.pt)
powersgd   12 steps with PowerSGD (two buckets) straight through, and 6 + 6 resumed from the step-6
           checkpoint, and the same resumed from a copy of that checkpoint without the hook's state (control)
compile    5 steps compiled (aot_eager) and uncompiled, under ddp and fsdp
straggler  6 steps with rank 1 sleeping in every training_step; the logged rows (rank 0)
demo       the digits demo with PowerSGD: the final validation accuracy
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import syncstep  # noqa: E402
from common import Tiny, dataset, loader  # noqa: E402


class Recorder:
    """A logger object that keeps every logged row."""

    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append({"step": step, **metrics})


def trainer(**kwargs) -> syncstep.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("lr_scaling", "none")
    return syncstep.Trainer(accelerator="cpu", devices=2, enable_progress_bar=False, enable_model_summary=False,
                            **kwargs)


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Recording(Tiny):
    """Tiny that keeps its first batch and the gradients DDP leaves after the first backward."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 0:
            self.seen = [t.clone() for t in batch]
        return super().training_step(batch, batch_idx)

    def on_after_backward(self):
        if self.global_step == 0:
            self.grads = {n: p.grad.clone() for n, p in self.named_parameters()}


def hooks() -> None:
    for hook in ("fp16", "bf16"):
        t = trainer(max_steps=1, strategy=syncstep.DDPStrategy(ddp_comm_hook=hook))
        seen = []

        def wrap(state, inner, seen=seen):  # as the noise-scale measurement does: read the bucket around it
            def outer(state, bucket):
                before = bucket.buffer().clone()
                return inner(state, bucket).then(lambda f: seen.append((before, f.value().clone())) or f.value())
            return state, outer

        t.strategy.comm_hook_wrappers.append(wrap)
        model = Recording()
        t.fit(model, loader(dataset(16), 4))
        torch.save({"batch": model.seen, "grads": model.grads, "wrapped": seen}, f"hooks.{hook}.rank{t.global_rank}.pt")
    # fp16 with the noise-scale measurement on: both must act (neither hook replaces the other)
    t = trainer(max_steps=1, strategy=syncstep.DDPStrategy(ddp_comm_hook="fp16"), noise_scale=True)
    model = Recording()
    t.fit(model, loader(dataset(16), 4))
    small, big = (float(v) for v in t._noise.last)
    torch.save({"batch": model.seen, "grads": model.grads, "small": small, "big": big},
               f"hooks.fp16_noise.rank{t.global_rank}.pt")


def powersgd() -> None:
    # buckets of 200 bytes: DDP starts with one bucket and rebuilds two after the first step (so a resumed
    # run's first step has other buckets than the steps before its checkpoint)
    strategy = syncstep.DDPStrategy(ddp_comm_hook="powersgd", bucket_cap_mb=0.0002,
                                    ddp_comm_options={"matrix_approximation_rank": 1, "start_powerSGD_iter": 2})
    data = loader(dataset(96), 4)
    kwargs = {"strategy": strategy, "enable_checkpointing": True, "ckpt_every_n_steps": 6}
    straight = Tiny(optimizer="sgd_momentum")
    t = trainer(max_steps=12, default_root_dir="psgd_straight", **kwargs)
    t.fit(straight, data)
    first = trainer(max_steps=6, default_root_dir="psgd_resumed", **kwargs)
    first.fit(Tiny(optimizer="sgd_momentum"), data)
    path = os.path.join("psgd_resumed", "checkpoints", "last.ckpt")
    if first.global_rank == 0:  # the control: the same checkpoint without the hook's state
        state = torch.load(path, weights_only=True)
        saved_hook = "strategy" in state
        state.pop("strategy", None)
        os.makedirs("psgd_control", exist_ok=True)
        torch.save(state, os.path.join("psgd_control", "stripped.ckpt"))
    dist.barrier()
    resumed, control = Tiny(optimizer="sgd_momentum"), Tiny(optimizer="sgd_momentum")
    trainer(max_steps=12, default_root_dir="psgd_resumed", **kwargs).fit(resumed, data, ckpt_path="last")
    trainer(max_steps=12, default_root_dir="psgd_control", **kwargs).fit(
        control, data, ckpt_path=os.path.join("psgd_control", "stripped.ckpt"))
    if t.global_rank == 0:
        torch.save({"straight": params(straight), "resumed": params(resumed), "control": params(control),
                    "saved_hook_state": saved_hook}, "powersgd.pt")


def compiled() -> None:
    from torch._dynamo.utils import counters

    out = {}
    for strategy in ("ddp", "fsdp"):
        for name, option in (("eager", False), ("compiled", {"backend": "aot_eager"})):
            model = Tiny(optimizer="sgd_momentum")
            t = trainer(max_steps=5, compile=option, strategy=strategy)
            t.fit(model, loader(dataset(40), 4))
            whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
            out[f"{strategy} {name}"] = {k: v.detach().clone() for k, v in whole.items()}
            out[f"{strategy} {name} compiled"] = model._compiled_call_impl is not None
    out["graphs"] = counters["stats"]["unique_graphs"]
    if t.global_rank == 0:
        torch.save(out, "compile.pt")


class Straggler(Tiny):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1:
            time.sleep(0.05)
        return super().training_step(batch, batch_idx)


def straggler() -> None:
    recorder = Recorder()
    t = trainer(max_steps=6, log_every_n_steps=2, logger=[recorder])
    t.fit(Straggler(), loader(dataset(48), 4))
    if t.global_rank == 0:
        with open("straggler.json", "w") as f:
            json.dump(recorder.rows, f)


def demo() -> None:
    from syncstep.examples.digits import Classifier, digits_loaders

    syncstep.seed_everything(0)
    train, val = digits_loaders(32)
    strategy = syncstep.DDPStrategy(ddp_comm_hook="powersgd",
                                    ddp_comm_options={"matrix_approximation_rank": 1, "start_powerSGD_iter": 10})
    t = trainer(max_epochs=20, warmup_epochs=1, seed=0, strategy=strategy, lr_scaling="auto")
    model = Classifier(0.05, 20)
    t.fit(model, train, val)
    accuracy = t.validate(model, val)[0]["val_acc"]
    if t.global_rank == 0:
        with open("demo.json", "w") as f:
            json.dump({"val_acc": accuracy}, f)


SCENARIOS = {"hooks": hooks, "powersgd": powersgd, "compile": compiled, "straggler": straggler, "demo": demo}

if __name__ == "__main__":
    for scenario in sys.argv[1:]:
        SCENARIOS[scenario]()
