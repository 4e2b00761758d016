"""strategy="fsdp" (FSDP2) in real processes (gloo on 127.0.0.1) against single-process references and ddp.

The 2-process configurations share one torchrun launch (``fsdp_runs``): training equal to a
hand-written loop and to ddp; shard sizes; checkpoints written by fsdp (full and sharded) and ddp,
resumed on fsdp and ddp; and, last, a rank killed in the middle of a sharded save. Then this
process resumes those checkpoints on fsdp with one device (and the crashed run from the checkpoint
before the crash).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import pickle
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import syncstep
from common import Tiny, dataset, loader, make_net, reference_sgd
from helpers import assert_params_close, assert_same_on_every_rank, free_port, load_result, run_configs
from syncstep import checkpoint

TWO = {"devices": 2, "lr": 0.1, "fsdp": {}}
UNITS = {"auto_wrap_policy": ["Linear"]}

TRAIN = [
    # 33 samples in batches of 2 x 4: 5 steps, the last one sample (rank 1 reruns it with weight 0).
    {**TWO, "name": "sgd", "n": 33, "batch_size": 4, "max_epochs": 1},
    {**TWO, "name": "adamw", "fsdp": UNITS, "optimizer": "adamw", "lr": 0.01, "n": 40, "batch_size": 4, "max_steps": 5},
    {**TWO, "name": "accum", "fsdp": UNITS, "n": 80, "batch_size": 4, "accumulate_grad_batches": 2, "max_steps": 5},
    # Clipping with activation checkpointing; evaluation of 5 samples (rank 0: 2 batches, rank 1: 1).
    {**TWO, "name": "clip", "fsdp": {**UNITS, "activation_checkpointing_policy": ["Linear"]}, "n": 40,
     "batch_size": 4, "max_steps": 5, "gradient_clip_val": 0.05, "evaluate_n": 5, "val_n": 5},
    {**TWO, "name": "offload", "fsdp": {**UNITS, "cpu_offload": True}, "n": 40, "batch_size": 4, "max_steps": 5},
    {**TWO, "name": "bf16", "fsdp": UNITS, "precision": "bf16-mixed", "n": 40, "batch_size": 4, "max_steps": 5},
    {**TWO, "name": "skip", "n": 40, "batch_size": 4, "max_steps": 5, "on_nonfinite_loss": "skip",
     "fail": {"rank": 1, "step": 2, "kind": "nan"}},
    {**TWO, "name": "bn", "fsdp": UNITS, "batchnorm": True, "n": 40, "batch_size": 4, "max_steps": 5, "evaluate_n": 5},
]
DDP_TWINS = ["sgd", "adamw", "accum", "clip", "bn"]  # the same configurations under ddp

RESUME = {"devices": 2, "n": 40, "batch_size": 4, "shuffle": True, "seed": 5, "lr": 0.1, "optimizer": "sgd_momentum",
          "scheduler": "step", "max_epochs": 2, "lr_scaling": "linear", "warmup_steps": 8,
          "enable_checkpointing": True, "global_batch_size": 8, "ckpt_every_n_steps": 2, "keep_last": 5}
FULL = {**RESUME, "fsdp": UNITS}
SHARDED = {**RESUME, "fsdp": {**UNITS, "state_dict_type": "sharded"}}
DDP = {**RESUME, "strategy": "ddp"}
LOAD = {"enable_checkpointing": False, "ckpt_path": "last"}  # a resume that leaves the checkpoints as they are

CHECKPOINTS = [
    {**FULL, "name": "straight", "root": "straight"},
    {**DDP, "name": "straight_ddp", "root": "straight_ddp"},
    {**FULL, "name": "part_full", "root": "full", "max_steps": 3},  # mid-epoch: 5 steps per epoch
    # Step 4 is saved twice (every 2 steps, and at max_steps): the second replaces the first directory.
    {**SHARDED, "name": "part_sharded", "root": "sharded", "max_steps": 4},
    {**DDP, "name": "part_ddp", "root": "ddp", "max_steps": 3},
    {**FULL, "name": "full_to_fsdp2", "root": "full", **LOAD},
    {**SHARDED, "name": "sharded_to_fsdp2", "root": "sharded", **LOAD},
    {**DDP, "name": "full_to_ddp2", "root": "full", **LOAD},
    {**DDP, "name": "sharded_to_ddp2", "root": "sharded", **LOAD},
    {**FULL, "name": "ddp_to_fsdp2", "root": "ddp", **LOAD},
    # Last: rank 1 is killed once it has written its shards of the second checkpoint (step 4).
    {**SHARDED, "name": "crash", "root": "crash", "crash_in_sharded_save": {"rank": 1, "save": 2}},
]
ONE_DEVICE = [{**cfg, "devices": 1} for cfg in [
    {**FULL, "name": "full_to_fsdp1", "root": "full", **LOAD},
    {**SHARDED, "name": "sharded_to_fsdp1", "root": "sharded", **LOAD},
    {**SHARDED, "name": "crash_resumed", "root": "crash", **LOAD},
]]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    twins = [{**cfg, "name": f"{cfg['name']}_ddp", "strategy": "ddp"} for cfg in TRAIN if cfg["name"] in DDP_TWINS]
    for cfg in twins:
        cfg.pop("fsdp")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    two = run_configs(tmp, TRAIN + twins + CHECKPOINTS, launcher=launcher, timeout=300, check=False)
    ended = time.monotonic()
    # One device needs no launch: the same script, in this process (fsdp over a world of one).
    import fit_configs

    spec, out, cwd = tmp / "one_device.json", io.StringIO(), os.getcwd()
    spec.write_text(json.dumps(ONE_DEVICE))
    os.chdir(tmp)
    try:
        with contextlib.redirect_stdout(out):
            fit_configs.main(str(spec))
    finally:
        os.chdir(cwd)
    return {"tmp": tmp, "two": two, "one": out.getvalue(), "two_ended": ended}


def params_of(tmp, name):
    return assert_same_on_every_rank(tmp, name)


# -- training: against a hand-written single process at batch 2b, and against ddp ------------------------

REFERENCES = {
    "sgd": lambda: reference_sgd(n=33, global_batch=8, steps=5, lr=0.1),
    "adamw": lambda: reference_sgd(n=40, global_batch=8, steps=5, lr=0.01, optimizer="adamw"),
    "accum": lambda: reference_sgd(n=80, global_batch=16, steps=5, lr=0.1),
    "clip": lambda: reference_sgd(n=40, global_batch=8, steps=5, lr=0.1, clip=0.05),
    "offload": lambda: reference_sgd(n=40, global_batch=8, steps=5, lr=0.1),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_fsdp_equals_one_process_with_twice_the_batch(fsdp_runs, name):
    assert_params_close(params_of(fsdp_runs["tmp"], name), REFERENCES[name]())


@pytest.mark.parametrize("name", DDP_TWINS)
def test_fsdp_equals_ddp(fsdp_runs, name):
    tmp = fsdp_runs["tmp"]
    if name != "bn":
        assert_params_close(params_of(tmp, name), params_of(tmp, f"{name}_ddp"))
        return
    # BatchNorm: both broadcast rank 0's statistics before each forward, then each rank's forward
    # updates its own, so the ranks end apart, and equal to their ddp counterparts.
    for rank in range(2):
        fsdp, ddp = (torch.load(tmp / f"{n}.rank{rank}.pt", weights_only=True) for n in (name, f"{name}_ddp"))
        assert_params_close(fsdp, ddp)


def test_clipping_uses_the_global_norm_of_the_sharded_gradients(fsdp_runs):
    # Each rank's shard has a smaller norm than the whole gradient: clipping by a local norm would
    # clip less and land elsewhere. The clip does bite: unclipped training ends far from it.
    clipped, unclipped = REFERENCES["clip"](), reference_sgd(n=40, global_batch=8, steps=5, lr=0.1)
    assert max((clipped[k] - unclipped[k]).abs().max().item() for k in clipped) > 1e-2
    assert_params_close(params_of(fsdp_runs["tmp"], "clip"), clipped)


def test_bf16_mixed_trains_in_bf16_close_to_fp32(fsdp_runs):
    params, fp32 = params_of(fsdp_runs["tmp"], "bf16"), REFERENCES["offload"]()
    assert all(v.dtype == torch.float32 for v in params.values())  # the sharded master weights stay fp32
    differences = [(params[k] - fp32[k]).abs().max().item() for k in fp32]
    assert max(differences) < 2e-2  # bf16 compute: about 3 significant digits
    assert max(differences) > 1e-6  # ... and really bf16: not the fp32 result


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(fsdp_runs):
    skipped = set(range(16, 24))  # step 2's samples
    order = [i for i in range(40) if i not in skipped]
    expected = reference_sgd(n=40, global_batch=8, steps=4, lr=0.1, order=lambda epoch: order)
    assert_params_close(params_of(fsdp_runs["tmp"], "skip"), expected)
    assert load_result(fsdp_runs["tmp"] / "skip.pt")["global_step"] == 5


def test_evaluation_counts_every_sample_once_with_uneven_shards(fsdp_runs):
    result = load_result(fsdp_runs["tmp"] / "clip.pt")
    net = make_net()
    net.load_state_dict({k.removeprefix("net."): v for k, v in result["params"].items()})
    x, y = dataset(5, seed=2)[:]
    with torch.no_grad():
        logits = net(x)
    assert result["evaluate"]["val_acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-7)
    assert result["evaluate"]["val_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-6)
    bn, bn_ddp = load_result(fsdp_runs["tmp"] / "bn.pt"), load_result(fsdp_runs["tmp"] / "bn_ddp.pt")
    assert bn["evaluate"] == pytest.approx(bn_ddp["evaluate"], abs=1e-6)


def test_each_rank_holds_half_of_the_parameters_and_of_the_optimizer_state(fsdp_runs):
    tmp = fsdp_runs["tmp"]
    shapes = {"net.0.weight": (16, 8), "net.0.bias": (16,), "net.2.weight": (3, 16), "net.2.bias": (3,)}
    # FSDP2 cuts dim 0 as torch.chunk does: 16 rows -> 8 + 8, 3 rows -> 2 + 1.
    rows = {16: (8, 8), 3: (2, 1)}
    for rank in range(2):
        shards = torch.load(tmp / f"adamw.shards{rank}.pt", weights_only=True)
        expected = {k: rows[s[0]][rank] * math.prod(s[1:]) for k, s in shapes.items()}
        assert shards["params"] == expected
        assert shards["optimizer"] == {f"{k}.{state}": n for k, n in expected.items()
                                       for state in ("exp_avg", "exp_avg_sq")}
    held = sum(sum(torch.load(tmp / f"adamw.shards{r}.pt", weights_only=True)["params"].values()) for r in range(2))
    assert held == sum(math.prod(s) for s in shapes.values()) == 195


def test_the_start_up_summary_gives_the_sharding_and_the_bytes_per_device(fsdp_runs):
    summary = load_result(fsdp_runs["tmp"] / "adamw.pt")["summary"]
    assert "fsdp: every parameter in 2 shards; root + 2 units (net.0, net.2); checkpoints full" in summary
    # Rank 0's shards: 8x8 + 8 + 2x16 + 2 = 106 fp32 values (424 B) of 195 (780 B); AdamW keeps two of each.
    assert ("per device: parameters 424 B (ddp: 780 B), gradients 424 B (ddp: 780 B), "
            "optimizer state 848 B (ddp: 1560 B)") in summary
    assert "activation checkpointing on 2 module(s)" in load_result(fsdp_runs["tmp"] / "clip.pt")["summary"]


# -- checkpoints -------------------------------------------------------------------------------------------

def test_mid_epoch_resume_at_the_same_world_size_is_bitwise_equal(fsdp_runs):
    tmp = fsdp_runs["tmp"]
    straight = params_of(tmp, "straight")
    assert_params_close(straight, params_of(tmp, "straight_ddp"))
    for name in ("full_to_fsdp2", "sharded_to_fsdp2"):
        resumed = params_of(tmp, name)
        for key in straight:
            assert torch.equal(resumed[key], straight[key]), f"{name}: {key}"


@pytest.mark.parametrize("name", ["full_to_ddp2", "sharded_to_ddp2", "ddp_to_fsdp2"])
def test_resume_across_strategies(fsdp_runs, name):
    assert_params_close(params_of(fsdp_runs["tmp"], name), params_of(fsdp_runs["tmp"], "straight"))


@pytest.mark.parametrize("name", ["full_to_fsdp1", "sharded_to_fsdp1"])
def test_resume_on_one_device_with_the_global_batch_fixed(fsdp_runs, name):
    assert "world size 2 -> 1, global batch 8 -> 8 (accumulation 1 -> 2)" in fsdp_runs["one"]
    result = load_result(fsdp_runs["tmp"] / f"{name}.pt")
    assert result["global_step"] == 10
    assert_params_close(result["params"], params_of(fsdp_runs["tmp"], "straight"))


def test_a_rank_killed_during_a_sharded_save_ends_the_run_and_leaves_the_previous_checkpoint(fsdp_runs):
    tmp, two = fsdp_runs["tmp"], fsdp_runs["two"]
    assert two.returncode != 0, two.stdout[-3000:]
    killed_at = float((tmp / "crash" / "killed.txt").read_text())
    assert fsdp_runs["two_ended"] - killed_at < 60  # wall-clock stamps of the same machine
    directory = tmp / "crash" / "checkpoints"
    names = sorted(os.listdir(directory))
    assert "epoch=0-step=2.ckpt" in names and "epoch=0-step=4.ckpt" not in names, names
    assert os.readlink(directory / "last.ckpt") == "epoch=0-step=2.ckpt"
    partial = [n for n in names if n.startswith(".epoch=0-step=4.ckpt.tmp-")]
    assert partial and "__1_0.distcp" in os.listdir(directory / partial[0])  # it died mid-save
    state = checkpoint.load(str(directory / "last.ckpt"))
    assert state["loop"]["global_step"] == 2
    # Resumed on one device from step 2: the run ends where the uninterrupted one did.
    assert "resumed from" in fsdp_runs["one"]
    assert_params_close(load_result(tmp / "crash_resumed.pt")["params"], params_of(tmp, "straight"))


def test_full_and_sharded_checkpoints_serve_inspect_and_validate_on_one_device(fsdp_runs, capsys):
    from syncstep.cli import main

    tmp = fsdp_runs["tmp"]
    full = tmp / "full" / "checkpoints" / "epoch=0-step=3.ckpt"
    sharded = tmp / "sharded" / "checkpoints" / "epoch=0-step=4.ckpt"
    assert full.is_file() and sharded.is_dir()
    assert not [n for n in os.listdir(sharded.parent) if n.startswith(".")]  # the replaced one is gone
    for path, step in ((full, 3), (sharded, 4)):
        assert main(["inspect", str(path), "--tensors"]) == 0
        out = capsys.readouterr().out
        assert f"global step {step}" in out and "strategy fsdp" in out and "net.0.weight: (16, 8) float32" in out
    assert "sharded: 2 shard file(s)" in out
    x, y = dataset(6, seed=2)[:]
    for path, weights in ((full, checkpoint.load(str(full))["state_dict"]),
                          (sharded, load_result(tmp / "part_sharded.pt")["params"])):  # its weights at step 4
        net = make_net()
        net.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()})
        with torch.no_grad():
            want = F.cross_entropy(net(x), y).item()
        trainer = syncstep.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                   default_root_dir=str(tmp))
        got = trainer.validate(Tiny(seed=9), loader(dataset(6, seed=2), 2), ckpt_path=str(path))[0]["val_loss"]
        assert got == pytest.approx(want, abs=1e-6), path


def test_a_sharded_checkpoint_that_would_run_code_is_refused(fsdp_runs, tmp_path):
    """A crafted .metadata (a pickle that calls a function) and a non-tensor entry (torch would
    unpickle it with weights_only=False) are refused, and nothing runs."""
    import shutil

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    source = fsdp_runs["tmp"] / "sharded" / "checkpoints" / "epoch=0-step=4.ckpt"
    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(target), "w"))

    evil = tmp_path / "evil.ckpt"
    shutil.copytree(source, evil)
    (evil / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(checkpoint.CheckpointError, match="refused to load .*evil.ckpt"):
        checkpoint.load(str(evil))
    assert not target.exists()
    data = tmp_path / "data.ckpt"
    shutil.copytree(source, data)
    with open(source / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file, read by the test
    metadata = copy.copy(metadata)
    metadata.state_dict_metadata = {**metadata.state_dict_metadata, "model.net.0.weight": BytesStorageMetadata()}
    (data / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(checkpoint.CheckpointError, match="non-tensor entries"):
        checkpoint.load(str(data))


# -- failures and errors -------------------------------------------------------------------------------

def test_a_rank_that_raises_ends_the_run_within_60_s_with_its_traceback(tmp_path):
    marker = tmp_path / "raised.txt"
    cfg = {**TWO, "name": "raises", "n": 400, "batch_size": 4, "max_steps": 50,
           "fail": {"rank": 1, "step": 3, "kind": "raise", "marker": str(marker)}}
    result = run_configs(tmp_path, [cfg], timeout=180, check=False)  # syncstep's own launch
    assert result.returncode != 0
    assert time.monotonic() - float(marker.read_text()) < 60
    assert "injected failure at step 3" in result.stdout and "rank 1 failed first" in result.stdout


def fsdp_trainer(**kwargs) -> syncstep.Trainer:
    kwargs.setdefault("strategy", "fsdp")
    kwargs.setdefault("devices", 1)
    return syncstep.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, lr_scaling="none", **kwargs)


def test_bad_strategy_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="does not support precision='16-mixed'.*bf16-mixed"):
        fsdp_trainer(precision="16-mixed")
    with pytest.raises(TypeError, match="Pass an instance: strategy=FSDPStrategy()"):
        fsdp_trainer(strategy=syncstep.FSDPStrategy)
    with pytest.raises(TypeError, match="strategy must be a name .* or syncstep.FSDPStrategy"):
        fsdp_trainer(strategy=object())
    with pytest.raises(ValueError, match="state_dict_type must be 'full' or 'sharded'"):
        syncstep.FSDPStrategy(state_dict_type="local")
    with pytest.raises(TypeError, match="auto_wrap_policy must be a set of torch.nn.Module classes"):
        syncstep.FSDPStrategy(auto_wrap_policy="Linear")
    # One process cannot drive two devices (dp-style): fsdp needs one process per device.
    t = fsdp_trainer(devices=2)
    with pytest.raises(ValueError, match="needs 2 processes \\(one per device\\).*torchrun --nproc-per-node=2"):
        t.fit(Tiny(), loader(dataset(8), 4))


class NoParameters(Tiny):
    def __init__(self):
        super().__init__()
        del self.net

    def configure_optimizers(self):
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


class EarlyOptimizer(Tiny):
    def __init__(self):
        super().__init__()
        self.early = torch.optim.SGD(self.parameters(), lr=0.1)  # holds the parameters before sharding

    def configure_optimizers(self):
        return self.early


def test_a_model_without_parameters_and_an_optimizer_built_too_early_are_refused():
    with pytest.raises(ValueError, match="NoParameters has none"):
        fsdp_trainer(max_steps=1).fit(NoParameters(), loader(dataset(8), 4))
    with pytest.raises(ValueError, match="not parameters of the model.*Build the optimizer inside configure_optim"):
        fsdp_trainer(max_steps=1).fit(EarlyOptimizer(), loader(dataset(8), 4))


class ShardsItself(Tiny):
    """Builds its layers in configure_model and shards the first one itself."""

    def __init__(self):
        syncstep.Module.__init__(self)
        self.lr, self.optimizer_name, self.scheduler, self.fail, self.net = 0.1, "sgd", None, {}, None

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        if self.net is None:
            self.net = make_net()
            fully_shard(self.net[0])


def test_configure_model_builds_and_shards_before_the_optimizer(capsys):
    model = ShardsItself()
    trainer = fsdp_trainer(max_steps=5)
    trainer.fit(model, loader(dataset(40), 8))
    assert "root + 1 unit (net.0)" in capsys.readouterr().out
    params = {k: v.full_tensor() for k, v in model.state_dict().items()}
    assert_params_close(params, reference_sgd(n=40, global_batch=8, steps=5, lr=0.1))
