"""Batch and learning-rate arithmetic, derived once, checked, and printed.

Everything here is a pure function of the numbers the user gave and the world the run is in, so it is
tested without a process group and printed before the first step.

The math, in one place:

    global batch      G = per_device_batch_size x world_size x accumulate_grad_batches
    scaling factor    k = G / reference_batch_size     (reference = the batch the LR was tuned for)
    LR multiplier     linear: k     sqrt: sqrt(k)     none: 1          (Goyal et al. 2017; Krizhevsky 2014)
                      adascale: 1 here; the gain r measured during the run (r or sqrt(r)) is applied by
                      step.py on top (adascale.py; Johnson et al. 2020)
    warmup            m(t) goes from m0 (default 1, the unscaled LR) to the multiplier at t = T and
                      stays there; t counts optimizer steps (or epochs, with warmup_interval="epoch")

The multiplier is applied on top of whatever LR the user's scheduler sets, at optimizer-step time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

LR_SCALING_RULES = ("auto", "linear", "sqrt", "none", "adascale")
WARMUP_KINDS = ("linear", "constant", "exponential")
WARMUP_INTERVALS = ("step", "epoch")

# "auto" picks the rule from the optimizer class (or any base class) by name. SGD-style updates are
# proportional to the averaged gradient, so the linear rule keeps the per-sample step the same.
# Adaptive optimizers normalise the gradient; the square-root rule is the usual choice there.
_LINEAR_FAMILY = ("SGD", "ASGD", "LARS", "Lars")  # LARS: SGD with a per-layer trust ratio (You et al. 2017)
_ADAPTIVE_FAMILY = (
    "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "Adagrad", "Adadelta", "RMSprop",
    "Adafactor", "LAMB", "Lamb", "Lion", "Adan", "Shampoo", "SophiaG", "Muon",
)


def resolve_rule(rule: str, optimizer: object) -> str:
    """Return "linear", "sqrt" or "none" for this optimizer ("adascale" or "adascale-sqrt" for adascale);
    "auto" and "adascale" decide by the optimizer's class."""
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"lr_scaling={rule!r} is not one of {LR_SCALING_RULES}.")
    if rule == "adascale":
        return "adascale" if resolve_rule("auto", optimizer) == "linear" else "adascale-sqrt"
    if rule != "auto":
        return rule
    names = [cls.__name__ for cls in type(optimizer).__mro__]
    if any(name in _LINEAR_FAMILY for name in names):
        return "linear"
    if any(name in _ADAPTIVE_FAMILY for name in names):
        return "sqrt"
    raise ValueError(
        f"lr_scaling='auto' does not know whether {type(optimizer).__name__} is SGD-like or adaptive, "
        "so it cannot pick a scaling rule. Pass Trainer(lr_scaling='linear') for SGD-like updates, "
        "'sqrt' for adaptive (Adam-like) ones, or 'none' to keep your learning rate as it is."
    )


def double_clipping(optimizers: list, gradient_clip_val: float | None) -> str | None:
    """A warning when a LAMB that clips the gradient norm itself (timm's ``max_grad_norm``, default 1.0)
    meets ``gradient_clip_val``: the gradients would be clipped twice, to two different norms."""
    if gradient_clip_val is None:
        return None
    for opt in optimizers:
        names = {cls.__name__ for cls in type(opt).__mro__}
        clips = {group.get("max_grad_norm") for group in opt.param_groups} - {None, 0}
        if names & {"LAMB", "Lamb"} and clips:
            return (f"{type(opt).__name__} clips the gradient norm itself (max_grad_norm={sorted(clips)[0]}), and "
                    f"Trainer(gradient_clip_val={gradient_clip_val}) clips it before: the gradients are clipped "
                    "twice. Keep one: pass max_grad_norm=None to the optimizer, or drop gradient_clip_val.")
    return None


def lr_factor(rule: str, k: float) -> float:
    """The LR multiplier for a global batch k times the reference batch."""
    if rule == "linear":
        return float(k)
    if rule == "sqrt":
        return math.sqrt(k)
    if rule in ("none", "adascale", "adascale-sqrt"):  # (adascale: the measured gain is applied by step.py)
        return 1.0
    raise ValueError(f"unknown scaling rule {rule!r}; expected 'linear', 'sqrt' or 'none'.")


@dataclass(frozen=True)
class BatchPlan:
    """How many samples one optimizer step sees, and how that compares to the reference batch."""

    per_device_batch_size: int
    world_size: int
    accumulate_grad_batches: int
    reference_batch_size: int

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.world_size * self.accumulate_grad_batches

    @property
    def k(self) -> float:
        return self.global_batch_size / self.reference_batch_size


def nearest_multiples(value: int, unit: int) -> str:
    low = max(unit, value // unit * unit)
    high = low if low >= value else low + unit
    return f"{low}" if low == high else f"{low} or {high}"


def plan_batch(
    per_device_batch_size: int,
    world_size: int,
    accumulate_grad_batches: int | None = None,
    global_batch_size: int | None = None,
    reference_batch_size: int | None = None,
) -> BatchPlan:
    """Derive gradient accumulation and the reference batch, with errors that name the numbers.

    The arguments were checked by ``TrainerConfig``; what is checked here depends on the data.

    With ``global_batch_size`` set, accumulation is derived so that the same script trains on the same
    global batch at any device count: A = G / (b x W).
    """
    b, w = per_device_batch_size, world_size
    if not isinstance(b, int) or b < 1:
        raise ValueError(f"the per-device batch size must be a positive int, got {b!r} (the DataLoader's batch_size).")
    if global_batch_size is None:
        accumulation = accumulate_grad_batches or 1
    else:
        unit = b * w
        if global_batch_size % unit:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of per-device batch {b} x "
                f"world size {w} = {unit}, so no whole number of accumulation steps gives it. "
                f"Nearest valid global batch sizes: {nearest_multiples(global_batch_size, unit)}; "
                "or change the DataLoader's batch_size."
            )
        accumulation = global_batch_size // unit
        if accumulate_grad_batches is not None and accumulate_grad_batches != accumulation:
            raise ValueError(
                f"global_batch_size={global_batch_size} needs accumulate_grad_batches={accumulation} at "
                f"per-device batch {b} x world size {w}, but accumulate_grad_batches="
                f"{accumulate_grad_batches} was given. Pass one of the two, not both."
            )
    reference = b if reference_batch_size is None else reference_batch_size
    return BatchPlan(b, w, accumulation, reference)


@dataclass(frozen=True)
class Warmup:
    """A resolved warmup: ``length`` optimizer steps (or epochs, for interval "epoch")."""

    length: float = 0
    interval: str = "step"
    kind: str = "linear"
    start: float | None = None  # multiplier at t = 0; None means 1.0 (the unscaled LR)


def warmup_multiplier(t: float, target: float, warmup: Warmup) -> float:
    """LR multiplier at progress ``t`` (steps or epochs) of a warmup that ends at ``target``.

    Monotone from ``warmup.start`` (default 1.0) at t = 0 to exactly ``target`` at t >= length.
    """
    if warmup.length <= 0 or t >= warmup.length:
        return target
    start = 1.0 if warmup.start is None else warmup.start * target
    fraction = max(t, 0) / warmup.length
    if warmup.kind == "linear":
        return start + (target - start) * fraction
    if warmup.kind == "exponential":
        return start * (target / start) ** fraction
    if warmup.kind == "constant":
        return start
    raise ValueError(f"unknown warmup kind {warmup.kind!r}; expected one of {WARMUP_KINDS}.")


def check_warmup_arguments(
    *, warmup_steps: float | None, warmup_epochs: float | None, interval: str, kind: str, start_factor: float | None
) -> None:
    """The warmup arguments on their own (``TrainerConfig`` calls this once); lengths need the data."""
    if interval not in WARMUP_INTERVALS:
        raise ValueError(f"warmup_interval={interval!r} is not one of {WARMUP_INTERVALS}.")
    if kind not in WARMUP_KINDS:
        raise ValueError(f"warmup_type={kind!r} is not one of {WARMUP_KINDS}.")
    if start_factor is not None and not (0 < start_factor <= 1):
        raise ValueError(
            f"warmup_start_factor={start_factor} must be in (0, 1]: it is the fraction of the scaled "
            "LR that the warmup starts from."
        )
    if warmup_steps and warmup_epochs:
        raise ValueError(
            f"warmup_steps={warmup_steps} and warmup_epochs={warmup_epochs} were both given; pass one."
        )
    for name, value in (("warmup_steps", warmup_steps), ("warmup_epochs", warmup_epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
    if interval == "epoch":
        if warmup_steps:
            raise ValueError(
                "warmup_interval='epoch' counts the warmup in epochs: pass warmup_epochs, not warmup_steps."
            )
        if (warmup_epochs or 0) != int(warmup_epochs or 0):
            raise ValueError(f"warmup_interval='epoch' needs a whole number of warmup_epochs, got {warmup_epochs}.")


def resolve_warmup(
    *,
    warmup_steps: float | None,
    warmup_epochs: float | None,
    interval: str,
    kind: str,
    start_factor: float | None,
    steps_per_epoch: int,
    total_steps: int,
    batch: BatchPlan,
) -> Warmup:
    """Turn the (checked) warmup arguments into a length in optimizer steps (or whole epochs).

    ``warmup_steps`` counts optimizer steps at the reference batch, so that the warmup covers the same
    number of samples at any device count; a float in (0, 1) is a fraction of the run's steps.
    """
    if interval == "epoch":
        return Warmup(int(warmup_epochs or 0), "epoch", kind, start_factor)
    if warmup_epochs:
        length = round(warmup_epochs * steps_per_epoch)
    elif warmup_steps and warmup_steps < 1:
        length = round(warmup_steps * total_steps)
    elif warmup_steps:
        length = round(warmup_steps * batch.reference_batch_size / batch.global_batch_size)
    else:
        length = 0
    if (warmup_steps or warmup_epochs) and length < 1:
        length = 1
    return Warmup(length, "step", kind, start_factor)


@dataclass(frozen=True)
class OptimizerScaling:
    """The scaling applied to one optimizer: its rule, factor and base -> scaled LR per param group."""

    name: str
    rule: str
    factor: float
    base_lrs: tuple[float, ...] = field(default=())


@dataclass(frozen=True)
class LRPlan:
    """The LR multiplier of every optimizer as a function of (step, epoch): scale x warmup."""

    optimizers: tuple[OptimizerScaling, ...]
    warmup: Warmup

    def multipliers(self, step: int, epoch: int) -> list[float]:
        t = epoch if self.warmup.interval == "epoch" else step
        if t >= self.warmup.length:  # after (or without) warmup: the factors themselves
            return self.factors
        return [warmup_multiplier(t, o.factor, self.warmup) for o in self.optimizers]

    def settled(self, step: int, epoch: int) -> bool:
        """Whether the multipliers at (step, epoch) are those of every later step: warmup is over."""
        return (epoch if self.warmup.interval == "epoch" else step) >= self.warmup.length

    @cached_property
    def factors(self) -> list[float]:
        return [o.factor for o in self.optimizers]


def optimizer_names(optimizers: list) -> list[str]:
    """Lightning's LearningRateMonitor names: lr-SGD, lr-Adam, lr-Adam-1 for a second Adam."""
    seen: dict[str, int] = {}
    names = []
    for opt in optimizers:
        base = type(opt).__name__
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.append(base if count == 0 else f"{base}-{count}")
    return names


def plan_lr(optimizers: list, rule: str, batch: BatchPlan, warmup: Warmup) -> LRPlan:
    scalings = []
    for name, opt in zip(optimizer_names(optimizers), optimizers):
        resolved = resolve_rule(rule, opt)
        # A scheduler's base LR (initial_lr) if there is one: the LR the user wrote.
        lrs = tuple(float(group.get("initial_lr", group["lr"])) for group in opt.param_groups)
        scalings.append(OptimizerScaling(name, resolved, lr_factor(resolved, batch.k), lrs))
    return LRPlan(tuple(scalings), warmup)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def summary(
    *,
    strategy: str,
    accelerator: str,
    devices: int,
    num_nodes: int,
    batch: BatchPlan,
    lr: LRPlan,
    steps_per_epoch: int,
    total_steps: int,
    requested_rule: str,
    extra: list[str] | tuple[str, ...] = (),
    max_epochs: int | None = None,
    adascale_target: float | None = None,
) -> str:
    """The start-up block printed once on rank 0; ``extra``: the strategy's own lines (fsdp's sharding)."""
    b = batch
    lines = [
        f"syncstep: strategy={strategy} accelerator={accelerator} world size {b.world_size} "
        f"({devices} device{'s' * (devices != 1)} x {num_nodes} node{'s' * (num_nodes != 1)})",
        f"  batch: {b.per_device_batch_size} per device x {b.world_size} x {b.accumulate_grad_batches} "
        f"accumulation = global batch {b.global_batch_size} (reference {b.reference_batch_size}, "
        f"k = {_fmt(b.k)})",
        f"  schedule: {steps_per_epoch} optimizer steps per epoch, {total_steps} in all",
        *extra,
    ]
    for o in lr.optimizers:
        how = f"{o.rule} (lr_scaling={requested_rule})" if requested_rule in ("auto", "adascale") else o.rule
        if o.rule.startswith("adascale"):
            gain = "sqrt(r)" if o.rule == "adascale-sqrt" else "r"
            groups = ", ".join(f"{_fmt(x)} -> {_fmt(x)} x {gain}" for x in o.base_lrs)
            lines.append(f"  lr {o.name}: {how}, factor {gain} (1 <= r <= k = {_fmt(b.k)}): {groups}")
            continue
        groups = ", ".join(f"{_fmt(x)} -> {_fmt(x * o.factor)}" for x in o.base_lrs)
        lines.append(f"  lr {o.name}: {how}, factor {_fmt(o.factor)}: {groups}")
    if any(o.rule.startswith("adascale") for o in lr.optimizers):
        from syncstep.adascale import summary_line

        target = total_steps * b.k if adascale_target is None else adascale_target
        lines.append(summary_line(target, total_steps, b.k, max_epochs))
    w = lr.warmup
    if w.length:
        start = "the unscaled LR" if w.start is None else f"{_fmt(w.start)} x the scaled LR"
        if w.interval == "epoch":
            span = f"{w.length} epoch{'s' * (w.length != 1)}, stepped per epoch"
        else:
            span = f"{w.length} steps ({_fmt(w.length / max(steps_per_epoch, 1))} epochs)"
        lines.append(f"  warmup: {w.kind} over {span}, from {start} to the scaled LR")
        if w.start is None and all(o.factor == 1 and not o.rule.startswith("adascale") for o in lr.optimizers):
            lines.append(
                "  note: the warmup starts at the unscaled LR, which equals the target at k = 1, so it "
                "does nothing; pass warmup_start_factor (e.g. 0.1) to ramp up from a lower LR."
            )
    else:
        lines.append("  warmup: none")
        if any(o.factor >= 4 for o in lr.optimizers):
            lines.append(
                "  hint: the LR grows by 4x or more; a warmup (e.g. warmup_epochs=5, Goyal et al. 2017) often "
                "tames the early instability of a large LR, though it cannot make a too-large LR stable."
            )
    return "\n".join(lines)
