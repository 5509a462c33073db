"""Looking at and damaging checkpoints in tests, and comparing what comes back."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asyncckpt import CheckpointManager
from asyncckpt.manifest import MANIFEST_NAME, parse_step_dir
from asyncckpt.storage import Storage, list_committed


def committed_steps(where: CheckpointManager | str | os.PathLike[str],
                    storage_options: Mapping[str, Any] | None = None) -> list[int]:
    """The committed steps, oldest first: a manager's ``list()`` (call ``wait()`` first where its
    retention must have run), or what a root's manifests say."""
    if isinstance(where, CheckpointManager):
        return [info.step for info in where.list()]
    return [m.step for m in list_committed(Storage(os.fspath(where), storage_options))]


def step_folders(root: Path, *, with_manifest: bool = False) -> list[int]:
    """The steps of the ``step-*`` folders on a local root (committed or not), oldest first."""
    return sorted(s for p in root.iterdir() if (s := parse_step_dir(p.name)) is not None
                  and (not with_manifest or (p / MANIFEST_NAME).exists()))


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:010d}"


def shard_of(folder: Path) -> Path:
    """The first ``.distcp`` file of a checkpoint folder."""
    return min(folder.glob("*.distcp"))


def flip_byte(path: Path, offset: int = -1, mask: int = 0xFF) -> bytes:
    """XOR one byte of a file with ``mask`` (offset from the end when negative); the bytes before."""
    data = path.read_bytes()
    damaged = bytearray(data)
    damaged[offset] ^= mask
    path.write_bytes(bytes(damaged))
    return data


def tensors_of(x: nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    return dict(x.state_dict() if isinstance(x, nn.Module) else x)


def assert_same_tensors(got: nn.Module | Mapping[str, Any], expected: nn.Module | Mapping[str, Any]) -> None:
    """The same keys, and for each the same value (``torch.equal`` for tensors: dtype, shape and
    every element), naming what differs first."""
    a, b = tensors_of(got), tensors_of(expected)
    assert a.keys() == b.keys(), f"missing {sorted(b.keys() - a.keys())}, extra {sorted(a.keys() - b.keys())}"
    for k, v in b.items():
        if isinstance(v, torch.Tensor):
            assert isinstance(a[k], torch.Tensor) and a[k].dtype == v.dtype and torch.equal(a[k], v), \
                f"{k}: {a[k]!r} != {v!r}"
        else:
            assert a[k] == v, f"{k}: {a[k]!r} != {v!r}"


def same_tensors(got: nn.Module | Mapping[str, Any], expected: nn.Module | Mapping[str, Any]) -> bool:
    try:
        assert_same_tensors(got, expected)
    except AssertionError:
        return False
    return True
