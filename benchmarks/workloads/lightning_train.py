"""The peer: Lightning 2.x's Trainer, with its progress bar, logger, checkpointing and model summary off
(the fairest setting for Lightning: it does the least it can).

    python lightning_train.py --workload w1 ...                 # one process
    python lightning_train.py --workload w3 --devices 2 ...     # DDP: Lightning starts the 2 processes
"""

from __future__ import annotations

import warnings

import lightning as L
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from common import WORKLOADS, StepClock, loss_of, make_dataset, make_mlp, make_optimizer, parse_args


class MLP(L.LightningModule):
    def __init__(self, workload, clock: StepClock, dataset):
        super().__init__()
        self.workload, self.clock, self.dataset = workload, clock, dataset
        self.net = make_mlp(workload)

    def train_dataloader(self):
        # Lightning always shuffles the training data it shards (its DistributedSampler gets shuffle=True);
        # the same sampler without shuffling gives every implementation the same batches.
        sampler = None
        if self.trainer.world_size > 1:
            sampler = DistributedSampler(self.dataset, self.trainer.world_size, self.global_rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.workload.batch_size, shuffle=False, sampler=sampler)

    def training_step(self, batch, batch_idx):
        self.clock.tick()
        loss = loss_of(self.net, batch)
        self.log("train_loss", loss, prog_bar=True)
        self.clock.last_loss = loss.detach()
        return loss

    def configure_optimizers(self):
        return make_optimizer(self.workload, self.parameters())


def main() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    args = parse_args()
    workload = WORKLOADS[args.workload]
    dataset = make_dataset(workload, args.steps * workload.batch_size * args.devices)
    clock = StepClock()
    model = MLP(workload, clock, dataset)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(model)
    if trainer.is_global_zero:
        clock.write(args.out, args, "lightning", model.net, trainer.world_size)


if __name__ == "__main__":
    main()
