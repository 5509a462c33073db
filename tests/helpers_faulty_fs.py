"""A real fsspec filesystem for fault injection: local disk that fails or pauses on a chosen write.

``new_faulty_fs()`` registers a fresh subclass of fsspec's ``LocalFileSystem``
under a unique protocol (``faulty<N>``) and returns it; each class keeps its
own counters, so tests never share state.  Its protocol also lists ``"file"``
because it *is* a local disk: ``Storage`` then takes its local path (fsync,
temporary file renamed into place), exactly as for a plain directory.

Every ``write()`` on a file opened for writing is counted, across threads.
``fail_on_write(n)`` makes the n-th write from then on raise ``OSError``
(later writes succeed); ``pause()`` makes writes wait until ``release()``,
and sets ``paused`` once a writer is waiting, so a test can synchronise on it
instead of sleeping.  ``on_read`` runs a function just before a chosen file is read;
``hide_listing(folder)`` makes that folder list as empty (a stale view of it).
"""

from __future__ import annotations

import errno
import itertools
import threading
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

_ids = itertools.count(1)
GATE_TIMEOUT_S = 60.0


class _FaultyFile:
    """Wraps a local file; ``write`` asks the filesystem class first."""

    def __init__(self, f: Any, fs_cls: type["FaultyFS"]) -> None:
        self._f = f
        self._fs_cls = fs_cls

    def write(self, data: Any) -> int:
        self._fs_cls._before_write()
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_FaultyFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


class FaultyFS(LocalFileSystem):
    """Local files whose writes can be made to fail or to wait."""

    protocol = ("faulty", "file")
    writes = 0
    fail_at: int | None = None
    failures = 0
    gate: threading.Event | None = None
    paused = threading.Event()
    lock = threading.Lock()
    hidden: str | None = None
    """A folder whose listings come back empty (``hide_listing``)."""
    on_read: tuple[str, Any] | None = None
    """``(substring, fn)``: ``fn()`` runs once, just before the first file whose path
    contains ``substring`` is opened for reading (an interleaving placed without sleeps)."""

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        hook = type(self).on_read
        if hook is not None and "r" in mode and hook[0] in str(path):
            type(self).on_read = None
            hook[1]()  # runs in the reader's thread, before the file is opened
        f = super()._open(path, mode, **kwargs)
        return _FaultyFile(f, type(self)) if any(c in mode for c in "wax") else f

    def ls(self, path: str, detail: bool = False, **kwargs: Any) -> Any:
        hidden = type(self).hidden
        if hidden is not None and self._strip_protocol(path).rstrip("/") == hidden:
            return []  # a stale listing: this folder looks empty
        return super().ls(path, detail=detail, **kwargs)

    # -- control (class-level: fsspec caches instances) ---------------------------
    @classmethod
    def url(cls, path: Any) -> str:
        return f"{cls.protocol[0]}://{path}"

    @classmethod
    def reset_count(cls) -> None:
        with cls.lock:
            cls.writes = 0

    @classmethod
    def fail_on_write(cls, n: int) -> None:
        """Raise OSError on the n-th write counted from now (1-based)."""
        with cls.lock:
            cls.writes, cls.fail_at, cls.failures = 0, n, 0

    @classmethod
    def hide_listing(cls, folder: Any) -> None:
        """Listings of ``folder`` come back empty (as from a lagging replica) until ``show_listing``."""
        cls.hidden = str(folder).rstrip("/")

    @classmethod
    def show_listing(cls) -> None:
        cls.hidden = None

    @classmethod
    def disarm(cls) -> None:
        with cls.lock:
            cls.fail_at = None

    @classmethod
    def pause(cls) -> None:
        cls.paused = threading.Event()
        cls.gate = threading.Event()

    @classmethod
    def release(cls) -> None:
        gate, cls.gate = cls.gate, None
        if gate is not None:
            gate.set()

    @classmethod
    def _before_write(cls) -> None:
        with cls.lock:
            cls.writes += 1
            fail = cls.fail_at is not None and cls.writes == cls.fail_at
            if fail:
                cls.failures += 1
            gate = cls.gate
        if fail:
            raise OSError(errno.EIO, f"injected write failure (write #{cls.fail_at})")
        if gate is not None:
            cls.paused.set()
            if not gate.wait(GATE_TIMEOUT_S):
                raise OSError(errno.EIO, "test gate was never released")


def new_faulty_fs() -> type[FaultyFS]:
    """A freshly registered FaultyFS subclass with its own protocol and counters."""
    name = f"faulty{next(_ids)}"
    cls = type(f"FaultyFS_{name}", (FaultyFS,), {
        "protocol": (name, "file"), "writes": 0, "fail_at": None, "failures": 0,
        "gate": None, "paused": threading.Event(), "lock": threading.Lock(), "on_read": None,
        "hidden": None,
    })
    fsspec.register_implementation(name, cls, clobber=True)
    return cls
