"""Mixed precision: the names users pass, autocast around forward, and the gradient scaler for fp16."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {
    "32": "32", "32-true": "32", 32: "32",
    "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed",
    "16-mixed": "16-mixed", "16": "16-mixed", 16: "16-mixed",
}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager | None:
    """The autocast context for forward passes, or None in full precision (the loop skips the ``with``)."""
    if precision == "32":
        return None
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
