"""The gradient noise scale (noise_scale.py) and AdaScale (adascale.py) against independent references:
per-sample gradients by brute force (torch.func), norms computed in one process, closed forms."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import syncstep
from common import dataset, make_net
from helpers import SCRIPTS, run

QUIET = {"enable_progress_bar": False, "logger": False, "enable_checkpointing": False,
         "enable_model_summary": False}


def digits_subset(n: int) -> TensorDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n], dtype=torch.long))


class Frozen(syncstep.Module):
    """Softmax regression or the demo's MLP, trained at LR 0: the gradient statistics stay fixed."""

    def __init__(self, mlp: bool):
        super().__init__()
        torch.manual_seed(0)
        self.net = (torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)) if mlp
                    else torch.nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def brute_force(net: torch.nn.Module, data: TensorDataset) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) over the whole set from every sample's gradient (Sigma: the population covariance)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    x, y = data.tensors

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(net, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1).double()
    mean = flat.mean(0)
    return float(mean.square().sum()), float((flat - mean).square().sum(1).mean())


@pytest.mark.parametrize("mlp", [False, True], ids=["softmax", "mlp"])
def test_estimates_match_brute_force_per_sample_gradients(mlp):
    n = 128  # a small training set, so that sampling without replacement shows
    data = digits_subset(n)
    model = Frozen(mlp)
    grad_sq, trace = brute_force(model.net, data)
    for w in (2, 4):
        trainer = syncstep.Trainer(max_steps=200, accumulate_grad_batches=w, noise_scale=True, log_every_n_steps=10,
                                   seed=w, **QUIET)
        trainer.fit(model, DataLoader(data, batch_size=32 // w, shuffle=True))
        r = trainer.noise_scale
        assert abs(r["grad_sq_run"] - grad_sq) < 4 * r["grad_sq_run_se"], (w, r["grad_sq_run"], grad_sq)
        assert abs(r["trace_sigma_run"] - trace) < 4 * r["trace_sigma_run_se"], (w, r["trace_sigma_run"], trace)
        low = grad_sq - trace / (n - 1)  # what the estimator finds without the without-replacement correction
        assert abs(r["grad_sq_uncorrected_run"] - low) < 4 * r["grad_sq_uncorrected_run_se"]
        assert grad_sq - r["grad_sq_uncorrected_run"] > 2 * r["grad_sq_uncorrected_run_se"]  # visibly low


# -- plumbing: the DDP hook reads exactly each replica's and the averaged gradient -----------------------

PLUMBING = [
    {"name": "plain", "n": 44, "batch_size": 4, "steps": 6},  # 5 full steps and a short one (skipped)
    {"name": "accum", "n": 88, "batch_size": 4, "accumulate": 2, "steps": 6},
    {"name": "clip", "n": 40, "batch_size": 4, "clip": 0.05, "steps": 5},
]


def reference_norms(n: int, batch_size: int, steps: int, accumulate: int = 1, clip: float | None = None,
                    world: int = 2, lr: float = 0.5) -> list[tuple[list[float], float] | None]:
    """Per step, in one process: each replica's squared gradient norm and the averaged one's (None for a
    short final step), training on with plain SGD and norm clipping as the DDP run does."""
    data, net = dataset(n), make_net(0)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    g = batch_size * world * accumulate

    def grad_of(indices):
        net.zero_grad()
        x, y = data[indices]
        F.cross_entropy(net(x), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double()

    out = []
    for s in range(steps):
        samples = list(range(s * g, min((s + 1) * g, n)))
        big = grad_of(samples)
        if len(samples) == g:
            chunks = [samples[a:a + batch_size * world] for a in range(0, g, batch_size * world)]
            local = [grad_of([i for chunk in chunks for i in chunk[r::world]]) for r in range(world)]
            out.append(([float(v.square().sum()) for v in local], float(big.square().sum())))
        else:
            out.append(None)
        grad_of(samples)
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    return out


@pytest.fixture(scope="module")
def ddp_norms(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("noise_ddp")
    spec = tmp / "configs.json"
    spec.write_text(json.dumps(PLUMBING))
    run([sys.executable, str(SCRIPTS / "noise_ddp.py"), str(spec)], timeout=240, cwd=str(tmp))
    return {c["name"]: [torch.load(tmp / f"{c['name']}.rank{r}.pt", weights_only=False) for r in range(2)]
            for c in PLUMBING}


@pytest.mark.parametrize("config", PLUMBING, ids=[c["name"] for c in PLUMBING])
def test_ddp_hook_reads_each_replicas_and_the_averaged_gradient(ddp_norms, config):
    ranks = ddp_norms[config["name"]]
    expected = reference_norms(**{k: v for k, v in config.items() if k != "name"})
    for rank, saved in enumerate(ranks):
        assert len(saved["norms"]) == len(expected)
        for step, (got, want) in enumerate(zip(saved["norms"], expected)):
            if want is None:  # the short final step is not measured
                assert got is None, f"step {step}: a short step was measured"
                continue
            local, big = want
            assert got is not None, f"step {step} was not measured"
            assert got[0] == pytest.approx(local[rank], rel=1e-6, abs=1e-9), (config["name"], rank, step)
            assert got[1] == pytest.approx(big, rel=1e-6, abs=1e-9), (config["name"], rank, step)
    result = ranks[0]["result"]
    assert result["source"] == "ddp" and result["small_batches_per_step"] == 2
    full = sum(w is not None for w in expected)
    assert result["steps"] == full


def test_one_batch_per_step_is_not_measurable_and_the_summary_says_why():
    trainer = syncstep.Trainer(max_steps=2, noise_scale=True, **QUIET)
    trainer.fit(Frozen(False), DataLoader(digits_subset(64), batch_size=16))
    assert "noise scale: not measurable with one batch per step" in trainer.plan_summary()
    assert "accumulate_grad_batches >= 2" in trainer.plan_summary()
    assert trainer.noise_scale is None


def test_logged_values_and_the_end_of_fit_report(capsys):
    trainer = syncstep.Trainer(max_steps=8, noise_scale=True, accumulate_grad_batches=2, log_every_n_steps=4,
                               reference_batch_size=8, **QUIET)
    trainer.fit(Frozen(False), DataLoader(digits_subset(128), batch_size=8, shuffle=True))
    metrics = trainer.callback_metrics
    for name in ("b_simple", "trace_sigma", "grad_sq", "gain", "step_efficiency"):
        assert f"noise_scale/{name}" in metrics
    result = trainer.noise_scale
    assert result["steps"] == 8 and len(result["history"]) == 2 and len(result["ci"]) == 2
    g, t = result["grad_sq"], result["trace_sigma"]
    assert result["b_simple"] == pytest.approx(t / g)
    # the logged gain is AdaScale's formula at global batch 16 against the reference 8
    assert float(metrics["noise_scale/gain"]) == pytest.approx((t / 8 + g) / (t / 16 + g), rel=1e-5)
    out = capsys.readouterr().out
    assert "noise scale: from 2 micro-batches' gradients of 8 samples" in out
    assert "syncstep: noise scale: B_simple" in out and "twice the devices" in out
