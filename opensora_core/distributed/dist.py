"""Process-group setup inside a job, small collectives, seeding and RNG state capture.

Under torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``... set) :func:`init_distributed` joins the
job's group; run directly (a test, a debugger) it makes a one-process group on a loopback port
chosen by the OS, so the same job code runs both ways. Backend: NCCL when CUDA is available,
gloo otherwise. Every helper here also works when no group exists (world size 1).
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Variables the single-process fallback sets (colossalai's DistCoordinator reads LOCAL_RANK).
_FALLBACK_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
_fallback_env_set: list[str] = []
_fallback_store: Any = None


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def under_torchrun() -> bool:
    """True when started by torchrun (or any launcher that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join (or create) the default process group and pick this process's device.

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. ``timeout_s`` bounds
    collectives; a timeout raises a torch.distributed error that the job wrapper maps to exit 75.
    Calling it again returns the existing group's info.
    """
    global _fallback_store
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        if under_torchrun():
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        else:
            # A TCP store on port 0 binds a free loopback port itself: no race with other jobs.
            _fallback_store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
            for key, value in _FALLBACK_ENV.items():
                if key not in os.environ:
                    os.environ[key] = value
                    _fallback_env_set.append(key)
            dist.init_process_group(
                backend=backend, store=_fallback_store, rank=0, world_size=1, timeout=timeout
            )
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def destroy_distributed() -> None:
    """Destroy the default group (if any) and undo what the single-process fallback set."""
    global _fallback_store
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in _fallback_env_set:
        os.environ.pop(key, None)
    _fallback_env_set.clear()
    _fallback_store = None


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a group of more than one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it (unchanged without a group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a picklable object; ``obj`` is ignored elsewhere)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def set_seed(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and CUDA) with ``seed + rank``; returns that seed.

    Ranks get different streams (data augmentation, noise); identical initial weights come from
    the DDP / ZeRO wrapper, which broadcasts rank 0's parameters.
    """
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def get_rng_states() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and (when available) every CUDA device.

    Only plain containers and tensors, so ``torch.load(..., weights_only=True)`` reads it back.
    """
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_states` returned (CUDA states only when both sides have CUDA)."""
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = states["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)
