"""Non-finite losses and stop requests (SIGTERM / SIGHUP, ``trainer.should_stop``): watched on each
rank, agreed by every rank, in one place.

Each rank keeps the loss of every micro-batch (``losses``, appended to by the loop). The ranks agree
at *agreement points* (``agree``: the kept losses are read in one go, then one all-reduce of a few
numbers: the first non-finite step with the rank that saw it, whether any rank got SIGTERM or SIGHUP,
whether any rank set ``trainer.should_stop``, and the step of the next agreement). So every rank raises
:class:`NonFiniteLossError` at the same point, naming the same step and rank, and every rank stops for
a signal or a stop request at the same step. With ``on_nonfinite_loss="skip"`` the ranks agree on
every step instead (``skip_step``), and skip such steps together.

The agreement points are every logging step, every epoch's start and end, before every checkpoint,
and often enough that no more than about ``AGREE_EVERY_SECONDS`` of training passes between two of
them whatever ``log_every_n_steps`` is: each rank proposes the step it will reach in that time at its
current pace, and the smallest proposal is the next agreement point (so a SIGTERM is acted on long
before the launcher's grace period ends, and a step slower than that is agreed after every step). The
proposal travels in the same all-reduce, so it costs no collective of its own. In one process there
is nothing to agree: a signal or ``should_stop`` stops the run after the current step, and the losses
are read at the logging steps.

Reading the losses together costs one device sync per agreement, not one per step, on a GPU; on the
CPU it costs the loop a detach and a list append per micro-batch. The losses are kept detached: a
loss kept with its graph holds whatever the graph's nodes reference until the next agreement, which
under fsdp is the all-gathered parameters of every unit: a whole model per kept micro-batch.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
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


_NOTHING_FOUND = 2**62  # larger than any (step, rank) packed by ``agree``, and than any step
AGREE_EVERY_SECONDS = 1.0  # the most training time between two agreements in several processes
STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # a scheduler's preemption, a closed terminal or ssh session


class Guards:
    def __init__(self, strategy: Any, state: Any, *, on_nonfinite_loss: str, log_every_n_steps: int,
                 print_fn: Callable[..., None]) -> None:
        self.strategy, self.state, self.print = strategy, state, print_fn
        self.skip = on_nonfinite_loss == "skip"
        self.log_every_n_steps = log_every_n_steps
        self.alone = strategy.num_processes == 1
        # (global step, loss) of every micro-batch since the last agreement
        self.losses: list[tuple[int, torch.Tensor]] = []
        self.signal_received: str | None = None  # "SIGTERM" / "SIGHUP" on this rank, not yet agreed
        self.preempting = False  # agreed: some rank got a stop signal (in one process: at once)
        self.stop_agreed = False  # agreed: some rank set trainer.should_stop
        # The step at which the loop calls ``agree`` next (never in one process), and the pace it is set from.
        self.next_agreement = sys.maxsize if self.alone else 0
        self._last_agreement: tuple[int, float] | None = None

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

    def _proposal(self, step: int) -> int:
        """The step this rank reaches about AGREE_EVERY_SECONDS from now, at its pace since the last agreement."""
        now, last = time.monotonic(), self._last_agreement
        self._last_agreement = (step, now)
        if last is None or step <= last[0] or now <= last[1]:
            return step + 1
        per_second = (step - last[0]) / (now - last[1])
        return step + max(1, int(per_second * AGREE_EVERY_SECONDS))

    def agree(self, payload: list[int] | tuple[int, ...] = ()) -> list[int]:
        """On every rank: raise NonFiniteLossError if any rank's loss was NaN or infinite since the last
        agreement (the first such step, and the rank), and learn whether any rank got a stop signal or
        set ``trainer.should_stop`` (then ``preempting`` / ``stop_agreed`` is True on every rank).

        ``payload``: more int64s that ride along in the same all-reduce (their minimum over ranks is
        returned; throughput.py's per-rank times), so that they cost no collective of their own."""
        bad_step = self._first_nonfinite_step()
        # (step, rank) packed into one number, so that the minimum over ranks names both.
        found = _NOTHING_FOUND if bad_step is None else bad_step * 1_000_000 + self.strategy.global_rank
        signalled, stop = int(self.signal_received is not None), int(bool(self.state.should_stop))
        if self.alone:  # one process has nothing to agree with
            self.preempting = self.preempting or bool(signalled)
        else:
            step = self.state.global_step
            packed = torch.tensor([found, -signalled, -stop, self._proposal(step), *payload], dtype=torch.int64)
            found, signalled, stop, self.next_agreement, *payload = self.strategy.all_reduce(packed, "min").tolist()
            self.preempting = self.preempting or signalled < 0
            self.stop_agreed = stop < 0
            if self.stop_agreed:  # the same on every rank from here on
                self.state.should_stop = True
        if found != _NOTHING_FOUND:
            step, rank = divmod(found, 1_000_000)
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at optimizer step {step} (first seen on rank {rank}); every "
                "rank stops here. Lower the learning rate, add warmup (warmup_epochs=...), clip gradients "
                "(gradient_clip_val=...), or pass on_nonfinite_loss='skip' to skip such steps on all ranks."
            )
        return list(payload)

    def should_stop(self) -> bool:
        """Whether a stop request (``trainer.should_stop``) holds on every rank: the agreed one in several
        processes (set on any rank, it holds on all from the next agreement), the flag itself in one."""
        return bool(self.state.should_stop) if self.alone else self.stop_agreed

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

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[None]:
        """While fit runs: SIGTERM (preemption, SLURM's warning) and SIGHUP (the terminal or ssh session
        closed) set a flag instead of killing the process; the run checkpoints and stops."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.signal_received, self.preempting = None, False

        def handler(signum: int, frame: Any) -> None:
            self.signal_received = signal.Signals(signum).name
            if self.alone:
                self.preempting = True

        previous = {name: signal.signal(getattr(signal, name), handler) for name in STOP_SIGNALS
                    if hasattr(signal, name)}
        try:
            yield
        finally:
            for name, old in previous.items():
                signal.signal(getattr(signal, name), old)
