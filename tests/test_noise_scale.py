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
from common import Quadratic, dataset, exact, make_net, quadratic_data
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
ADASCALE_DDP = {"name": "adascale", "n": 64, "batch_size": 4, "steps": 12, "lr_scaling": "adascale"}


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
    spec.write_text(json.dumps([*PLUMBING, ADASCALE_DDP]))
    run([sys.executable, str(SCRIPTS / "noise_ddp.py"), str(spec)], timeout=240, cwd=str(tmp))
    return {c["name"]: [torch.load(tmp / f"{c['name']}.rank{r}.pt", weights_only=False) for r in range(2)]
            for c in [*PLUMBING, ADASCALE_DDP]}


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


# -- AdaScale: the gain and tau on a quadratic whose gradient mean and covariance are known -------------

class Recorder:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append({"step": step, **metrics})

    def finalize(self):
        pass


@pytest.mark.parametrize("noise, expected", [(20.0, "k"), (0.0, "1"), (1.6, "formula")])
def test_adascale_gain_and_tau_follow_the_formula(noise, expected):
    dim, n, k = 10, 512, 8
    data = quadratic_data(n, dim, noise)
    grad_sq, trace = exact(data)
    recorder = Recorder()
    trainer = syncstep.Trainer(max_steps=40, lr_scaling="adascale", accumulate_grad_batches=k, log_every_n_steps=5,
                               reference_batch_size=8, enable_progress_bar=False, logger=[recorder],
                               enable_checkpointing=False, enable_model_summary=False, seed=0)
    trainer.fit(Quadratic(dim, lr=1e-9), DataLoader(data, batch_size=8, shuffle=True))  # (w stays ~0)
    rows = [r for r in recorder.rows if "noise_scale/gain" in r]
    r_final = rows[-1]["noise_scale/gain"]
    r_exact = (trace / 8 + grad_sq) / (trace / 64 + grad_sq)
    if expected == "k":  # B_simple = 4000 >> 64: nearly every sample counts
        assert r_exact > 7.8 and 0.85 * k < r_final <= k  # (|G|^2 is the noisy part here: r near k, not r_exact)
    elif expected == "1":  # no noise: a bigger batch buys nothing
        assert trace == 0 and r_final == pytest.approx(1.0, abs=1e-6)
    else:  # B_simple = 25.6, between the reference batch and the global one: r = 4.2 / 1.4 = 3
        assert r_exact == pytest.approx(3.0, rel=1e-3) and r_final == pytest.approx(r_exact, rel=0.05)
    # tau = sum of the gain in force at each step: 1 until the first estimate, then each logged gain
    gains = [1.0] + [r["noise_scale/gain"] for r in rows]
    for i, row in enumerate(rows):
        assert row["adascale/tau"] == pytest.approx(5 * sum(gains[:i + 1]), rel=1e-12)
        assert row["lr-SGD"] == pytest.approx(1e-9 * gains[i], rel=1e-12)  # the LR the last step applied
    # the run ends at the first step where tau reaches the reference run's 40 x 8 = 320 steps
    tau, steps = 0.0, 0
    while tau < 320 - 1e-9:
        tau, steps = tau + gains[steps // 5], steps + 1
    assert trainer.global_step == steps
    assert trainer._checkpointer.stepper.adascale.tau == pytest.approx(tau, rel=1e-12)


def test_adascale_resumes_exactly_mid_block_with_schedulers_following_tau(tmp_path):
    data = quadratic_data(128, 10, 1.6)

    def trainer(**kwargs):
        return syncstep.Trainer(max_epochs=4, lr_scaling="adascale", accumulate_grad_batches=4, log_every_n_steps=2,
                                reference_batch_size=8, enable_progress_bar=False, logger=False, seed=0,
                                enable_model_summary=False, default_root_dir=str(tmp_path), ckpt_every_n_steps=3,
                                keep_last=100, **kwargs)

    whole = trainer()
    model = Quadratic(10, lr=0.05, scheduler=True)
    whole.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    adascale = whole._checkpointer.stepper.adascale
    # the cosine (T_max = 4 epochs) stepped once per reference epoch of tau: 4 x 4 steps x k = 4
    assert adascale.tau >= 64 and adascale.gain > 1.5
    assert whole.lr_scheduler_configs[0].scheduler.last_epoch == 4
    assert whole.global_step < 64 and whole.current_epoch >= 4  # more epochs than planned, fewer steps than k = 1
    final = {k: v.clone() for k, v in model.state_dict().items()}

    resumed = trainer()
    again = Quadratic(10, lr=0.05, scheduler=True)
    resumed.fit(again, DataLoader(data, batch_size=8, shuffle=True),
                ckpt_path=str(tmp_path / "checkpoints" / "epoch=2-step=9.ckpt"))
    for key, value in again.state_dict().items():
        assert torch.equal(value, final[key]), key
    assert resumed._checkpointer.stepper.adascale.tau == adascale.tau
    assert resumed.global_step == whole.global_step
    assert repr(resumed.noise_scale["history"]) == repr(whole.noise_scale["history"])  # (nan == nan in repr)


# -- LARS / LAMB under lr_scaling="auto" -----------------------------------------------------------------

class LARS(torch.optim.SGD):
    """Stands in for a LARS optimizer (timm / pytorch-optimizer are not dependencies): only the name counts."""


class Lamb(torch.optim.Adam):
    """Stands in for timm's Lamb, which clips the gradient norm itself (max_grad_norm, default 1.0)."""

    def __init__(self, params, lr=1e-3, max_grad_norm=1.0):
        super().__init__(params, lr=lr)
        for group in self.param_groups:
            group["max_grad_norm"] = max_grad_norm


def test_lars_is_linear_lamb_is_sqrt_and_double_clipping_is_said():
    from syncstep.plan import double_clipping, lr_factor, resolve_rule

    w = [torch.nn.Parameter(torch.zeros(2))]
    assert resolve_rule("auto", LARS(w, lr=0.1)) == "linear" and lr_factor("linear", 4) == 4
    assert resolve_rule("auto", Lamb(w)) == "sqrt" and lr_factor("sqrt", 4) == 2
    assert resolve_rule("adascale", LARS(w, lr=0.1)) == "adascale"
    assert resolve_rule("adascale", Lamb(w)) == "adascale-sqrt"
    message = double_clipping([Lamb(w)], 0.5)
    assert "clipped twice" in message and "max_grad_norm=1.0" in message
    assert double_clipping([Lamb(w, max_grad_norm=None)], 0.5) is None
    assert double_clipping([Lamb(w)], None) is None


def test_adascale_without_a_measurable_noise_scale_is_an_error_that_says_why():
    trainer = syncstep.Trainer(max_steps=2, lr_scaling="adascale", reference_batch_size=8, **QUIET)
    with pytest.raises(ValueError, match="not measurable with one batch per step.*accumulate_grad_batches >= 2"):
        trainer.fit(Frozen(False), DataLoader(digits_subset(64), batch_size=16))


def test_adascale_on_ddp_applies_one_gain_on_every_rank(ddp_norms):
    """Every rank derives the gain from the same all-reduced sums: the same LR, tau and weights everywhere."""
    first, second = ddp_norms["adascale"]
    assert first["gain"] == second["gain"] and first["tau"] == second["tau"]
    # k = 2 (2 processes x batch 4 against the per-device reference 4): the gain by hand from the run's
    # moving averages, r = (t/4 + g) / (t/8 + g) kept in [1, 2]; a |G|^2 not above 0 (noise only) gives k
    g, t = first["result"]["grad_sq"], first["result"]["trace_sigma"]
    expected = 2.0 if g <= 0 else min(max((t / 4 + g) / (t / 8 + g), 1.0), 2.0)
    assert first["gain"] == pytest.approx(expected, rel=1e-9)
    assert first["tau"] >= 12 * 2 and first["global_step"] == second["global_step"] > 12
    for key, value in first["params"].items():
        assert torch.equal(value, second["params"][key]), key
