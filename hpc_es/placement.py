"""Where a run's pieces live: the model folder (``model=tiny`` -> the cache), each replica's device, and
which rank and replica evaluate each population member."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from hpc_es.comm import Comm
from hpc_es.config import Config, default_cache_dir
from hpc_es.errors import HpcEsError
from hpc_es.models import ensure_tiny_model


def resolve_model_path(cfg: Config) -> str:
    """``model=tiny`` -> the cached tiny model folder (built on first use)."""
    if cfg.model != "tiny":
        return cfg.model
    return ensure_tiny_model(cfg.tiny, default_cache_dir(cfg))


def local_devices(cfg: Config, comm: Comm) -> list[torch.device]:
    """The device of each replica this rank holds (a device repeats with dist.replicas_per_device)."""
    kind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    copies = cfg.dist.replicas_per_device
    if kind == "cpu":
        return [torch.device("cpu")] * (max(1, cfg.dist.devices_per_rank) * copies)
    if not torch.cuda.is_available():
        raise HpcEsError("device=cuda but torch sees no GPU (check CUDA_VISIBLE_DEVICES and the torch build)")
    count = torch.cuda.device_count()
    local_size = getattr(comm, "local_size", 1)
    per = cfg.dist.devices_per_rank or (count // local_size if local_size > 1 and count >= local_size else count)
    offset = comm.local_rank * per if count >= local_size * per and local_size > 1 else 0
    if offset + per > count:
        raise HpcEsError(f"rank {comm.rank} needs GPUs {offset}..{offset + per - 1} but sees only {count}")
    devices = [torch.device("cuda", offset + j) for j in range(per) for _ in range(copies)]
    # This rank's first GPU becomes the process's current device: without it every rank creates a context
    # on cuda:0 (pin_memory, default streams, torch.cuda calls without a device all use the current one).
    torch.cuda.set_device(devices[0])
    return devices


def device_scope(device: torch.device) -> ContextManager[Any]:
    """Make ``device`` the calling thread's current CUDA device for the block (a no-op elsewhere).

    The current device is per thread: a pool thread starts on cuda:0, where it would create a context
    and put default allocations (pinned staging, streams) of another rank's GPU.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def slot_owner(member: int, world: int, per_rank: int) -> tuple[int, int]:
    """(rank, replica) that evaluates ``member``: round-robin over ranks, then over the rank's replicas.

    Every rank gets floor(N/world) or ceil(N/world) members (so none idles while N >= world), and a
    rank's replicas differ by at most one member.
    """
    return member % world, (member // world) % per_rank
