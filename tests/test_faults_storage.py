"""Faults met in one process: full and read-only disks, two runs in one directory, last.ckpt's copy, a
malicious checkpoint, resuming on changed data or another optimizer, an empty training set, DDP's
unused-parameter error, a stop request mid-epoch, and the launcher's stale rendezvous directories.

The disks are real where this process may mount a tmpfs (as root); elsewhere the full disk is a
``torch.save`` that writes half and raises ENOSPC, and the read-only directory one whose parent is a
plain file, so that the same checks still run (docs/checkpoints.md, "Failures").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import tempfile

import pytest
import torch

import syncstep
from common import Tiny, dataset, loader
from syncstep import checkpoint


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def trainer(root, **kwargs) -> syncstep.Trainer:
    kwargs = {"max_epochs": 1, "lr_scaling": "none", **kwargs}
    return syncstep.Trainer(accelerator="cpu", default_root_dir=str(root), logger=False, enable_progress_bar=False,
                            enable_model_summary=False, **kwargs)


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A real tmpfs at ``path`` (yields True), or nothing where mounting is not allowed (yields False)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             check=False).returncode == 0 if os.geteuid() == 0 else False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(root) -> None:
    """Write zeros into ``root`` until its file system is full (ENOSPC)."""
    fd = os.open(os.path.join(root, "filler"), os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)


class FillDisk(syncstep.Callback):
    """After the first checkpoint (step 2), fill the disk: for real, or by making torch.save fail half-way."""

    def __init__(self, root, real: bool):
        self.root, self.real = root, real

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != 3:
            return
        if self.real:
            fill_disk(self.root)
            return
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if ".ckpt.tmp-" not in getattr(f, "name", ""):  # (pickling a tensor calls torch.save too)
                return real_save(obj, f, *args, **kwargs)
            f.write(b"PK" + b"\0" * 100)  # a partial write, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        checkpoint.torch.save = save
        self.restore = real_save


def test_a_full_disk_during_a_save_is_a_clear_error_and_the_previous_checkpoint_is_intact(tmp_path):
    disk = tmp_path / "disk"
    with tmpfs(disk, "size=512k") as real:
        fill = FillDisk(disk, real)
        t = trainer(disk, ckpt_every_n_steps=2, max_steps=6, callbacks=[fill])
        first = disk / "checkpoints" / "epoch=0-step=2.ckpt"
        try:
            with pytest.raises(checkpoint.CheckpointError) as raised:
                t.fit(Tiny(), loader(dataset(40), 4))
        finally:
            if hasattr(fill, "restore"):
                checkpoint.torch.save = fill.restore
        message = str(raised.value)
        assert "could not write the checkpoint" in message and "epoch=0-step=4.ckpt" in message, message
        assert "No space left on device" in message and "untouched" in message, message
        names = sorted(os.listdir(disk / "checkpoints"))
        assert names == ["epoch=0-step=2.ckpt", "last.ckpt"], names  # no partial file, no temporary
        assert sha256(first) == sha256(disk / "checkpoints" / "last.ckpt")
        state = checkpoint.load(str(first))
        assert state["loop"]["global_step"] == 2


def test_a_read_only_root_dir_is_refused_at_start_up(tmp_path):
    ro = tmp_path / "ro"
    with tmpfs(ro, "ro,size=64k") as real:
        root = ro if real else tmp_path / "a_file" / "sub"  # (without a mount: a "directory" inside a file)
        if not real:
            (tmp_path / "a_file").write_text("")
        t = trainer(root, max_steps=2)
        with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoints to .*default_root_dir"):
            t.fit(Tiny(), loader(dataset(16), 4))
        assert t.global_step == 0  # refused before training, not at the first save


class SecondRun(syncstep.Callback):
    def __init__(self, root):
        self.root, self.error = root, None

    def on_train_start(self, trainer, module):
        try:
            globals()["trainer"](self.root, max_steps=2).fit(Tiny(), loader(dataset(16), 4))
        except checkpoint.CheckpointError as error:
            self.error = str(error)


def test_two_runs_in_one_directory_the_second_is_refused_and_the_first_keeps_its_checkpoints(tmp_path):
    second = SecondRun(tmp_path)
    first = trainer(tmp_path, max_steps=5, callbacks=[second])
    first.fit(Tiny(), loader(dataset(40), 4))
    assert second.error and "another run is training into" in second.error, second.error
    last = checkpoint.load(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert last["loop"]["global_step"] == 5  # the first run's, not overwritten by the second
    trainer(tmp_path, max_steps=7).fit(Tiny(), loader(dataset(40), 4), ckpt_path="last")  # released at the end


def test_last_ckpt_is_a_copy_not_a_link(tmp_path):
    trainer(tmp_path, max_steps=3).fit(Tiny(), loader(dataset(40), 4))
    directory = tmp_path / "checkpoints"
    newest, last = directory / "epoch=0-step=3.ckpt", directory / "last.ckpt"
    assert sha256(newest) == sha256(last) and os.stat(newest).st_ino != os.stat(last).st_ino
    with open(newest, "r+b") as f:
        f.truncate(100)
    assert checkpoint.load(str(last))["loop"]["global_step"] == 3  # a damaged file damages only itself


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_is_refused_for_safety_without_unsafe_advice(tmp_path):
    marker = tmp_path / "it_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"syncstep": {"version": "0"}, "state_dict": {}, "x": Evil(marker)}, evil)
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.load(str(evil))
    message = str(raised.value)
    assert "refused to load" in message and "for safety" in message and "system" in message, message
    assert "corrupted" not in message and "weights_only=False" not in message, message
    assert "set to `False`" not in message and "will likely succeed" not in message, message
    assert not marker.exists()


def fit_tiny(root, n, ckpt_path=None, optimizer="sgd", **kwargs):
    t = trainer(root, **kwargs)
    t.fit(Tiny(optimizer=optimizer), loader(dataset(n), 4, shuffle=True), ckpt_path=ckpt_path)
    return t


@pytest.mark.parametrize("n, steps", [(48, 12), (12, 3)])
def test_resume_after_the_dataset_changed_size_says_so_and_restarts_the_epoch(tmp_path, capsys, n, steps):
    fit_tiny(tmp_path, 32, max_steps=5)  # stops 20 samples into epoch 0 (of 8 steps)
    capsys.readouterr()
    resumed = fit_tiny(tmp_path, n, ckpt_path="last")
    out = capsys.readouterr().out
    assert f"the training set has {n} samples, the checkpoint's run had 32" in out, out
    assert "20 samples into epoch 0" in out and "starts again from its beginning" in out, out
    assert resumed.global_step == 5 + steps  # the whole epoch on the new data; never a silent step 0


def test_resume_into_another_optimizer_names_both(tmp_path):
    fit_tiny(tmp_path, 32, max_steps=3, optimizer="sgd_momentum")
    with pytest.raises(checkpoint.CheckpointError, match="state of a SGD optimizer, but configure_optimizers now "
                                                         "returns a Adam"):
        fit_tiny(tmp_path, 32, ckpt_path="last", optimizer="adam", max_steps=6)


def test_an_empty_training_set_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="the training set is empty"):  # (shuffle=True: torch's own error)
        trainer(tmp_path).fit(Tiny(), loader(dataset(0), 4))


class Unused(Tiny):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(3, 3)


def test_ddp_unused_parameters_error_names_the_syncstep_strategy(tmp_path):
    t = trainer(tmp_path, strategy="ddp", devices=1, max_steps=3, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="find_unused_parameters") as raised:
        t.fit(Unused(), loader(dataset(16), 4))
    assert any('strategy="ddp_find_unused_parameters_true"' in note for note in raised.value.__notes__)


class StopAt(syncstep.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            trainer.should_stop = True


def test_should_stop_mid_epoch_stops_after_that_step_with_a_checkpoint(tmp_path):
    t = trainer(tmp_path, max_epochs=3, callbacks=[StopAt()])
    t.fit(Tiny(), loader(dataset(40), 4))
    assert t.global_step == 3  # Lightning's rule (before: the epoch's end, step 10)
    last = checkpoint.load(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert last["loop"] == {"epoch": 0, "global_step": 3, "epoch_sample": 12}


def test_the_next_launch_removes_a_dead_launchers_rendezvous_directory(tmp_path):
    from syncstep import selflaunch

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tempfile.mkdtemp(prefix="syncstep-launch-", dir=tmp_path)
    live = tempfile.mkdtemp(prefix="syncstep-launch-", dir=tmp_path)
    for path, pid in ((stale, dead.pid), (live, os.getpid())):
        with open(os.path.join(path, "launcher.pid"), "w") as f:
            f.write(str(pid))
    selflaunch.remove_stale_rendezvous(str(tmp_path))
    assert not os.path.exists(stale) and os.path.exists(live)


class TermAt(syncstep.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_without_checkpointing_says_that_no_checkpoint_was_written(tmp_path, capsys):
    t = trainer(tmp_path, enable_checkpointing=False, max_epochs=3, callbacks=[TermAt()])
    with pytest.raises(syncstep.Preempted):
        t.fit(Tiny(), loader(dataset(40), 4))
    out = capsys.readouterr().out
    assert "SIGTERM received at step 2; exiting WITHOUT a checkpoint" in out, out
    assert "checkpoint saved" not in out and not (tmp_path / "checkpoints").exists()


class FillDiskForLogs(syncstep.Callback):
    """After the checkpoint of step 2: fill the disk (for real), or make the CSV logger's writes fail as on
    a full disk."""

    def __init__(self, root, real: bool):
        self.root, self.real = root, real

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != 3:
            return
        if self.real:
            fill_disk(self.root)
            return

        def save():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        trainer.loggers[0].save = save


def test_a_full_disk_during_log_writes_says_so_and_the_checkpoint_is_intact(tmp_path):
    disk = tmp_path / "disk"
    with tmpfs(disk, "size=512k") as real:
        csv = syncstep.loggers.CSVLogger(save_dir=str(disk), flush_logs_every_n_steps=1)
        t = syncstep.Trainer(accelerator="cpu", default_root_dir=str(disk), logger=[csv], log_every_n_steps=1,
                             enable_progress_bar=False, enable_model_summary=False, max_steps=8,
                             ckpt_every_n_steps=2, callbacks=[FillDiskForLogs(disk, real)])
        first = disk / "checkpoints" / "epoch=0-step=2.ckpt"
        with pytest.raises(OSError) as raised:  # the log write at step 3 comes before the next save
            t.fit(Tiny(), loader(dataset(40), 4))
        errors, error = [], raised.value
        while error is not None:  # the first failure and what failed after it (the logger's finalize)
            errors.append(error)
            error = error.__context__
        notes = [note for e in errors for note in getattr(e, "__notes__", ())]
        assert any(getattr(e, "errno", None) == errno.ENOSPC for e in errors), errors
        assert any("the disk is full (ENOSPC)" in note and "default_root_dir" in note for note in notes), notes
        assert checkpoint.load(str(first))["loop"]["global_step"] == 2
        assert sha256(first) == sha256(disk / "checkpoints" / "last.ckpt")
