"""Mirror: copy committed checkpoints to a backup storage, on a thread of its own.

After each commit on the primary, rank 0's pipeline calls ``submit(step)``.
The mirror thread then, for that step:

1. reads the primary's ``manifest.json`` (a step already gone from the
   primary, pruned by its retention, is skipped with a warning);
2. copies every file the manifest lists, streaming, checksumming each as it
   goes and refusing (``CorruptCheckpointError``) a file whose size or
   checksum differs from the manifest: a damaged primary is never copied;
3. writes the same ``manifest.json`` on the backup LAST, so the backup copy
   exists only once whole (the backup's own ``Storage`` gives the usual
   guarantees: fsync on disks, completed uploads on S3);
4. applies the backup's retention there (manifest deleted first).

``submit`` never blocks.  If steps arrive faster than the backup takes them,
the mirror skips to the newest committed step with a warning.  A failure is
logged and latched: ``raise_pending``/``wait``/``close`` raise it unless
``on_error="warn"``.  Before its first copy the mirror removes what an
earlier, killed mirror left on the backup (folders without a manifest,
unfinished multipart uploads).

``with_backup`` is the pure part of restoring with a fallback: the order in
which to try primary and backup copies.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence

from .branches import drop_abandoned_copies
from .codec import Checksum
from .errors import AsyncCkptError, CorruptCheckpointError, IntegrityError, StorageError
from .manifest import MANIFEST_NAME, MAX_JSON_BYTES, FileEntry, Manifest, step_dir_name
from .retention import Retention
from .storage import (Storage, abort_unfinished_saves, claim_folder, delete_checkpoint,
                      list_committed, remove_unfinished_saves)

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
"""Bytes read from the primary and written to the backup at a time."""


class Mirror:
    """Copies committed checkpoints from ``primary`` to ``backup``; see the module docstring."""

    def __init__(self, primary: Storage, backup: Storage, retention: Retention | None = None, *,
                 on_error: str = "raise", chunk_bytes: int = CHUNK_BYTES) -> None:
        self.primary, self.backup, self.retention = primary, backup, retention
        self.on_error = on_error
        self.chunk_bytes = chunk_bytes
        self.mirrored: list[int] = []
        """Steps committed on the backup by this mirror, in order."""
        self.skipped: list[int] = []
        """Steps never copied: a newer one came first, or the primary had dropped them."""
        self._cond = threading.Condition()
        self._wanted: int | None = None
        self._busy = False
        self._closing = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._prepared = False
        self._drop_abandoned = False

    # -- called from the pipeline (after a commit) and the training thread -------------
    def submit(self, step: int) -> None:
        """Mirror ``step`` (just committed on the primary) soon; never blocks."""
        with self._cond:
            if self._closing:
                raise AsyncCkptError(f"the mirror to {self.backup.url} is closed")
            if self._wanted is not None and self._wanted != step:
                log.warning("step=%d: the mirror to %s is behind; skipping step %d for the newer "
                            "step %d", step, self.backup.url, self._wanted, step)
                self.skipped.append(self._wanted)
            self._wanted = step
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="asyncckpt-mirror", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drop_abandoned(self) -> None:
        """The primary set a branch aside (a rollback): before its next copy the mirror thread
        deletes the backup's copies of those checkpoints, so they never win ``latest`` there."""
        with self._cond:
            self._drop_abandoned = True

    def raise_pending(self) -> None:
        """Raise a latched failure (once) unless ``on_error="warn"``."""
        with self._cond:
            err, self._error = self._error, None
        if err is not None and self.on_error == "raise":
            raise err

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the newest submitted step is mirrored (or failed); then ``raise_pending``.

        Returns False if ``timeout`` passed first.
        """
        with self._cond:
            idle = self._cond.wait_for(lambda: self._wanted is None and not self._busy, timeout)
        self.raise_pending()
        return idle

    def close(self, *, raise_errors: bool = True) -> None:
        """Finish the step in hand and the newest submitted one, stop the thread, raise."""
        with self._cond:
            self._cond.wait_for(lambda: self._wanted is None and not self._busy)
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if raise_errors:
            self.raise_pending()

    # -- the mirror thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted is not None or self._closing)
                if self._wanted is None:
                    return
                step, self._wanted, self._busy = self._wanted, None, True
            try:
                self._mirror(step)
            except Exception as e:  # noqa: BLE001 - latched, never lost
                log.error("step=%d: mirroring to %s failed: %s", step, self.backup.url, e)
                with self._cond:
                    self._error = self._error or e
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _prepare(self) -> None:
        """Remove what a killed mirror left on the backup (only this mirror writes there)."""
        remove_unfinished_saves(self.backup, "a backup copy")
        abort_unfinished_saves(self.backup)
        self._prepared = True
        self._drop_abandoned = True  # a rollback a crash kept from reaching the backup

    def _mirror(self, step: int) -> None:
        if not self._prepared:
            self._prepare()
        with self._cond:
            drop, self._drop_abandoned = self._drop_abandoned, False
        if drop:
            drop_abandoned_copies(self.primary, self.backup)
        name = step_dir_name(step)
        src, dst = self.primary.child(name), self.backup.child(name)
        started, copying = time.monotonic(), False
        try:
            raw = src.read_bytes(MANIFEST_NAME, max_bytes=MAX_JSON_BYTES)
            manifest = Manifest.from_json(raw, src.url_of(MANIFEST_NAME))
            if not self._copy_needed(dst, raw):
                return
            copying = True
            for entry in manifest.files:
                self._copy(src, dst, entry)
        except (StorageError, IntegrityError) as e:
            if copying:
                with contextlib.suppress(StorageError):
                    dst.remove("", recursive=True)  # what was copied, never committed
            if src.exists(MANIFEST_NAME):
                raise
            log.warning("step=%d: deleted from the primary before the mirror copied it; skipped "
                        "(%s)", step, type(e).__name__)
            self.skipped.append(step)
            return
        dst.fsync_dir()
        dst.put_atomic(MANIFEST_NAME, raw, create_only=True)
        self.mirrored.append(step)
        log.info("step=%d: mirrored %d bytes to %s in %.2fs", step, manifest.total_bytes,
                 dst.url, time.monotonic() - started)
        self._prune()

    def _copy_needed(self, dst: Storage, raw: bytes) -> bool:
        """Make way for the copy; False when the backup already holds this very checkpoint."""
        if dst.exists(MANIFEST_NAME):
            if dst.read_bytes(MANIFEST_NAME) == raw:
                return False
            log.warning("replacing %s: the primary copy was overwritten", dst.url)
            dst.remove(MANIFEST_NAME)  # committed: proven ours by its manifest
            dst.remove("", recursive=True)
        claim_folder(dst, commit_file=MANIFEST_NAME, kind="backup copy")
        return True

    def _copy(self, src: Storage, dst: Storage, entry: FileEntry) -> None:
        """Stream one file across, checking its size and checksum against the manifest."""
        digest = Checksum()
        with src.open_read(entry.path) as inp, dst.open_write(entry.path) as out:
            while True:
                try:
                    chunk = inp.read(self.chunk_bytes)
                except Exception as e:  # noqa: BLE001 - name the side that failed
                    raise src.error_for("read", entry.path, e) from e
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
            url = src.url_of(entry.path)
            if digest.nbytes != entry.size:
                raise CorruptCheckpointError(url, f"{entry.size} bytes", f"{digest.nbytes} bytes",
                                             "not mirrored")
            if entry.checksum and digest.hexdigest() != entry.checksum:
                raise CorruptCheckpointError(url, entry.checksum, digest.hexdigest(),
                                             "checksum mismatch; not mirrored")

    def _prune(self) -> None:
        if self.retention is None:
            return
        plan = self.retention.plan(list_committed(self.backup))
        for step in plan.delete:
            delete_checkpoint(self.backup, step)
            log.info("step=%d: deleted from the backup %s by its retention", step, self.backup.url)


def with_backup(primary: Sequence[Manifest], backup: Sequence[Manifest], *,
                latest: bool) -> list[tuple[Manifest, bool]]:
    """The copies to try when restoring, best first: ``(manifest, from_backup)``.

    ``primary`` holds the candidates chosen on the primary (newest first for
    ``latest``, else the one chosen), ``backup`` the backup's committed
    checkpoints.  For ``latest``: every step of either, newest first, the
    primary copy of a step before its backup copy.  Otherwise: the chosen
    step's primary copy, then its backup copy; or, when the primary chose
    nothing, ``backup`` as given.
    """
    in_backup = {m.step: m for m in backup}
    if not latest:
        if not primary:
            return [(m, True) for m in backup]
        return [(m, False) for m in primary] + [
            (in_backup[m.step], True) for m in primary if m.step in in_backup]
    in_primary = {m.step: m for m in primary}
    out: list[tuple[Manifest, bool]] = []
    for step in sorted(set(in_primary) | set(in_backup), reverse=True):
        if step in in_primary:
            out.append((in_primary[step], False))
        if step in in_backup:
            out.append((in_backup[step], True))
    return out
