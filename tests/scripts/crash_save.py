"""Train with a checkpoint every 2 steps, and kill the process during the second save.

Usage: python crash_save.py ROOT POINT   with POINT one of before_write, mid_write, before_rename,
after_rename. Before dying it writes the sha256 of last.ckpt as the first save left it to ROOT/sha.txt.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import syncstep  # noqa: E402
from common import Tiny, dataset, loader  # noqa: E402
from syncstep import checkpoint  # noqa: E402

root, point = sys.argv[1], sys.argv[2]
SECOND = "step=4.ckpt"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


real_save, real_replace, real_link = torch.save, os.replace, checkpoint.atomic_copy


def save(obj, f, *args, **kwargs):
    if SECOND in getattr(f, "name", ""):
        if point == "before_write":
            os._exit(9)
        if point == "mid_write":
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os._exit(9)
    return real_save(obj, f, *args, **kwargs)


def replace(src, dst):
    if dst.endswith(SECOND) and point == "before_rename":
        os._exit(9)
    real_replace(src, dst)
    if dst.endswith(SECOND) and point == "after_rename":
        os._exit(9)


def link(source, path):
    real_link(source, path)
    if source.endswith("step=2.ckpt"):
        with open(os.path.join(root, "sha.txt"), "w") as f:
            f.write(sha256(path))


torch.save, os.replace, checkpoint.atomic_copy = save, replace, link
trainer = syncstep.Trainer(accelerator="cpu", max_epochs=1, ckpt_every_n_steps=2, ckpt_every_n_epochs=None,
                           keep_last=5, default_root_dir=root, logger=False, enable_progress_bar=False)
trainer.fit(Tiny(), loader(dataset(40), 4))
print("the crash point was never reached", file=sys.stderr)
sys.exit(3)
