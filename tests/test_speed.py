"""Issue 14: communication hooks, torch.compile, throughput; each against a hand computation or an
uncompiled / uninterrupted run. The two-process runs share one launch (scripts/speed_ddp.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import syncstep
from common import Tiny, dataset, loader, make_net, reference_sgd
from helpers import SCRIPTS, assert_params_close, clean_env, free_port, kill_tree, run

# -- two processes: one launch for every scenario ------------------------------------------------


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed")
    run([sys.executable, str(SCRIPTS / "speed_ddp.py"), "hooks", "powersgd", "compile", "straggler", "demo"],
        timeout=400, cwd=str(tmp))
    return tmp


def local_gradients(batch) -> dict:
    """One rank's own gradient of the mean loss on its batch, by hand (no DDP)."""
    net = make_net(0)
    x, y = batch
    F.cross_entropy(net(x), y).backward()
    return {f"net.{n}": p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize("hook,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_compressed_hooks_give_the_compressed_then_averaged_gradients(two_process, hook, dtype):
    ranks = [torch.load(two_process / f"hooks.{hook}.rank{r}.pt", weights_only=True) for r in range(2)]
    local = [local_gradients(r["batch"]) for r in ranks]
    for name in local[0]:
        # torch's compression: cast, divide by the world size, sum in that precision, cast back
        expected = (local[0][name].to(dtype) / 2 + local[1][name].to(dtype) / 2).float()
        plain_mean = (local[0][name] + local[1][name]) / 2
        for r in ranks:
            assert torch.equal(r["grads"][name], expected), name
        assert (expected - plain_mean).abs().max() > 1e-6  # so the check above tells the hook ran
    # a wrapper registered with it (as the noise-scale measurement does) saw the bucket around the hook
    before, after = ranks[0]["wrapped"][0]
    own = torch.cat([g.reshape(-1) for g in local[0].values()])
    final = torch.cat([g.reshape(-1) for g in ranks[0]["grads"].values()])
    assert torch.equal(before.sort().values, own.sort().values)
    assert torch.equal(after.sort().values, final.sort().values)


def test_compression_and_the_noise_scale_compose(two_process):
    """fp16 compression with noise_scale=True: the gradients are still the compressed-then-averaged ones,
    and the noise meter read each rank's own gradient before the hook and the decompressed average after."""
    ranks = [torch.load(two_process / f"hooks.fp16_noise.rank{r}.pt", weights_only=True) for r in range(2)]
    local = [local_gradients(r["batch"]) for r in ranks]
    expected = {n: (local[0][n].half() / 2 + local[1][n].half() / 2).float() for n in local[0]}
    for r, saved in enumerate(ranks):
        for name in expected:
            assert torch.equal(saved["grads"][name], expected[name]), name
        own = sum(float(g.double().square().sum()) for g in local[r].values())
        average = sum(float(g.double().square().sum()) for g in expected.values())
        assert saved["small"] == pytest.approx(own, rel=1e-6)
        assert saved["big"] == pytest.approx(average, rel=1e-6)


def test_powersgd_resumes_bitwise_with_its_error_feedback(two_process):
    result = torch.load(two_process / "powersgd.pt", weights_only=True)
    assert result["saved_hook_state"]
    for name, value in result["straight"].items():
        assert torch.equal(result["resumed"][name], value), name
    # without the hook's state in the checkpoint the resumed run goes elsewhere: the state matters
    assert max((result["control"][n] - v).abs().max() for n, v in result["straight"].items()) > 1e-4


def test_powersgd_demo_reaches_its_accuracy(two_process):
    assert json.loads((two_process / "demo.json").read_text())["val_acc"] >= 0.95


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_two_process_run_ends_where_the_uncompiled_one_does(two_process, strategy):
    result = torch.load(two_process / "compile.pt", weights_only=True)
    assert result["graphs"] >= 1  # dynamo really captured the forward
    assert result[f"{strategy} compiled compiled"] and not result[f"{strategy} eager compiled"]
    compiled, eager = result[f"{strategy} compiled"], result[f"{strategy} eager"]
    assert_params_close(compiled, eager, atol=1e-5)
    initial = {f"net.{n}": v for n, v in make_net(0).state_dict().items()}
    assert max((compiled[n] - v).abs().max() for n, v in initial.items()) > 1e-3  # (it trained)


def test_straggler_is_the_rank_that_sleeps(two_process):
    rows = [r for r in json.loads((two_process / "straggler.json").read_text()) if "throughput/slowest_rank" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        slowest, median = row["throughput/rank_time_max"], row["throughput/rank_time_median"]
        other = 2 * median - slowest  # two ranks: the median is their mean
        assert row["throughput/slowest_rank"] == 1.0
        assert slowest >= 0.05 and other < slowest / 2, row


# -- one process ----------------------------------------------------------------------------------


def trainer(**kwargs) -> syncstep.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return syncstep.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                            lr_scaling="none", **kwargs)


def test_compiled_single_device_run_equals_the_uncompiled_one():
    from torch._dynamo.utils import counters

    eager, compiled = Tiny(optimizer="adam", lr=0.01), Tiny(optimizer="adam", lr=0.01)
    trainer(max_epochs=2).fit(eager, loader(dataset(36), 8))  # (the last batch of 4: a second shape)
    counters.clear()
    trainer(max_epochs=2, compile={"backend": "aot_eager"}).fit(compiled, loader(dataset(36), 8))
    assert counters["stats"]["unique_graphs"] >= 1
    assert compiled._compiled_call_impl is not None
    assert_params_close(compiled.state_dict(), eager.state_dict(), atol=1e-5)


def test_a_user_compiled_module_trains_and_checkpoints_without_prefixes(tmp_path):
    eager = Tiny()
    trainer(max_steps=4).fit(eager, loader(dataset(32), 8))
    model = Tiny()
    user_compiled = torch.compile(model, backend="aot_eager")
    t = trainer(max_steps=4, enable_checkpointing=True, default_root_dir=str(tmp_path))
    t.fit(user_compiled, loader(dataset(32), 8))
    assert t.lightning_module is model and model._compiled_call_impl is not None
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert list(state) == list(eager.state_dict())  # no "_orig_mod." anywhere
    assert_params_close(state, eager.state_dict(), atol=1e-6)


class Timed(Tiny):
    def training_step(self, batch, batch_idx):
        time.sleep(0.01)
        return super().training_step(batch, batch_idx)


class Clocked:
    """A logger that notes when each row arrives."""

    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append({"step": step, "at": time.perf_counter(), **metrics})


def test_logged_samples_per_second_agree_with_the_steps_and_batches():
    logger = Clocked()
    # 44 samples, batch 8: 5 steps of 8 and one of 4; logged at steps 3 and 6
    t = trainer(max_epochs=1, log_every_n_steps=3, logger=[logger], flops_per_sample=1000.0,
                peak_flops_per_device=1e6)
    started = time.perf_counter()
    t.fit(Timed(), loader(dataset(44), 8))
    rows = [r for r in logger.rows if "throughput/samples_per_sec" in r]
    assert [r["step"] for r in rows] == [3, 6]
    for row, samples, since in zip(rows, (24, 20), (started, rows[0]["at"])):
        rate, steps = row["throughput/samples_per_sec"], row["throughput/steps_per_sec"]
        assert rate / steps == pytest.approx(samples / 3, rel=1e-9)  # the window's samples over its steps
        window = row["at"] - since  # the test's own clock
        assert rate <= samples / (3 * 0.01)  # every step sleeps 10 ms
        if since is started:  # the test's first window holds the start-up too
            assert rate >= samples / window * 0.99
        else:  # between two logging steps both clocks time the same three steps
            assert rate == pytest.approx(samples / window, rel=0.25)
        assert row["throughput/mfu"] == pytest.approx(rate * 1000.0 / 1e6, rel=1e-9)
        assert "throughput/slowest_rank" not in row  # one process: no straggler to name (and no clock calls)


@pytest.mark.filterwarnings("ignore:strategy=.dp. on the CPU")
def test_bad_speed_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="ddp_comm_hook='int8' is not one of"):
        syncstep.DDPStrategy(ddp_comm_hook="int8")
    with pytest.raises(ValueError, match="are PowerSGD's"):
        syncstep.DDPStrategy(ddp_comm_hook="fp16", ddp_comm_options={"matrix_approximation_rank": 2})
    with pytest.raises(ValueError, match="start_powerSGD_iter must be an int >= 2"):
        syncstep.DDPStrategy(ddp_comm_hook="powersgd", ddp_comm_options={"start_powerSGD_iter": 1})
    with pytest.raises(TypeError, match="unknown PowerSGD option"):
        syncstep.DDPStrategy(ddp_comm_hook="powersgd", ddp_comm_options={"rank": 2})
    with pytest.raises(ValueError, match="bucket_cap_mb must be a number > 0"):
        syncstep.DDPStrategy(bucket_cap_mb=0)
    with pytest.raises(TypeError, match=r"Pass an instance: strategy=DDPStrategy\(\)"):
        trainer(strategy=syncstep.DDPStrategy)
    with pytest.raises(TypeError, match="not torch.compile arguments"):
        trainer(compile={"modes": "max-autotune"})
    with pytest.raises(ValueError, match="flops_per_sample must be a number > 0"):
        trainer(flops_per_sample=0)
    with pytest.raises(ValueError, match=r"needs every bucket at least as large as DDP's first one \(1 MiB\)"):
        trainer(strategy=syncstep.DDPStrategy(bucket_cap_mb=0.5), devices=1, compile=True, max_steps=1).fit(
            Tiny(), loader(dataset(8), 4))
    with pytest.raises(ValueError, match="does not work with strategy='dp'"):
        trainer(strategy="dp", devices=2, compile=True, max_steps=1).fit(Tiny(), loader(dataset(8), 4))


# -- elastic: torchrun --nnodes=1:2, one agent stopped mid-run -------------------------------------


def test_elastic_run_finishes_on_the_remaining_node_as_an_uninterrupted_run(tmp_path):
    """Two torchrun agents (one process each) with --nnodes=1:2; when rank 1 reaches step 5 its agent is
    killed, and the other agent restarts its worker alone: it resumes from the step-4 checkpoint with
    world size 1 (accumulation 2 instead of 1, global batch 8 either way) and must end where one
    process with batch 8 ends."""
    marker = tmp_path / "stalled.txt"
    config = {"name": "elastic", "n": 64, "batch_size": 4, "devices": 1, "num_nodes": "auto",
              "global_batch_size": 8, "max_steps": 8, "lr": 0.1, "enable_checkpointing": True,
              "ckpt_every_n_steps": 2, "timeout": 60, "root": str(tmp_path),
              "fail": {"rank": 1, "step": 5, "kind": "sleep", "seconds": 120, "marker": str(marker)}}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([config]))
    port = free_port()

    def agent(is_host: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
               "--max-restarts=3", "--monitor-interval=0.5", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}",
               # short rendezvous timings: a dead agent is noticed after 2 missed 1 s heartbeats
               f"--rdzv-conf=is_host={is_host},last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=2",
               str(SCRIPTS / "fit_configs.py"), str(spec)]
        return subprocess.Popen(cmd, cwd=str(tmp_path), env=clean_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    stays = agent(1)  # the rendezvous store lives in this agent, which must outlive the other
    time.sleep(0.5)
    leaves = agent(0)
    try:
        deadline = time.monotonic() + 150
        while not marker.exists():
            assert time.monotonic() < deadline and stays.poll() is None, "rank 1 never reached step 5"
            time.sleep(0.2)
        kill_tree(leaves.pid)
        out, _ = stays.communicate(timeout=150)
    finally:
        for proc in (stays, leaves):
            kill_tree(proc.pid)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        leaves.communicate()
    assert stays.returncode == 0, out[-6000:]
    assert "world size 2 (1 device x 2 nodes)" in out and "world size 1 (1 device x 1 node)" in out, out[-6000:]
    assert re.search(r"resumed from .*: epoch 0, step 4, 32 samples", out), out[-6000:]
    assert "world size 2 -> 1, global batch 8 -> 8 (accumulation 1 -> 2)" in out
    params = torch.load(tmp_path / "elastic.rank0.pt", weights_only=True)
    assert_params_close(params, reference_sgd(n=64, global_batch=8, steps=8, lr=0.1), atol=1e-6)


def test_powersgd_state_moves_to_another_world_size_without_the_residuals():
    """At another device count each rank's residual has no owner: it restarts at zero, P and Q carry over."""
    strategy = syncstep.DDPStrategy(ddp_comm_hook="powersgd",
                                    ddp_comm_options={"matrix_approximation_rank": 1, "start_powerSGD_iter": 2})
    t = trainer(max_steps=4, strategy=strategy, devices=1)
    t.fit(Tiny(), loader(dataset(32), 4))
    saved = t.strategy.extra_state()
    (one,) = saved["comm_hook"]
    pieces = one["per_parameter"]
    assert one["iter"] == 4 and all("error" in entry for entry in pieces.values())
    assert {i for i, entry in pieces.items() if "p" in entry} == {0, 2}  # the two weight matrices
    said = []
    t.strategy.load_extra_state({"comm_hook": [one, one]}, said.append)  # as if saved by 2 processes
    loaded = t.strategy.comm_state.per_parameter
    assert "restarts at zero" in said[0]
    assert all("error" not in entry for entry in loaded.values())
    assert all(torch.equal(loaded[i]["p"], pieces[i]["p"]) for i in (0, 2))
