"""The background half of a save: write shards, commit, then post-commit work.

One writer thread per manager takes staged saves off a queue in order and,
for each: writes the DCP checkpoint through ``CheckpointWriter`` (every file
durable before it returns), gathers every rank's file list over the CPU group,
and has rank 0 publish ``manifest.json`` last.  Then it runs the post-commit
hook (retention, mirroring).

A failure is logged, kept on the save's handle, and latched: the manager
raises it on its next ``save()``/``wait()``/``close()``, unless
``on_error="warn"``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch.distributed.checkpoint as dcp

from ._threads import can_start_threads
from . import _dist
from .codec import CodecOptions
from .dcp_io import CheckpointWriter, unwrap_failures
from .errors import AsyncCkptError, SaveError
from .manifest import MANIFEST_NAME, CheckpointInfo, Manifest, step_dir_name
from .planner import PlannedSavePlanner, RankPlan, SavePlanner
from .staging import Staged
from .storage import Storage, claim_folder, remove_unfinished

log = logging.getLogger(__name__)
# DCP warns on every single-process save; a single process is a supported mode here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class SaveHandle:
    """The future of one save.  ``done()`` never blocks."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.bytes_staged = 0
        """Bytes this rank copied off the training state."""
        self.bytes_written = 0
        """Bytes this rank wrote to storage."""
        self.bytes_per_rank: dict[int, int] = {}
        """Bytes written by each rank (known on every rank once committed)."""
        self.bytes_staged_per_rank: dict[int, int] = {}
        """Bytes staged by each rank (known on every rank once committed)."""
        self.stall_s = 0.0
        """Seconds ``save()`` held the training thread."""
        self._staged = threading.Event()
        self._finished = threading.Event()
        self._info: CheckpointInfo | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._finished.is_set()

    def staged(self, timeout: float | None = None) -> bool:
        """Block until staging is over; False if ``timeout`` passed first."""
        return self._staged.wait(timeout)

    def committed(self, timeout: float | None = None) -> bool:
        """Block until the save has committed (and the post-commit work of that commit,
        retention and ``on_commit``, is over) or failed; False if ``timeout`` passed first."""
        return self._finished.wait(timeout)

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """The committed checkpoint, or the save's error raised.  It returns once the
        retention that followed the commit has run, so a ``list()``/``verify()`` after it
        never races the manager's own deletions."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"save of step {self.step} not committed after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._info is not None
        return self._info

    def exception(self) -> BaseException | None:
        return self._error if self._finished.is_set() else None

    def _set_staged(self, nbytes: int, stall_s: float) -> None:
        self.bytes_staged, self.stall_s = nbytes, stall_s
        self._staged.set()

    def _finish(self, info: CheckpointInfo | None, error: BaseException | None) -> None:
        self._info, self._error = info, error
        self._staged.set()
        self._finished.set()

    def __repr__(self) -> str:
        state = "failed" if self._error else "committed" if self.done() else "pending"
        return f"SaveHandle(step={self.step}, {state})"


@dataclass
class SaveJob:
    """A staged save waiting for the writer thread."""

    handle: SaveHandle
    staged: Staged
    manifest: Manifest
    """The manifest to publish, without its files (filled in after the write)."""
    overwrite: bool = False
    on_commit: list[Callable[[Manifest], None]] = field(default_factory=list)
    plan: RankPlan | None = None
    """The save plan ``staged`` was selected by (this rank's items only); None: the whole state."""
    cleared: bool = False
    """Rank 0 made the step folder this save's own: on failure, what it left is removed."""
    before_write: Callable[[], None] | None = None
    """Rank 0's writer runs it before the step folder is touched (a rollback's move-aside);
    if it raises, the save fails on every rank."""


_STOP = object()


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _as_error(e: BaseException, where: str) -> Exception:
    """``e`` fit to latch: a SystemExit or KeyboardInterrupt caught on the writer thread
    would end the training when the next ``save()`` re-raises it; it is wrapped instead."""
    if isinstance(e, Exception):
        return e
    err = AsyncCkptError(f"{where} raised {e!r}")
    err.__cause__ = e
    return err


def codec_workers(writer_threads: int) -> int:
    """Compression threads for one rank: its share of the machine's cores (ranks on one node
    split them; LOCAL_WORLD_SIZE is set by torchrun), at least ``writer_threads``, at most 16.
    zstd releases the GIL, so these run in parallel with training's Python thread."""
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = (os.cpu_count() or 1) // local_ranks
    return max(writer_threads, min(16, share - 1))


class Pipeline:
    """The writer thread and its queue."""

    def __init__(self, storage: Storage, *, codec: CodecOptions | None, group: Any,
                 rank: int, max_pending: int = 2, writer_threads: int = 2,
                 on_error: str = "raise",
                 after_commit: Callable[[Manifest], None] | None = None,
                 on_failure: Callable[[int, BaseException], None] | None = None,
                 guard: Callable[[], None] | None = None) -> None:
        self.storage = storage
        self.guard = guard
        """Rank 0 calls it before clearing a step folder and before committing; it raises
        (``LeaseError``) when this writer may not write the root."""
        self.on_failure = on_failure
        self.codec = codec
        self.group = group
        self.rank = rank
        self.on_error = on_error
        self.after_commit = after_commit
        self.writer_threads = writer_threads
        self._slots = threading.BoundedSemaphore(max_pending)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._pending: list[SaveHandle] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        workers = codec_workers(writer_threads)
        self._codec_pool = (ThreadPoolExecutor(workers, thread_name_prefix="asyncckpt-zstd")
                            if codec is not None and workers > 1 else None)
        self._closed = False

    # -- called from the training thread ------------------------------------------
    def submit(self, job: SaveJob) -> None:
        """Queue ``job`` for the writer.  If this raises (closed, interrupted while waiting for
        a slot), the job was not taken: the caller still owns its staged buffers."""
        if self._closed:
            raise AsyncCkptError("the checkpoint manager is closed")
        if not self._slots.acquire(blocking=False):
            log.warning("step=%d rank=%d: the writer is behind; waiting for a pending save "
                        "to finish writing", job.handle.step, self.rank)
            self._slots.acquire()
        try:
            with self._lock:  # one writer per manager, however many threads save at once
                self._pending.append(job.handle)
                if self._thread is None:
                    thread = threading.Thread(target=self._run, name="asyncckpt-writer", daemon=True)
                    thread.start()
                    self._thread = thread
        except BaseException:
            with self._lock:
                self._pending = [h for h in self._pending if h is not job.handle]
            self._slots.release()
            raise
        self._queue.put(job)

    def submit_failed(self, step: int, error: BaseException) -> None:
        """Queue a save that failed before its write (staging), so that every rank's writer
        still takes part in its agreement and the save fails on all ranks together."""
        def fail() -> None:
            raise error

        self.submit(SaveJob(handle=SaveHandle(step), staged=Staged({}, 0, _finish=fail),
                            manifest=Manifest(step=step)))

    def pending_steps(self) -> set[int]:
        with self._lock:
            return {h.step for h in self._pending if not h.done()}

    def raise_pending(self) -> None:
        """Raise a background failure latched since the last call (on_error="raise")."""
        with self._lock:
            err, self._error = self._error, None
        if err is not None and self.on_error == "raise":
            raise err

    def forget(self, err: BaseException) -> None:
        """Drop ``err`` from the latch: the caller got it another way (a blocking save)."""
        with self._lock:
            if self._error is err:
                self._error = None

    def wait(self) -> None:
        """Block until every submitted save is written, committed and post-processed."""
        self._queue.join()
        self.raise_pending()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join()
            if self._codec_pool is not None:
                self._codec_pool.shutdown()

    # -- the writer thread ----------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                self._queue.task_done()
                return
            try:
                self._process(job)
            except BaseException as e:  # noqa: BLE001 - the writer must outlive any one save
                log.error("step=%d rank=%d: the writer caught %r; going on with the next save",
                          job.handle.step, self.rank, e)
                self._latch(_as_error(e, "the writer"))
                if not job.handle.done():
                    job.handle._finish(None, SaveError(job.handle.step, {self.rank: e}))
            finally:
                job.staged.release()
                with self._lock:
                    self._pending = [h for h in self._pending if h is not job.handle]
                self._slots.release()
                del job
                self._queue.task_done()

    def _process(self, job: SaveJob) -> None:
        step, started = job.handle.step, time.monotonic()
        try:
            manifest = self._write_and_commit(job)
        except BaseException as e:  # noqa: BLE001 - kept on the handle and latched
            err = e if isinstance(e, SaveError) else SaveError(step, {self.rank: e})
            err.__cause__ = e if err is not e else e.__cause__
            log.error("step=%d rank=%d: save failed: %s", step, self.rank, err)
            if self.on_failure is not None:
                try:
                    self.on_failure(step, err)
                except BaseException as cb_err:  # noqa: BLE001 - sys.exit() too: a callback never breaks a save
                    log.error("step=%d rank=%d: on_failure callback raised: %r", step, self.rank, cb_err)
            if job.cleared:
                self._discard_uncommitted(step)
            self._latch(err)
            job.handle._finish(None, err)
            return
        info = CheckpointInfo.from_manifest(manifest, self.storage.url_of(step_dir_name(step)))
        log.info("step=%d rank=%d: committed %d bytes in %.2fs", step, self.rank,
                 manifest.total_bytes, time.monotonic() - started)
        try:
            self._post_commit(manifest, job)
        finally:  # after retention: a read that follows result() sees what retention left
            job.handle._finish(info, None)

    def _discard_uncommitted(self, step: int) -> None:
        """Remove what a failed save wrote (it would hold disk space until the next start);
        every rank is past the write when the failure reaches rank 0's writer."""
        folder = self.storage.child(step_dir_name(step))
        try:
            remove_unfinished(self.storage, step_dir_name(step), commit_file=MANIFEST_NAME,
                              what="a failed save")
        except Exception as e:  # noqa: BLE001 - the next start removes it anyway
            log.warning("step=%d rank=%d: could not remove the failed save's files at %s: %s",
                        step, self.rank, folder.url, e)

    def _post_commit(self, manifest: Manifest, job: SaveJob) -> None:
        hooks = ([self.after_commit] if self.after_commit else []) + job.on_commit
        for hook in hooks:
            try:
                hook(manifest)
            except BaseException as e:  # noqa: BLE001 - latched, never lost; the writer goes on
                log.error("step=%d rank=%d: post-commit work %s failed: %r", manifest.step, self.rank,
                          _name_of(hook), e)
                self._latch(_as_error(e, "post-commit work"))

    def _latch(self, err: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = err

    def _write_and_commit(self, job: SaveJob) -> Manifest:
        step = job.handle.step
        folder = self.storage.child(step_dir_name(step))
        self._agree(step, lambda: self._prepare(job, folder))
        pool = self._codec_pool if can_start_threads() else None  # none at interpreter exit
        writer = CheckpointWriter(folder, codec=self.codec, thread_count=self.writer_threads,
                                  executor=pool)
        planner = PlannedSavePlanner(job.plan) if job.plan is not None else SavePlanner()
        try:
            dcp.save(job.staged.state_dict, storage_writer=writer, planner=planner,
                     process_group=self.group, no_dist=self.group is None)
        except (Exception, dcp.CheckpointException) as e:  # DCP's is a BaseException
            raise SaveError(step, unwrap_failures(e)) from e
        job.handle.bytes_written = writer.bytes_written
        per_rank = _dist.all_gather_object(
            (self.rank, writer.bytes_written, writer.files, job.staged.bytes_staged), self.group)
        job.handle.bytes_per_rank = {r: n for r, n, _, _ in per_rank}
        job.handle.bytes_staged_per_rank = {r: s for r, _, _, s in per_rank}
        files = tuple(sorted((f for _, _, fs, _ in per_rank for f in fs), key=lambda f: f.path))
        manifest = replace(job.manifest, files=files)
        outcome: str | None = None
        if self.rank == 0:
            try:
                if self.guard is not None:
                    self.guard()
                folder.put_atomic(MANIFEST_NAME, manifest.to_json().encode(), create_only=True)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it
                outcome = f"{type(e).__name__}: {e}"
        outcome = _dist.broadcast_object(outcome, self.group)
        if outcome is not None:
            raise SaveError(step, {0: outcome})
        return manifest

    def _prepare(self, job: SaveJob, folder: Storage) -> None:
        if self.rank == 0:
            if self.guard is not None:
                self.guard()
            if job.before_write is not None:
                job.before_write()
            self._clear_folder(folder, job.overwrite)
            job.cleared = True
        job.staged.wait_ready()

    def _agree(self, step: int, work: Callable[[], None]) -> None:
        """Run ``work`` on every rank; if it failed on any, every rank raises (nobody hangs)."""
        error: BaseException | None = None
        try:
            work()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            error = e
        said = _dist.all_gather_object(None if error is None else f"{type(error).__name__}: {error}",
                                       self.group)
        failures: dict[int, BaseException | str] = {r: s for r, s in enumerate(said) if s is not None}
        if failures:
            if error is not None:
                failures[self.rank] = error
            raise SaveError(step, failures) from error

    def _clear_folder(self, folder: Storage, overwrite: bool) -> None:
        """Make way for a new write: leftovers of a crash, or an overwritten checkpoint."""
        if folder.exists(MANIFEST_NAME):
            if not overwrite:
                from .errors import CheckpointExistsError

                raise CheckpointExistsError(f"{folder.url} is already committed")
            log.warning("overwriting committed checkpoint %s", folder.url)
            folder.remove(MANIFEST_NAME)  # committed: proven ours by its manifest
            folder.remove("", recursive=True)
        claim_folder(folder, commit_file=MANIFEST_NAME, kind="checkpoint")
