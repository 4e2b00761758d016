"""Lightning-style scripts, as Lightning's documentation writes them, run by syncstep on 2 processes.

Usage: python lightning_ddp.py OUT_DIR   (syncstep starts the 2 processes itself at the first fit)

Each scenario is what a Lightning user's script does, with only the imports changed
(``import syncstep as L``; ``from syncstep.callbacks import ...``; ``from syncstep.loggers import ...``).
Every rank writes what it saw to OUT_DIR/<scenario>.rank<R>.pt; tests/test_lightning_ddp.py checks it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import syncstep as L  # noqa: E402
from common import dataset, make_net  # noqa: E402
from syncstep.callbacks import BasePredictionWriter, EarlyStopping, LearningRateMonitor, ModelCheckpoint  # noqa: E402
from syncstep.loggers import CSVLogger  # noqa: E402

OUT = "."  # set by __main__
COMMON = dict(accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False, lr_scaling="none",
              enable_model_summary=False)


def save(name, trainer, **values):
    torch.save(values, os.path.join(OUT, f"{name}.rank{trainer.global_rank}.pt"))


# -- A: a DataModule, ModelCheckpoint(monitor), EarlyStopping, LearningRateMonitor, CSVLogger ----------
class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.1, hidden: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


class Data(L.LightningDataModule):
    def __init__(self, batch_size: int = 4):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage):
        self.train, self.val = dataset(48), dataset(20, seed=1)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)


def scenario_callbacks():
    checkpoint = ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=2, filename="{epoch}-{val_loss:.4f}")
    stopping = EarlyStopping(monitor="val_loss", patience=2, min_delta=0.01)
    trainer = L.Trainer(max_epochs=10, default_root_dir=os.path.join(OUT, "a"), seed=3,
                        logger=CSVLogger(os.path.join(OUT, "a"), name="lit"),
                        callbacks=[checkpoint, stopping, LearningRateMonitor()], **COMMON)
    trainer.fit(Classifier(), datamodule=Data())
    save("callbacks", trainer, log_dir=trainer.log_dir, logger_dir=trainer.logger.log_dir,
         stopped_epoch=stopping.stopped_epoch, epoch=trainer.current_epoch, best_path=checkpoint.best_model_path,
         best_score=float(checkpoint.best_model_score), params={k: v.clone() for k, v in
                                                                trainer.lightning_module.state_dict().items()})


# -- B: a GAN: manual optimization, two optimizers, toggle_optimizer -----------------------------------
class GAN(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        noise, real = batch  # the noise comes with the data, so that a reference can use the same
        opt_g, opt_d = self.optimizers()
        self.toggle_optimizer(opt_d)
        fake = self.generator(noise).detach()
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), torch.ones(len(real), 1))
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake), torch.zeros(len(fake), 1)))
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(noise)),
                                                    torch.ones(len(noise), 1))
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, prog_bar=True)

    def configure_optimizers(self):
        return [torch.optim.Adam(self.generator.parameters(), lr=0.01),
                torch.optim.Adam(self.discriminator.parameters(), lr=0.02)]


def gan_data():
    g = torch.Generator().manual_seed(5)
    return torch.utils.data.TensorDataset(torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g) + 2)


def scenario_gan():
    trainer = L.Trainer(max_epochs=1, default_root_dir=os.path.join(OUT, "b"), logger=False,
                        enable_checkpointing=False, **{**COMMON, "strategy": "ddp_find_unused_parameters_true"})
    model = GAN()
    trainer.fit(model, DataLoader(gan_data(), batch_size=4))
    save("gan", trainer, params={k: v.clone() for k, v in model.state_dict().items()}, steps=trainer.global_step)


# -- C: predict on 2 processes, and a prediction writer ------------------------------------------------
class Writer(BasePredictionWriter):
    def __init__(self):
        super().__init__(write_interval="batch")
        self.seen = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.seen.append((list(batch_indices), prediction.clone()))


def scenario_predict():
    writer = Writer()
    trainer = L.Trainer(default_root_dir=os.path.join(OUT, "c"), logger=False, callbacks=[writer], **COMMON)
    model = Classifier()
    predictions = trainer.predict(model, DataLoader(dataset(11, seed=4), batch_size=2))
    save("predict", trainer, predictions=predictions, seen=writer.seen,
         params={k: v.clone() for k, v in model.state_dict().items()})


# -- E: a torchmetrics Metric in self.log -----------------------------------------------------------------
def scenario_torchmetrics():
    import torchmetrics

    class WithAccuracy(Classifier):
        def __init__(self):
            super().__init__()
            self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.val_acc(self(x), y)
            self.log("val_acc", self.val_acc, on_epoch=True)

    trainer = L.Trainer(default_root_dir=os.path.join(OUT, "e"), logger=False, **COMMON)
    model = WithAccuracy()
    results = trainer.validate(model, DataLoader(dataset(13, seed=2), batch_size=3))
    save("torchmetrics", trainer, results=results, params={k: v.clone() for k, v in model.net.state_dict().items()})


if __name__ == "__main__":
    OUT = sys.argv[1]
    L.seed_everything(0, workers=True)
    scenario_callbacks()
    scenario_gan()
    scenario_predict()
    scenario_torchmetrics()
