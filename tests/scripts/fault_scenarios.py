"""Fault scenarios of tests/test_faults_*.py, run in turn in one launch (python fault_scenarios.py spec.json;
syncstep starts the processes itself). Each scenario writes ``<name>.rank<r>.json`` (where the run
ended, the error it raised if it was told to catch one) and ``<name>.rank<r>.pt`` (the parameters).

Scenario keys: name, n, batch_size, trainer (Trainer arguments), data ("tensor", "dict", "custom", "iterable",
"rank_len": rank r gets n + r samples), stop ({"ranks": [..] or "all", "step": s} in training_step, or
{"ranks": .., "epoch_end": e} in on_train_epoch_end), sleep (seconds per training step), signal
({"step": s, "name": "SIGTERM"}: rank 0 sends it to the launcher), fail (Tiny's fail dict),
fail_after_fit (a rank raises after fit while the others validate), busy ({"rank", "step",
"seconds"}: a long sleep in one rank's training_step), catch (record fit's error and go
on), chdir (os.chdir there before fit), full_disk_at_save (rank 0's N-th torch.save writes 4 bytes and
raises ENOSPC, as a full disk would).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

import syncstep  # noqa: E402
from common import Tiny, dataset  # noqa: E402

START = os.getcwd()


class Stream(IterableDataset):
    """This rank's own stream of samples: rank r takes samples r, r + W, ... of dataset(n), for ever."""

    def __init__(self, n: int, rank: int, world: int):
        self.data, self.rank, self.world = dataset(n), rank, world

    def __iter__(self):
        while True:
            for i in range(self.rank, len(self.data), self.world):
                yield self.data[i]


class DictBatches(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.data = dataset(n)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"x": x, "y": y}


class Batch:
    """A batch of the user's own type (from a collate_fn)."""

    def __init__(self, samples):
        self.x = torch.stack([x for x, _ in samples])
        self.y = torch.stack([y for _, y in samples])


class Faulty(Tiny):
    def __init__(self, scenario: dict):
        super().__init__(lr=0.1, optimizer=scenario.get("optimizer", "sgd"), fail=scenario.get("fail"))
        self.scenario = scenario

    def _mine(self, ranks) -> bool:
        return ranks == "all" or self.global_rank in ranks

    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict):
            batch = (batch["x"], batch["y"])
        if isinstance(batch, Batch):
            batch = (batch.x, batch.y)
        s = self.scenario
        if s.get("sleep"):
            time.sleep(s["sleep"])
        busy = s.get("busy")  # {"rank": r, "step": s, "seconds": t}: long work without a collective
        if busy and self.global_rank == busy["rank"] and self.global_step == busy["step"]:
            time.sleep(busy["seconds"])
        stop, sig = s.get("stop"), s.get("signal")
        if stop and "step" in stop and self.global_step == stop["step"] and self._mine(stop["ranks"]):
            self.trainer.should_stop = True
        if sig and self.global_rank == 0 and self.global_step == sig["step"] and not sig.get("sent"):
            sig["sent"] = True
            os.kill(os.getppid(), getattr(signal, sig["name"]))  # the launcher: the workers' parent
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self):
        stop = self.scenario.get("stop")
        if stop and stop.get("epoch_end") == self.current_epoch and self._mine(stop["ranks"]):
            self.trainer.should_stop = True


def full_disk_at(call: int, real_save):
    """A torch.save whose ``call``-th write of a checkpoint writes 4 bytes and fails as a full disk does
    (counting only checkpoint files: pickling a tensor for a collective calls torch.save too)."""
    calls = [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += ".ckpt.tmp-" in getattr(f, "name", "")
        if calls[0] == call and ".ckpt.tmp-" in getattr(f, "name", ""):
            f.write(b"PK\0\0")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    return save


def train_loader(s: dict, rank: int, world: int) -> DataLoader:
    n, b, kind = s["n"], s["batch_size"], s.get("data", "tensor")
    if kind == "iterable":
        return DataLoader(Stream(n, rank, world), batch_size=b)
    if kind == "dict":
        return DataLoader(DictBatches(n), batch_size=b, **s.get("loader", {}))
    if kind == "custom":
        return DataLoader(dataset(n), batch_size=b, collate_fn=Batch)
    if kind == "rank_len":
        return DataLoader(dataset(n + rank), batch_size=b)
    return DataLoader(dataset(n), batch_size=b)


def main(spec: str) -> None:
    with open(spec) as f:
        scenarios = json.load(f)
    for s in scenarios:
        os.chdir(START)
        if s.get("chdir"):
            os.makedirs(s["chdir"], exist_ok=True)
            os.chdir(s["chdir"])
        kwargs = {"max_epochs": 1, "lr_scaling": "none", "enable_checkpointing": False, **s.get("trainer", {})}
        trainer = syncstep.Trainer(accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False,
                                   logger=False, enable_model_summary=False,
                                   default_root_dir=os.path.join(START, s.get("root", s["name"])), **kwargs)
        model = Faulty(s)
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        error = None
        real_save = syncstep.checkpoint.torch.save
        if s.get("full_disk_at_save") and rank == 0:  # rank 0 writes the file: its disk fills at that save
            syncstep.checkpoint.torch.save = full_disk_at(s["full_disk_at_save"], real_save)
        with open(os.path.join(START, f"{s['name']}.pid{rank}"), "w") as f:
            f.write(str(os.getpid()))
        try:
            trainer.fit(model, train_loader(s, rank, world), ckpt_path=s.get("ckpt_path"))
        except Exception as e:  # noqa: BLE001 - recorded for the test
            if not s.get("catch"):
                raise
            error = f"{type(e).__name__}: {e}"
        finally:
            syncstep.checkpoint.torch.save = real_save
        os.chdir(START)
        name = s["name"]
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{name}.rank{rank}.pt")
        with open(f"{name}.rank{rank}.json", "w") as f:
            json.dump({"global_step": trainer.global_step, "epoch": trainer.current_epoch, "error": error}, f)
        after = s.get("fail_after_fit")
        if after:
            if rank == after["rank"]:
                raise RuntimeError(f"injected failure after fit on rank {rank}")
            time.sleep(after.get("others_wait", 0))
            trainer.validate(model, DataLoader(dataset(16), batch_size=2))


if __name__ == "__main__":
    main(sys.argv[1])
