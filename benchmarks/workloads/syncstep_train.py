"""syncstep as a user runs it: progress bar and logger (CSV + TensorBoard) on, log_every_n_steps=50,
checkpointing at its default (one checkpoint at the end of the epoch, after the timed steps).
``--lean`` turns the bar, the loggers and checkpoints off, to show what they cost.

    python syncstep_train.py --workload w1 ...                  # one process
    python syncstep_train.py --workload w3 --devices 2 ...      # DDP: syncstep starts the 2 processes
    python syncstep_train.py --workload w3 --devices 2 --strategy fsdp ...   # FSDP, each Linear a unit

lr_scaling="none" only so that the losses can be compared with the other implementations at any
world size; the scaling factor is applied for free (it multiplies the LR at step time either way).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

import syncstep
from common import WORKLOADS, StepClock, loss_of, make_dataset, make_mlp, make_optimizer, parse_args


class MLP(syncstep.Module):
    def __init__(self, workload, clock: StepClock):
        super().__init__()
        self.workload, self.clock = workload, clock
        self.net = make_mlp(workload)

    def training_step(self, batch, batch_idx):
        self.clock.tick()
        loss = loss_of(self.net, batch)
        self.log("train_loss", loss, prog_bar=True)
        self.clock.last_loss = loss.detach()
        return loss

    def configure_optimizers(self):
        return make_optimizer(self.workload, self.parameters())


def main() -> None:
    args = parse_args()
    workload = WORKLOADS[args.workload]
    dataset = make_dataset(workload, args.steps * workload.batch_size * args.devices)
    loader = DataLoader(dataset, batch_size=workload.batch_size, shuffle=False)
    clock = StepClock()
    model = MLP(workload, clock)
    strategy = args.strategy if args.devices > 1 else "auto"
    if strategy == "fsdp":
        strategy = syncstep.FSDPStrategy(auto_wrap_policy={torch.nn.Linear})
    lean = dict(enable_progress_bar=False, logger=False, enable_checkpointing=False) if args.lean else {}
    trainer = syncstep.Trainer(max_epochs=1, accelerator="cpu", devices=args.devices, strategy=strategy,
                               lr_scaling="none", noise_scale=args.noise_scale, **lean)
    trainer.fit(model, loader)
    net = model.net
    if args.strategy == "fsdp" and args.devices > 1:  # the checksum needs whole parameters: gather them (every rank)
        net = make_mlp(workload)
        net.load_state_dict({k: v.full_tensor() for k, v in model.net.state_dict().items()})
    if trainer.is_global_zero:
        clock.write(args.out, args, "syncstep", net, trainer.world_size)


if __name__ == "__main__":
    main()
