"""DDP on 2 processes with noise_scale=True: every rank saves the squared norms the communication hook
read at each step (its own gradient, the averaged one), for tests/test_noise_scale.py to compare with
norms computed in one process. A config with "ramp": {"dim", "n", "b_simple", "epochs"} instead trains
the frozen quadratic of common.py (known B_simple) with batch_ramp="noise" and saves each epoch's
global batch (tests/test_batch_ramp.py).

Usage: python noise_ddp.py configs.json   (syncstep starts the 2 processes itself)
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import syncstep  # noqa: E402
from common import Quadratic, Tiny, dataset, loader, quadratic_data  # noqa: E402


class Sizes(syncstep.Callback):
    def __init__(self):
        self.sizes = []

    def on_train_epoch_start(self, trainer, module):
        self.sizes.append(trainer.batch_plan.global_batch_size)


def ramp(config: dict) -> None:
    """The noise ramp under DDP: the small batches are the replicas' (B_small = 4 x accumulation)."""
    spec, sizes = config["ramp"], Sizes()
    trainer = syncstep.Trainer(accelerator="cpu", devices=2, strategy="ddp", batch_ramp="noise", seed=0,
                               max_epochs=spec["epochs"], log_every_n_steps=4, enable_progress_bar=False, logger=False,
                               enable_checkpointing=False, enable_model_summary=False, callbacks=[sizes])
    data = quadratic_data(spec["n"], spec["dim"], (spec["b_simple"] / spec["dim"]) ** 0.5)
    trainer.fit(Quadratic(spec["dim"]), torch.utils.data.DataLoader(data, batch_size=4, shuffle=True))
    torch.save({"sizes": sizes.sizes, "result": trainer.noise_scale, "global_step": trainer.global_step},
               f"{config['name']}.rank{trainer.global_rank}.pt")


class Norms(syncstep.Callback):
    """After each optimizer step: the hook's (local |g|^2, averaged |g|^2) of that step on this rank."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        meter = trainer._noise
        self.rows.append([float(x) for x in meter.last] if meter.last is not None else None)
        meter.last = None


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        configs = json.load(f)
    for config in configs:
        if "ramp" in config:
            ramp(config)
            continue
        norms = Norms()
        trainer = syncstep.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", noise_scale=True, lr_scaling=config.get("lr_scaling", "none"),
            max_steps=config["steps"],
            accumulate_grad_batches=config.get("accumulate", 1), gradient_clip_val=config.get("clip"),
            log_every_n_steps=2, enable_progress_bar=False, logger=False, enable_checkpointing=False,
            enable_model_summary=False, callbacks=[norms],
        )
        model = Tiny(lr=0.5)
        trainer.fit(model, loader(dataset(config["n"]), config["batch_size"]))
        adascale = trainer._checkpointer.stepper.adascale
        torch.save({"norms": norms.rows, "result": trainer.noise_scale, "global_step": trainer.global_step,
                    "tau": adascale.tau if adascale else None, "gain": adascale.gain if adascale else None,
                    "params": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   f"{config['name']}.rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
