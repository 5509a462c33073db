"""CheckpointManager: the public entry point that wires the stages together.

``save`` collects the state, stages it (the only part the training thread
waits for), and hands it to the pipeline's writer thread, which writes,
commits and then applies retention.  ``restore`` picks a committed checkpoint
(latest, best, a step, or a path), verifies and loads it.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
import socket
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import _dist, restore as _restore
from .codec import CodecOptions
from .config import ManagerOptions
from .errors import (
    AsyncCkptError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IntegrityError,
    StorageError,
)
from .manifest import MANIFEST_NAME, CheckpointInfo, Manifest, check_step, select, step_dir_name
from .pipeline import Pipeline, SaveHandle, SaveJob
from .retention import Retention
from .schedule import Schedule, ScheduleState
from .staging import stage
from .state import PARTS, TrainState
from .storage import Storage, list_committed, read_manifest, uncommitted_steps, verify_files

log = logging.getLogger(__name__)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigError.field("metrics", metrics, "a dict of name -> number")
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and callable(v.item):
            v = v.item()
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"metrics[{k!r}]={v!r} is not valid: expected a str name and a number")
        out[k] = float(v)
    return out


def _check_tags(tags: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tags, str) or not all(isinstance(t, str) and t for t in tags):
        raise ConfigError.field("tags", tags, "a list of non-empty strings")
    return tuple(dict.fromkeys(tags))


_live: "weakref.WeakSet[CheckpointManager]" = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for mgr in list(_live):
        try:
            mgr.close()
        except Exception as e:  # noqa: BLE001 - at exit there is nobody left to raise to
            log.error("pending checkpoint writes failed at exit: %s", e)


class CheckpointManager:
    """Asynchronous, atomic checkpoints of a ``TrainState`` under one storage URL."""

    def __init__(self, root: str | os.PathLike[str], *, retention: Retention | None = None,
                 schedule: Schedule | None = None, compression: str | None = "zstd",
                 staging: str = "auto", backup: str | None = None,
                 storage_options: Mapping[str, Any] | None = None, on_error: str = "raise",
                 **options: Any) -> None:
        self.options = ManagerOptions.from_kwargs(dict(
            retention=retention, schedule=schedule, compression=compression, staging=staging,
            backup=backup, storage_options=storage_options, on_error=on_error, **options))
        self.storage = Storage(root, self.options.storage_options)
        self.root = self.storage.url
        self.rank, self.world_size = _dist.rank(), _dist.world_size()
        self._fg_group = _dist.new_cpu_group()
        self._bg_group = _dist.new_cpu_group()
        self._schedule_state = ScheduleState()
        self._host, self._device, self._git = socket.gethostname(), _device_name(), _git_commit()
        if self.rank == 0:
            self._prepare_root()
        _dist.barrier(self._fg_group)
        codec = CodecOptions(level=self.options.zstd_level) if self.options.compression else None
        self._pipeline = Pipeline(self.storage, codec=codec, group=self._bg_group, rank=self.rank,
                                  max_pending=self.options.max_pending,
                                  writer_threads=self.options.writer_threads,
                                  on_error=self.options.on_error,
                                  after_commit=self._after_commit if self.rank == 0 else None)
        self._closed = False
        _live.add(self)

    # -- setup -------------------------------------------------------------------
    def _prepare_root(self) -> None:
        try:
            self.storage.check_writable()
        except StorageError as e:
            raise StorageError("create or write checkpoint root", self.root, e.cause) from e
        for step in uncommitted_steps(self.storage):
            name = step_dir_name(step)
            log.warning("removing %s: a save that never committed", self.storage.url_of(name))
            self.storage.remove(name, recursive=True)

    @property
    def retention(self) -> Retention | None:
        return self.options.retention

    @property
    def schedule(self) -> Schedule | None:
        return self.options.schedule

    # -- saving ------------------------------------------------------------------
    def save(self, step: int, state: TrainState, *, metrics: Mapping[str, Any] | None = None,
             epoch: int | None = None, tags: Sequence[str] = (), blocking: bool = False,
             overwrite: bool = False) -> SaveHandle:
        """Stage ``state`` and return; the write and commit happen in the background."""
        self._check_open()
        self._pipeline.raise_pending()
        check_step(step)
        if not isinstance(state, TrainState):
            raise ConfigError.field("state", type(state).__name__, "a TrainState")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
            raise ConfigError.field("epoch", epoch, "a non-negative integer or None")
        metrics_f, tags_t = _check_metrics(metrics), _check_tags(tags)
        if not overwrite:
            self._refuse_existing(step)
        started = time.perf_counter()
        staged = stage({**state.tensors(), **state.objects(self.rank)})
        handle = SaveHandle(step)
        handle._set_staged(staged.bytes_staged, time.perf_counter() - started)
        manifest = Manifest(step=step, epoch=epoch, time=_utc_now(), metrics=metrics_f, tags=tags_t,
                            world_size=self.world_size, param_count=state.param_count(),
                            codec=self.options.compression, torch_version=torch.__version__,
                            git_commit=self._git, host=self._host, device=self._device)
        self._pipeline.submit(SaveJob(handle=handle, staged=staged, manifest=manifest,
                                      overwrite=overwrite))
        log.debug("step=%d rank=%d: staged %d bytes in %.3fs", step, self.rank,
                  staged.bytes_staged, handle.stall_s)
        if blocking:
            handle.result()
        return handle

    def _refuse_existing(self, step: int) -> None:
        exists = None
        if self.rank == 0:
            if step in self._pipeline.pending_steps():
                exists = f"a save of step {step} is already in flight"
            elif self.storage.exists(f"{step_dir_name(step)}/{MANIFEST_NAME}"):
                exists = f"step {step} is already committed at {self.storage.url_of(step_dir_name(step))}"
        exists = _dist.broadcast_object(exists, self._fg_group)
        if exists:
            raise CheckpointExistsError(f"{exists}; pass overwrite=True to replace it")

    def maybe_save(self, step: int, state: TrainState, *, metrics: Mapping[str, Any] | None = None,
                   epoch: int | None = None, epoch_end: bool = False, force: bool = False,
                   tags: Sequence[str] = ()) -> SaveHandle | None:
        """Save when the schedule (or ``force``) says so; otherwise do nothing."""
        self._check_open()
        check_step(step)
        now = time.monotonic()
        decision = None
        if self.schedule is not None:
            decision = self._schedule_state.decide(self.schedule, step=step, now=now,
                                                   epoch_end=epoch_end,
                                                   param_count=state.trainable_param_count())
        if not force and not (decision and decision.save):
            return None
        all_tags = [*tags, *(decision.tags if decision else ()), *(["epoch_end"] if epoch_end else [])]
        handle = self.save(step, state, metrics=metrics, epoch=epoch, tags=all_tags)
        self._schedule_state.record_save(step, now, stall_s=handle.stall_s,
                                         milestones=decision.milestones if decision else ())
        return handle

    # -- post-commit ---------------------------------------------------------------
    def _after_commit(self, manifest: Manifest) -> None:
        if self.retention is None:
            return
        self.prune(self.retention)

    def prune(self, retention: Retention | None = None, *, dry_run: bool = False) -> list[int]:
        """Delete what the retention policy drops; returns the steps deleted (or to delete)."""
        policy = retention or self.retention
        if policy is None:
            raise ConfigError("prune() needs a Retention: pass one or configure retention=")
        manifests = list_committed(self.storage)
        plan = policy.plan(manifests)
        for step, metric in plan.missing_metric:
            log.warning("step=%d has no metric %r; keep_best ignores it", step, metric)
        if dry_run:
            return list(plan.delete)
        for step in plan.delete:
            self._delete(step)
        return list(plan.delete)

    def _delete(self, step: int) -> None:
        """Manifest first, so a half-deleted folder is never listed."""
        name = step_dir_name(step)
        self.storage.remove(f"{name}/{MANIFEST_NAME}")
        self.storage.fsync_dir(name)
        self.storage.remove(name, recursive=True)
        log.info("step=%d: deleted by retention", step)

    # -- listing, verifying and restoring ---------------------------------------------
    def verify(self, step: int | None = None) -> dict[int, list[str]]:
        """Check every file of one checkpoint (or all) against its manifest.

        Returns ``{step: [problems]}``; a checkpoint with an empty list is whole.
        """
        steps = [check_step(step)] if step is not None else [m.step for m in list_committed(self.storage)]
        out = {}
        for s in steps:
            try:
                m = read_manifest(self.storage, s)
            except StorageError as e:
                raise CheckpointNotFoundError(f"at step {s}", self.root,
                                              [m.step for m in list_committed(self.storage)]) from e
            out[s] = verify_files(self.storage.child(step_dir_name(s)), m)
        return out

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        manifests = list_committed(self.storage)
        best_tags = self._best_tags(manifests)
        return [CheckpointInfo.from_manifest(m, self.storage.url_of(step_dir_name(m.step)),
                                             best_tags.get(m.step, ()))
                for m in manifests]

    def _best_tags(self, manifests: Sequence[Manifest]) -> dict[int, tuple[str, ...]]:
        out: dict[int, tuple[str, ...]] = {}
        if self.retention is None:
            return out
        for metric in self.retention.metrics:
            step = self.retention.best_step(manifests, metric)
            if step is not None:
                out[step] = (*out.get(step, ()), f"best:{metric}")
        return out

    def restore(self, state: TrainState, which: int | str | os.PathLike[str] = "latest", *,
                strict: bool = True, verify: bool | None = None,
                include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> int:
        """Load a checkpoint into ``state``; returns its step, or 0 when there is none."""
        self._check_open()
        self._pipeline.raise_pending()
        verify = self.options.verify_on_restore if verify is None else verify
        parts = self._parts(include, exclude)
        if isinstance(which, os.PathLike) or (isinstance(which, str) and _is_path(which)):
            return self._restore_path(state, os.fspath(which), strict=strict, verify=verify, parts=parts)
        candidates = self._agreed_candidates(which)
        if not candidates:
            return 0
        errors = []
        for m in candidates:
            try:
                _restore.load_into(self.storage.child(step_dir_name(m.step)), m, state,
                                   rank=self.rank, group=self._fg_group, strict=strict,
                                   verify=verify, parts=parts)
            except IntegrityError as e:
                if which != "latest":
                    raise
                errors.append(e)
                log.warning("step=%d is damaged, falling back to an older checkpoint: %s", m.step, e)
                continue
            self._after_restore(m, state)
            return m.step
        raise CorruptCheckpointError(self.root, "a restorable checkpoint",
                                     f"{len(errors)} damaged", "; ".join(map(str, errors)))

    def _agreed_candidates(self, which: int | str) -> list[Manifest]:
        """Rank 0 decides which checkpoints to try (newest first) and every rank follows."""
        chosen: list[Manifest] | BaseException = []
        if self.rank == 0:
            try:
                chosen = self._candidates(which)
            except AsyncCkptError as e:
                chosen = e
        chosen = _dist.broadcast_object(chosen, self._fg_group)
        if isinstance(chosen, BaseException):
            raise chosen
        return chosen

    def _candidates(self, which: int | str) -> list[Manifest]:
        manifests = list_committed(self.storage)
        if which == "latest":
            return list(reversed(manifests))
        if isinstance(which, str) and (which == "best" or which.startswith("best:")):
            return [self._best(manifests, which)]
        return [select(manifests, which, self.root)]

    def _best(self, manifests: Sequence[Manifest], which: str) -> Manifest:
        metric = which.split(":", 1)[1] if ":" in which else None
        policy = self.retention
        if metric is None and (policy is None or policy.primary_metric is None):
            raise ConfigError('restore(which="best") needs Retention(best_metric=...) '
                              'or which="best:<metric>"')
        if policy is None:
            policy = Retention(best_metric=metric)
        step = policy.best_step(manifests, metric)
        if step is None:
            raise CheckpointNotFoundError(f"with metric {metric or policy.primary_metric!r}",
                                          self.root, [m.step for m in manifests])
        return next(m for m in manifests if m.step == step)

    def _restore_path(self, state: TrainState, path: str, *, strict: bool, verify: bool,
                      parts: Sequence[str]) -> int:
        folder = Storage(path, self.options.storage_options)
        try:
            raw = folder.read_bytes(MANIFEST_NAME)
        except StorageError as e:
            raise CheckpointNotFoundError(f"at {folder.url} (no {MANIFEST_NAME})", self.root,
                                          [m.step for m in list_committed(self.storage)]) from e
        m = Manifest.from_json(raw, folder.url_of(MANIFEST_NAME))
        _restore.load_into(folder, m, state, rank=self.rank, group=self._fg_group, strict=strict,
                           verify=verify, parts=parts)
        self._after_restore(m, state)
        return m.step

    def _after_restore(self, m: Manifest, state: TrainState) -> None:
        milestones = self.schedule.param_milestones if self.schedule else ()
        count = state.trainable_param_count()
        self._schedule_state.mark_milestones(ms for ms in (milestones or ()) if ms <= count)
        self._schedule_state.record_save(m.step, time.monotonic())
        log.info("step=%d rank=%d: restored from %s", m.step, self.rank, self.storage.url_of(step_dir_name(m.step)))

    @staticmethod
    def _parts(include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[str]:
        for name, given in (("include", include), ("exclude", exclude)):
            bad = [p for p in (given or ()) if p not in PARTS]
            if bad:
                raise ConfigError(f"{name}={list(given or ())!r} names unknown part(s) {bad}; "
                                  f"expected some of {list(PARTS)}")
        parts = list(include) if include is not None else list(PARTS)
        return [p for p in parts if p not in set(exclude or ())]

    # -- lifecycle ---------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every pending save has committed; raise a background failure."""
        self._pipeline.wait()

    def close(self) -> None:
        """Wait for pending writes, stop the writer, and raise any background failure."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        self._pipeline.close()

    def _check_open(self) -> None:
        if self._closed:
            raise AsyncCkptError(f"the checkpoint manager for {self.root} is closed")

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            try:
                self.close()
            except Exception as e:  # noqa: BLE001 - do not mask the exception already leaving
                log.error("while closing after an error: %s", e)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.root!r}, rank={self.rank}/{self.world_size})"


def _is_path(which: str) -> bool:
    return which not in ("latest", "best") and not which.startswith("best:") and not which.isdigit()

