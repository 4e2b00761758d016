"""The gradient noise scale, measured from the gradients data parallelism computes anyway.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", App. A): a step computes W
gradients of small batches (B_small samples each) and their mean, the gradient of the big batch
(B_big = W x B_small). With G the true gradient and Sigma the per-sample covariance,
E|g_B|^2 = |G|^2 + tr(Sigma) / B, so two batch sizes give unbiased estimates of both terms:

    |G|^2     ~ (W |g_big|^2 - mean |g_small|^2) / (W - 1)
    tr(Sigma) ~ B_small W (mean |g_small|^2 - |g_big|^2) / (W - 1)
    B_simple  = tr(Sigma) / |G|^2       (the ratio of the two averages, never the average of ratios)

Where the small batches come from:

    ddp, W > 1 processes       each replica's local gradient (B_small = per-device batch x accumulation),
                               read by a DDP communication hook before and after the all-reduce
    single, dp (accumulation   each micro-batch's gradient (the difference of the accumulated gradient
      A >= 2)                  around its backward); W = A, B_small = the micro-batch over all replicas

Sampling without replacement (an epoch is a permutation of N samples) makes E|g_B|^2 = |G|^2 +
tr(Sigma) (N - B) / (B (N - 1)); the plain estimators then find |G|^2 - tr(Sigma) / (N - 1) and
tr(Sigma) N / (N - 1), which is corrected here when N is known.

Cost: per step, a squared norm per bucket (or per micro-batch) and one small add on the device; no
collective and no host sync. Each process keeps running sums that are all-reduced at logging steps;
the steps between two logging steps form a block, whose estimates feed an exponential moving average
(of |G|^2 and tr(Sigma) separately) and the block-to-block spread gives the confidence interval.
Measured before clipping, on unscaled gradients (16-bit), skipping non-finite and short final steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# The moving average's memory: about 100 steps at the reference batch, i.e. 100 x reference_batch_size
# samples (100 / k optimizer steps at k x the batch; one step's estimate is about k times less noisy).
EMA_DECAY_PER_REFERENCE_STEP = 0.99
Z_95 = 1.96


def measurable(strategy: Any, batch: Any) -> tuple[str | None, int, int, str]:
    """(source, W small batches per step, B_small, why not) for this strategy and batch plan."""
    from syncstep.strategies.ddp import DDP  # (the running strategy; DDPStrategy is its options)

    if isinstance(strategy, DDP) and batch.world_size > 1:
        return "ddp", batch.world_size, batch.per_device_batch_size * batch.accumulate_grad_batches, ""
    if strategy.name in ("single", "dp") or (isinstance(strategy, DDP) and batch.world_size == 1):
        if batch.accumulate_grad_batches >= 2:
            return ("micro", batch.accumulate_grad_batches,
                    batch.per_device_batch_size * batch.world_size, "")
        return None, 0, 0, ("one batch per step: with one process the small batches are the micro-batches, "
                            "so pass accumulate_grad_batches >= 2 (or a global_batch_size that needs it), or "
                            "train with strategy='ddp' on 2 or more devices")
    return None, 0, 0, f"strategy={strategy.name!r} does not expose each replica's gradient (use 'ddp')"


def estimates(mean_small: float, mean_big: float, w: int, small_batch: int,
              num_samples: int | None) -> tuple[float, float, float]:
    """(|G|^2, tr(Sigma), uncorrected |G|^2) from the mean squared norms of the small and big batches."""
    grad_sq = (w * mean_big - mean_small) / (w - 1)
    trace = small_batch * w * (mean_small - mean_big) / (w - 1)
    uncorrected = grad_sq
    if num_samples and num_samples > 1:  # without replacement: see the module docstring
        grad_sq, trace = grad_sq + trace / num_samples, trace * (num_samples - 1) / num_samples
    return grad_sq, trace, uncorrected


def b_simple(grad_sq: float, trace: float) -> float:
    return trace / grad_sq if grad_sq > 0 else math.inf


def gain(grad_sq: float, trace: float, reference_batch: int, global_batch: int) -> float:
    """AdaScale's gain r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2), sigma^2 = tr(Sigma) / reference batch,
    S = global / reference batch: S while the noise dominates, 1 in the noise-free limit (kept in [1, S])."""
    scale = global_batch / reference_batch
    if trace <= 0 or not math.isfinite(trace):
        return 1.0
    if grad_sq <= 0:
        return float(scale)
    r = (trace / reference_batch + grad_sq) / (trace / global_batch + grad_sq)
    return min(max(r, 1.0), scale) if scale >= 1 else min(max(r, scale), 1.0)


class _Average:
    """Exponential moving average of a few block values, bias-corrected, with the variance of the
    average from the blocks' spread (n_eff = (sum w)^2 / sum w^2 for i.i.d. blocks)."""

    def __init__(self, state: dict | None = None) -> None:
        self.s1 = self.s2 = 0.0
        self.mean = [0.0, 0.0]  # grad_sq, trace
        self.moment = [0.0, 0.0, 0.0]  # E[g^2], E[t^2], E[g t]
        if state:
            self.__dict__.update(state)

    def update(self, decay: float, grad_sq: float, trace: float) -> None:
        a = 1.0 - decay
        self.s1 = decay * self.s1 + a
        self.s2 = decay * decay * self.s2 + a * a
        for i, x in enumerate((grad_sq, trace)):
            self.mean[i] = decay * self.mean[i] + a * x
        for i, x in enumerate((grad_sq * grad_sq, trace * trace, grad_sq * trace)):
            self.moment[i] = decay * self.moment[i] + a * x

    def values(self) -> tuple[float, float]:
        return (self.mean[0] / self.s1, self.mean[1] / self.s1) if self.s1 else (math.nan, math.nan)

    def ci(self) -> tuple[float, float]:
        if not self.s1 or self.s1 * self.s1 / self.s2 < 2:
            return math.nan, math.nan
        g, t = self.values()
        n_eff = self.s1 * self.s1 / self.s2
        vg, vt, c = (m / self.s1 for m in self.moment)
        return ratio_interval(g, t, (vg - g * g) / n_eff, (vt - t * t) / n_eff, (c - g * t) / n_eff)


def ratio_interval(g: float, t: float, var_g: float, var_t: float, cov: float) -> tuple[float, float]:
    """95% interval of B = t / g by the delta method (high = inf when |G|^2 is not clearly above 0)."""
    if g <= 0:
        return (t / abs(g) if g < 0 and t > 0 else 0.0), math.inf
    b = t / g
    var = b * b * (max(var_t, 0) / (t * t) + max(var_g, 0) / (g * g) - 2 * cov / (t * g)) if t > 0 else math.inf
    sd = math.sqrt(max(var, 0.0))
    if g - Z_95 * math.sqrt(max(var_g, 0)) <= 0:
        return max(b - Z_95 * sd, 0.0), math.inf
    return max(b - Z_95 * sd, 0.0), b + Z_95 * sd


def norm(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-norm, accumulated in float32 at least (never a float64 copy of a bucket: that costs 30x)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(tensor, dtype=torch.float32)
    return torch.linalg.vector_norm(tensor)


class NoiseScale:
    """Running sums on the device, folded into block estimates at logging steps (every rank calls
    ``log_values`` there: it all-reduces)."""

    def __init__(self, *, source: str, w: int, small_batch: int, batch: Any, num_samples: int | None,
                 params: list[torch.Tensor], device: torch.device, all_reduce: Any, scaler: Any = None,
                 processes: int = 1, all_gather_object: Any = None) -> None:
        self.source, self.w, self.small_batch = source, w, small_batch
        self.global_batch, self.reference_batch = batch.global_batch_size, batch.reference_batch_size
        self.num_samples = num_samples
        self.params, self.device, self.all_reduce, self.scaler = params, device, all_reduce, scaler
        self.processes = processes  # how many processes hold running sums
        self.all_gather_object = all_gather_object or (lambda obj: [obj])
        # sum of small-batch |g|^2, number of small batches, sum of big-batch |g|^2, steps (this process)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self._one = torch.ones((), dtype=torch.float64, device=device)
        # this step's norms: ddp, of each bucket before / after the all-reduce; micro, of what each
        # micro-batch added to each parameter's gradient / of the step's gradients
        self._local: list[torch.Tensor] = []
        self._averaged: list[torch.Tensor] = []
        self._previous: list[torch.Tensor] | None = None
        self._micro = 0
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean small, big) of the last full step
        self.average = _Average()
        # per block: global_step, steps, grad_sq, trace, uncorrected grad_sq; then the moving average's
        # B_simple and its 95% interval after it
        self.blocks: list[list[float]] = []
        self.steps = 0

    def set_batch(self, batch: Any, w: int, small_batch: int, global_step: int | None) -> None:
        """A batch ramp changed the accumulation: the steps so far end a block (every rank calls this: it
        all-reduces), and the next ones are measured at the new batch. ``global_step`` None: a resume,
        whose restored sums are already those of the new batch."""
        if global_step is not None:
            self.log_values(global_step)
        self.w, self.small_batch = w, small_batch
        self.global_batch = batch.global_batch_size
        self._previous = None

    # -- ddp: the communication hook wrapper (strategies/comm_hooks.register) ----------------------
    def comm_hook_wrapper(self, state: Any, hook: Any) -> tuple[Any, Any]:
        """``hook`` with the bucket's norm read before it (local gradient) and after its future resolves
        (the averaged gradient as the optimizer sees it, after any decompression)."""
        local, averaged = self._local, self._averaged

        def after(future: Any) -> torch.Tensor:
            value = future.value()
            tensor = value[0] if isinstance(value, (list, tuple)) else value
            averaged.append(norm(tensor))
            return tensor

        def observed(hook_state, bucket):  # (no annotations: DDP checks them against its own types)
            local.append(norm(bucket.buffer()))
            return hook(hook_state, bucket).then(after)

        return state, observed

    # -- single / dp: the micro-batches are the small batches --------------------------------------
    def after_backward(self) -> None:
        """After a micro-batch's backward: the norms of what it added to the gradients. In a full step each
        micro-batch has loss weight 1 / A, so its own gradient is A x that (only full steps are kept)."""
        grads, previous = [], []
        if self._previous is None:
            self._previous = [torch.zeros_like(p) for p in self.params]
        for p, prev in zip(self.params, self._previous):
            if p.grad is not None:
                grads.append(p.grad)
                previous.append(prev)
            elif self._micro == 0:
                prev.zero_()
        if not grads:
            return
        deltas = grads if self._micro == 0 else torch._foreach_sub(grads, previous)
        self._local += torch._foreach_norm(deltas)
        self._micro += 1
        if self._micro < self.w:  # (after the step's last micro-batch nothing needs the copy)
            torch._foreach_copy_(previous, grads)

    # -- once per optimizer step, before clipping ---------------------------------------------------
    def end_step(self, full: bool) -> None:
        """Fold this step's norms into the running sums (``full``: the step had a whole global batch)."""
        local, averaged, micro = list(self._local), list(self._averaged), self._micro
        self._local.clear()  # (in place: the DDP hook holds these lists)
        self._averaged.clear()
        self._micro = 0
        if self.source == "micro":  # the big batch: the gradients as the step leaves them
            grads = [p.grad for p in self.params if p.grad is not None]
            averaged = list(torch._foreach_norm(grads)) if grads and full and micro == self.w else []
            count, scale = float(micro), float(micro * micro)
        else:
            count, scale = 1.0, 1.0
        if not full or not local or not averaged:
            return
        squares = torch.stack(local + averaged).double().square()
        small, big = squares[:len(local)].sum() * scale, squares[len(local):].sum()
        if self.scaler is not None:  # 16-bit: the gradients are scaled by S; their squares by S^2
            inverse = self.scaler._get_scale_async().double().reciprocal().square()
            small, big = small * inverse, big * inverse
        values = torch.stack([small, self._one * count, big, self._one])  # (no host-to-device copy per step)
        self.sums += torch.where(torch.isfinite(values).all(), values, 0.0)
        self.last = (small / count, big)

    # -- at logging steps (every rank) -------------------------------------------------------------
    def log_values(self, global_step: int) -> dict[str, float]:
        """All-reduce the sums since the last logging step into one block; the logged values."""
        total = self.all_reduce(self.sums.clone(), "sum").tolist()
        self.sums.zero_()
        small_sum, small_count, big_sum, step_count = total
        if step_count > 0 and small_count > 0:
            steps = round(step_count / self.processes)  # (every process counts each step)
            grad_sq, trace, uncorrected = estimates(small_sum / small_count, big_sum / step_count, self.w,
                                                    self.small_batch, self.num_samples)
            decay = EMA_DECAY_PER_REFERENCE_STEP ** (steps * self.global_batch / self.reference_batch)
            self.average.update(decay, grad_sq, trace)
            self.blocks.append([global_step, steps, grad_sq, trace, uncorrected, b_simple(*self.current()),
                                *self.average.ci()])
            self.steps += steps
        return self.metrics()

    def current(self) -> tuple[float, float]:
        """The moving averages (|G|^2, tr(Sigma)); nan before the first block."""
        return self.average.values()

    def metrics(self) -> dict[str, float]:
        grad_sq, trace = self.current()
        if math.isnan(grad_sq):
            return {}
        r = gain(grad_sq, trace, self.reference_batch, self.global_batch)
        return {"noise_scale/b_simple": b_simple(grad_sq, trace), "noise_scale/trace_sigma": trace,
                "noise_scale/grad_sq": grad_sq, "noise_scale/gain": r,
                "noise_scale/step_efficiency": r * self.reference_batch / self.global_batch}

    def result(self) -> dict[str, Any]:
        """``trainer.noise_scale`` after fit: the moving averages now, their interval, and the run's means."""
        grad_sq, trace = self.current()
        out: dict[str, Any] = {"b_simple": b_simple(grad_sq, trace), "trace_sigma": trace, "grad_sq": grad_sq,
                               "ci": self.average.ci(), "steps": self.steps, "source": self.source,
                               "small_batch": self.small_batch, "small_batches_per_step": self.w,
                               "global_batch": self.global_batch, "num_samples": self.num_samples,
                               "history": [tuple(b) for b in self.blocks]}
        out.update(run_means(self.blocks))
        return out

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every rank's unreduced sums (gathered: every rank calls this) and the averages so far."""
        return {"sums": self.all_gather_object(self.sums.tolist()), "average": dict(self.average.__dict__),
                "blocks": [list(b) for b in self.blocks], "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any], rank: int) -> None:
        sums = state["sums"]
        if len(sums) == self.processes:
            mine = sums[rank]
        else:  # another process count: the sums only ever meet in a sum, so rank 0 takes them all
            mine = [sum(col) for col in zip(*sums)] if rank == 0 else [0.0] * 4
        self.sums = torch.tensor(mine, dtype=torch.float64, device=self.device)
        self.average = _Average(state["average"])
        self.blocks = [list(b) for b in state["blocks"]]
        self.steps = state["steps"]


def run_means(blocks: list[list[float]]) -> dict[str, Any]:
    """The run's means over all blocks (weighted by their steps) and standard errors from their spread."""
    if not blocks:
        return {}
    weights = [b[1] for b in blocks]
    total = sum(weights)
    out: dict[str, Any] = {}
    for name, i in (("grad_sq", 2), ("trace_sigma", 3), ("grad_sq_uncorrected", 4)):
        values = [b[i] for b in blocks]
        mean = sum(w * v for w, v in zip(weights, values)) / total
        n = len(values)
        var = sum(w * (v - mean) ** 2 for w, v in zip(weights, values)) / total * n / max(n - 1, 1)
        out[f"{name}_run"], out[f"{name}_run_se"] = mean, math.sqrt(var / n) if n > 1 else math.nan
    g, t = out["grad_sq_run"], out["trace_sigma_run"]
    out["b_simple_run"] = b_simple(g, t)
    n = len(blocks)
    if n > 1:
        gs, ts = [b[2] for b in blocks], [b[3] for b in blocks]
        cov = sum((a - g) * (c - t) for a, c in zip(gs, ts)) / (n - 1) / n
        out["ci_run"] = ratio_interval(g, t, out["grad_sq_run_se"] ** 2, out["trace_sigma_run_se"] ** 2, cov)
    return out


def wanted(config: Any) -> bool:
    """Whether the fit measures the noise scale: asked for, or needed by AdaScale or the noise ramp."""
    return config.noise_scale or config.lr_scaling == "adascale" or config.batch_ramp == "noise"


def build(config: Any, strategy: Any, plan: Any, scaler: Any, params: list[torch.Tensor],
          model: Any) -> NoiseScale | None:
    """The meter of a fit, or None when ``noise_scale`` is off or cannot be measured (see ``summary_line``)."""
    if not wanted(config):
        return None
    if not model.automatic_optimization:
        raise ValueError("noise_scale=True, lr_scaling='adascale' and batch_ramp='noise' need automatic "
                         "optimization: with automatic_optimization = False your training_step steps the optimizers, "
                         "and syncstep cannot see each step's gradients before it. Set noise_scale=False, and another "
                         "lr_scaling / no batch_ramp.")
    source, w, small_batch, _ = measurable(strategy, plan.batch)
    if source is None:
        return None
    train = plan.train
    exact = train.distributed_sampler and train.info.shuffle and train.info.custom_sampler is None
    num_samples = train.num_samples if exact else None  # the population each step samples from
    meter = NoiseScale(source=source, w=w, small_batch=small_batch, batch=plan.batch, num_samples=num_samples,
                       params=params, device=strategy.root_device, all_reduce=strategy.all_reduce, scaler=scaler,
                       processes=strategy.num_processes, all_gather_object=strategy.all_gather_object)
    return meter  # (under ddp the fit loop registers meter.comm_hook_wrapper with the strategy's hook)


def finish(trainer: Any, meter: NoiseScale, global_step: int) -> None:
    """At the end of fit (every rank): the steps since the last logging step as a last block,
    ``trainer.noise_scale``, and the report on rank 0."""
    meter.log_values(global_step)
    trainer.noise_scale = meter.result()
    trainer.print(report(meter))


def summary_line(config: Any, strategy: Any, batch: Any) -> str | None:
    """The start-up summary's line on the noise scale (None when it is off)."""
    if not wanted(config):
        return None
    if not config.noise_scale and config.batch_ramp != "noise" and batch.k == 1:
        return None
    source, w, small_batch, why = measurable(strategy, batch)
    if source is None:
        return f"  noise scale: not measurable with {why}"
    what = "replicas' gradients (DDP hook)" if source == "ddp" else "micro-batches' gradients"
    why = "" if config.noise_scale else " (on for batch_ramp='noise')" if config.batch_ramp == "noise" else \
        " (on for lr_scaling='adascale')"
    return (f"  noise scale{why}: from {w} {what} of {small_batch} samples each per step, "
            f"averaged over blocks of log_every_n_steps={config.log_every_n_steps} steps")


def report(meter: NoiseScale) -> str:
    """The end-of-fit lines on rank 0: B_simple now and at the start, the gain at this batch, and what
    doubling the devices would buy."""
    result = meter.result()
    if not meter.blocks:
        return "syncstep: noise scale: no full step was measured (no logging step was reached)."
    first = meter.blocks[0]
    low, high = result["ci"]
    k = meter.global_batch / meter.reference_batch
    grad_sq, trace = result["grad_sq"], result["trace_sigma"]
    r = gain(grad_sq, trace, meter.reference_batch, meter.global_batch)
    r2 = gain(grad_sq, trace, meter.reference_batch, 2 * meter.global_batch)
    interval = "" if math.isnan(low) else f" (95% interval {low:.4g} to {high:.4g})"
    lines = [
        f"syncstep: noise scale: B_simple {result['b_simple']:.4g} now{interval}, "
        f"{b_simple(first[2], first[3]):.4g} at the start (step {first[0]}); over {meter.steps} measured steps",
        f"  at global batch {meter.global_batch} (k = {k:.4g}): linear scaling assumes a gain of {k:.4g}, the "
        f"noise model gives {r:.3g} (step efficiency {r / k:.2f})",
        f"  twice the devices (global batch {2 * meter.global_batch}) would make each step worth {r2 / r:.3g}x "
        f"the present one ({'close to' if r2 / r > 1.8 else 'well short of'} the 2x that linear scaling assumes)",
    ]
    return "\n".join(lines)
