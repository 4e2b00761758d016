"""The model summary printed at the start of fit (``Trainer(enable_model_summary=True)``, Lightning's)."""

from __future__ import annotations

import torch


def _count(parameters: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def model_summary(model: torch.nn.Module) -> str:
    """One row per top-level child (name, type, parameters), then the totals."""
    rows = [(name, type(child).__name__, _count(list(child.parameters()))) for name, child in model.named_children()]
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = _count(params)
    width = max([len(r[0]) for r in rows] + [4])
    kind = max([len(r[1]) for r in rows] + [4])
    lines = [f"  | {'Name'.ljust(width)} | {'Type'.ljust(kind)} | Params", "  " + "-" * (width + kind + 16)]
    lines += [f"  | {name.ljust(width)} | {cls.ljust(kind)} | {_human(n)}" for name, cls, n in rows]
    size_mb = sum(p.numel() * p.element_size() for p in params) / 1e6
    lines += [f"  {_human(trainable)} trainable params, {_human(total - trainable)} non-trainable, {_human(total)} "
              f"total, {size_mb:.3f} MB of parameters"]
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)
