"""``lr_scaling="adascale"``: the LR gain from the measured noise scale, and progress counted in it.

AdaScale (Johnson et al., ICML 2020) at a global batch S x the reference batch:

    gain          r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2),   sigma^2 = tr(Sigma) / reference batch,
                  mu^2 = |G|^2  (noise_scale.gain: S while the noise dominates, 1 without noise)
    multiplier    r for SGD-like optimizers, sqrt(r) for adaptive ones (the square-root rule's reasoning)
    progress      tau = sum of r over the optimizer steps taken: "scale-invariant iterations", the number
                  of reference-batch steps this run's steps are worth

r starts at 1 and is refreshed at every logging step from the moving averages of |G|^2 and tr(Sigma)
(noise_scale.py), so no host sync is added per step. The user's step-interval schedulers step once per
whole unit of tau, the epoch-interval ones once per reference epoch of tau (k x the steps of an epoch
here), and training ends when tau reaches the reference run's steps (the planned steps x k): a run at
k x the batch makes the progress of the reference run in fewer optimizer steps, taking more epochs
than planned when r < k (at most k x as many).
"""

from __future__ import annotations

import math
from typing import Any

from syncstep import noise_scale
from syncstep.noise_scale import gain
from syncstep.optim import step_schedulers


class AdaScale:
    def __init__(self, *, meter: Any, rules: list[str], batch: Any, steps_per_epoch: int, total_steps: int) -> None:
        self.meter, self.rules = meter, rules
        self.reference_batch, self.global_batch = batch.reference_batch_size, batch.global_batch_size
        self.k = batch.k
        self.gain = 1.0
        self.tau = 0.0
        self.target = total_steps * self.k  # the reference run's optimizer steps
        self.reference_steps_per_epoch = max(steps_per_epoch, 1) * self.k
        self.factors = [1.0] * len(rules)

    @property
    def done(self) -> bool:
        """Whether the run has made the reference run's progress (with a little slack for rounding)."""
        return self.tau >= self.target - 1e-9

    def refresh(self) -> None:
        """At a logging step, after the meter's new block: the gain from its moving averages."""
        if self.meter is None:
            return
        grad_sq, trace = self.meter.current()
        if math.isnan(grad_sq):
            return
        self.gain = gain(grad_sq, trace, self.reference_batch, self.global_batch)
        self.factors = [math.sqrt(self.gain) if rule == "adascale-sqrt" else self.gain for rule in self.rules]

    def apply(self, multipliers: list[float]) -> list[float]:
        """The plan's multipliers (warmup) x each optimizer's gain factor."""
        return [m * f for m, f in zip(multipliers, self.factors)]

    def advance(self, scheduler_configs: list, metric_values: dict) -> None:
        """After an optimizer step: tau += r, and the schedulers for each whole step / epoch of tau passed."""
        old, self.tau = self.tau, self.tau + self.gain
        if not scheduler_configs:
            return
        for count in range(math.floor(old) + 1, math.floor(self.tau) + 1):
            step_schedulers(scheduler_configs, "step", count, metric_values)
        per_epoch = self.reference_steps_per_epoch
        for count in range(math.floor(old / per_epoch) + 1, math.floor(self.tau / per_epoch) + 1):
            step_schedulers(scheduler_configs, "epoch", count, metric_values)

    def max_epochs(self, max_epochs: int | None) -> int | None:
        """The epochs the loop may run: up to ceil(k) x max_epochs, as r >= 1 (tau ends the run before)."""
        return None if max_epochs is None else max_epochs * max(math.ceil(self.k), 1)

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "gain": self.gain, "factors": list(self.factors), "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau, self.gain, self.target = state["tau"], state["gain"], state["target"]
        self.factors = list(state["factors"])


def build(config: Any, strategy: Any, plan: Any, meter: Any) -> AdaScale | None:
    """lr_scaling="adascale": the gain and tau of the run (its noise scale measured by ``meter``)."""
    if config.lr_scaling != "adascale":
        return None
    if meter is None and plan.batch.k != 1:
        _, _, _, why = noise_scale.measurable(strategy, plan.batch)
        raise ValueError(f"lr_scaling='adascale' takes its gain from the gradient noise scale, which is not "
                         f"measurable with {why}; or use lr_scaling='linear' / 'sqrt'.")
    return AdaScale(meter=meter, rules=[o.rule for o in plan.lr.optimizers], batch=plan.batch,
                    steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps)


def summary_line(total_steps: int, k: float, max_epochs: int | None) -> str:
    epochs = f", at most {max_epochs * max(math.ceil(k), 1)} epochs" if max_epochs is not None else ""
    return (f"  adascale: LR x gain r (sqrt(r) for adaptive optimizers), r = 1 until the first noise estimate, "
            f"then refreshed at each logging step; the schedulers and the end of training follow tau = sum of r "
            f"(scale-invariant steps): training ends at tau = {total_steps * k:.6g}, the reference run's steps "
            f"({total_steps} x k = {k:.6g}), after {total_steps} optimizer steps if r stays at k and up to "
            f"{math.ceil(total_steps * k)} if r falls to 1{epochs}")
