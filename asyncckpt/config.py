"""Manager options: one validated dataclass, built from keywords or YAML.

Pure: no torch, no I/O.  ``ManagerOptions.__post_init__`` raises
``ConfigError`` naming the field, the value, and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .retention import Retention
from .schedule import Schedule

COMPRESSIONS = ("zstd", None)
STAGINGS = ("auto", "pinned", "device")
ON_ERROR = ("raise", "warn")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError.field(name, value, f"an integer >= {low}")


@dataclass(frozen=True, kw_only=True)
class ManagerOptions:
    """Everything ``CheckpointManager`` takes besides its root."""

    retention: Retention | None = None
    """Which committed checkpoints to keep; None keeps all."""
    schedule: Schedule | None = None
    """When ``maybe_save`` saves; None means only when forced."""
    compression: str | None = "zstd"
    """``"zstd"`` (byte-grouped floats, zstd frames) or None for plain DCP files."""
    zstd_level: int = 1
    """zstd compression level (1 is fast and already gains most of the ratio)."""
    staging: str = "auto"
    """``"pinned"``, ``"device"`` or ``"auto"``; CPU training always stages with a plain copy."""
    on_error: str = "raise"
    """``"raise"``: a background failure is raised by the next call; ``"warn"``: logged only."""
    max_pending: int = 2
    """Saves staged but not yet committed before ``save()`` waits for the writer."""
    writer_threads: int = 2
    """Files written (and compressed) in parallel per rank."""
    verify_on_restore: bool = True
    """Check every file's checksum while restoring."""
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    """Passed to fsspec for the root (endpoint, credentials, ...)."""
    backup: str | None = None
    """Optional second storage URL that committed checkpoints are mirrored to."""
    backup_storage_options: Mapping[str, Any] = field(default_factory=dict)
    """fsspec options for the backup URL."""
    backup_retention: Retention | None = None
    """Retention on the backup; None uses ``retention``."""
    save_on_signal: bool = False
    """Install SIGTERM/SIGINT handlers that make the next ``maybe_save`` save and stop."""

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ConfigError.field("compression", self.compression, '"zstd" or None')
        if isinstance(self.zstd_level, bool) or not isinstance(self.zstd_level, int) \
                or not -5 <= self.zstd_level <= 22 or self.zstd_level == 0:
            raise ConfigError.field("zstd_level", self.zstd_level, "an integer in [-5, -1] or [1, 22]")
        if self.staging not in STAGINGS:
            raise ConfigError.field("staging", self.staging, " | ".join(map(repr, STAGINGS)))
        if self.on_error not in ON_ERROR:
            raise ConfigError.field("on_error", self.on_error, '"raise" or "warn"')
        _int_at_least("max_pending", self.max_pending, 1)
        _int_at_least("writer_threads", self.writer_threads, 1)
        if self.retention is not None and not isinstance(self.retention, Retention):
            raise ConfigError.field("retention", self.retention, "a Retention or None")
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ConfigError.field("schedule", self.schedule, "a Schedule or None")
        for name in ("storage_options", "backup_storage_options"):
            if not isinstance(getattr(self, name), Mapping):
                raise ConfigError.field(name, getattr(self, name), "a dict")
        if self.backup is not None and (not isinstance(self.backup, str) or not self.backup):
            raise ConfigError.field("backup", self.backup, "a storage URL or None")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "ManagerOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        return cls(**{k: (dict(v) if k.endswith("storage_options") and v is None else v)
                      for k, v in kwargs.items() if not (k.endswith("storage_options") and v is None)})
