"""The manifest: the record whose presence makes a checkpoint exist.

Pure: no torch, no I/O.  A manifest is strict, versioned JSON with
``format_version`` first and snake_case keys, readable by anything that reads
JSON.  ``Manifest.from_json(m.to_json()) == m`` always holds.

On disk a checkpoint is ``<root>/step-0000000500/`` holding DCP shard files,
DCP's ``.metadata`` and ``manifest.json``, which is written last.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointNotFoundError, CorruptCheckpointError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STEP_DIR_PATTERN = re.compile(r"step-([0-9]{10})")  # ASCII digits only, as step_dir_name writes
_MAX_STEP = 10**10 - 1
BRANCH_PATTERN = re.compile(r"[0-9a-f]{1,32}")
"""A lineage branch id: lowercase hex (``branches.new_branch_id`` writes 8 digits)."""
MAX_JSON_BYTES = 64 << 20
"""The largest JSON file asyncckpt reads back (a manifest of 500 000 files fits): a bigger one
is damage, refused before it is read."""
_PLAIN_NAME = re.compile(r"[^/\\\x00-\x1f]+")


def parse_json(data: str | bytes, source: str) -> Any:
    """``json.loads`` for a file asyncckpt reads back; anything unparsable (not UTF-8, a syntax
    error, nesting too deep for the parser) raises ``CorruptCheckpointError`` naming ``source``."""
    try:
        return json.loads(data)
    except RecursionError as e:
        raise CorruptCheckpointError(source, "JSON", "nesting too deep to parse") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(source, "JSON", "unparsable text", str(e)) from e


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is a file name inside its folder: no separator, no ``..``, not absolute."""
    return isinstance(name, str) and name not in (".", "..") and bool(_PLAIN_NAME.fullmatch(name))


def step_dir_name(step: int) -> str:
    """The folder name of a step: ``step-`` and ten zero-padded digits."""
    check_step(step)
    return f"step-{step:010d}"


def parse_step_dir(name: str) -> int | None:
    """The step a folder name stands for, or None if it is not a step folder."""
    m = STEP_DIR_PATTERN.fullmatch(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def check_step(step: object) -> int:
    """Validate a step number: a non-negative int (bools are refused)."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise _step_error(step, "a non-negative integer")
    if step < 0 or step > _MAX_STEP:
        raise _step_error(step, f"an integer in [0, {_MAX_STEP}]")
    return step


def _step_error(step: object, expected: str) -> Exception:
    from .errors import ConfigError

    return ConfigError(f"step={step!r} is not valid: expected {expected}")


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One file of a checkpoint, relative to its folder."""

    path: str
    """File name inside the checkpoint folder."""
    size: int
    """Size in bytes as stored."""
    checksum: str | None = None
    """Digest of the stored bytes, ``"crc32:%08x"``; None when not recorded."""
    codec: str | None = None
    """How tensors inside the file are encoded: ``"zstd"`` or None for plain DCP."""
    rank: int | None = None
    """The rank that wrote the file; None for files written by the coordinator alone."""
    raw_bytes: int | None = None
    """Decoded size of all the items in a compressed shard: reading bounds every decode by it
    (a damaged header cannot make a reader allocate more); None when not recorded."""

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "size": self.size, "checksum": self.checksum,
               "codec": self.codec, "rank": self.rank}
        return out if self.raw_bytes is None else {**out, "raw_bytes": self.raw_bytes}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything known about one committed checkpoint."""

    step: int
    epoch: int | None = None
    time: str = ""
    """UTC time of the save, ISO 8601 with a ``Z`` suffix."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    world_size: int = 1
    files: tuple[FileEntry, ...] = ()
    param_count: int = 0
    codec: str | None = None
    torch_version: str = ""
    git_commit: str | None = None
    host: str = ""
    device: str = ""
    milestones_reached: tuple[int, ...] = ()
    """Parameter-count milestones the run had reached by this save (restarts remember them)."""
    branch: str | None = None
    """Lineage: the id (short hex) of the line of saves this one belongs to; a rollback (a
    restore of an older checkpoint, then a save) starts a new one.  None in older manifests."""
    parent: int | None = None
    """Lineage: the step the run that wrote this checkpoint restored, or None (a fresh start)."""
    rank_metric: str | None = None
    """The metric the writing manager's retention ranked by (its primary ``best_metric``), so
    ``"best"`` means the same to a reader without a policy; None when it ranked by none (and in
    older manifests).  Written only when set: older readers ignore it."""
    rank_mode: str | None = None
    """``"min"`` or ``"max"``: how ``rank_metric`` was ranked; None with no ``rank_metric``."""
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "step": self.step,
            "epoch": self.epoch,
            "time": self.time,
            "metrics": {k: _json_float(v) for k, v in self.metrics.items()},
            "tags": list(self.tags),
            "world_size": self.world_size,
            "param_count": self.param_count,
            "codec": self.codec,
            "torch_version": self.torch_version,
            "git_commit": self.git_commit,
            "host": self.host,
            "device": self.device,
            "milestones_reached": list(self.milestones_reached),
            "branch": self.branch,
            "parent": self.parent,
            "files": [f.to_dict() for f in self.files],
            **({} if self.rank_metric is None else {"rank_metric": self.rank_metric,
                                                    "rank_mode": self.rank_mode})}

    def to_json(self) -> str:
        return json.dumps(seal(self.to_dict()), indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<manifest>") -> "Manifest":
        """Parse a manifest strictly; anything malformed raises CorruptCheckpointError."""
        raw = parse_json(text, source)
        if not isinstance(raw, dict):
            raise CorruptCheckpointError(source, "a JSON object", type(raw).__name__)
        return _parse(raw, source)


def _json_float(v: float) -> float | str:
    v = float(v)
    return v if math.isfinite(v) else str(v)


_REQUIRED = ("format_version", "step", "time", "world_size", "files", "manifest_checksum")
CHECKSUM_KEY = "manifest_checksum"


def content_checksum(raw: Mapping[str, Any]) -> str:
    """CRC-32 of a manifest's canonical JSON without its own checksum key."""
    body = {k: v for k, v in raw.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return f"crc32:{zlib.crc32(text.encode()):08x}"


def seal(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with ``manifest_checksum`` (re)computed, last; a flipped bit anywhere in a
    manifest (a metric, the time, a file's size) then fails to parse instead of misleading."""
    body = {k: v for k, v in raw.items() if k != CHECKSUM_KEY}
    body[CHECKSUM_KEY] = content_checksum(body)
    return body


def _parse(raw: dict[str, Any], source: str) -> Manifest:
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CorruptCheckpointError(source, f"keys {list(_REQUIRED)}", f"missing {missing}")
    version = raw["format_version"]
    if not isinstance(version, int) or version < 1:
        raise CorruptCheckpointError(source, "an integer format_version", repr(version))
    if version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            source, f"format_version <= {FORMAT_VERSION}", version,
            "written by a newer asyncckpt; upgrade to read it")
    try:
        actual = content_checksum(raw)
    except (TypeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(source, "JSON values", "unserialisable content", str(e)) from e
    if raw[CHECKSUM_KEY] != actual:
        raise CorruptCheckpointError(source, raw[CHECKSUM_KEY], actual,
                                     "manifest content does not match its checksum")
    try:
        files = tuple(_parse_file(f) for f in raw["files"])
        return Manifest(
            format_version=version,
            step=check_step(raw["step"]),
            epoch=_opt_int(raw.get("epoch")),
            time=str(raw["time"]),
            metrics={str(k): float(v) for k, v in (raw.get("metrics") or {}).items()},
            tags=tuple(str(t) for t in raw.get("tags") or ()),
            world_size=int(raw["world_size"]),
            files=files,
            param_count=int(raw.get("param_count") or 0),
            codec=raw.get("codec"),
            torch_version=str(raw.get("torch_version") or ""),
            git_commit=raw.get("git_commit"),
            host=str(raw.get("host") or ""),
            device=str(raw.get("device") or ""),
            milestones_reached=tuple(sorted(_milestone_list(raw.get("milestones_reached")))),
            branch=_opt_branch(raw.get("branch")),
            parent=_opt_parent(raw.get("parent")),
            **_ranking(raw.get("rank_metric"), raw.get("rank_mode")),
        )
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CorruptCheckpointError(source, "a valid manifest", "malformed field", str(e)) from e


def _milestone_list(v: Any) -> list[int]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                          for x in v):
        raise ValueError(f"milestones_reached must be a list of positive integers, got {v!r}")
    return v


def _opt_branch(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not BRANCH_PATTERN.fullmatch(v):
        raise ValueError(f"branch must be a short lowercase hex id, got {v!r}")
    return v


def _opt_parent(v: Any) -> int | None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_STEP):
        raise ValueError(f"parent must be a step number or null, got {v!r}")
    return v


def _ranking(metric: Any, mode: Any) -> dict[str, str | None]:
    if metric is None and mode is None:
        return {"rank_metric": None, "rank_mode": None}
    if not isinstance(metric, str) or not metric or mode not in ("min", "max"):
        raise ValueError(f"rank_metric must be a metric name and rank_mode 'min' or 'max', got "
                         f"{metric!r} and {mode!r}")
    return {"rank_metric": metric, "rank_mode": mode}


def _opt_int(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer or null, got {v!r}")
    return v


def _parse_file(f: Any) -> FileEntry:
    if not isinstance(f, dict) or "path" not in f or "size" not in f:
        raise ValueError(f"file entry {f!r} lacks path or size")
    path, size, checksum, codec = f["path"], f["size"], f.get("checksum"), f.get("codec")
    if not is_plain_name(path):
        raise ValueError(f"file entry path {path!r} must be a plain file name inside the folder")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"file entry {path!r}: size {size!r} is not a non-negative integer")
    if not (checksum is None or isinstance(checksum, str)) or not (codec is None or isinstance(codec, str)):
        raise ValueError(f"file entry {path!r}: checksum and codec must be strings or null")
    raw_bytes = _opt_int(f.get("raw_bytes"))
    if raw_bytes is not None and raw_bytes < 0:
        raise ValueError(f"file entry {path!r}: raw_bytes {raw_bytes!r} is negative")
    return FileEntry(path=path, size=size, checksum=checksum, codec=codec,
                     rank=_opt_int(f.get("rank")), raw_bytes=raw_bytes)


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint as ``CheckpointManager.list()`` reports it."""

    step: int
    epoch: int | None
    path: str
    """URL of the checkpoint folder (credentials never included)."""
    time: str
    bytes: int
    metrics: Mapping[str, float]
    tags: tuple[str, ...]
    committed: bool = True

    @classmethod
    def from_manifest(cls, m: Manifest, path: str, extra_tags: Sequence[str] = ()) -> "CheckpointInfo":
        tags = tuple(dict.fromkeys((*m.tags, *extra_tags)))
        return cls(step=m.step, epoch=m.epoch, path=path, time=m.time, bytes=m.total_bytes,
                   metrics=dict(m.metrics), tags=tags)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "path": self.path, "time": self.time,
                "bytes": self.bytes, "metrics": {k: _json_float(v) for k, v in self.metrics.items()},
                "tags": list(self.tags), "committed": self.committed}


def select(manifests: Iterable[Manifest], which: int | str, root: str) -> Manifest:
    """Pick ``"latest"`` or a step number out of committed manifests."""
    by_step = {m.step: m for m in manifests}
    if which == "latest":
        if not by_step:
            raise CheckpointNotFoundError("to restore", root, ())
        return by_step[max(by_step)]
    if isinstance(which, str) and which.isdigit():
        which = int(which)
    step = check_step(which)
    if step not in by_step:
        raise CheckpointNotFoundError(f"at step {step}", root, by_step)
    return by_step[step]
