"""The batch and LR arithmetic: hand computations and properties over k, optimizers and schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import syncstep
from common import Tiny, dataset, loader
from syncstep.plan import Warmup, lr_factor, plan_batch, resolve_rule, warmup_multiplier


def test_global_batch_is_devices_times_batch_times_accumulation():
    plan = plan_batch(per_device_batch_size=32, world_size=8, accumulate_grad_batches=4)
    assert (plan.global_batch_size, plan.k) == (1024, 32.0)


def test_global_batch_size_derives_accumulation():
    assert plan_batch(32, 2, global_batch_size=256).accumulate_grad_batches == 4
    assert plan_batch(32, 8, global_batch_size=256).accumulate_grad_batches == 1


def test_global_batch_size_that_does_not_divide_names_the_nearest_valid_sizes():
    with pytest.raises(ValueError, match=r"global_batch_size=100 .* 32 x world size 2 = 64.*64 or 128"):
        plan_batch(32, 2, global_batch_size=100)
    with pytest.raises(ValueError, match="Nearest valid global batch sizes: 64;"):
        plan_batch(32, 2, global_batch_size=16)


def test_conflicting_accumulation_and_global_batch():
    with pytest.raises(ValueError, match="accumulate_grad_batches=4 .* but accumulate_grad_batches=2 was given"):
        plan_batch(32, 2, accumulate_grad_batches=2, global_batch_size=256)


def test_auto_rule_by_optimizer_family():
    params = [torch.nn.Parameter(torch.zeros(1))]
    assert resolve_rule("auto", torch.optim.SGD(params, lr=1)) == "linear"
    assert resolve_rule("auto", torch.optim.AdamW(params, lr=1)) == "sqrt"
    assert resolve_rule("auto", torch.optim.RMSprop(params, lr=1)) == "sqrt"

    class MySGD(torch.optim.SGD):
        pass

    assert resolve_rule("auto", MySGD(params, lr=1)) == "linear"

    class Mystery(torch.optim.Optimizer):
        def __init__(self, p):
            super().__init__(p, {"lr": 1.0})

    with pytest.raises(ValueError, match="Pass Trainer\\(lr_scaling='linear'\\)"):
        resolve_rule("auto", Mystery(params))


@given(k=st.floats(min_value=0.125, max_value=4096, allow_nan=False))
def test_factors(k):
    assert lr_factor("linear", k) == k
    assert lr_factor("sqrt", k) == math.sqrt(k)
    assert lr_factor("none", k) == 1.0


@given(
    length=st.integers(1, 500),
    target=st.floats(0.1, 1000),
    kind=st.sampled_from(["linear", "exponential", "constant"]),
    start=st.one_of(st.none(), st.floats(0.001, 1.0)),
)
def test_warmup_is_monotone_starts_where_documented_and_ends_exactly(length, target, kind, start):
    warmup = Warmup(length, "step", kind, start)
    values = [warmup_multiplier(t, target, warmup) for t in range(length + 3)]
    expected_start = 1.0 if start is None else start * target
    assert values[0] == pytest.approx(expected_start, rel=1e-12)
    assert values[length] == target and values[-1] == target  # exactly, from step T on
    increasing = target >= expected_start
    pairs = list(zip(values, values[1:]))
    assert all((b >= a * (1 - 1e-12)) if increasing else (b <= a * (1 + 1e-12)) for a, b in pairs)


# -- the same properties through the Trainer, on real optimizers and schedulers ---------------------

SCHEDULERS = {
    "none": lambda opt: None,
    "step": lambda opt: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5), "interval": "step"},
    "multistep": lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [1, 2], 0.3),
    "cosine": lambda opt: {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20), "interval": "step"},
    "onecycle": lambda opt: {"scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, 0.5, total_steps=40),
                             "interval": "step"},
    "linear": lambda opt: {"scheduler": torch.optim.lr_scheduler.LinearLR(opt, 0.2, total_iters=5),
                           "interval": "step", "frequency": 2},
    "sequential": lambda opt: {"scheduler": torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.ConstantLR(opt, 0.5, total_iters=3),
              torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)], milestones=[3]), "interval": "step"},
    "lambda_epoch": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1 / (e + 1)),
}


class Scheduled(Tiny):
    """Tiny with one of SCHEDULERS; records the LR in the optimizer at every real ``step()``."""

    def __init__(self, optimizer: str, scheduler: str):
        super().__init__(lr=0.1, optimizer=optimizer)
        self.scheduler_name = scheduler
        self.applied: list[float] = []

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        opt.register_step_pre_hook(lambda o, args, kwargs: self.applied.append(o.param_groups[0]["lr"]))
        sched = SCHEDULERS[self.scheduler_name](opt)
        return opt if sched is None else ([opt], [sched])


def user_schedule(optimizer: str, scheduler: str, steps: int, steps_per_epoch: int) -> list[float]:
    """The reference: the user's scheduler on its own, stepped by hand as Lightning documents it (after
    every ``frequency``-th optimizer step for interval "step", after every epoch for "epoch")."""
    import warnings

    opt = Scheduled(optimizer, "none").configure_optimizers()
    config = SCHEDULERS[scheduler](opt)
    if isinstance(config, torch.optim.lr_scheduler.LRScheduler):
        config = {"scheduler": config}
    config = {"interval": "epoch", "frequency": 1, **(config or {})}
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": no step is taken here
        for step in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            if "scheduler" not in config:
                continue
            done = step + 1 if config["interval"] == "step" else (
                (step + 1) // steps_per_epoch if (step + 1) % steps_per_epoch == 0 else None)
            if done is not None and done % config["frequency"] == 0:
                config["scheduler"].step()
    return lrs


def applied_schedule(optimizer: str, scheduler: str, **kwargs) -> list[float]:
    """The LRs a real training run applied, one per optimizer step; also checks lr_schedule() predicts them."""
    trainer = syncstep.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_epochs=4,
                               enable_checkpointing=False, **kwargs)
    predicted = trainer.lr_schedule(Scheduled(optimizer, scheduler), loader(dataset(40), 4))
    model = Scheduled(optimizer, scheduler)
    trainer.fit(model, loader(dataset(40), 4))
    (values,) = predicted.values()
    assert model.applied == pytest.approx(values, rel=1e-12)
    return model.applied


@settings(max_examples=25, deadline=None)
@given(
    accumulation=st.integers(1, 6),
    reference=st.sampled_from([2, 4, 5, 8, 16]),
    optimizer=st.sampled_from(["sgd", "sgd_momentum", "adam"]),
    scheduler=st.sampled_from(sorted(SCHEDULERS)),
    rule=st.sampled_from(["linear", "sqrt", "auto", "none"]),
)
def test_scaling_multiplies_the_users_schedule_by_the_factor(accumulation, reference, optimizer, scheduler, rule):
    applied = applied_schedule(optimizer, scheduler, lr_scaling=rule, accumulate_grad_batches=accumulation,
                               reference_batch_size=reference)
    steps_per_epoch = math.ceil(40 / (4 * accumulation))
    assert len(applied) == 4 * steps_per_epoch
    k = 4 * accumulation / reference
    resolved = rule if rule != "auto" else ("sqrt" if optimizer == "adam" else "linear")
    factor = {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[resolved]
    expected = user_schedule(optimizer, scheduler, len(applied), steps_per_epoch)
    assert applied == pytest.approx([x * factor for x in expected], rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    accumulation=st.integers(2, 5),
    warmup_steps=st.integers(1, 12),
    scheduler=st.sampled_from(["none", "step", "cosine", "multistep"]),
)
def test_warmup_ramps_from_the_unscaled_to_the_scaled_schedule(accumulation, warmup_steps, scheduler):
    """warmup_steps counts steps at the reference batch (here the per-device batch 4)."""
    warm = applied_schedule("sgd", scheduler, lr_scaling="linear", accumulate_grad_batches=accumulation,
                            warmup_steps=warmup_steps)
    plain = user_schedule("sgd", scheduler, len(warm), math.ceil(40 / (4 * accumulation)))
    k = accumulation
    length = max(1, round(warmup_steps / k))
    assert warm[0] == pytest.approx(plain[0], rel=1e-12)  # the unscaled LR
    for t in range(len(plain)):
        multiplier = 1 + (k - 1) * min(t / length, 1)
        assert warm[t] == pytest.approx(plain[t] * multiplier, rel=1e-12)


def test_design_note_lambdalr_warmup_runs_unchanged():
    """The design note's configure_optimizers, verbatim, on one device: LR = 0.01 * (epoch + 1) / 5."""
    import torch.optim as optim
    from torch.optim.lr_scheduler import LambdaLR

    class DesignNote(Tiny):
        warmup_epochs = 5

        def configure_optimizers(self):
            optimizer = optim.Adam(self.parameters(), lr=0.01)

            # Define the warm-up function (Linear Warm-up)
            def lr_lambda(epoch):
                if epoch < self.warmup_epochs:
                    return (epoch + 1) / self.warmup_epochs  # Gradually increase LR
                return 1.0  # Keep LR constant after warm-up

            scheduler = LambdaLR(optimizer, lr_lambda=lr_lambda)

            return [optimizer], [{"scheduler": scheduler, "interval": "epoch"}]

    lrs_seen = []

    class Watch:
        def log_metrics(self, metrics, step):
            if "lr-Adam" in metrics:
                lrs_seen.append((metrics["epoch"], metrics["lr-Adam"]))

    trainer = syncstep.Trainer(accelerator="cpu", max_epochs=7, logger=[Watch()], log_every_n_steps=1,
                               enable_progress_bar=False, enable_checkpointing=False)
    model = DesignNote()
    trainer.fit(model, loader(dataset(12), 4))
    per_epoch = sorted(set(lrs_seen))
    assert [e for e, _ in per_epoch] == list(range(7))
    assert [lr for _, lr in per_epoch] == pytest.approx([0.01 * min(e + 1, 5) / 5 for e in range(7)], rel=1e-9)
    # At k = 2 (accumulation 2; Adam -> sqrt rule) the same code runs, scaled by sqrt(2).
    lrs_seen.clear()
    trainer = syncstep.Trainer(accelerator="cpu", max_epochs=3, logger=[Watch()], log_every_n_steps=1,
                               accumulate_grad_batches=2, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(DesignNote(), loader(dataset(16), 4))
    per_epoch = sorted(set(lrs_seen))
    assert [e for e, _ in per_epoch] == list(range(3))
    assert [lr for _, lr in per_epoch] == pytest.approx([0.01 * (e + 1) / 5 * math.sqrt(2) for e in range(3)], rel=1e-9)
