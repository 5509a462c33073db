"""asyncckpt: asynchronous, atomic checkpoints for PyTorch training.

``from asyncckpt import CheckpointManager, TrainState, Retention, Schedule``.
The pure parts (``Retention``, ``Schedule``, manifests) import without torch;
``CheckpointManager`` and ``TrainState`` load torch on first use.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    AsyncCkptError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    ForeignFolderError,
    IntegrityError,
    RollbackRefusedError,
    SaveError,
    StateMismatchError,
    StorageError,
    UnsafeCheckpointError,
)
from .manifest import CheckpointInfo
from .retention import Retention
from .schedule import Schedule, format_params, parse_milestones, plan_checkpoints

__version__ = "0.1.0"

_LAZY = {"CheckpointManager": "manager", "TrainState": "state", "SaveHandle": "pipeline",
         "load_weights": "weights"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'asyncckpt' has no attribute {name!r}")


__all__ = [
    "AsyncCkptError", "CheckpointExistsError", "CheckpointInfo", "CheckpointManager",
    "CheckpointNotFoundError", "ConfigError", "CorruptCheckpointError", "ForeignFolderError",
    "IntegrityError",
    "Retention", "RollbackRefusedError", "SaveError", "SaveHandle", "Schedule", "StateMismatchError", "StorageError",
    "TrainState", "UnsafeCheckpointError", "format_params", "load_weights", "parse_milestones",
    "plan_checkpoints",
]
