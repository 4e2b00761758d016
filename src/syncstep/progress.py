"""The progress bar: tqdm on rank 0, one bar per epoch and per evaluation."""

from __future__ import annotations

import math
import time


def format_metric(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


class ProgressBar:
    """A tqdm bar per epoch on rank 0, showing the values logged with ``prog_bar=True``.

    tqdm is told of finished steps every ``every`` steps, and ``every`` adapts so that this happens
    about 20 times a second at most (tqdm redraws at most 10 times a second anyway), rather than a tqdm
    call on every step of a model whose steps take a few hundred microseconds.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.pending, self.every = 0, 1
        self.postfix: dict[str, float] | None = None  # values to show, not yet handed to tqdm
        self.postfix_at = 0.0
        self.advanced_at = 0.0

    def start(self, description: str, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=description, dynamic_ncols=True, leave=True, unit="step")
        self.pending, self.every, self.advanced_at = 0, 1, time.monotonic()

    def update(self) -> None:
        """One step done (the training loop counts its steps itself and calls ``advance``)."""
        self.pending += 1
        if self.pending >= self.every:
            self.advance(self.pending)
            self.pending = 0

    def advance(self, steps: int) -> int:
        """``steps`` more steps done; call it every ``every`` steps. Returns ``every``, which may change."""
        if self.bar is not None and steps:
            now = time.monotonic()
            if now - self.advanced_at < 0.05:  # more often than 20 times a second: wait longer
                self.every = min(self.every * 2, 1 << 20)
            elif now - self.advanced_at > 0.2 and self.every > 1:
                self.every //= 2
            self.advanced_at = now
            # tqdm redraws at most every 0.1 s (mininterval): values logged in between would be formatted
            # for nothing, so they are handed over only as often.
            if self.postfix is not None and now - self.postfix_at >= self.bar.mininterval:
                self._set_postfix()
            self.bar.update(steps)
        return self.every

    def show(self, values: dict[str, float]) -> None:
        """Show ``values`` after the bar (from its next redraw on)."""
        if self.bar is not None and values:
            self.postfix = values

    def _set_postfix(self) -> None:
        self.bar.set_postfix({k: format_metric(v) for k, v in self.postfix.items()}, refresh=False)
        self.postfix, self.postfix_at = None, time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            if self.postfix is not None:
                self._set_postfix()
            if self.pending:
                self.bar.update(self.pending)
            self.bar.close()
            self.bar = None
        self.pending = 0
        self.postfix = None
