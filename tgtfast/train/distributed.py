"""Device choice and the process group under ``torchrun``, and the few collectives the trainer needs."""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import torch

__all__ = ["resolve_device", "setup_distributed", "gather_rows", "all_min", "broadcast_object"]


def resolve_device(requested: Optional[str]) -> torch.device:
    """``requested`` (``config.device``) as a device; ``None``: CUDA when available. Under torchrun on CUDA an
    unindexed ``cuda`` is ``cuda:LOCAL_RANK``."""
    dev = requested
    if dev is None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"config.device={requested!r} but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return device


def setup_distributed(backend: Optional[str], device: torch.device) -> Tuple[bool, int, int]:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``). Returns (whether this call
    created the group, rank, world size)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        created = True
    if dist.is_available() and dist.is_initialized():
        return created, dist.get_rank(), dist.get_world_size()
    return created, 0, 1


def gather_rows(part: torch.Tensor, per: int, n: int, world_size: int) -> torch.Tensor:
    """The ranks' row shards (each at most ``per`` rows) concatenated in rank order, cut to ``n`` rows."""
    import torch.distributed as dist

    padded = torch.zeros((per,) + tuple(part.shape[1:]), dtype=part.dtype, device=part.device)
    padded[:part.shape[0]] = part
    out = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(out, padded)
    return torch.cat(out)[:n]


def all_min(value: int, device: torch.device, world_size: int) -> int:
    """The smallest ``value`` over the ranks (the value itself in a single process)."""
    if world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0])


def broadcast_object(obj: Any, world_size: int, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
