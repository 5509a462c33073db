"""Lease: one writer per checkpoint root.

Two jobs started on the same root by mistake would delete each other's
in-flight saves (a new manager removes step folders without a manifest) and
prune each other's checkpoints.  The writer therefore holds a lease, the
small JSON file ``<root>/.lease.json``: owner id (random), when it was taken,
last heartbeat, the timeout it promises to heartbeat within, and who the writer
is: host, boot id, pid namespace, pid and the process's start time.

Call order: ``Lease(storage, ...)``, ``acquire()`` (raises ``LeaseError``
naming the holder when another live writer has the root), ``check()`` before
any write that must be exclusive (raises once the lease was lost), and
``release()`` at the end.  A heartbeat thread rewrites the file every
``heartbeat_s``.

- Acquiring is a create-only put (a hard link locally, ``If-None-Match: *``
  on S3), so of two writers starting together exactly one gets the file.
- A lease is this process's only when host, boot id, pid namespace, pid and
  process start time all match (two containers on one host may both run as
  pid 1; a pid may be reused); a lease without a start time (an older file)
  never is.  Leases this process holds are kept by resolved root (``ckpt``,
  ``./ckpt`` and its absolute path are one), so a second manager of this
  process on a held root is refused, and one it holds no more is taken over.
- A lease is stale when its heartbeat is older than its ``timeout_s`` (wall
  clocks: hosts must agree within that), or when it was taken on this very
  machine (same host, boot and pid namespace) by a process that is gone: no
  process has its pid, or one that started at another time.  A
  stale lease is taken over: re-read it (unchanged?), delete it, create-only
  put ours, wait ``settle_s`` and read it back; a contender that lost the race
  finds the other owner there and raises.  The heartbeat also reads the
  owner first, so a writer whose lease was taken over learns it within one
  heartbeat and its next commit or deletion fails with ``LeaseError``.
- Readers (``asyncckpt list/verify``, ``CheckpointManager(..., lease=False)``)
  never take it; ``live_holder()`` tells them whether a writer is active.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from .errors import CheckpointExistsError, CorruptCheckpointError, LeaseError, StorageError
from .manifest import parse_json
from .storage import Retry, Storage

log = logging.getLogger(__name__)

LEASE_NAME = ".lease.json"
HEARTBEAT_S = 10.0
TIMEOUT_S = 60.0
_ACQUIRE_TRIES = 4
_MAX_LEASE_BYTES = 64 << 10
"""A lease is a few hundred bytes; a bigger file at its name is not one."""


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:  # a command name may be any bytes
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_ticks(stat: str) -> int:
    """Field 22 of a ``/proc/<pid>/stat`` line: the start time in clock ticks since boot (0: unknown)."""
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    try:
        return int(fields[19])  # fields[0] is field 3, the state
    except (IndexError, ValueError):
        return 0


def _proc_is_ours() -> bool:
    """Whether ``/proc`` shows this pid namespace (a container without its own /proc sees the host's)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


@dataclass(frozen=True, kw_only=True)
class Holder:
    """What ``.lease.json`` says about the writer holding a root."""

    owner: str
    """Random id of this holding (a new one at every acquire)."""
    host: str
    """Host name of the writer."""
    pid: int
    """Process id of the writer on its host."""
    started: float
    """When the lease was taken (Unix time, seconds)."""
    heartbeat: float
    """The last refresh (Unix time, seconds)."""
    timeout_s: float
    """After this many seconds without a heartbeat the lease is stale."""
    boot_id: str = ""
    """The host's boot id (Linux): a pid from before a reboot is not compared."""
    pid_ns: str = ""
    """The pid namespace (Linux): pids of other containers are not compared."""
    pid_start_ticks: int = 0
    """When the writer process started (field 22 of ``/proc/<pid>/stat``, clock ticks since boot;
    0: unknown): the same pid with another start time is another process."""

    @classmethod
    def for_this_process(cls, *, now: float, timeout_s: float) -> "Holder":
        return cls(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), started=now,
                   heartbeat=now, timeout_s=timeout_s,
                   boot_id=_read_text("/proc/sys/kernel/random/boot_id"), pid_ns=_pid_namespace(),
                   pid_start_ticks=_start_ticks(_read_text("/proc/self/stat")))

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> "Holder":
        try:
            raw = parse_json(data, source)
            return _in_range(cls(owner=str(raw["owner"]), host=str(raw["host"]), pid=int(raw["pid"]),
                                 started=float(raw["started"]), heartbeat=float(raw["heartbeat"]),
                                 timeout_s=float(raw["timeout_s"]), boot_id=str(raw.get("boot_id", "")),
                                 pid_ns=str(raw.get("pid_ns", "")),
                                 pid_start_ticks=int(raw.get("pid_start_ticks", 0))))
        except (CorruptCheckpointError, ValueError, TypeError, KeyError, OverflowError) as e:
            raise LeaseError(f"{source} is not a readable lease ({type(e).__name__}: {e}); if no job "
                             "writes to this root, delete it") from e

    def describe(self, now: float | None = None) -> str:
        """``host pid 123 since 2024-...Z (last heartbeat 3s ago)``."""
        since = _dt.datetime.fromtimestamp(self.started, _dt.timezone.utc)
        age = (time.time() if now is None else now) - self.heartbeat
        return (f"host {self.host} pid {self.pid} since {since.isoformat(timespec='seconds')}"
                f" (last heartbeat {age:.0f}s ago)").replace("+00:00", "Z")


def _in_range(holder: Holder) -> Holder:
    """``holder``, once its numbers are ones a writer can have written: a nan or infinite time
    would never go stale, a pid past the OS's range would make ``os.kill`` overflow."""
    for name in ("started", "heartbeat", "timeout_s"):
        if not math.isfinite(getattr(holder, name)) or abs(getattr(holder, name)) > _MAX_TIME_S:
            raise ValueError(f"{name}={getattr(holder, name)!r} is not a time")
    if holder.timeout_s <= 0 or not 0 < holder.pid < 2**31 or not 0 <= holder.pid_start_ticks < 2**63:
        raise ValueError(f"timeout_s={holder.timeout_s!r}, pid={holder.pid!r} or "
                         f"pid_start_ticks={holder.pid_start_ticks!r} is out of range")
    return holder


_MAX_TIME_S = 10**11
"""The largest time (seconds) a lease file may hold: year 5138, within ``datetime``'s range."""


def process_start(pid: int) -> int | None:
    """When process ``pid`` of this pid namespace started (clock ticks since boot); 0 when it runs
    but that cannot be read (``/proc`` is another namespace's), None when none runs (a zombie
    counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it runs, as another user
    if not _proc_is_ours():
        return 0
    stat = _read_text(f"/proc/{pid}/stat")
    if stat and stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
        return None
    return _start_ticks(stat)


def same_pid_space(holder: Holder, here: Holder) -> bool:
    """Whether ``holder``'s pid names a process ``here`` can see: same host, boot and pid namespace
    (both known)."""
    return bool(holder.boot_id and holder.pid_ns) and \
        (holder.host, holder.boot_id, holder.pid_ns) == (here.host, here.boot_id, here.pid_ns)


def is_same_process(holder: Holder, here: Holder) -> bool:
    """Whether ``holder`` was written by the process ``here`` describes: same pid space, pid and
    start time (a holder without a start time, from an older version, never is)."""
    return same_pid_space(holder, here) and holder.pid == here.pid and \
        holder.pid_start_ticks > 0 and holder.pid_start_ticks == here.pid_start_ticks


def stale_reason(holder: Holder, *, now: float, here: Holder,
                 started: Callable[[int], int | None] = process_start) -> str | None:
    """Why ``holder`` no longer holds the root (pure but for ``started``), or None while it does.

    ``here`` is this process's own record; ``started(pid)`` is ``process_start`` (asked only
    for a pid of ``here``'s pid space other than its own).  A holder in another pid space (host,
    container, boot) is judged by its heartbeat alone.
    """
    age = now - holder.heartbeat
    if age > holder.timeout_s:
        return f"its last heartbeat is {age:.0f}s old (timeout {holder.timeout_s:g}s)"
    if not same_pid_space(holder, here):
        return None
    ticks = here.pid_start_ticks if holder.pid == here.pid else started(holder.pid)
    if ticks is None:
        return f"its process {holder.pid} on this host is gone"
    if ticks and holder.pid_start_ticks and ticks != holder.pid_start_ticks:
        return (f"its process {holder.pid} on this host is gone: pid {holder.pid} is now another "
                f"process (started {ticks} clock ticks after boot, the holder {holder.pid_start_ticks})")
    return None


def root_key(storage: Storage) -> str:
    """One name per root however it is spelled: a local path resolved (``ckpt``, ``./ckpt``, its
    absolute path and a symlink to it are one), else the protocol and fsspec's normalised path."""
    if storage.is_local:
        return os.path.realpath(storage.root)
    protocol = storage.fs.protocol if isinstance(storage.fs.protocol, str) else storage.fs.protocol[0]
    return f"{protocol}://{storage.root}"


def read_holder(storage: Storage) -> Holder | None:
    """The holder named by ``<root>/.lease.json``, or None when there is none."""
    try:
        data = storage.read_bytes(LEASE_NAME, max_bytes=_MAX_LEASE_BYTES)
    except CorruptCheckpointError as e:
        raise LeaseError(f"{storage.url_of(LEASE_NAME)} is not a readable lease ({e}); if no job "
                         "writes to this root, delete it") from e
    except StorageError as e:
        if isinstance(e.cause, FileNotFoundError) or not storage.exists(LEASE_NAME):
            return None
        raise
    return Holder.from_json(data, storage.url_of(LEASE_NAME))


def live_holder(storage: Storage, *, now: float | None = None) -> Holder | None:
    """The writer holding the root now, or None (no lease, or a stale one)."""
    holder = read_holder(storage)
    if holder is None:
        return None
    here = Holder.for_this_process(now=0.0, timeout_s=0.0)
    stale = stale_reason(holder, now=time.time() if now is None else now, here=here)
    return None if stale else holder


_held: dict[str, str] = {}
"""Owner ids of the leases held by this process, by ``root_key``."""
_held_lock = threading.Lock()


class Lease:
    """This process's hold on ``<root>/.lease.json``; see the module docstring."""

    def __init__(self, storage: Storage, *, heartbeat_s: float = HEARTBEAT_S,
                 timeout_s: float = TIMEOUT_S, settle_s: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self._key = root_key(storage)
        self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
        self.settle_s = min(1.0, heartbeat_s / 4) if settle_s is None else settle_s
        self._clock = clock
        self.holder: Holder | None = None
        """Our record while we hold the lease."""
        self._lost: LeaseError | None = None
        self.lost = threading.Event()
        """Set once the lease was lost (taken over, deleted, or not refreshed in time)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = 0.0

    @property
    def url(self) -> str:
        return self.storage.url_of(LEASE_NAME)

    # -- acquiring ---------------------------------------------------------------
    def acquire(self) -> Holder:
        """Take the lease (or raise ``LeaseError`` naming its live holder); start the heartbeat."""
        self.storage.makedirs()
        for _ in range(_ACQUIRE_TRIES):
            mine = Holder.for_this_process(now=self._clock(), timeout_s=self.timeout_s)
            try:
                self.storage.put_atomic(LEASE_NAME, mine.to_json(), create_only=True)
            except CheckpointExistsError:
                current = read_holder(self.storage)
                if current is None:
                    continue  # released meanwhile: try again
                self._refuse_unless_stale(current, mine)
                if not self._take_over(current, mine):
                    continue
            self._hold(mine)
            return mine
        raise LeaseError(f"could not take the lease {self.url}: other writers keep taking it")

    def _refuse_unless_stale(self, current: Holder, mine: Holder) -> None:
        reason = stale_reason(current, now=self._clock(), here=mine)
        with _held_lock:
            held_here = _held.get(self._key) == current.owner  # owner ids are random: proof enough
        if reason is None and held_here:
            raise LeaseError(f"{self.storage.url} is already written by another CheckpointManager "
                             f"of this process ({current.describe(self._clock())}); close() it first")
        if reason is None and is_same_process(current, mine):
            reason = "it was left by this process and nothing here holds it any more"
        if reason is None:
            raise LeaseError(f"{self.storage.url} is in use by another writer: "
                             f"{current.describe(self._clock())}. Two jobs must not write one root; "
                             f"if that job is gone, its lease expires {current.timeout_s:g}s after its "
                             f"last heartbeat (or delete {self.url})")
        log.warning("taking over the lease of %s from %s: %s", self.storage.url,
                    current.describe(self._clock()), reason)

    def _take_over(self, stale: Holder, mine: Holder) -> bool:
        """Replace a stale lease; False when it changed under us (the caller looks again)."""
        if read_holder(self.storage) != stale:
            return False
        self.storage.remove(LEASE_NAME)
        try:
            self.storage.put_atomic(LEASE_NAME, mine.to_json(), create_only=True)
        except CheckpointExistsError:
            return False
        if self.settle_s > 0:
            time.sleep(self.settle_s)  # a contender that judged the same stale lease shows up here
        now = read_holder(self.storage)
        if now is None or now.owner != mine.owner:
            raise LeaseError(f"{self.storage.url}: another writer took the stale lease at the same "
                             f"time: {now.describe(self._clock()) if now else 'it is gone again'}")
        return True

    def _hold(self, mine: Holder) -> None:
        self.holder, self._lost, self._last_beat = mine, None, mine.heartbeat
        self.lost.clear()
        with _held_lock:
            _held[self._key] = mine.owner
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="asyncckpt-lease", daemon=True)
        self._thread.start()
        log.info("took the lease %s (owner %s)", self.url, mine.owner)

    # -- holding -----------------------------------------------------------------
    def check(self) -> None:
        """Raise ``LeaseError`` if the lease is not (or no longer) ours."""
        if self._lost is not None:
            raise self._lost
        if self.holder is None:
            raise LeaseError(f"the lease {self.url} is not held")

    def refresh(self) -> None:
        """One heartbeat: check the owner is still us, then write the new time."""
        assert self.holder is not None
        current = read_holder(self.storage)
        if current is None or current.owner != self.holder.owner:
            who = current.describe(self._clock()) if current else "nobody (the file was deleted)"
            raise LeaseError(f"lost the lease {self.url}: it is now held by {who}")
        beat = replace(self.holder, heartbeat=self._clock())
        self.storage.put_atomic(LEASE_NAME, beat.to_json(), create_only=False)
        self.holder, self._last_beat = beat, beat.heartbeat

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except LeaseError as e:
                self._lose(e)
                return
            except Exception as e:  # noqa: BLE001 - storage trouble: try again next beat
                silent = self._clock() - self._last_beat
                if silent > self.timeout_s:
                    self._lose(LeaseError(f"lost the lease {self.url}: no heartbeat could be written "
                                          f"for {silent:.0f}s (timeout {self.timeout_s:g}s): {e}"))
                    return
                log.warning("could not refresh the lease %s (%s); trying again in %gs", self.url,
                            e, self.heartbeat_s)

    def _lose(self, err: LeaseError) -> None:
        log.error("%s; this manager will not commit or delete checkpoints any more", err)
        self._lost = err
        self.lost.set()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        holder, self.holder = self.holder, None
        if holder is None:
            return
        with _held_lock:
            if _held.get(self._key) == holder.owner:
                del _held[self._key]
        once = self.storage.child("")
        once.retry = Retry(attempts=2, deadline_s=2.0)  # at exit the store may be gone: do not wait
        try:
            current = read_holder(once)
            if current is not None and current.owner == holder.owner:
                once.remove(LEASE_NAME)
        except Exception as e:  # noqa: BLE001 - it expires by itself
            log.warning("could not release the lease %s (%s); it expires after %gs", self.url, e,
                        holder.timeout_s)

    def __repr__(self) -> str:
        return f"Lease({self.url!r}, held={self.holder is not None})"


class WriteGuard:
    """Whether a manager may write its root: it holds the lease, or (``take=False``) no
    other writer holds it.  Call order: ``open()`` once, on rank 0 (True: the root may be
    cleaned up); ``check()`` before each commit or deletion; ``close()`` at the end."""

    def __init__(self, storage: Storage, *, take: bool, heartbeat_s: float = HEARTBEAT_S,
                 timeout_s: float = TIMEOUT_S) -> None:
        self.storage = storage
        self.lease = Lease(storage, heartbeat_s=heartbeat_s, timeout_s=timeout_s) if take else None
        self.other: Holder | None = None
        """The live writer found by a manager that takes no lease."""

    def open(self) -> bool:
        if self.lease is not None:
            self.lease.acquire()
            return True
        self.other = live_holder(self.storage)
        if self.other is not None:
            log.info("%s is written by another job (%s): opened for reading only (lease=False)",
                     self.storage.url, self.other.describe())
        return self.other is None

    def check(self) -> None:
        """Raise ``LeaseError`` unless this manager may commit and delete under its root."""
        if self.lease is not None:
            self.lease.check()
        elif self.other is not None:
            raise LeaseError(f"{self.storage.url} is in use by another writer "
                             f"({self.other.describe()}); this manager was opened with lease=False "
                             "and only lists and restores")

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
