"""Rank, world size, and CPU process groups for the manager.

The writer thread must never issue collectives on the training's communicator
(NCCL): DCP's plan exchange and the commit agreement run on a separate gloo
group created here, once, from the main thread.  A manager makes two: one
for the training thread (save planning, restore, agreeing on "latest") and
one for its writer thread, so collectives of the two threads never
interleave on one group.  Every helper is a no-op pass-through when the job
is not distributed (``group`` is None).
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


def all_reduce_max(values: list[int], group: Any) -> list[int]:
    """Element-wise max of small int lists over ``group`` (one tiny gloo all_reduce)."""
    if group is None:
        return list(values)
    import torch

    box = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in box.tolist()]
