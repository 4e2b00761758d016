"""The floor: the training loop a user writes by hand with plain PyTorch.

    python handwritten.py --workload w1 ...                        # one process
    torchrun --nproc-per-node=2 handwritten.py --workload w3 ...   # DDP (gloo), torch's own recipe

No progress bar, no logging, no checkpoints: the least work one SGD step can be.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from common import WORKLOADS, StepClock, loss_of, make_dataset, make_mlp, make_optimizer, parse_args


def main() -> None:
    args = parse_args()
    workload = WORKLOADS[args.workload]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dataset = make_dataset(workload, args.steps * workload.batch_size * world_size)
    net = make_mlp(workload)
    model = net
    sampler = None
    if world_size > 1:
        torch.distributed.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(net)
        sampler = DistributedSampler(dataset, shuffle=False)
    loader = DataLoader(dataset, batch_size=workload.batch_size, shuffle=False, sampler=sampler)
    optimizer = make_optimizer(workload, model.parameters())
    clock = StepClock()
    for batch in loader:
        clock.tick()
        loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.last_loss = loss.detach()
    if int(os.environ.get("RANK", "0")) == 0:
        clock.write(args.out, args, "hand-written", net, world_size)
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
