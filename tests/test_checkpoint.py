"""Checkpoints: atomic under crashes, safe to load, exact to resume (also on another world size)."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import sys

import pytest
import torch

import syncstep
from common import Tiny, dataset, loader
from helpers import SCRIPTS, assert_params_close, assert_same_on_every_rank, load_result, run, run_configs
from syncstep import checkpoint


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fit(root, *, ckpt_path=None, model=None, n=40, batch=4, shuffle=True, **kwargs):
    kwargs.setdefault("max_epochs", 3)
    trainer = syncstep.Trainer(accelerator="cpu", default_root_dir=str(root), logger=False,
                               enable_progress_bar=False, seed=7, **kwargs)
    model = model or Tiny(lr=0.05, optimizer="sgd_momentum", scheduler="step", dropout=0.2)
    trainer.fit(model, loader(dataset(n), batch, shuffle), ckpt_path=ckpt_path)
    return trainer, model


# -- atomic writes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["before_write", "mid_write", "before_rename", "after_rename"])
def test_a_crash_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, point):
    result = run([sys.executable, str(SCRIPTS / "crash_save.py"), str(tmp_path), point], timeout=120, check=False)
    assert result.returncode == 9, result.stdout[-3000:]
    directory = tmp_path / "checkpoints"
    before = (tmp_path / "sha.txt").read_text()
    assert sha256(directory / "epoch=0-step=2.ckpt") == before
    assert sha256(directory / "last.ckpt") == before  # last.ckpt is only moved after a complete write
    names = sorted(os.listdir(directory))
    # Only a hidden temporary may be left behind, never a partial file under a checkpoint's name.
    for name in names:
        if not name.startswith("."):
            checkpoint.load(str(directory / name))
    if point in ("before_write", "mid_write", "before_rename"):
        assert "epoch=0-step=4.ckpt" not in names
    # And the run resumes from it.
    trainer, _ = fit(tmp_path, ckpt_path="last", max_epochs=1, ckpt_every_n_steps=2, keep_last=5, shuffle=False,
                     model=Tiny())
    assert trainer.global_step == 10
    assert not [n for n in os.listdir(directory) if n.startswith(".")]  # the crashed writer's temporary is gone


# -- safe loading -----------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    fit(tmp_path, max_epochs=1)
    return tmp_path / "checkpoints" / "last.ckpt"


def test_truncated_and_random_files_are_refused_with_the_file_named(saved, tmp_path):
    data = saved.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated.ckpt is not a readable checkpoint"):
        checkpoint.load(str(truncated))
    for seed in range(20):  # random bytes: torch.load fails in many different ways; all are one error
        noise = tmp_path / f"noise{seed}.ckpt"
        noise.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(checkpoint.CheckpointError, match=f"noise{seed}.ckpt is not a readable checkpoint"):
            checkpoint.load(str(noise))
    # The same bytes behind a valid zip header (what a partly overwritten checkpoint looks like).
    mangled = tmp_path / "mangled.ckpt"
    mangled.write_bytes(data[:200] + random.Random(1).randbytes(len(data) - 200))
    with pytest.raises(checkpoint.CheckpointError, match="mangled.ckpt is not a readable checkpoint"):
        checkpoint.load(str(mangled))


class Payload:
    """Unpickling this would create a file: the classic pickle attack."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"syncstep": {"version": "0"}, "state_dict": {}, "x": Payload(str(target))}, evil)
    assert not target.exists()
    with pytest.raises(checkpoint.CheckpointError, match="refused to load .*evil.ckpt"):
        checkpoint.load(str(evil))
    plain = tmp_path / "plain.pkl"
    with open(plain, "wb") as f:
        pickle.dump(Payload(str(target)), f)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(str(plain))
    with pytest.raises(checkpoint.CheckpointError):
        syncstep.Trainer(accelerator="cpu", logger=False).fit(Tiny(), loader(dataset(8), 4), ckpt_path=str(evil))
    assert not target.exists()


def test_last_falls_back_to_the_newest_readable_checkpoint_and_says_so(tmp_path, capsys):
    fit(tmp_path, max_epochs=2, keep_last=3)
    directory = tmp_path / "checkpoints"
    (directory / "last.ckpt").unlink()
    (directory / "last.ckpt").write_bytes(b"garbage")
    trainer, _ = fit(tmp_path, max_epochs=3, ckpt_path="last")
    out = capsys.readouterr().out
    assert "skipping a checkpoint" in out and "last.ckpt is not a readable checkpoint" in out
    assert "resuming from" in out and "epoch=1-step=20.ckpt" in out
    assert trainer.global_step == 30


def test_last_with_only_corrupt_checkpoints_refuses_to_start_from_zero(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "last.ckpt").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="Refusing to start from step 0 silently"):
        fit(tmp_path, ckpt_path="last")


def test_checkpoint_contents(saved):
    state = checkpoint.load(str(saved))
    assert set(state) >= {"syncstep", "state_dict", "optimizer_states", "lr_schedulers", "loop", "world", "rng"}
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in state["state_dict"])
    assert state["loop"] == {"epoch": 1, "global_step": 10, "epoch_sample": 0}
    assert state["world"]["global_batch_size"] == 4 and state["world"]["world_size"] == 1
    assert state["syncstep"]["version"] == syncstep.__version__


def test_inspect_command(saved, capsys):
    from syncstep.cli import main

    assert main(["inspect", str(saved), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "global step 10" in out and "global batch 4" in out and "net.0.weight: (16, 8)" in out


# -- exact resume -----------------------------------------------------------------------------------

def test_mid_epoch_resume_is_bitwise_equal_inside_warmup(tmp_path):
    """Stopped at step 13 of 30 (epoch 1, inside a 16-step warmup), with dropout, momentum and StepLR."""
    common = dict(max_epochs=3, accumulate_grad_batches=2, lr_scaling="linear", warmup_steps=32)
    straight, model = fit(tmp_path / "a", **common, batch=2)
    fit(tmp_path / "b", **{**common, "max_steps": 13}, batch=2)
    state = checkpoint.load(str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    assert state["loop"]["epoch_sample"] == 12 and state["loop"]["epoch"] == 1
    resumed, resumed_model = fit(tmp_path / "b", **common, batch=2, ckpt_path="last")
    assert resumed.global_step == straight.global_step == 30
    for key, value in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    assert (resumed.optimizers[0].state_dict()["state"][0]["momentum_buffer"]
            .equal(straight.optimizers[0].state_dict()["state"][0]["momentum_buffer"]))


RESUME = {"devices": 2, "strategy": "ddp", "n": 40, "batch_size": 4, "shuffle": True, "seed": 5, "lr": 0.1,
          "optimizer": "sgd_momentum", "scheduler": "step", "max_epochs": 3, "lr_scaling": "linear",
          "warmup_steps": 16, "enable_checkpointing": True, "global_batch_size": 8}


def test_resume_on_two_processes_and_across_world_sizes(tmp_path):
    # 2 processes: uninterrupted; stopped mid-epoch at step 7 (of 15) and resumed; stopped again elsewhere.
    run_configs(tmp_path, [
        {**RESUME, "name": "straight", "root": "straight"},
        {**RESUME, "name": "part", "root": "two", "max_steps": 7},
        {**RESUME, "name": "resumed", "root": "two", "ckpt_path": "last"},
        {**RESUME, "name": "part_b", "root": "two_to_one", "max_steps": 7},
    ], timeout=240)
    straight = assert_same_on_every_rank(tmp_path, "straight")
    resumed = assert_same_on_every_rank(tmp_path, "resumed")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # 2 -> 1: the 2-process checkpoint at step 7, resumed by one process (accumulation 2 instead of 1);
    # and a 1-process run stopped at step 9 for the way back.
    one = {**RESUME, "devices": 1, "strategy": "auto"}
    result = run_configs(tmp_path, [{**one, "name": "two_to_one", "root": "two_to_one", "ckpt_path": "last"},
                                    {**one, "name": "part1", "root": "one", "max_steps": 9}], timeout=120)
    assert "world size 2 -> 1, global batch 8 -> 8 (accumulation 1 -> 2)" in result.stdout
    assert_params_close(load_result(tmp_path / "two_to_one.pt")["params"], straight)
    # 1 -> 2: the 1-process checkpoint at step 9, resumed by two processes.
    result = run_configs(tmp_path, [{**RESUME, "name": "one_to_two", "root": "one", "ckpt_path": "last"}], timeout=120)
    assert "world size 1 -> 2, global batch 8 -> 8 (accumulation 2 -> 1)" in result.stdout
    assert_params_close(assert_same_on_every_rank(tmp_path, "one_to_two"), straight)


def test_resume_without_a_fixed_global_batch_rescales_the_lr_and_says_so(tmp_path, capsys):
    fit(tmp_path, max_steps=5, accumulate_grad_batches=2, lr_scaling="linear")
    trainer, _ = fit(tmp_path, max_epochs=3, lr_scaling="linear", ckpt_path="last")
    out = capsys.readouterr().out
    assert "global batch 8 -> 4" in out and "LR factor 2 -> 1" in out
    assert trainer.global_step == 5 + 2 * 10  # epoch 0 ended at step 5 (batch 8); two more epochs of batch 4
