"""The one place that knows how torch's APIs differ between the versions asyncckpt runs on.

Supported: torch 2.11, 2.12 and 2.13 (``pyproject.toml`` declares the oldest; CI runs the
suite on the oldest and the newest). Everything here is a private or changed torch API;
public APIs are used directly by the other modules. Differences are detected by feature
(the value a helper returns, whether a name exists), not by parsing version strings, and
each adapter names the versions it was checked on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint import default_planner as _default_planner

# DCP's nested-dict helpers: private, stable in one module across 2.11-2.13.
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element

# The file layout of DCP's FileSystemWriter, which asyncckpt's writer reproduces so that
# plain ``dcp.load`` reads an uncompressed checkpoint: private, same shape in 2.11-2.13.
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix

# Read items for one key of a checkpoint's metadata: private, same signature in 2.11-2.13.
from torch.distributed.checkpoint.planner_helpers import _create_read_items

from torch.distributed.tensor import DTensor

# The DataLoader's iterators, which loader_position subclasses to count what was yielded
# (``_num_yielded``) and to replay an epoch's order (``_reset``, ``_next_index``): private,
# the same in 2.11-2.13.
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter, _SingleProcessDataLoaderIter

__all__ = ["DTensor", "_MultiProcessingDataLoaderIter", "_SingleProcessDataLoaderIter", "MIN_TORCH", "empty_host_cache", "flatten_state_dict", "global_plan_problems", "set_element",
           "_StorageInfo", "_StoragePrefix", "_create_read_items", "torch_release"]

MIN_TORCH = (2, 11)
"""The oldest torch release asyncckpt supports; ``pyproject.toml`` and CI follow it."""

_validate = getattr(_default_planner, "_validate_global_plan", None)


def global_plan_problems(plans: list[Any], metadata: Any) -> list[str]:
    """What DCP's own check finds wrong with a global save plan; empty when it is valid.

    ``_validate_global_plan`` returns a bool up to torch 2.11 (True = valid, the
    reasons only logged as warnings) and a list of problems from 2.12 on. Where it
    does not exist, nothing is checked here (DCP then validates in its own planner).
    """
    if _validate is None:
        return []
    verdict = _validate(plans, metadata)
    if isinstance(verdict, bool):
        return [] if verdict else ["DCP rejected the plan (its warnings above name the keys)"]
    return [str(p) for p in verdict]


def empty_host_cache() -> None:
    """Return the pinned blocks cached by torch's host allocator to the system, if it can.

    No public API exists in 2.11-2.13; ``torch._C._host_emptyCache`` is in the CUDA
    builds of all three and absent from CPU builds, where there is no pinned cache.
    """
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def torch_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``2.11.0+cu130``."""
    parts = (version or torch.__version__).split("+")[0].split(".")
    return int(parts[0]), int(parts[1])
