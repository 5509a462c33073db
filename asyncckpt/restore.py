"""The load path: find committed checkpoints, check, read safely, set state.

``load_into(...)`` compares the live state with the
checkpoint's DCP metadata first, so a missing key or a shape mismatch is
reported by name with both shapes, then reads with DCP (resharding to the live
layout) through ``CheckpointReader`` (checksums verified, nothing unpickled
outside the allow-list) and pushes the values into the live objects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata

try:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
except ImportError:  # pragma: no cover
    from torch.distributed.checkpoint._traverse import flatten_state_dict  # type: ignore[no-redef]

from .dcp_io import CheckpointReader, reraise_own
from .errors import StateMismatchError
from .manifest import Manifest
from .planner import SafeLoadPlanner
from .state import PARTS, TrainState
from .storage import Storage

log = logging.getLogger(__name__)


def _top(fqn: str) -> str:
    return fqn.split(".", 1)[0]


def check_compatible(target: dict[str, Any], md: dcp_metadata.Metadata, *, strict: bool,
                     source: str) -> None:
    """Raise StateMismatchError naming missing keys, unexpected keys, and shape mismatches."""
    flat, _ = flatten_state_dict(target)
    saved = md.state_dict_metadata
    missing = sorted(k for k, v in flat.items() if isinstance(v, torch.Tensor) and k not in saved)
    shapes = {}
    for k, v in flat.items():
        meta = saved.get(k)
        if isinstance(v, torch.Tensor) and isinstance(meta, dcp_metadata.TensorStorageMetadata):
            if tuple(meta.size) != tuple(v.shape):
                shapes[k] = (tuple(meta.size), tuple(v.shape))
    tops = {_top(k) for k in flat if _top(k).startswith(("model/", "optim/"))}
    unexpected = sorted(k for k in saved if _top(k) in tops and k not in flat)
    problems = []
    if shapes:
        problems += [f"{k}: checkpoint has shape {a}, live state has {b}" for k, (a, b) in shapes.items()]
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:10])}"
                        + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    if unexpected and strict:
        problems.append(f"in the checkpoint but not in the live state: {', '.join(unexpected[:10])}"
                        + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    if problems:
        raise StateMismatchError(f"{source} does not match the live state: " + "; ".join(problems),
                                 missing=missing, unexpected=unexpected, shapes=shapes)
    if unexpected:
        log.warning("%s: keys not in the live state were ignored: %s", source, unexpected[:10])


def load_into(folder: Storage, manifest: Manifest, state: TrainState, *, rank: int,
              group: Any, strict: bool = True, verify: bool = True,
              parts: Iterable[str] = PARTS) -> None:
    """Read the checkpoint in ``folder`` into ``state`` (every rank calls this)."""
    reader = CheckpointReader(folder, files={f.path: f for f in manifest.files}, verify=verify)
    md = reader.read_metadata()
    available = {_top(k) for k in md.state_dict_metadata}
    target = state.load_targets(rank, available, parts)
    if not strict:
        _drop_missing(target, md)
    check_compatible(target, md, strict=strict, source=folder.url)
    try:
        dcp.load(target, storage_reader=reader, planner=SafeLoadPlanner(folder.url),
                 process_group=group, no_dist=group is None)
    except Exception as e:
        reraise_own(e)
        raise
    state.apply(target, rank, strict=strict)


def _drop_missing(target: dict[str, Any], md: dcp_metadata.Metadata) -> None:
    """With strict=False, keys the checkpoint lacks are left as they are (and reported)."""
    saved = md.state_dict_metadata
    for top, sub in list(target.items()):
        if isinstance(sub, dict) and top.startswith("model/"):
            gone = [k for k in sub if f"{top}.{k}" not in saved and isinstance(sub[k], torch.Tensor)]
            for k in gone:
                del sub[k]
            if gone:
                log.warning("%s: keys missing from the checkpoint were left as they are: %s", top, gone[:10])
