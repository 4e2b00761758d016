"""``DataModule``: the data of a run in one object, with Lightning's hooks (``LightningDataModule``)."""

from __future__ import annotations

from typing import Any

from syncstep.hparams import HyperparametersMixin


class DataModule(HyperparametersMixin):
    """Override what you need. The trainer calls, for ``fit(model, datamodule=dm)``:

    ``prepare_data()`` on the first process of each node (download, tokenise: write to disk; do not
    set state here, other processes will not see it), then ``setup(stage)`` on every process, then
    ``train_dataloader()`` / ``val_dataloader()`` (``test_dataloader()`` for test, ``predict_dataloader()``
    for predict), and ``teardown(stage)`` at the end. ``self.trainer`` is the trainer from ``setup`` on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.trainer: Any = None

    def prepare_data(self) -> None: ...
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...

    def train_dataloader(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} defines no train_dataloader(); fit() needs one.")

    def val_dataloader(self) -> Any:
        return None

    def test_dataloader(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} defines no test_dataloader(); test() needs one.")

    def predict_dataloader(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} defines no predict_dataloader(); predict() needs one.")

    def state_dict(self) -> dict[str, Any]:
        """Kept in checkpoints (plain types and tensors only)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


LightningDataModule = DataModule
