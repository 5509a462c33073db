"""A real local filesystem whose operations are events: ``announcing_fs(protocol, hit)``
registers a ``LocalFileSystem`` subclass under ``protocol`` (also ``file``, so ``Storage``
treats it as the local disk it is) that calls ``hit(kind, path)`` before each operation:
``open-w``/``open-r``, each ``write``, ``close``, ``mkdir``, ``ls`` and ``rm`` (one per file and
per folder: asyncckpt deletes file by file, then the folders).  ``hit`` may block (freeze the
caller for a SIGKILL) or exit; the crash matrix and the pruning-crash tests use it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

Hit = Callable[[str, str], None]


class _File:
    """A local file open for writing whose writes and close are events."""

    def __init__(self, f: Any, path: str, hit: Hit) -> None:
        self._f, self._path, self._hit = f, path, hit

    def write(self, data: Any) -> int:
        self._hit("write", self._path)
        return self._f.write(data)

    def close(self) -> None:
        if not self._f.closed:
            self._hit("close", self._path)
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_File":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def announcing_fs(protocol: str, hit: Hit) -> type[LocalFileSystem]:
    """Register (replacing any earlier one) and return the filesystem class for ``protocol``."""

    class AnnouncingFS(LocalFileSystem):
        def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
            path = self._strip_protocol(path)
            writing = any(c in mode for c in "wax+")
            hit("open-w" if writing else "open-r", path)
            f = super()._open(path, mode, **kwargs)
            return _File(f, path, hit) if writing else f

        def makedirs(self, path: str, exist_ok: bool = False) -> None:
            hit("mkdir", self._strip_protocol(path))
            super().makedirs(path, exist_ok=exist_ok)

        def ls(self, path: str, detail: bool = False, **kwargs: Any) -> Any:
            hit("ls", self._strip_protocol(path))
            return super().ls(path, detail=detail, **kwargs)

        def rm_file(self, path: Any) -> None:
            p = self._strip_protocol(path)
            if os.path.isfile(p):
                hit("rm", p)
            super().rm_file(path)

        def rmdir(self, path: Any) -> None:
            hit("rm", self._strip_protocol(path))
            super().rmdir(path)

    AnnouncingFS.protocol = (protocol, "file")
    fsspec.register_implementation(protocol, AnnouncingFS, clobber=True)
    return AnnouncingFS
