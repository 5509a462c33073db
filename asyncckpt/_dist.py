"""Rank, world size, and a CPU process group for the writer threads.

The writer thread must never issue collectives on the training's communicator
(NCCL): DCP's plan exchange and the commit agreement run on a separate gloo
group created here, once, from the main thread.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def new_cpu_group() -> Any:
    """A gloo group over all ranks (call from every rank, on the main thread)."""
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo")


def all_gather_object(obj: Any, group: Any) -> list[Any]:
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, group: Any, src: int = 0) -> Any:
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: Any) -> None:
    if group is not None:
        dist.barrier(group=group)
