"""Non-finite losses and SIGTERM: watched on each rank, agreed by every rank, in one place.

Each rank keeps the loss of every micro-batch (``losses``, appended to by the loop). The ranks agree
at *agreement points*: every logging step, every epoch's end and before every checkpoint (``agree``:
the kept losses are read in one go, then one all-reduce of two numbers, the first non-finite step with
the rank that saw it, and whether any rank got SIGTERM). So every rank raises
:class:`NonFiniteLossError` at the same point, naming the same step and rank, and every rank stops for a
SIGTERM at the same step. With ``on_nonfinite_loss="skip"`` the ranks agree on every step instead
(``skip_step``), and skip such steps together.

Reading the losses together costs one device sync per agreement, not one per step, on a GPU; on the
CPU it costs the loop a detach and a list append per micro-batch. The losses are kept detached: a
loss kept with its graph holds whatever the graph's nodes reference until the next agreement, which
under fsdp is the all-gathered parameters of every unit: a whole model per kept micro-batch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; every rank raises it at the same step."""


class Preempted(SystemExit):
    """``fit()`` stopped on SIGTERM after writing a checkpoint; raised by ``fit()`` on every rank.

    A ``SystemExit`` with code 143 (128 + SIGTERM), so that a script that does not catch it exits as a
    preempted job should, without a traceback; catch it to do something else before exiting.
    Resume with ``trainer.fit(..., ckpt_path="last")``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(128 + signal.SIGTERM)
        self.message = message

    def __str__(self) -> str:
        return self.message


_NOTHING_FOUND = 2**62  # larger than any (step, rank) packed by ``agree``


class Guards:
    def __init__(self, strategy: Any, state: Any, *, on_nonfinite_loss: str, log_every_n_steps: int,
                 print_fn: Callable[..., None]) -> None:
        self.strategy, self.state, self.print = strategy, state, print_fn
        self.skip = on_nonfinite_loss == "skip"
        self.log_every_n_steps = log_every_n_steps
        # (global step, loss) of every micro-batch since the last agreement
        self.losses: list[tuple[int, torch.Tensor]] = []
        self.stop_signal = False  # SIGTERM on this rank; after ``agree``, on any rank

    def _first_nonfinite_step(self) -> int | None:
        """The first step whose kept loss is NaN or infinite (one device sync), and forget the losses."""
        losses = self.losses
        if not losses:
            return None
        try:
            finite = torch.stack([x for _, x in losses]).isfinite().reshape(-1)
        except RuntimeError:  # losses of different shapes ((), (1,)) or devices
            finite = torch.stack([x.float().reshape(()).cpu() for _, x in losses]).isfinite()
        found = None if bool(finite.all()) else losses[int((~finite).nonzero()[0, 0])][0]
        losses.clear()
        return found

    def agree(self, payload: list[int] | tuple[int, ...] = ()) -> list[int]:
        """On every rank: raise NonFiniteLossError if any rank's loss was NaN or infinite since the last
        agreement (the first such step, and the rank), and learn whether any rank got SIGTERM.

        ``payload``: more int64s that ride along in the same all-reduce (their minimum over ranks is
        returned; throughput.py's per-rank times), so that they cost no collective of their own."""
        bad_step = self._first_nonfinite_step()
        # (step, rank) packed into one number, so that the minimum over ranks names both.
        found = _NOTHING_FOUND if bad_step is None else bad_step * 1_000_000 + self.strategy.global_rank
        stop = int(self.stop_signal)
        payload = list(payload)
        if self.strategy.num_processes > 1:  # one process has nothing to agree with
            packed = self.strategy.all_reduce(torch.tensor([found, -stop, *payload], dtype=torch.int64), "min")
            found, stop, *payload = packed.tolist()
            stop = -stop
        self.stop_signal = bool(stop)
        if found != _NOTHING_FOUND:
            step, rank = divmod(found, 1_000_000)
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at optimizer step {step} (first seen on rank {rank}); every "
                "rank stops here. Lower the learning rate, add warmup (warmup_epochs=...), clip gradients "
                "(gradient_clip_val=...), or pass on_nonfinite_loss='skip' to skip such steps on all ranks."
            )
        return payload

    def skip_step(self) -> bool:
        """With on_nonfinite_loss="skip", at every step: whether any rank's loss of this step was
        non-finite (one all-reduce, through the strategy so that it runs on the backend's device)."""
        bad = self._first_nonfinite_step() is not None
        agreed = self.strategy.all_reduce(torch.tensor([float(bad)]), "max")
        if agreed.item() == 0:
            return False
        self.print(f"syncstep: non-finite loss at step {self.state.global_step} (epoch {self.state.current_epoch}) "
                   "on some rank; skipping this optimizer step on every rank.")
        return True

    def stop_requested(self, step: int) -> bool:
        """True on every rank once any rank got SIGTERM: at once in one process; on several, at the next
        logging step, where ``agree`` has just exchanged the flag."""
        if self.strategy.num_processes == 1 or step % self.log_every_n_steps == 0:
            return self.stop_signal
        return False

    @contextlib.contextmanager
    def catching_sigterm(self) -> Iterator[None]:
        """While fit runs: SIGTERM (preemption, SLURM's warning) sets a flag instead of killing the process."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.stop_signal = False

        def handler(signum: int, frame: Any) -> None:
            self.stop_signal = True

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
