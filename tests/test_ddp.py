"""DDP in real processes (gloo on 127.0.0.1) against hand-written single-process references."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from common import dataset, make_net, reference_losses, reference_sgd, shuffled_order
from helpers import (
    CONFIGS,
    SCRIPTS,
    assert_params_close,
    assert_same_on_every_rank,
    clean_env,
    free_port,
    load_result,
    run,
    run_configs,
    run_together,
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    started = time.monotonic()
    result = run_configs(tmp, CONFIGS, timeout=240)
    return tmp, result, time.monotonic() - started


def test_ddp_equals_single_process_with_twice_the_batch(ddp_run):
    tmp, _, _ = ddp_run
    params = assert_same_on_every_rank(tmp, "plain")
    assert_params_close(params, reference_sgd(n=40, global_batch=8, steps=5, lr=0.1))


def test_ddp_with_accumulation_equals_four_times_the_batch(ddp_run):
    tmp, _, _ = ddp_run
    params = assert_same_on_every_rank(tmp, "accum")
    assert_params_close(params, reference_sgd(n=80, global_batch=16, steps=5, lr=0.1))


def test_ddp_shuffled_uneven_epochs_equal_reference(ddp_run):
    tmp, _, _ = ddp_run
    params = assert_same_on_every_rank(tmp, "shuffled")
    expected = reference_sgd(n=37, global_batch=8, steps=10, lr=0.1, order=shuffled_order(37, 3), epochs=2)
    assert_params_close(params, expected)


def test_ddp_final_step_with_one_sample_is_exact(ddp_run):
    tmp, _, _ = ddp_run
    params = assert_same_on_every_rank(tmp, "lonely")
    assert_params_close(params, reference_sgd(n=33, global_batch=8, steps=5, lr=0.1))


def test_ddp_evaluation_counts_every_sample_once(ddp_run):
    tmp, _, _ = ddp_run
    result = load_result(tmp / "shuffled.pt")
    net = make_net()
    net.load_state_dict({k.removeprefix("net."): v for k, v in result["params"].items()})
    x, y = dataset(7, seed=2)[:]
    with torch.no_grad():
        logits = net(x)
    expected_acc = (logits.argmax(1) == y).float().mean().item()
    expected_loss = F.cross_entropy(logits, y).item()
    assert result["evaluate"]["val_acc"] == pytest.approx(expected_acc, abs=1e-7)
    assert result["evaluate"]["val_loss"] == pytest.approx(expected_loss, abs=1e-6)


def test_train_loss_epoch_is_the_mean_over_all_samples(ddp_run):
    """train_loss_epoch (logged on_epoch) weights each batch by its size on every rank."""
    tmp, _, _ = ddp_run
    result = load_result(tmp / "plain.pt")
    epoch_rows = [r for r in result["rows"] if "train_loss_epoch" in r]
    assert len(epoch_rows) == 1
    # Recompute: the loss of each of the 5 steps at the parameters before that step, on 8 samples.
    losses = reference_losses(40, 8, 5)
    assert epoch_rows[0]["train_loss_epoch"] == pytest.approx(sum(losses) / 5, abs=1e-6)


def test_fixed_global_batch_gives_the_same_run_on_one_and_two_processes(ddp_run, tmp_path):
    """global_batch_size=8: 1 process derives accumulation 2, 2 processes accumulation 1."""
    tmp, _, _ = ddp_run
    ddp = load_result(tmp / "invariant.pt")
    single_cfg = {**CONFIGS[4], "name": "invariant_single", "devices": 1, "strategy": "auto"}
    run_configs(tmp_path, [single_cfg], timeout=120)
    single = load_result(tmp_path / "invariant_single.pt")
    assert_params_close(ddp["params"], single["params"])
    assert ddp["lrs"] == pytest.approx(single["lrs"], rel=1e-12)
    assert len(ddp["lrs"]) == 12


def test_every_rank_ends_equal_under_torchrun(tmp_path):
    cfg = {**CONFIGS[0], "name": "torchrun"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    run_configs(tmp_path, [cfg], launcher=launcher, timeout=120)
    params = assert_same_on_every_rank(tmp_path, "torchrun")
    assert_params_close(params, reference_sgd(n=40, global_batch=8, steps=5, lr=0.1))


def test_two_node_torchrun_rendezvous(tmp_path):
    """Two torchrun agents on 127.0.0.1, one process each: num_nodes=2, devices=1."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{**CONFIGS[0], "name": "twonode", "devices": 1, "num_nodes": 2}]))
    port = free_port()
    commands = [([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                  "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                  str(SCRIPTS / "fit_configs.py"), str(spec)], clean_env()) for node in range(2)]
    results = run_together(commands, cwd=str(tmp_path))
    assert [code for code, _ in results] == [0, 0], "\n".join(out[-3000:] for _, out in results)
    params = assert_same_on_every_rank(tmp_path, "twonode")
    assert_params_close(params, reference_sgd(n=40, global_batch=8, steps=5, lr=0.1))


def test_slurm_environment_is_detected(tmp_path):
    """Two processes with the variables srun sets (no SLURM here, so we play srun)."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{**CONFIGS[0], "name": "slurm"}]))
    port = free_port()
    commands = [([sys.executable, str(SCRIPTS / "fit_configs.py"), str(spec)],
                 clean_env(SLURM_NTASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                           SLURM_NNODES="1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="train",
                           SLURM_STEP_NODELIST="127.0.0.1", MASTER_PORT=str(port))) for rank in range(2)]
    results = run_together(commands, cwd=str(tmp_path))
    assert [code for code, _ in results] == [0, 0], "\n".join(out[-3000:] for _, out in results)
    params = assert_same_on_every_rank(tmp_path, "slurm")
    assert_params_close(params, reference_sgd(n=40, global_batch=8, steps=5, lr=0.1))


def test_a_rank_that_raises_ends_the_run_with_its_traceback(tmp_path):
    cfg = {**CONFIGS[0], "name": "raises", "max_steps": 50, "n": 400, "fail": {"rank": 1, "step": 3, "kind": "raise"}}
    started = time.monotonic()
    result = run_configs(tmp_path, [cfg], timeout=90, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 60
    assert "injected failure at step 3" in result.stdout
    assert "rank 1" in result.stdout
    assert "Traceback" in result.stdout


def test_the_process_group_is_really_destroyed_at_exit(tmp_path):
    # DDP imports torch.distributed.nn.functional, whose default arguments would otherwise pin the
    # group for the life of the process: gloo's threads then outlive destroy_process_group() and are torn
    # down during interpreter shutdown, where one can abort the process (SIGABRT, "terminate called
    # without an active exception"; seen in CI). The script reports from an atexit handler that runs
    # after syncstep's own teardown.
    result = run([sys.executable, str(SCRIPTS / "exit_threads.py")], timeout=120, cwd=str(tmp_path))
    for rank in range(2):
        during = re.search(rf"rank {rank}: gloo threads after fit: (\d+)", result.stdout)
        assert during and int(during.group(1)) > 0, result.stdout[-3000:]  # the count does see gloo's threads
        assert f"rank {rank}: gloo threads at exit: 0" in result.stdout, result.stdout[-3000:]
