"""syncstep: data-parallel training for PyTorch (one device, dp, ddp, fsdp) with the LR arithmetic done right."""

__version__ = "0.1.0"

from syncstep.callbacks import Callback
from syncstep.datamodule import DataModule, LightningDataModule
from syncstep.guards import NonFiniteLossError, Preempted
from syncstep.module import Module
from syncstep.rng import seed_everything
from syncstep.strategies.ddp import DDPStrategy
from syncstep.strategies.fsdp import FSDPStrategy
from syncstep.trainer import Trainer

LightningModule = Module  # Lightning's name, so that `import syncstep as L` code reads unchanged

__all__ = ["Callback", "DataModule", "DDPStrategy", "FSDPStrategy", "LightningDataModule", "LightningModule", "Module",
           "NonFiniteLossError", "Preempted", "Trainer", "__version__", "seed_everything"]
