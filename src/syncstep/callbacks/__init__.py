"""Callbacks with Lightning's names: subclass ``Callback``, or use the ones here."""

from syncstep.callbacks.base import Callback
from syncstep.callbacks.early_stopping import EarlyStopping
from syncstep.callbacks.lr_monitor import LearningRateMonitor
from syncstep.callbacks.model_checkpoint import ModelCheckpoint
from syncstep.callbacks.prediction_writer import BasePredictionWriter
from syncstep.callbacks.progress import ProgressBar, RichProgressBar, TQDMProgressBar

__all__ = ["BasePredictionWriter", "Callback", "EarlyStopping", "LearningRateMonitor",
           "ModelCheckpoint", "ProgressBar", "RichProgressBar", "TQDMProgressBar"]
