"""The one exception hierarchy of asyncckpt.

Every error the library raises on purpose is an ``AsyncCkptError``.  Several
also derive from the builtin a caller would naturally catch (``ValueError``,
``LookupError``, ``FileExistsError``, ``OSError``), so generic handlers keep
working.  Messages name the problem: the path, the key, the value, and what
was expected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


class AsyncCkptError(Exception):
    """Root of every error raised by asyncckpt."""

    def __reduce__(self) -> tuple[object, ...]:
        # Picklable although subclasses take other arguments than the message: ranks send
        # errors to each other (DCP's failure gather, the restore broadcast).
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls: type[AsyncCkptError], args: tuple[object, ...],
             state: dict[str, object]) -> AsyncCkptError:
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


class ConfigError(AsyncCkptError, ValueError):
    """An option has a value that is not allowed."""

    @classmethod
    def field(cls, name: str, value: object, expected: str) -> "ConfigError":
        return cls(f"{name}={value!r} is not valid: expected {expected}")


class CheckpointNotFoundError(AsyncCkptError, LookupError):
    """The requested checkpoint does not exist; the message lists those that do."""

    def __init__(self, what: str, root: str, available: Iterable[int] = ()) -> None:
        self.what = what
        self.root = root
        self.available = sorted(available)
        if self.available:
            shown = ", ".join(str(s) for s in self.available[:20])
            more = "" if len(self.available) <= 20 else f" (+{len(self.available) - 20} more)"
            have = f"committed steps: {shown}{more}"
        else:
            have = "no committed checkpoints"
        super().__init__(f"no checkpoint {what} under {root} ({have})")


class CheckpointExistsError(AsyncCkptError, FileExistsError):
    """A checkpoint (or release) at that step or version is already committed."""


class ForeignFolderError(CheckpointExistsError):
    """Where asyncckpt would write a checkpoint, backup copy or release there is a file, or a
    folder holding files asyncckpt did not write; asyncckpt never deletes those."""


class StateMismatchError(AsyncCkptError):
    """The checkpoint and the live state disagree on a key or a shape."""

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        shapes: Mapping[str, tuple[object, object]] | None = None,
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shapes = dict(shapes or {})
        super().__init__(message)


class IntegrityError(AsyncCkptError):
    """Stored bytes are not what the manifest says they should be."""

    def __init__(self, path: str, expected: object, actual: object, detail: str = "") -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        extra = f": {detail}" if detail else ""
        super().__init__(f"{path}: expected {expected}, found {actual}{extra}")


class CorruptCheckpointError(IntegrityError):
    """A checkpoint file is missing, truncated, or fails its checksum."""


class UnsafeCheckpointError(IntegrityError):
    """A checkpoint file asks to run code (a pickle global outside the allow-list)."""


class StorageError(AsyncCkptError, OSError):
    """An I/O operation on a storage URL failed.  Never carries credentials."""

    def __init__(self, op: str, url: str, cause: BaseException | str) -> None:
        self.op = op
        self.url = url
        self.cause = cause
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"{op} {url} failed: {reason}")
        self.errno = getattr(cause, "errno", None)  # e.g. ENOSPC: callers can tell a full disk


class SaveError(AsyncCkptError):
    """A background save failed; ``failures`` maps rank to the error seen there."""

    def __init__(self, step: int, failures: Mapping[int, BaseException | str]) -> None:
        self.step = step
        self.failures = dict(failures)
        parts = "; ".join(
            f"rank {r}: {e if isinstance(e, str) else f'{type(e).__name__}: {e}'}"
            for r, e in sorted(self.failures.items())
        )
        super().__init__(f"save of step {step} failed ({parts})")


class LeaseError(AsyncCkptError):
    """Another writer holds the checkpoint root (the message names it: host, pid, since),
    or this manager lost its lease and must not commit or delete any more."""


class RollbackRefusedError(AsyncCkptError):
    """A save after restoring an older checkpoint would abandon newer ones, and the manager
    was made with ``on_rollback="refuse"``; the message names them and how to go on."""
