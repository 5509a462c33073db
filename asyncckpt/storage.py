"""Storage: every byte asyncckpt reads or writes goes through here.

This is the only module that knows about URL schemes.  A ``Storage`` wraps one
fsspec filesystem rooted at a URL (a local path, ``file://``, ``s3://``,
``memory://``, or any registered protocol) and offers the few operations the
commit protocol needs:

1. ``open_write(rel)`` streams a file and makes it durable when the block ends
   (flush and fsync of the file on local disks; a completed upload on object
   stores).  A write that fails removes what it left.
2. ``put_atomic(rel, data, create_only=True)`` publishes a small file whole or
   not at all: a temporary file renamed into place and the folder fsynced on
   local disks; a single PUT, which is atomic, on object stores.
3. ``list_dirs``/``list_files``/``read_bytes``/``open_read``/``remove``.

Errors come out as ``StorageError`` naming the operation and the URL (never
credentials); transient ones are retried with exponential backoff and jitter
by ``Retry``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec

from . import codec as _codec
from .errors import CheckpointExistsError, ConfigError, CorruptCheckpointError, StorageError
from .manifest import MANIFEST_NAME, Manifest, parse_step_dir, step_dir_name

log = logging.getLogger(__name__)
T = TypeVar("T")

_USERINFO = re.compile(r"^([a-zA-Z][\w+.-]*://)[^/@]*@")
_TRANSIENT_WORDS = ("slowdown", "throttl", "timeout", "timed out", "reset", "temporar",
                    "503", "500", "502", "504", "internalerror", "serviceunavailable",
                    "connection", "requesttimeout", "too many requests", "429")


def redact(url: str) -> str:
    """The URL without any ``user:secret@`` part."""
    return _USERINFO.sub(r"\1", str(url))


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying (5xx, throttling, resets, timeouts)."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError,
                        IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in _TRANSIENT_WORDS)


@dataclass(frozen=True, kw_only=True)
class Retry:
    """How transient storage errors are retried."""

    attempts: int = 5
    """Tries in all, the first included (1 disables retrying)."""
    base_delay_s: float = 0.2
    """Delay before the first retry; doubles on each further one."""
    max_delay_s: float = 5.0
    """Upper bound of a single delay."""
    deadline_s: float = 60.0
    """No retry starts after this many seconds from the first try."""

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError.field("Retry.attempts", self.attempts, "an integer >= 1")
        for name in ("base_delay_s", "max_delay_s", "deadline_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ConfigError.field(f"Retry.{name}", v, "a number >= 0")

    def delay_s(self, attempt: int) -> float:
        """Full-jitter backoff before retry number ``attempt`` (1-based)."""
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return random.uniform(cap / 2, cap)

    def call(self, fn: Callable[[], T], what: str) -> T:
        start = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below, re-raised when final
                late = time.monotonic() - start > self.deadline_s
                if attempt == self.attempts or late or not is_transient(e):
                    raise
                delay = self.delay_s(attempt)
                log.warning("transient error on %s (attempt %d/%d): %s; retrying in %.2fs",
                            what, attempt, self.attempts, type(e).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


class Storage:
    """One fsspec filesystem rooted at a URL.  Paths given to methods are relative."""

    def __init__(self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None,
                 *, retry: Retry | None = None) -> None:
        url = os.fspath(url)
        if not url:
            raise ConfigError.field("root", url, "a path or URL")
        self.url = redact(url).rstrip("/")
        self.retry = retry or Retry()
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except (ValueError, ImportError, TypeError) as e:
            raise StorageError("open", self.url, e) from e
        self.root = root.rstrip("/") or root
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols or "local" in protocols
        self.is_object_store = any(p in ("s3", "s3a", "gs", "gcs", "az", "abfs") for p in protocols)

    # -- naming -------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def child(self, rel: str) -> "Storage":
        """A Storage rooted at a sub-folder, sharing this one's filesystem."""
        sub = Storage.__new__(Storage)
        sub.__dict__.update(self.__dict__)
        sub.root, sub.url = self.path(rel), self.url_of(rel)
        return sub

    @contextlib.contextmanager
    def _errors(self, op: str, rel: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except CheckpointExistsError:
            raise
        except Exception as e:  # noqa: BLE001 - every I/O error leaves as a StorageError
            raise StorageError(op, self.url_of(rel), e) from e

    # -- writing ------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        with self._errors("mkdir", rel):
            if self.is_local or not self.is_object_store:
                self.fs.makedirs(self.path(rel), exist_ok=True)

    def check_writable(self) -> None:
        """Create the root and prove a file can be written there."""
        probe = f".asyncckpt-probe-{uuid.uuid4().hex[:12]}"
        self.makedirs()
        with self.open_write(probe) as f:
            f.write(b"ok")
        self.remove(probe)

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        """A file open for writing that is durable once the block ends without error."""
        path = self.path(rel)
        with self._errors("write", rel):
            f = self.retry.call(lambda: self.fs.open(path, "wb"), f"open {self.url_of(rel)}")
            try:
                yield f
                f.flush()
                if self.is_local:
                    os.fsync(f.fileno())
            except BaseException:
                with contextlib.suppress(Exception):
                    _discard(f)
                with contextlib.suppress(Exception):
                    self.fs.rm(path)
                raise
            f.close()

    def put_atomic(self, rel: str, data: bytes, *, create_only: bool = True) -> None:
        """Publish ``data`` at ``rel`` whole or not at all; refuse to replace unless told."""
        with self._errors("put", rel):
            if create_only and self.exists(rel):
                raise CheckpointExistsError(f"{self.url_of(rel)} already exists")
            if not self.is_local:
                self.retry.call(lambda: self.fs.pipe_file(self.path(rel), data),
                                f"put {self.url_of(rel)}")
                return
            tmp = f"{rel}.tmp-{uuid.uuid4().hex[:12]}"
            with self.open_write(tmp) as f:
                f.write(data)
            os.replace(self.path(tmp), self.path(rel))
            self.fsync_dir(rel.rsplit("/", 1)[0] if "/" in rel else "")

    def fsync_dir(self, rel: str = "") -> None:
        """Make a folder's entries durable (local disks only; a no-op elsewhere)."""
        if not self.is_local:
            return
        with self._errors("fsync", rel):
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- reading ------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        with self._errors("stat", rel):
            return bool(self.retry.call(lambda: self.fs.exists(self.path(rel)),
                                        f"stat {self.url_of(rel)}"))

    def read_bytes(self, rel: str) -> bytes:
        with self._errors("read", rel):
            return self.retry.call(lambda: self.fs.cat_file(self.path(rel)),
                                   f"read {self.url_of(rel)}")

    @contextlib.contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        with self._errors("read", rel):
            f = self.retry.call(lambda: self.fs.open(self.path(rel), "rb"),
                                f"open {self.url_of(rel)}")
            with f:
                yield f

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the sub-folders of ``rel`` (empty when it does not exist)."""
        return [name for name, info in self._ls(rel).items() if info.get("type") == "directory"]

    def list_files(self, rel: str = "") -> dict[str, int]:
        """File names of ``rel`` with their sizes (empty when it does not exist)."""
        return {name: int(info.get("size") or 0)
                for name, info in self._ls(rel).items() if info.get("type") != "directory"}

    def _ls(self, rel: str) -> dict[str, dict[str, Any]]:
        path = self.path(rel)
        with self._errors("list", rel):
            try:
                if hasattr(self.fs, "invalidate_cache"):
                    self.fs.invalidate_cache(path)
                entries = self.retry.call(lambda: self.fs.ls(path, detail=True),
                                          f"list {self.url_of(rel)}")
            except FileNotFoundError:
                return {}
        out = {}
        for info in entries:
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if name and str(info["name"]).rstrip("/") != path.rstrip("/"):
                out[name] = info
        return out

    # -- deleting -----------------------------------------------------------
    def remove(self, rel: str, *, recursive: bool = False, missing_ok: bool = True) -> None:
        with self._errors("delete", rel):
            try:
                self.retry.call(lambda: self.fs.rm(self.path(rel), recursive=recursive),
                                f"delete {self.url_of(rel)}")
            except FileNotFoundError:
                if not missing_ok:
                    raise


def _discard(f: Any) -> None:
    """Abandon a partly written file: abort a multipart upload where there is one."""
    if hasattr(f, "discard") and not getattr(f, "autocommit", True):
        f.discard()
    elif hasattr(f, "_abort_mpu"):
        f._abort_mpu()  # s3fs: abort the multipart upload instead of completing it
        f.closed = True
    else:
        f.close()


# -- the checkpoints under a root ---------------------------------------------------

def read_manifest(storage: Storage, step: int) -> Manifest:
    """The manifest of one step; CorruptCheckpointError if it is unreadable or inconsistent."""
    rel = f"{step_dir_name(step)}/{MANIFEST_NAME}"
    m = Manifest.from_json(storage.read_bytes(rel), storage.url_of(rel))
    if m.step != step:
        raise CorruptCheckpointError(storage.url_of(rel), f"step {step}", f"step {m.step}")
    return m


def list_committed(storage: Storage) -> list[Manifest]:
    """Every checkpoint under the root with a readable manifest, oldest first.

    A folder without a manifest is not a checkpoint and is skipped silently;
    one whose manifest cannot be read is skipped with a warning.
    """
    out = []
    for name in storage.list_dirs():
        step = parse_step_dir(name)
        if step is None or MANIFEST_NAME not in storage.list_files(name):
            continue
        try:
            out.append(read_manifest(storage, step))
        except (CorruptCheckpointError, StorageError) as e:
            log.warning("skipping %s: %s", storage.url_of(name), e)
    return sorted(out, key=lambda m: m.step)


def uncommitted_steps(storage: Storage) -> list[int]:
    """Step folders without a manifest: saves that never committed."""
    return sorted(step for name in storage.list_dirs()
                  if (step := parse_step_dir(name)) is not None
                  and MANIFEST_NAME not in storage.list_files(name))


def verify_files(folder: Storage, manifest: Manifest) -> list[str]:
    """Problems with a checkpoint's files (missing, wrong size, bad checksum); empty when whole."""
    problems = []
    present = folder.list_files()
    for entry in manifest.files:
        url = folder.url_of(entry.path)
        if entry.path not in present:
            problems.append(f"{url}: missing")
            continue
        digest = _codec.Checksum()
        with folder.open_read(entry.path) as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        if digest.nbytes != entry.size:
            problems.append(f"{url}: expected {entry.size} bytes, found {digest.nbytes}")
        elif entry.checksum and digest.hexdigest() != entry.checksum:
            problems.append(f"{url}: expected {entry.checksum}, found {digest.hexdigest()}")
    return problems
