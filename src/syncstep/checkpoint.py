"""Checkpoints: atomic writes, safe loads, and finding the newest good one.

Writing: rank 0 writes ``.<name>.tmp-<pid>`` in the target directory, flushes and fsyncs it, renames it
over the final name (atomic on POSIX file systems) and fsyncs the directory. A crash at any moment
leaves either the old file or the new one under the name, never a partial file; a write that fails (a
full disk, a read-only directory) removes its temporary and raises ``CheckpointError`` saying so.
``last.ckpt`` is a copy of the newest checkpoint written the same way (not a hard link: a damaged
file must not damage both). ``lock_directory`` keeps a second run out of a directory in use.

Reading: only ``torch.load(weights_only=True)``, which refuses any pickled Python object other than
tensors and plain containers; there is no unsafe fallback. syncstep's own metadata is plain types.

A sharded checkpoint (fsdp's ``state_dict_type="sharded"``) is a directory of the same name, written
and read by ``sharded_checkpoint.py`` with the same guarantees; ``last.ckpt`` is then a symbolic link
to it. Everything here that finds, links, removes or describes checkpoints takes both.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import torch

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^epoch=(\d+)-step=(\d+)\.ckpt$")
LAST = "last.ckpt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and why."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write`` a hidden temporary beside ``path``, then rename it over ``path`` and fsync the folder;
    CheckpointError if the disk refused (full, read-only), with nothing left under ``path``'s name."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        if isinstance(error, RuntimeError) and "writ" not in str(error).lower():
            raise
        raise CheckpointError(
            f"could not write the checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Nothing was written under that name and the checkpoints already there are untouched. Free some "
            "space or pass Trainer(default_root_dir=...) a writable directory (or enable_checkpointing=False)."
        ) from error
    finally:
        try:
            if os.path.lexists(tmp):
                remove(tmp)
        except OSError:
            pass
    _fsync_dir(directory)


def atomic_save(obj: Any, path: str) -> None:
    """Write ``obj`` with torch.save so that ``path`` is always either the old or the new file."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    _replace_atomically(path, write)


def atomic_copy(source: str, path: str) -> None:
    """Make ``path`` a copy of ``source``, atomically (a sharded checkpoint: a symbolic link to it)."""

    def write(tmp: str) -> None:
        if os.path.isdir(source):  # a sharded checkpoint: a relative link, so the folder can move
            os.symlink(os.path.basename(source), tmp)
            return
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    _replace_atomically(path, write)


def lock_directory(directory: str) -> tuple[int | None, str | None]:
    """Lock ``directory`` for one run (an advisory flock on the directory itself, so no file is added to
    it, dropped when the process ends, however it ends): (the lock's file descriptor, None), or (None,
    why this run may not use the directory)."""
    import fcntl

    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable")
        fd = os.open(directory, os.O_RDONLY)
    except OSError as error:
        return None, (f"cannot write checkpoints to {directory} ({type(error).__name__}: {error.strerror}). Pass "
                      "Trainer(default_root_dir=...) a writable directory, or enable_checkpointing=False.")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, (f"another run is training into {directory} (a process holds its lock); two runs in one "
                      "directory would overwrite each other's checkpoints and last.ckpt. Give this run its own "
                      "Trainer(default_root_dir=...), or wait for the other to finish.")
    except OSError:  # a file system without locks (some network mounts): go on unlocked
        return fd, None
    return fd, None


def unlock_directory(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # drops the lock


def remove_stale_temporaries(directory: str) -> None:
    """Delete temporary files left by a writer that crashed (its process is gone)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        match = re.match(r"^\..+\.tmp-(\d+)$", name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            remove(os.path.join(directory, name))
        except PermissionError:
            pass  # someone else's live process


def remove(path: str) -> None:
    """Delete a checkpoint file, link, or sharded checkpoint directory."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def load(path: str) -> dict:
    """Load a syncstep checkpoint safely (weights_only=True) or raise CheckpointError naming the file.

    For a sharded checkpoint (a directory), what loads is its run state, with the model's tensors as
    shapes only (on the meta device); ``sharded_checkpoint.load`` puts the tensors into a model.
    """
    if os.path.isdir(path):
        from syncstep.sharded_checkpoint import read_run_state

        return read_run_state(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused, reason = _unpickler_reason(str(error))
        if not refused:  # not a forbidden object: the bytes themselves are broken
            raise CheckpointError(f"{path} is not a readable checkpoint; it is probably corrupted ({reason}).") \
                from None
        raise CheckpointError(
            f"refused to load {path} for safety: it holds Python objects other than tensors and plain data, "
            f"which could run code when unpickled ({reason}). syncstep loads checkpoints only with "
            "weights_only=True and nothing in the file was run. If you did not write this file yourself, do not "
            "load it any other way."
        ) from None
    except Exception as error:  # on arbitrary bytes torch.load can raise almost anything (IndexError, ...)
        raise CheckpointError(
            f"{path} is not a readable checkpoint; it is probably truncated or corrupted "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})."
        ) from None
    if not isinstance(checkpoint, dict) or "syncstep" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} loads, but it is not a syncstep checkpoint (no 'syncstep' metadata).")
    return checkpoint


def _unpickler_reason(message: str) -> tuple[bool, str]:
    """Whether torch's weights-only unpickler refused an object (a GLOBAL it does not allow) rather than
    unreadable bytes, and the one informative line of its long message: never its advice to retry with
    weights_only=False, the unsafe thing to tell someone holding a crafted file. torch < 2.6 puts the
    reason after "WeightsUnpickler error:", later versions on a line of its own ("Trying to load
    unsupported GLOBAL posix.system whose module posix is blocked.")."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    lines = [line.split(":", 1)[1].strip() if line.startswith("WeightsUnpickler error") else line for line in lines]
    lines = [line for line in lines if line and "weights_only" not in line.replace("`", "").replace(" ", "_")]
    found = next((line for line in lines if "global" in line.lower()), None)
    if found is not None:
        return True, found
    return False, next((line for line in lines if not line.startswith("Weights only")), "unpickling failed")


def step_checkpoints(directory: str) -> list[str]:
    """``epoch=E-step=S.ckpt`` files in ``directory``, the most recently written first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _STEP_FILE.match(name)
        if match:
            path = os.path.join(directory, name)
            found.append((os.stat(path).st_mtime_ns, int(match.group(2)), path))
    return [path for _, _, path in sorted(found, reverse=True)]


def newest_valid(directory: str) -> tuple[str | None, dict | None, list[str]]:
    """The newest loadable checkpoint in ``directory`` (last.ckpt first), and the problems met on the way."""
    candidates = [os.path.join(directory, LAST)] if os.path.exists(os.path.join(directory, LAST)) else []
    candidates += step_checkpoints(directory)
    problems = []
    for path in candidates:
        try:
            return path, load(path), problems
        except (CheckpointError, FileNotFoundError) as error:
            problems.append(str(error))
    return None, None, problems


def strip_prefixes(state_dict: dict[str, Any], prefixes: Iterable[str] = ("module.", "_orig_mod.")) -> dict:
    """A plain state_dict: no DDP ``module.`` or torch.compile ``_orig_mod.`` in the keys."""
    prefixes = tuple(prefixes)
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
            key = key.replace("._orig_mod.", ".")
        out[key] = value
    return out


def check_plain(obj: Any, where: str) -> None:
    """Raise if ``obj`` holds anything weights_only loading would refuse (functions, custom objects)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(obj, (list, tuple, set)):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            check_plain(key, f"{where} key")
            check_plain(value, f"{where}[{key!r}]")
        return
    raise CheckpointError(
        f"cannot checkpoint {where}: it holds a {type(obj).__name__}, which a safe (weights_only) load "
        "refuses. Schedulers built from lambdas are fine (their state is saved without the lambda); use "
        "plain numbers and tensors in any state you add."
    )


def describe(path: str, checkpoint: dict, tensors: bool = False) -> str:
    """A human-readable summary of a checkpoint (what ``syncstep inspect`` prints)."""
    meta, loop, world = checkpoint["syncstep"], checkpoint.get("loop", {}), checkpoint.get("world", {})
    state = checkpoint["state_dict"]
    numel = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    lines = [
        f"{path}",
        f"  syncstep {meta.get('version')} (format {meta.get('format')}), {_size(path):,} bytes"
        + (f", sharded: {checkpoint['sharded']['files']} shard file(s)" if "sharded" in checkpoint else ""),
        f"  epoch {loop.get('epoch')}, global step {loop.get('global_step')}, "
        f"{loop.get('epoch_sample')} samples into the epoch",
        f"  strategy {world.get('strategy')}, {world.get('num_processes')} process(es), world size "
        f"{world.get('world_size')}, per-device batch {world.get('per_device_batch_size')} x accumulation "
        f"{world.get('accumulate_grad_batches')} = global batch {world.get('global_batch_size')} "
        f"(reference {world.get('reference_batch_size')})",
        f"  lr_scaling {world.get('lr_scaling')}, factors {world.get('lr_factors')}, warmup "
        f"{world.get('warmup_steps')} ({world.get('warmup_interval')}), precision {world.get('precision')}",
        f"  model: {len(state)} tensors, {numel:,} values; {len(checkpoint.get('optimizer_states', []))} "
        f"optimizer(s), {len(checkpoint.get('lr_schedulers', []))} scheduler(s)",
    ]
    if tensors:
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                lines.append(f"    {name}: {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}")
    return "\n".join(lines)


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
