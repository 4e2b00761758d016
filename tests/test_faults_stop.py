"""Stop requests and odd data in real processes: ``trainer.should_stop`` on one rank or all, mid-epoch or at
an epoch's end; rank 0's disk filling up during a save; datasets of 1 sample, smaller than world size x
batch, not divisible by it, dict batches from persistent workers, batches of a custom class, an
IterableDataset, an empty one, and one whose length differs between ranks.

One launch runs every scenario in turn (scripts/fault_scenarios.py), so the start-up cost is paid
once; each scenario is compared with a hand-written single-process loop or a hand-counted step.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from common import reference_sgd
from helpers import SCRIPTS, assert_params_close, free_port, run

STEP_SLEEP = 0.3  # s per step where the stop must come within the agreement interval (about 1 s)
SCENARIOS = [
    # 80 samples, 2 processes x batch 4: 10 steps per epoch, 2 epochs.
    {"name": "one_rank_mid", "n": 80, "batch_size": 4, "sleep": STEP_SLEEP, "stop": {"ranks": [1], "step": 3},
     "trainer": {"max_epochs": 2, "enable_checkpointing": True, "log_every_n_steps": 50}},
    {"name": "all_mid", "n": 80, "batch_size": 4, "sleep": STEP_SLEEP, "stop": {"ranks": "all", "step": 3},
     "trainer": {"max_epochs": 2, "log_every_n_steps": 50}},
    {"name": "one_rank_epoch_end", "n": 80, "batch_size": 4, "stop": {"ranks": [1], "epoch_end": 0},
     "trainer": {"max_epochs": 3, "log_every_n_steps": 50}},
    {"name": "all_epoch_end", "n": 80, "batch_size": 4, "stop": {"ranks": "all", "epoch_end": 0},
     "trainer": {"max_epochs": 3, "log_every_n_steps": 50}},
    {"name": "one_sample", "n": 1, "batch_size": 4, "trainer": {"max_epochs": 2}},
    {"name": "smaller_than_a_step", "n": 3, "batch_size": 4, "trainer": {"max_epochs": 2}},
    {"name": "not_divisible", "n": 13, "batch_size": 2},
    {"name": "dict_batches_workers", "n": 16, "batch_size": 2, "data": "dict",
     "loader": {"num_workers": 2, "persistent_workers": True}, "trainer": {"max_epochs": 2}},
    {"name": "custom_batches", "n": 12, "batch_size": 2, "data": "custom"},
    {"name": "stream", "n": 40, "batch_size": 4, "data": "iterable",
     "trainer": {"use_distributed_sampler": False, "max_steps": 3, "max_epochs": None}},
    {"name": "stream_unbounded", "n": 40, "batch_size": 4, "data": "iterable", "catch": True,
     "trainer": {"use_distributed_sampler": False}},
    {"name": "empty", "n": 0, "batch_size": 4, "catch": True},
    {"name": "full_disk", "n": 40, "batch_size": 4, "catch": True, "full_disk_at_save": 2,
     "trainer": {"enable_checkpointing": True, "ckpt_every_n_steps": 2}},
    # last: only the rank whose data differs can know, so this one ends the launch
    {"name": "rank_len", "n": 40, "batch_size": 4, "data": "rank_len"},
]


def outcome(tmp_path, name: str, rank: int) -> dict:
    return json.loads((tmp_path / f"{name}.rank{rank}.json").read_text())


def params(tmp_path, name: str) -> dict:
    ranks = [torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{name}: {key} differs between ranks"
    return {f"net.{k}" if not k.startswith("net.") else k: v for k, v in ranks[0].items()}


def test_stop_requests_and_odd_data_in_two_processes(tmp_path):
    spec = tmp_path / f"spec-{free_port()}.json"
    spec.write_text(json.dumps(SCENARIOS))
    started = time.monotonic()
    result = run([sys.executable, str(SCRIPTS / "fault_scenarios.py"), str(spec)], timeout=300, cwd=str(tmp_path),
                 check=False)
    out = result.stdout
    assert time.monotonic() - started < 240, out[-3000:]

    # should_stop on rank 1 alone, mid-epoch: both ranks stop at the same step, soon after, cleanly, with a
    # checkpoint there (before, rank 0 went on into a collective: "Connection closed by peer").
    one, other = outcome(tmp_path, "one_rank_mid", 0), outcome(tmp_path, "one_rank_mid", 1)
    assert one == other, (one, other)
    # set during step 3 (global_step 3 -> 4); one agreement interval (~1 s) is at most ~4 steps of 0.3 s
    assert 4 <= one["global_step"] <= 9, one
    last = torch.load(tmp_path / "one_rank_mid" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["loop"] == {"epoch": 0, "global_step": one["global_step"], "epoch_sample": 8 * one["global_step"]}
    # on every rank, mid-epoch: stops within the epoch (before, only at the epoch's end: step 10)
    both = outcome(tmp_path, "all_mid", 0)
    assert both == outcome(tmp_path, "all_mid", 1) and 4 <= both["global_step"] <= 9, both
    # at the end of epoch 0 (of 3), on one rank or all: every rank stops after exactly that epoch
    for name in ("one_rank_epoch_end", "all_epoch_end"):
        assert outcome(tmp_path, name, 0)["global_step"] == outcome(tmp_path, name, 1)["global_step"] == 10, name

    # odd sizes train exactly: the same as one process with the global batch of 8 (4 for batch 2)
    assert_params_close(params(tmp_path, "one_sample"), reference_sgd(n=1, global_batch=8, steps=2, lr=0.1, epochs=2))
    assert_params_close(params(tmp_path, "smaller_than_a_step"),
                        reference_sgd(n=3, global_batch=8, steps=2, lr=0.1, epochs=2))
    assert_params_close(params(tmp_path, "not_divisible"), reference_sgd(n=13, global_batch=4, steps=4, lr=0.1))
    assert_params_close(params(tmp_path, "dict_batches_workers"),
                        reference_sgd(n=16, global_batch=4, steps=8, lr=0.1, epochs=2))
    assert_params_close(params(tmp_path, "custom_batches"), reference_sgd(n=12, global_batch=4, steps=3, lr=0.1))
    # each rank its own stream (rank r: samples r, r + 2, ...): step s is samples 8s .. 8s + 7 in order
    assert_params_close(params(tmp_path, "stream"), reference_sgd(n=40, global_batch=8, steps=3, lr=0.1))
    for rank in (0, 1):
        unbounded = outcome(tmp_path, "stream_unbounded", rank)["error"]
        assert unbounded.startswith("ValueError") and "max_steps" in unbounded, unbounded
        empty = outcome(tmp_path, "empty", rank)["error"]
        assert empty.startswith("ValueError") and "training set is empty" in empty, empty

    # rank 0's disk full at the second save (step 4): every rank raises the same error (before, rank 1 went on
    # into the next collective); the first checkpoint is still there, and nothing under the second's name
    for rank in (0, 1):
        full = outcome(tmp_path, "full_disk", rank)
        assert full["global_step"] == 4, full
        assert full["error"].startswith("CheckpointError: on rank 0: could not write the checkpoint"), full
        assert "epoch=0-step=4.ckpt" in full["error"] and "No space left on device" in full["error"], full
    directory = tmp_path / "full_disk" / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert torch.load(directory / "last.ckpt", weights_only=True)["loop"]["global_step"] == 2

    # lengths that differ between ranks: a real message naming both, not gloo's SIGABRT ("Received data size
    # doesn't match"); rank 0 cannot know and is stopped by the launcher (after gloo's follow-on error)
    assert result.returncode == 1, out[-3000:]
    assert "rank 1 failed first: ValueError: the training set has 41 samples on rank 1 but 40 on rank 0" in out, \
        out[-3000:]
    assert "SIGABRT" not in out and "data size" not in out, out[-3000:]
