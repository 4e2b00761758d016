"""Progress-bar choices: ``TQDMProgressBar(refresh_rate=N)`` configures the trainer's own tqdm bar."""

from __future__ import annotations

from syncstep.callbacks.base import Callback


class ProgressBar(Callback):
    """The base of progress-bar callbacks (Lightning's ``ProgressBar``)."""


class TQDMProgressBar(ProgressBar):
    """The tqdm bar on rank 0; ``refresh_rate`` is the least number of steps between redraws (0: no bar).

    syncstep's bar already redraws at most ~10 times a second however short the steps are, so the
    default (1) costs nothing on fast models.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        if not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ValueError(f"TQDMProgressBar(refresh_rate={refresh_rate!r}) must be an int >= 0.")
        self.refresh_rate, self.process_position, self.leave = refresh_rate, process_position, leave


class RichProgressBar(ProgressBar):
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise ValueError("RichProgressBar is a Lightning callback syncstep does not support: syncstep's bar is "
                         "tqdm. Use TQDMProgressBar(refresh_rate=...) or Trainer(enable_progress_bar=False).")
