"""Storage: every byte asyncckpt reads or writes goes through here.

This is the only module that knows about URL schemes.  A ``Storage`` wraps one
fsspec filesystem rooted at a URL (a local path, ``file://``, ``s3://``,
``memory://``, or a registered subclass of those; others are refused: see
``_check_can_hold``) and offers the few operations the commit protocol needs:

1. ``open_write(rel)`` streams a file and makes it durable when the block ends
   (flush and fsync of the file on local disks; a completed upload on object
   stores).  A write that fails removes what it left.  On S3 (s3fs) files go
   through ``multipart.MultipartWriter`` (parallel parts, bounded memory,
   aborted on failure); ``abort_uploads`` aborts those a killed writer left.
2. ``put_atomic(rel, data, create_only=True)`` publishes a small file whole or
   not at all: a temporary file renamed into place and the folder fsynced on
   local disks; a single PUT, which is atomic, on object stores (conditional,
   ``If-None-Match: *``, on S3 when ``create_only``).
3. ``list_dirs``/``list_files``/``read_bytes``/``open_read``/``remove``.

Errors come out as ``StorageError`` naming the operation and the URL, with
any credential of the storage options scrubbed from the message; transient
ones (5xx, throttling, resets, timeouts) are retried with exponential backoff
and jitter by ``Retry``, bounded in attempts and in time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import stat
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar
from urllib.parse import unquote

import fsspec
from fsspec.spec import AbstractBufferedFile

from . import codec as _codec
from .errors import (AsyncCkptError, CheckpointExistsError, ConfigError, CorruptCheckpointError,
                     ForeignFolderError, StorageError)
from .manifest import MANIFEST_NAME, MAX_JSON_BYTES, Manifest, parse_step_dir, step_dir_name
from .multipart import MultipartWriter, Upload, abort_unfinished

log = logging.getLogger(__name__)
T = TypeVar("T")

_USERINFO = re.compile(r"^([a-zA-Z][\w+.-]*://)[^/@]*@")
_TRANSIENT_WORDS = ("slowdown", "throttl", "timeout", "timed out", "reset", "temporar",
                    "503", "500", "502", "504", "internalerror", "serviceunavailable",
                    "connection", "requesttimeout", "too many requests", "429",
                    "flexiblechecksum")  # a reply body that failed the client's checksum in transit
_TRANSIENT_ERRNOS = {e for e in (getattr(errno, "EREMOTEIO", None), errno.EBUSY) if e is not None}
_CREDENTIAL_NAME = re.compile(r"secret|token|passw|credential|access_key|key_id|account_key"
                              r"|connection_string|(^|_)key$|^username$", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL without any ``user:secret@`` part."""
    return _USERINFO.sub(r"\1", str(url))


def credentials_in_url(url: str) -> tuple[str, ...]:
    """The ``user`` and ``secret`` of every ``proto://user:secret@...`` part of a URL chain."""
    found: list[str] = []
    for part in str(url).split("::"):
        m = _USERINFO.match(part)
        if m:
            userinfo = part[len(m.group(1)):m.end() - 1]
            found += [v for v in (*userinfo.split(":", 1), unquote(userinfo)) if len(v) >= 4]
    return tuple(found)


_NO_USERINFO = ("s3", "s3a", "gs", "gcs")
"""Object stores whose URLs have no ``user:secret@`` part (s3fs and gcsfs read it as the bucket)."""


def _refuse_url_credentials(part: str, redacted: str) -> None:
    proto = fsspec.core.split_protocol(part)[0]
    if proto in _NO_USERINFO and _USERINFO.match(part):
        raise ConfigError(f"checkpoint root {redacted}: credentials in a {proto}:// URL are not "
                          f"read ({proto}:// would take 'user:secret@bucket' for the bucket's name); "
                          "pass them in storage_options (e.g. {'key': ..., 'secret': ...}), a "
                          "profile, or the environment")


def credentials_in(options: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Values of ``options`` (searched recursively) whose key names a credential."""
    found: set[str] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                if isinstance(v, str) and len(v) >= 4 and _CREDENTIAL_NAME.search(str(k)):
                    found.add(v)
                else:
                    walk(v)
    walk(options or {})
    return tuple(sorted(found, key=len, reverse=True))


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying (5xx, throttling, resets, timeouts)."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError,
                        IsADirectoryError, NotADirectoryError, AsyncCkptError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True  # s3fs: 500 InternalError is EREMOTEIO, 503 SlowDown and 409 are EBUSY
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in _TRANSIENT_WORDS)


@dataclass(frozen=True, kw_only=True)
class Retry:
    """How transient storage errors are retried (on top of the client's own retries)."""

    attempts: int = 5
    """Tries in all, the first included (1 disables retrying)."""
    base_delay_s: float = 0.2
    """Delay before the first retry; doubles on each further one."""
    max_delay_s: float = 5.0
    """Upper bound of a single delay."""
    deadline_s: float = 60.0
    """No retry starts after this many seconds from the first try, nor sleeps past it."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    """Monotonic seconds the deadline is measured on (a simulation or a test passes its own)."""
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    """Waits out each delay (a simulation or a test passes its own)."""

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError.field("Retry.attempts", self.attempts, "an integer >= 1")
        for name in ("base_delay_s", "max_delay_s", "deadline_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0:
                raise ConfigError.field(f"Retry.{name}", v, "a number >= 0")
        for name in ("clock", "sleep"):
            if not callable(getattr(self, name)):
                raise ConfigError.field(f"Retry.{name}", getattr(self, name), "a callable")

    def delay_s(self, attempt: int) -> float:
        """Jittered exponential backoff before retry number ``attempt`` (1-based)."""
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return random.uniform(cap / 2, cap)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``, retried while it fails with a transient error and time and attempts remain."""
        start = self.clock()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below, re-raised when final
                left = self.deadline_s - (self.clock() - start)
                if attempt == self.attempts or left <= 0 or not is_transient(e):
                    raise
                delay = min(self.delay_s(attempt), left)
                log.warning("transient error on %s (attempt %d/%d): %s; retrying in %.2fs",
                            what, attempt, self.attempts, type(e).__name__, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")


class Storage:
    """One fsspec filesystem rooted at a URL.  Paths given to methods are relative."""

    def __init__(self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None,
                 *, retry: Retry | None = None, upload: Upload | None = None) -> None:
        url = os.fspath(url)
        if not url:
            raise ConfigError.field("root", url, "a path or URL")
        self.url = redact(url).rstrip("/")
        self.retry = retry or Retry()
        self.upload = upload or Upload()
        self._credentials = tuple(sorted({*credentials_in(storage_options), *credentials_in_url(url)},
                                         key=len, reverse=True))
        for part in url.split("::"):  # before connecting: http, ftp, zip, github... never can
            _refuse_url_credentials(part, self.url)
            _check_can_hold(part, self.url)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except Exception as e:  # noqa: BLE001 - a bad option, a missing package, no connection
            err = self.error_for("open", "", e)
            raise err from (None if isinstance(err.cause, str) else e)
        self.fs, root = _unwrap(self.fs, root, self.url)
        _check_can_hold(self.fs, self.url)
        self.root = root.rstrip("/") or root
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols or "local" in protocols
        self.is_object_store = any(p in ("s3", "s3a", "gs", "gcs", "az", "abfs") for p in protocols)
        self.multipart = callable(getattr(self.fs, "call_s3", None)) and hasattr(self.fs, "split_path")
        """Files go up through our own parallel multipart uploader (S3 API)."""

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

    def scrub(self, text: str) -> str:
        """``text`` with every credential of the storage options replaced by ``***``."""
        for secret in self._credentials:
            text = text.replace(secret, "***")
        return text

    def error_for(self, op: str, rel: str, e: BaseException) -> StorageError:
        """The StorageError for ``op`` on ``rel`` failing with ``e``, credentials scrubbed."""
        text = f"{type(e).__name__}: {e}"
        clean = self.scrub(text)
        return StorageError(op, self.url_of(rel), e if clean == text else clean)

    @contextlib.contextmanager
    def _errors(self, op: str, rel: str) -> Iterator[None]:
        try:
            yield
        except AsyncCkptError:
            raise
        except Exception as e:  # noqa: BLE001 - every I/O error leaves as a StorageError
            err = self.error_for(op, rel, e)  # a cause naming a credential is not chained
            raise err from (None if isinstance(err.cause, str) else e)

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
        """A file open for writing that is durable once the block ends without error.

        If the block raises, nothing is published: a multipart upload is
        aborted and a partial local file removed.
        """
        with self._errors("write", rel):
            if self.multipart:
                up = self._multipart_writer(rel)
                try:
                    yield up  # type: ignore[misc]
                    up.commit()
                except BaseException:
                    with contextlib.suppress(Exception):
                        up.abort()
                    raise
                finally:
                    self.fs.invalidate_cache(self.path(rel))
                return
            path = self.path(rel)
            kw = {"block_size": self.upload.part_bytes} if self.is_object_store else {}
            f = self.retry.call(lambda: self.fs.open(path, "wb", **kw), f"open {self.url_of(rel)}")
            try:
                yield f
                f.flush()
                if self.is_local:
                    os.fsync(f.fileno())
                f.close()
            except BaseException:
                with contextlib.suppress(Exception):
                    _discard(f)
                with contextlib.suppress(Exception):
                    self.fs.rm_file(path)
                raise

    def put_atomic(self, rel: str, data: bytes, *, create_only: bool = True) -> None:
        """Publish ``data`` at ``rel`` whole or not at all; refuse to replace unless told."""
        with self._errors("put", rel):
            if create_only and self.exists(rel):
                raise CheckpointExistsError(f"{self.url_of(rel)} already exists")
            if not self.is_local:
                self._put_object(rel, data, create_only)
                return
            tmp = f"{rel}{TEMP_INFIX}{uuid.uuid4().hex[:12]}"
            with self.open_write(tmp) as f:
                f.write(data)
            if create_only:
                self._link_new(tmp, rel)
            else:
                os.replace(self.path(tmp), self.path(rel))
            self.fsync_dir(rel.rsplit("/", 1)[0] if "/" in rel else "")

    def _link_new(self, tmp: str, rel: str) -> None:
        """Publish ``tmp`` at ``rel`` only if nothing is there: a hard link is create-only and
        atomic (two writers racing: one wins).  Where links are not supported, a rename."""
        try:
            os.link(self.path(tmp), self.path(rel))
        except FileExistsError:
            os.unlink(self.path(tmp))
            raise CheckpointExistsError(f"{self.url_of(rel)} already exists") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
            os.replace(self.path(tmp), self.path(rel))
            return
        os.unlink(self.path(tmp))

    def _put_object(self, rel: str, data: bytes, create_only: bool) -> None:
        path = self.path(rel)
        kw = {"mode": "create"} if create_only and self.multipart else {}
        try:
            self.retry.call(lambda: self.fs.pipe_file(path, data, **kw), f"put {self.url_of(rel)}")
        except OSError as e:
            if not (isinstance(e, FileExistsError) or (kw and _precondition_failed(e))):
                raise
            # a retried conditional PUT whose first try landed is ours if the bytes match
            if self.fs.cat_file(path) != data:
                raise CheckpointExistsError(f"{self.url_of(rel)} already exists") from None

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

    def _multipart_writer(self, rel: str) -> MultipartWriter:
        bucket, key, _ = self.fs.split_path(self.path(rel))
        return MultipartWriter(self.fs.call_s3, self.retry.call, bucket=bucket, key=key,
                               url=self.url_of(rel), upload=self.upload)

    def abort_uploads(self, prefix: str = "") -> int:
        """Abort the unfinished multipart uploads under the root whose names start with
        ``prefix`` (what a killed writer leaves: invisible, but billed); returns how many."""
        if not self.multipart:
            return 0
        bucket, key, _ = self.fs.split_path(self.path())
        with self._errors("abort uploads", prefix):
            return abort_unfinished(self.fs.call_s3, self.retry.call, bucket=bucket,
                                    prefix=f"{key}/{prefix}" if key else prefix,
                                    url=self.url_of(prefix))

    # -- reading ------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        with self._errors("stat", rel):
            if not self.is_local and hasattr(self.fs, "invalidate_cache"):
                self.fs.invalidate_cache(path)
            return bool(self.retry.call(lambda: self.fs.exists(path), f"stat {self.url_of(rel)}"))

    def isfile(self, rel: str = "") -> bool:
        """Whether ``rel`` is a file (not a folder, not missing)."""
        path = self.path(rel)
        with self._errors("stat", rel):
            if not self.is_local and hasattr(self.fs, "invalidate_cache"):
                self.fs.invalidate_cache(path)
            return bool(self.retry.call(lambda: self.fs.isfile(path), f"stat {self.url_of(rel)}"))

    def read_bytes(self, rel: str, *, max_bytes: int | None = None) -> bytes:
        """The whole file ``rel``; with ``max_bytes``, a larger file is ``CorruptCheckpointError``
        and no more than ``max_bytes + 1`` bytes are read (on local disk its size is checked
        first).  On local disk only a regular file inside this folder is read (see
        ``check_local_file``)."""
        size = self.check_local_file(rel) if self.is_local else None
        if max_bytes is not None and size is not None and size > max_bytes:
            raise CorruptCheckpointError(self.url_of(rel), f"at most {max_bytes} bytes", f"{size} bytes")
        end = None if max_bytes is None else max_bytes + 1
        with self._errors("read", rel):
            data = self.retry.call(lambda: self.fs.cat_file(self.path(rel), start=None, end=end),
                                   f"read {self.url_of(rel)}")
        if max_bytes is not None and len(data) > max_bytes:
            raise CorruptCheckpointError(self.url_of(rel), f"at most {max_bytes} bytes",
                                         f"more ({len(data)} read)")
        return data

    @contextlib.contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        """``rel`` opened for reading; on local disk only a regular file inside this folder."""
        if self.is_local:
            self.check_local_file(rel)
        with self._errors("read", rel):
            f = self.retry.call(lambda: self.fs.open(self.path(rel), "rb"),
                                f"open {self.url_of(rel)}")
            with f:
                yield f

    def check_local_file(self, rel: str) -> int:
        """The size of ``rel`` on a local disk, which must be a regular file whose real path
        (symlinks resolved) lies inside this folder: a FIFO (a read would hang), a device
        (``/dev/zero`` never ends) or a link out of the folder is ``CorruptCheckpointError``
        before anything is opened.  A missing file is ``StorageError``."""
        path, url = self.path(rel), self.url_of(rel)
        with self._errors("read", rel):
            real, inside = os.path.realpath(path), os.path.realpath(self.root)
            st = os.stat(real)
        if os.path.commonpath([real, inside]) != inside:
            raise CorruptCheckpointError(url, f"a file inside {self.url}", f"a link to {real}",
                                         "refused: a checkpoint's files stay in its folder")
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                    else "a device or socket")
            raise CorruptCheckpointError(url, "a regular file", kind, "refused to read it")
        return st.st_size

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

    def move_dir(self, rel: str, dest: str) -> None:
        """Move the folder ``rel`` to ``dest``, which must not exist.

        Local disks: one rename, made durable by fsyncing both parents.  Elsewhere every
        file is copied, then the source deleted, its manifest first: a move cut short
        leaves the source whole, or uncommitted (and so cleaned up at the next start).
        """
        with self._errors("move", rel):
            if self.exists(dest):
                raise CheckpointExistsError(f"{self.url_of(dest)} already exists")
            parent = dest.rsplit("/", 1)[0] if "/" in dest else ""
            if self.is_local:
                self.makedirs(parent)
                os.rename(self.path(rel), self.path(dest))
                self.fsync_dir(parent)
                self.fsync_dir(rel.rsplit("/", 1)[0] if "/" in rel else "")
                return
            files = self.walk_files(rel)
            for sub in files:
                src, dst = self.path(f"{rel}/{sub}"), self.path(f"{dest}/{sub}")
                self.retry.call(lambda s=src, d=dst: self.fs.cp_file(s, d),  # type: ignore[misc]
                                f"copy {self.url_of(f'{rel}/{sub}')}")
            if MANIFEST_NAME in files:
                self.remove(f"{rel}/{MANIFEST_NAME}")
            self.remove(rel, recursive=True)

    def walk_files(self, rel: str = "") -> list[str]:
        """Every file under the folder ``rel``, as paths relative to it."""
        out = list(self.list_files(rel))
        for sub in self.list_dirs(rel):
            out += [f"{sub}/{name}" for name in self.walk_files(f"{rel}/{sub}" if rel else sub)]
        return out

    # -- deleting -----------------------------------------------------------
    def remove(self, rel: str, *, recursive: bool = False, missing_ok: bool = True) -> None:
        with self._errors("delete", rel):
            if not missing_ok and not self.exists(rel):
                raise FileNotFoundError(f"no such file: {self.url_of(rel)}")  # S3 deletes are idempotent
            # literal paths only: fsspec's rm() expands *, ? and [...] (a root named "exp[1]"
            # would delete "exp1"'s files), so files are deleted one by one, by name
            subs = self.walk_files(rel) if recursive else []
            # the folder's marker last: a delete cut short leaves a folder still proven ours
            subs.sort(key=lambda sub: sub.rsplit("/", 1)[-1] == MARKER_NAME)
            for sub in subs:
                path = self.path(_join(rel, sub))
                self.retry.call(lambda p=path: self._rm_file(p), f"delete {self.url_of(_join(rel, sub))}")
            if not subs:  # a file (or nothing); a folder's files went one by one above
                self.retry.call(lambda: self._rm_file(self.path(rel)), f"delete {self.url_of(rel)}")
            if recursive and (subs or not self.is_object_store):  # then the folders, deepest first
                parts = [sub.split("/")[:-1] for sub in subs]
                folders = {_join(rel, "/".join(p[:n])) for p in parts for n in range(1, len(p) + 1)}
                folders.add(rel)
                for folder in sorted(folders, key=lambda f: f.count("/"), reverse=True):
                    if self.is_object_store:  # a store that keeps folders (SeaweedFS) drops
                        path = self.path(folder)  # one by its name; elsewhere a no-op delete
                        self.retry.call(lambda p=path: self._rm_file(p), f"delete {self.url_of(folder)}")
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rmdir(self.path(folder))

    def _rm_file(self, path: str) -> bool:
        """Delete one file by its literal name; False when there was none."""
        try:
            self.fs.rm_file(path)
            return True
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            if isinstance(e, PermissionError) and not self.fs.isdir(path):
                raise
            return False  # a folder (macOS says EPERM): its files went one by one


SUPPORTED_ROOTS = "a local path or file://, memory://, or an object store (s3://; gs://, az:// too)"
"""What ``StorageError`` says a root may be when its filesystem cannot hold checkpoints."""
_OBJECT_STORES = (("s3fs", "S3FileSystem"), ("gcsfs", "GCSFileSystem"), ("adlfs", "AzureBlobFileSystem"))


def _check_can_hold(fs: Any, url: str) -> None:
    """Refuse a filesystem (an instance, a class, or one ``proto://...`` of a ``::`` chain) that
    cannot hold checkpoints: it must be the local disk, memory or an object store (subclasses
    too, e.g. a test's fault-injecting local disk).  Read-only ones (``http``, ``zip``,
    ``github``...) and those without fsync or an atomic create-only put (``ftp``...) are not.
    ``dir::`` and caching wrappers are left to ``_unwrap``."""
    import sys

    from fsspec.implementations.cached import CachingFileSystem
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.implementations.memory import MemoryFileSystem

    if isinstance(fs, str):
        proto = fsspec.core.split_protocol(fs)[0] or "file"
        try:
            fs = fsspec.get_filesystem_class(proto)
        except (ValueError, ImportError) as e:
            raise StorageError("open", url, f"{type(e).__name__}: {e}; a checkpoint root is "
                               f"{SUPPORTED_ROOTS}") from e
    cls = fs if isinstance(fs, type) else type(fs)
    stores = tuple(getattr(sys.modules.get(m), c, None) for m, c in _OBJECT_STORES)
    good = (LocalFileSystem, MemoryFileSystem, DirFileSystem, CachingFileSystem,
            *(s for s in stores if isinstance(s, type)))
    if not issubclass(cls, good):
        name = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]
        raise StorageError("open", url, f"{name}:// ({cls.__name__}) cannot hold checkpoints (read-only, "
                           f"or no durable atomic writes); a checkpoint root is {SUPPORTED_ROOTS}")


def _unwrap(fs: Any, root: str, url: str) -> tuple[Any, str]:
    """The filesystem that really holds ``root``.  A ``dir::``/``dir://`` prefix is only a path
    prefix: it is resolved here, so a local disk under it keeps fsync and atomic, create-only
    publishing.  Any other wrapper (``simplecache::``, ``filecache::``, ``blockcache::``, ...)
    puts its own file handling between asyncckpt and the storage (a write lands in a cache and
    is copied on close: no fsync, no create-only manifest), so it is refused."""
    from fsspec.implementations.dirfs import DirFileSystem

    while isinstance(getattr(fs, "fs", None), fsspec.AbstractFileSystem):
        if not isinstance(fs, DirFileSystem):
            name = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            raise ConfigError(f"root {url!r}: {name}:: wraps the storage in {type(fs).__name__}, "
                              "which writes through a cache (no fsync, no atomic create-only "
                              "manifest), so checkpoints there would be less durable than on the "
                              "storage itself; give the storage's own URL instead")
        inner = fs._strip_protocol(root)
        if fs.path and ".." in inner.split("/"):
            raise ConfigError(f"root {url!r}: {inner!r} leaves the {fs.path!r} folder of dir://")
        root = (fs.fs.sep.join((fs.path, inner)) if inner else fs.path) if fs.path else inner
        log.debug("root %s: dir:// over %s, at %s", url, type(fs.fs).__name__, root)
        fs = fs.fs
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            root = os.path.normpath(root)
    return fs, root


def _join(rel: str, sub: str) -> str:
    return f"{rel}/{sub}" if rel else sub


def _precondition_failed(e: BaseException) -> bool:
    """Whether S3 answered 412 PreconditionFailed: to a create-only PUT (``If-None-Match: *``),
    the object exists.  s3fs makes that a FileExistsError only when the reply names the
    condition (AWS, moto); SeaweedFS's does not, and s3fs raises OSError(EINVAL) from it."""
    reply = getattr(e.__cause__, "response", None) or {}
    return (reply.get("Error", {}).get("Code") == "PreconditionFailed"
            or reply.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412)


def _discard(f: Any) -> None:
    """Abandon a partly written fsspec file without publishing it.

    s3fs: abort its multipart upload (if one started); other buffered files
    (gcsfs, ...): ``discard()`` drops their resumable upload.  Then mark the
    file closed, since ``close()`` on a buffered file would upload what it
    holds; a plain local file is simply closed (and removed by the caller).
    """
    if callable(getattr(f, "_abort_mpu", None)):
        f._abort_mpu()
    elif callable(getattr(f, "discard", None)):
        f.discard()
    if isinstance(f, AbstractBufferedFile):
        f.closed = True
    else:
        f.close()


# -- the checkpoints under a root ---------------------------------------------------

def read_folder_manifest(folder: Storage) -> Manifest:
    """The manifest of the checkpoint folder ``folder`` (at most ``MAX_JSON_BYTES`` read);
    CorruptCheckpointError if it is unreadable, StorageError if it cannot be read."""
    data = folder.read_bytes(MANIFEST_NAME, max_bytes=MAX_JSON_BYTES)
    return Manifest.from_json(data, folder.url_of(MANIFEST_NAME))


def read_manifest(storage: Storage, step: int) -> Manifest:
    """The manifest of one step; CorruptCheckpointError if it is unreadable or inconsistent."""
    m = read_folder_manifest(storage.child(step_dir_name(step)))
    if m.step != step:
        raise CorruptCheckpointError(storage.url_of(f"{step_dir_name(step)}/{MANIFEST_NAME}"),
                                     f"step {step}", f"step {m.step}")
    return m


def manifest_steps(storage: Storage) -> list[int]:
    """Steps whose folder holds a manifest, readable or not, in order."""
    return sorted(step for name in storage.list_dirs() if (step := parse_step_dir(name)) is not None
                  and MANIFEST_NAME in storage.list_files(name))


def list_committed(storage: Storage) -> list[Manifest]:
    """Every checkpoint under the root with a readable manifest, oldest first.

    A folder without a manifest is not a checkpoint and is skipped silently;
    one whose manifest cannot be read is skipped with a warning.
    """
    out = []
    for step in manifest_steps(storage):
        name = step_dir_name(step)
        try:
            out.append(read_manifest(storage, step))
        except (CorruptCheckpointError, StorageError) as e:
            if isinstance(e, StorageError) and not is_committed(storage, step):
                log.debug("skipping %s: deleted while listing", storage.url_of(name))
                continue
            log.warning("skipping %s: %s", storage.url_of(name), e)
    return sorted(out, key=lambda m: m.step)


def is_committed(storage: Storage, step: int) -> bool:
    """Whether ``step``'s manifest is (still) there.  Deletes remove the manifest first, so a
    read that fails while this is False met a deletion (retention), not damage."""
    return storage.exists(f"{step_dir_name(step)}/{MANIFEST_NAME}")


def verify_checkpoint(storage: Storage, step: int, manifest: Manifest | None = None,
                      on_bytes: Callable[[int], object] | None = None) -> list[str] | None:
    """Problems with one checkpoint (empty when whole), or None when it was deleted (by
    retention, say) before or while it was read: a deletion is never reported as damage.
    A manifest that cannot be parsed is a problem; ``on_bytes`` as for ``verify_files``."""
    try:
        manifest = manifest or read_manifest(storage, step)
        problems = verify_files(storage.child(step_dir_name(step)), manifest, on_bytes)
    except CorruptCheckpointError as e:
        problems = [str(e)]
    except StorageError:
        if is_committed(storage, step):
            raise
        return None
    if problems and not is_committed(storage, step):
        return None
    return problems


def delete_checkpoint(storage: Storage, step: int) -> None:
    """Delete one checkpoint, manifest first, so a half-deleted folder is never listed."""
    name = step_dir_name(step)
    storage.remove(f"{name}/{MANIFEST_NAME}")
    storage.fsync_dir(name)
    storage.remove(name, recursive=True)


def abort_unfinished_saves(storage: Storage) -> int:
    """Abort the multipart uploads left in step folders by writers that died (object stores).

    Call only while no save is in flight under this root.
    """
    return storage.abort_uploads(step_dir_name(0)[:-10])


TEMP_INFIX = ".asyncckpt-tmp-"
"""``put_atomic``'s temporary files on local disks are ``<name>.asyncckpt-tmp-<12 hex>``."""
_ROOT_FILES = (".lease.json",)
"""The files asyncckpt publishes at a root with ``put_atomic`` (the lease)."""
_TEMPORARY = re.compile(r"\.asyncckpt-probe-[0-9a-f]{12}|(?:%s)(?:\.asyncckpt-tmp-|\.tmp-)[0-9a-f]{12}"
                        % "|".join(re.escape(n) for n in _ROOT_FILES))
"""What a killed writer leaves at a root: a write probe, or a temporary copy of a root file
(``.tmp-`` is the infix of earlier versions).  The name of a file asyncckpt publishes there
is the proof that it is ours: ``data.tmp-202401011230`` is left alone."""


def remove_temporary_files(storage: Storage) -> list[str]:
    """Remove the files a killed writer leaves at the root (write probes, temporary files of
    ``put_atomic``); returns their names.  Call only while no other writer uses the root."""
    stray = [name for name in storage.list_files() if _TEMPORARY.fullmatch(name)]
    for name in stray:
        log.warning("removing %s: left by a writer that was killed", storage.url_of(name))
        storage.remove(name)
    return stray


# -- folders asyncckpt made -------------------------------------------------------------

MARKER_NAME = ".asyncckpt"
"""Written first into every folder asyncckpt creates (a checkpoint, a backup copy, a release)
and deleted last: a folder without its commit file (manifest, model card) is an unfinished
write of asyncckpt's, safe to delete, only when the marker is there."""


def mark_folder(folder: Storage, kind: str) -> None:
    """Create ``folder`` with its marker, before anything else is written into it."""
    body = json.dumps({"written_by": "asyncckpt", "kind": kind}) + "\n"
    folder.makedirs()
    with folder.open_write(MARKER_NAME) as f:
        f.write(body.encode())


def claim_folder(folder: Storage, *, commit_file: str, kind: str) -> None:
    """Make ``folder`` ready for a new write of ``kind``: remove what an unfinished write of
    asyncckpt's left there (proven by its marker; the caller deals with a committed one), then
    mark it.  Raises ``ForeignFolderError`` when the path is a file or holds files asyncckpt
    did not write: those are never deleted."""
    entries = folder._ls("")  # one listing: files and sub-folders
    here = {name for name, info in entries.items() if info.get("type") != "directory"}
    if not entries and folder.isfile():
        raise ForeignFolderError(f"{folder.url} is a file, not a folder asyncckpt made: asyncckpt "
                                 f"will not replace it; move it away to write this {kind} there")
    if entries:
        if MARKER_NAME not in here and commit_file not in here:
            raise ForeignFolderError(
                f"{folder.url} holds files asyncckpt did not write ({', '.join(sorted(here)[:3]) or 'folders'}"
                f"{', ...' if len(here) > 3 else ''}; no {commit_file} and no {MARKER_NAME} marker): "
                f"asyncckpt will not delete them; move them away to write this {kind} there")
        log.warning("removing %s: an unfinished %s that never committed", folder.url, kind)
        folder.remove("", recursive=True)
    mark_folder(folder, kind)


def remove_unfinished(storage: Storage, rel: str, *, commit_file: str, what: str) -> bool:
    """Delete the folder ``rel`` if it is an unfinished write of asyncckpt's (its marker but not
    its ``commit_file``); an empty folder goes quietly, one holding files asyncckpt did not write
    stays (with a warning).  True when it was removed."""
    folder = storage.child(rel)
    files = folder.walk_files()
    if commit_file in files:
        return False
    if not files:
        log.debug("removing the empty folder %s", folder.url)
        storage.remove(rel, recursive=True)
        return True
    if MARKER_NAME not in files:
        log.warning("leaving %s alone: it has no %s and no %s marker, so asyncckpt did not write it "
                    "(or an asyncckpt before markers did); delete it by hand if it is not needed",
                    folder.url, commit_file, MARKER_NAME)
        return False
    log.warning("removing %s: %s that never committed", folder.url, what)
    storage.remove(rel, recursive=True)
    return True


def remove_unfinished_saves(storage: Storage, what: str = "a save") -> list[int]:
    """Remove the step folders unfinished saves left (see ``remove_unfinished``); their steps.
    Call only while no save is in flight under this root."""
    return [step for step in uncommitted_steps(storage)
            if remove_unfinished(storage, step_dir_name(step), commit_file=MANIFEST_NAME, what=what)]


def uncommitted_steps(storage: Storage) -> list[int]:
    """Step folders without a manifest: saves that never committed."""
    return sorted(step for name in storage.list_dirs()
                  if (step := parse_step_dir(name)) is not None
                  and MANIFEST_NAME not in storage.list_files(name))


def verify_files(folder: Storage, manifest: Manifest,
                 on_bytes: Callable[[int], object] | None = None, *, deep: bool = True,
                 paths: Collection[str] | None = None) -> list[str]:
    """Problems with a checkpoint's files (missing, wrong size, bad checksum); empty when whole.
    ``on_bytes`` is called with the size of each piece read (a progress bar).  ``deep=False``
    compares the listed sizes only (one listing, no file read); ``paths`` checks only those."""
    problems = []
    present = folder.list_files()
    for entry in manifest.files:
        if paths is not None and entry.path not in paths:
            continue
        url = folder.url_of(entry.path)
        if entry.path not in present:
            problems.append(f"{url}: missing")
            continue
        if not deep:
            if present[entry.path] != entry.size:
                problems.append(f"{url}: expected {entry.size} bytes, found {present[entry.path]}")
            continue
        try:
            digest = _stream_digest(folder, entry.path, entry.size + 1, on_bytes)
        except CorruptCheckpointError as e:  # not a regular file of the folder
            problems.append(str(e))
            continue
        if digest.nbytes != entry.size:
            found = f"more than {entry.size}" if digest.nbytes > entry.size else digest.nbytes
            problems.append(f"{url}: expected {entry.size} bytes, found {found}")
        elif entry.checksum and digest.hexdigest() != entry.checksum:
            problems.append(f"{url}: expected {entry.checksum}, found {digest.hexdigest()}: "
                            "checksum mismatch")
    return problems


def _stream_digest(folder: Storage, rel: str, limit: int,
                   on_bytes: Callable[[int], object] | None) -> _codec.Checksum:
    """The checksum of at most ``limit`` bytes of ``rel``, read 8 MiB at a time (a file longer
    than the manifest records is not read to its end: one byte more shows it)."""
    digest = _codec.Checksum()
    with folder.open_read(rel) as f:
        while digest.nbytes < limit and (chunk := f.read(min(8 << 20, limit - digest.nbytes))):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest
