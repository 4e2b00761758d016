"""Sharded checkpoints (``FSDPStrategy(state_dict_type="sharded")``): every rank writes its own shards.

A checkpoint is a directory ``epoch=E-step=S.ckpt/`` holding

- torch.distributed.checkpoint's files for the model's and optimizers' tensors (``__R_0.distcp``,
  one per rank, and ``.metadata``, which says where each piece of each tensor is), and
- ``run_state.pt``: everything else a syncstep checkpoint holds (run state, schedulers, RNG, the
  optimizers' param_groups), plain data written with torch.save, as in the one-file format.

Atomic as a whole: every rank writes into ``.epoch=E-step=S.ckpt.tmp-<pid of rank 0>``. ``dcp.save``
returns on any rank only once rank 0 has written ``.metadata``, i.e. once every rank's shards are on
disk; then rank 0 writes ``run_state.pt``, fsyncs, and renames the directory into place. A crash at
any moment before that rename leaves the previous checkpoints as they were (the next save removes the
orphaned temporary). Replacing a checkpoint of the same name (an epoch's end right after a step
checkpoint at that step) takes two renames; a crash between them leaves the older checkpoints.

Loaded safely: torch's reader unpickles ``.metadata`` with plain ``pickle`` and non-tensor entries with
``torch.load(weights_only=False)``, either of which runs whatever code a crafted file holds. The
reader here unpickles ``.metadata`` allowing only the classes DCP's metadata is made of, refuses any
non-tensor entry and any shard file name that is not DCP's, and reads tensors with
``torch.load(weights_only=True)`` (DCP's own); ``run_state.pt`` loads with weights_only=True.

Resharded on load: the running model is asked for its state dict (DTensor shards under fsdp at any
world size, whole tensors under ddp or on one device), DCP reads into it whichever pieces each rank
needs, and the strategy's state-dict setters put them in place. So a sharded checkpoint resumes on
another number of devices, or under ddp, exactly.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import warnings
from typing import Any

import torch
import torch.distributed as dist

from syncstep import checkpoint as ckpt

RUN_STATE = "run_state.pt"
_SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")


def is_sharded(state: dict) -> bool:
    return "sharded" in state


@contextlib.contextmanager
def _one_process_is_intended() -> Any:
    """Without a process group (one device, no launcher) DCP reads and writes alone, as intended; it
    warns that it assumes so every time."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# -- saving ---------------------------------------------------------------------------------------------

def _split_optimizer_state(state: dict) -> tuple[dict, dict]:
    """(tensors for DCP, plain data for run_state.pt) of a name-keyed optimizer state dict."""
    tensors: dict[str, dict] = {}
    plain: dict[str, dict] = {}
    for fqn, entry in state.get("state", {}).items():
        for key, value in entry.items():
            (tensors if isinstance(value, torch.Tensor) else plain).setdefault(fqn, {})[key] = value
    return tensors, {"param_groups": state.get("param_groups", []), "state": plain}


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(strategy: Any, model: torch.nn.Module, optimizers: list, run_state: dict, path: str) -> None:
    """Write ``run_state`` and the model's and optimizers' shards as the directory ``path``; every rank
    calls this, and all have finished when it returns on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    directory = os.path.dirname(os.path.abspath(path))
    rank0 = strategy.global_rank == 0
    tmp = strategy.broadcast_object(lambda: os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}"))
    if rank0:
        os.makedirs(directory, exist_ok=True)
        ckpt.remove_stale_temporaries(directory)
        ckpt.remove(tmp)
        os.makedirs(tmp)
    strategy.barrier()  # the folder exists before any rank writes into it
    tensors: dict[str, Any] = {"model": get_model_state_dict(model), "optimizers": {}}
    plain = []
    for i, opt in enumerate(optimizers):
        tensors["optimizers"][str(i)], rest = _split_optimizer_state(get_optimizer_state_dict(model, opt))
        plain.append(rest)
    with _one_process_is_intended():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=not dist.is_initialized())
    if rank0:
        state = {**run_state, "state_dict": {}, "optimizer_states": plain,
                 "sharded": {"format": 1, "world_size": strategy.world_size}}
        ckpt.check_plain(state, "the run state")
        with open(os.path.join(tmp, RUN_STATE), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if os.path.lexists(path):  # a checkpoint of the same name: moved aside, then removed
            old = os.path.join(directory, f".{os.path.basename(path)}.old.tmp-{os.getpid()}")  # a temporary too
            os.replace(path, old)
            os.replace(tmp, path)
            ckpt.remove(old)
        else:
            os.replace(tmp, path)
        _fsync(directory)


# -- loading --------------------------------------------------------------------------------------------

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch.Size, dtypes and paths; nothing else (no callables, no code)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")


def read_metadata(path: str) -> Any:
    """The ``.metadata`` of the DCP checkpoint in ``path``, read safely and checked."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    file = os.path.join(path, ".metadata")
    if not os.path.isfile(file):
        raise ckpt.CheckpointError(f"{path} is not a complete sharded checkpoint (no .metadata).")
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as error:
        raise ckpt.CheckpointError(
            f"refused to load {path}: its .metadata holds Python objects other than DCP's metadata, which could "
            f"run code when unpickled ({error})."
        ) from None
    except Exception as error:
        raise ckpt.CheckpointError(f"{path}/.metadata is not readable; it is probably corrupted ({error}).") from None
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise ckpt.CheckpointError(f"{path}/.metadata is not torch.distributed.checkpoint metadata.")
    data = [key for key, value in entries.items() if isinstance(value, BytesStorageMetadata)]
    if data:
        raise ckpt.CheckpointError(
            f"refused to load {path}: it holds non-tensor entries ({', '.join(data[:3])}), which torch would load "
            "with pickle; syncstep's sharded checkpoints hold tensors only."
        )
    for info in (metadata.storage_data or {}).values():
        if not _SHARD_FILE.match(str(getattr(info, "relative_path", ""))):
            raise ckpt.CheckpointError(f"refused to load {path}: it names a shard file {info.relative_path!r} "
                                       "that is not one of DCP's.")
    return metadata


def read_run_state(path: str) -> dict:
    """A sharded checkpoint's run state, with ``state_dict`` as meta-device tensors of the model's shapes
    (for ``syncstep inspect`` and the checks before a resume); CheckpointError if it is not usable."""
    metadata = read_metadata(path)
    state = ckpt.load(os.path.join(path, RUN_STATE)) if os.path.isfile(os.path.join(path, RUN_STATE)) else None
    if state is None:
        raise ckpt.CheckpointError(f"{path} is not a complete sharded checkpoint (no {RUN_STATE}).")
    if not is_sharded(state):
        raise ckpt.CheckpointError(f"{path}/{RUN_STATE} is not a sharded checkpoint's run state.")
    state["state_dict"] = {
        key.removeprefix("model."): torch.empty(tuple(value.size), dtype=value.properties.dtype, device="meta")
        for key, value in metadata.state_dict_metadata.items() if key.startswith("model.")}
    state["sharded"]["files"] = len({info.relative_path for info in (metadata.storage_data or {}).values()})
    return state


def _reader(path: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            raise ckpt.CheckpointError("a sharded checkpoint entry is not a tensor; refusing to unpickle it.")

    return TensorsOnly()


def load(model: torch.nn.Module, optimizers: list, path: str, state: dict) -> None:
    """The sharded checkpoint at ``path`` (its run state already read: ``state``) into ``model`` and
    ``optimizers`` as the running strategy holds them; every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model_state = get_model_state_dict(model)
    # The optimizers' own state dicts give the shapes to read into (torch initialises an empty state
    # first with a zero-gradient, zero-LR step, which changes no parameter).
    optimizer_states = [get_optimizer_state_dict(model, opt) for opt in optimizers]
    targets = {"model": model_state,
               "optimizers": {str(i): _split_optimizer_state(s)[0] for i, s in enumerate(optimizer_states)}}
    if not targets["optimizers"]:
        del targets["optimizers"]
    try:
        with _one_process_is_intended():
            dcp.load(targets, storage_reader=_reader(path), planner=_planner(), no_dist=not dist.is_initialized())
    except ckpt.CheckpointError:
        raise
    except Exception as error:
        raise ckpt.CheckpointError(
            f"{path} does not fit this model: {str(error).splitlines()[0] if str(error) else type(error).__name__}. "
            "The model and configure_optimizers must be those of the saved run."
        ) from None
    set_model_state_dict(model, model_state)
    for i, opt in enumerate(optimizers):
        saved = state["optimizer_states"][i]
        tensors = targets["optimizers"][str(i)]
        merged = {fqn: {**tensors.get(fqn, {}), **saved["state"].get(fqn, {})}
                  for fqn in {*tensors, *saved["state"]}}
        set_optimizer_state_dict(model, opt, {"state": merged, "param_groups": saved["param_groups"]})
