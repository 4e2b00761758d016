"""Seeding and the RNG state a checkpoint carries (plain types and tensors only, for a safe load)."""

from __future__ import annotations

import random
from typing import Any

import torch


def seed_everything(seed: int | None = None, workers: bool = False) -> int:
    """Seed Python, NumPy (if installed) and torch on this process, as Lightning's seed_everything.

    ``seed=None`` takes ``PL_GLOBAL_SEED`` from the environment, else 0. ``workers=True`` also seeds
    Python's and NumPy's RNGs in every DataLoader worker, from the worker's torch seed and the rank
    (so that ranks draw different augmentations). Returns the seed.
    """
    import os

    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = str(int(workers))
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    return seed


def seed_worker(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn`` under ``seed_everything(workers=True)``."""
    import os

    rank = int(os.environ.get("RANK", "0") or 0)
    seed = (torch.initial_seed() + 1_000_003 * rank) % 2**32
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy

        name, keys, pos, has_gauss, gauss = numpy.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    return state


def _plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    return obj


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        try:
            import numpy

            name, keys, pos, has_gauss, gauss = state["numpy"]
            numpy.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
        except ImportError:
            pass


def set_determinism(deterministic: bool | str | None, benchmark: bool | None) -> None:
    """``Trainer(deterministic=..., benchmark=...)``: torch's deterministic algorithms and cuDNN's autotuner."""
    import os

    if deterministic is not None:
        torch.use_deterministic_algorithms(bool(deterministic), warn_only=deterministic == "warn")
        if deterministic:
            # cuBLAS needs a fixed workspace to be deterministic (torch's documentation).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
    if benchmark is not None:
        torch.backends.cudnn.benchmark = benchmark
