"""Staging: copy the state off the training's hands so training can go on.

``stage(state_dict)`` returns a copy of every tensor in host memory (object
blobs were already serialised by ``state.py`` and are shared as they are),
together with the number of bytes it copied.  The copy is plain here: a
contiguous host tensor per item, detached from anything training mutates.
DTensors keep their wrapper around a host copy of the local shard, so DCP
still sees their global layout.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - very old torch
    DTensor = ()  # type: ignore[assignment,misc]


@dataclass
class Staged:
    """The host-side snapshot of one save."""

    state_dict: dict[str, Any]
    bytes_staged: int


def _copy_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone(memory_format=torch.contiguous_format)
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    out.copy_(t, non_blocking=True)
    return out


def _stage_value(v: Any, counter: list[int]) -> Any:
    if isinstance(v, DTensor):  # type: ignore[arg-type]
        local = _copy_tensor(v.to_local())
        counter[0] += local.numel() * local.element_size()
        return DTensor.from_local(local, v.device_mesh, v.placements, run_check=False,
                                  shape=v.shape, stride=v.stride())
    if isinstance(v, torch.Tensor):
        out = _copy_tensor(v)
        counter[0] += out.numel() * out.element_size()
        return out
    if isinstance(v, io.BytesIO):
        counter[0] += v.getbuffer().nbytes
        return v
    if isinstance(v, Mapping):
        return {k: _stage_value(x, counter) for k, x in v.items()}
    if isinstance(v, list):
        return [_stage_value(x, counter) for x in v]
    if isinstance(v, tuple):
        return tuple(_stage_value(x, counter) for x in v)
    return copy.deepcopy(v)


def stage(state_dict: Mapping[str, Any]) -> Staged:
    """Copy ``state_dict`` into host memory; returns once the copy is complete."""
    counter = [0]
    out = {k: _stage_value(v, counter) for k, v in state_dict.items()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()
    return Staged(out, counter[0])
