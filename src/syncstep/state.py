"""Where a run stands: the one object a checkpoint's "loop" section comes from and goes back into."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunState:
    """The position of a run. ``global_step`` advances in one place only (``step.py``)."""

    current_epoch: int = 0
    global_step: int = 0  # optimizer steps taken
    epoch_sample: int = 0  # samples of the current epoch already trained on, over all replicas
    should_stop: bool = False  # set by the user (trainer.should_stop = True): stop after this step (guards.py)
    stage: str | None = None  # "fit", "validate", "test", or None between calls
    preempted: bool = False  # fit ended early on SIGTERM, after saving a checkpoint

    def state_dict(self, epoch_finished: bool) -> dict[str, int]:
        """The checkpoint's "loop" section: where a resumed run starts."""
        if epoch_finished:
            return {"epoch": self.current_epoch + 1, "global_step": self.global_step, "epoch_sample": 0}
        return {"epoch": self.current_epoch, "global_step": self.global_step, "epoch_sample": self.epoch_sample}

    def load_state_dict(self, loop: dict[str, int]) -> None:
        self.current_epoch, self.global_step = loop["epoch"], loop["global_step"]
        self.epoch_sample = loop["epoch_sample"]
