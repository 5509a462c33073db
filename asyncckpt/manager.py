"""CheckpointManager: the public entry point that wires the stages together.

``save`` collects the state, stages it (the only part the training thread
waits for), and hands it to the pipeline's writer thread, which writes,
commits and then applies retention.  ``restore`` picks a committed checkpoint
(latest, best, a step, or a path), verifies and loads it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import logging
import os
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch

from . import _dist, _threads, branches, foreign, restore as _restore
from .codec import CodecOptions
from .config import ManagerOptions, decode_yaml, load_yaml_text, options_from_dict
from .errors import (
    AsyncCkptError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IntegrityError,
    RollbackRefusedError,
    StorageError,
    UnsafeCheckpointError,
)
from .manifest import MANIFEST_NAME, CheckpointInfo, Manifest, check_step, select, step_dir_name
from .pipeline import Pipeline, SaveHandle, SaveJob
from .planner import PlanCache
from .retention import Retention, RetentionPlan, best_step_for, best_tags, metric_value
from .schedule import Schedule, ScheduleState, format_params
from .signals import StopSignals, signal_name
from .staging import Stager
from .state import TrainState, storage_ptr
from .mirror import Mirror, with_backup
from .multipart import Upload
from .lease import WriteGuard
from .quarantine import (checked_plan, list_quarantined, quarantine, quarantine_unreadable,
                         retire_expired)
from .storage import (Storage, abort_unfinished_saves, delete_checkpoint, is_committed,
                      list_committed, manifest_steps, read_folder_manifest, read_manifest,
                      remove_temporary_files, remove_unfinished_saves, verify_checkpoint)
from .release import (Provenance, ReleaseInfo, ReleaseOptions, checkpoint_weights, is_release,
                      list_releases, release_weights, remove_unfinished_releases, state_weights,
                      with_release_tags, write_release)

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
        try:
            if hasattr(v, "item") and callable(v.item):
                v = v.item()  # a one-element tensor or numpy scalar
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError
            out[k] = float(v)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ConfigError(f"metrics[{k!r}]={v!r} is not valid: expected a str name and a number "
                              "(one element, within float range)") from e
    return out


def _check_tags(tags: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tags, str) or not all(isinstance(t, str) and t for t in tags):
        raise ConfigError.field("tags", tags, "a list of non-empty strings")
    return tuple(dict.fromkeys(tags))


_live: "weakref.WeakSet[CheckpointManager]" = weakref.WeakSet()


def _drain_at_exit() -> None:
    _threads.exiting.set()  # from here on, saves are written without new threads
    for mgr in list(_live):
        try:
            mgr.close()
        except Exception as e:  # noqa: BLE001 - at exit there is nobody left to raise to
            log.error("pending checkpoint writes failed at exit: %s", e)


def _at_exit_before_thread_pools(fn: Any) -> None:
    """Run ``fn`` when the interpreter exits, while thread pools still take work.
    ``concurrent.futures`` shuts its pools in threading's own exit hooks, which run before
    ``atexit``'s (and last-registered first): a drain left to ``atexit`` found them shut, and
    a save still pending when the script ended failed ("cannot schedule new futures after
    interpreter shutdown")."""
    import concurrent.futures.thread  # noqa: F401 - its hook first, so that it runs after ours

    register = getattr(threading, "_register_atexit", None)
    (register or atexit.register)(fn)


_at_exit_before_thread_pools(_drain_at_exit)


def _failure(e: BaseException) -> str:
    """How restore names a checkpoint it could not use: save() makes none that weights-only
    loading refuses, so such a one was written by something else, not torn or bit-flipped."""
    return "refused as unsafe (an item asks to import code)" if isinstance(
        e, UnsafeCheckpointError) else "damaged"


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
        upload = Upload(part_bytes=self.options.upload_part_bytes,
                        concurrency=self.options.upload_concurrency)
        self.storage = Storage(root, self.options.storage_options, upload=upload, retry=self.options.retry)
        self.root = self.storage.url
        self.backup_storage = (Storage(self.options.backup, self.options.backup_storage_options,
                                       upload=upload, retry=self.options.retry)
                               if self.options.backup else None)
        self.rank, self.world_size = _dist.rank(), _dist.world_size()
        self._fg_group = _dist.new_cpu_group()
        self._bg_group = _dist.new_cpu_group()
        self._plans = PlanCache(lambda obj: _dist.all_gather_object(obj, self._fg_group),
                                rank=self.rank, world_size=self.world_size)
        self._schedule_state = ScheduleState()
        self._step_hooks: dict[int, Any] = {}
        self._stager = Stager(mode=self.options.staging, budget_bytes=self.options.pinned_memory_budget,
                              pageable_sets=self.options.max_pending)
        self._host, self._device, self._git = socket.gethostname(), _device_name(), _git_commit()
        self._initial = (_restore.select_parts(self.options.initial_include)
                         if self.options.initial_from is not None else None)
        self._guard = WriteGuard(self.storage, take=self.options.lease and self.rank == 0,
                                 heartbeat_s=self.options.lease_heartbeat_s,
                                 timeout_s=self.options.lease_timeout_s)
        failure: BaseException | None = None
        self._lineage = branches.Lineage(branch=branches.new_branch_id())
        """The lineage the next saves record, and a rollback still to carry out (rank 0 decides)."""
        self._rolled_back: set[str] = set()
        """Branch ids whose rollback rank 0's writer has carried out."""
        if self.rank == 0:
            try:
                self._lineage = self._prepare_root()
            except Exception as e:  # noqa: BLE001 - every rank must hear of it (no hang)
                failure = e
        failure, self._lineage = _dist.broadcast_object((failure, self._lineage), self._fg_group)
        if failure is not None:
            self._guard.close()
            raise failure
        codec = CodecOptions(level=self.options.zstd_level) if self.options.compression else None
        self._mirror = (Mirror(self.storage, self.backup_storage,
                               self.options.backup_retention or self.retention,
                               on_error=self.options.on_error)
                        if self.backup_storage is not None and self.rank == 0 else None)
        self._pipeline = Pipeline(self.storage, codec=codec, group=self._bg_group, rank=self.rank,
                                  max_pending=self.options.max_pending,
                                  writer_threads=self.options.writer_threads,
                                  on_error=self.options.on_error,
                                  guard=self._guard.check if self.rank == 0 else None,
                                  after_commit=self._after_commit if self.rank == 0 else None,
                                  on_failure=self.options.on_failure if self.rank == 0 else None)
        self._warned_direct = False
        self._warned_metrics: set[str] = set()  # missing from a save: warned once each, then debug
        self._saved_steps: set[int] = set()  # steps save() took in this run: maybe_save skips them
        self.last_restore_report: _restore.RestoreReport | None = None
        """What the last ``restore()`` loaded, and the keys it found missing or unexpected."""
        self._closed = False
        _live.add(self)
        self._should_stop = False
        self._last_handle: SaveHandle | None = None
        self._signals = StopSignals() if self.options.save_on_signal else None
        if self._signals is not None:
            self._signals.install()

    @classmethod
    def from_config(cls, config: str | os.PathLike[str] | Mapping[str, Any],
                    **overrides: Any) -> "CheckpointManager":
        """A manager from a YAML file (or its parsed dict): the ``checkpoint:`` section
        (``root`` and any option), and ``training:`` for a planned schedule; see
        ``asyncckpt.config``.  ``overrides`` replace keys of ``checkpoint:``.  A relative
        ``checkpoint.root`` in the file is relative to the file's folder (in a dict, and in
        ``overrides``, to the working directory)."""
        if isinstance(config, Mapping):
            data, source, base = config, "config", None
        else:
            source = os.fspath(config)
            with open(source, "rb") as f:  # a missing file stays a FileNotFoundError
                data = load_yaml_text(decode_yaml(f.read(), source), source)
            base = os.path.dirname(os.path.abspath(source))
        root, options = options_from_dict(data, source, overrides, base_dir=base)
        return cls(root, **{f.name: getattr(options, f.name) for f in fields(options)})

    # -- setup -------------------------------------------------------------------
    def _prepare_root(self) -> branches.Lineage:
        """Check the root, finish what a crash left (as the lease holder); the run's lineage."""
        try:
            self.storage.check_writable()
        except StorageError as e:
            raise StorageError("create or write checkpoint root", self.root, e.cause) from e
        if self._guard.open():  # the lease before any cleanup: cleaning up is a write
            self._clean_root()
        newest = manifest_steps(self.storage)[-1:]
        try:
            return branches.start([read_manifest(self.storage, s) for s in newest],
                                  branches.abandoned_branches(self.storage))
        except (CorruptCheckpointError, StorageError):
            return branches.start([])

    def _clean_root(self) -> None:
        branches.finish_interrupted(self.storage)  # a rollback cut short: before anything lists
        quarantine_unreadable(self.storage)  # a manifest that does not parse never blocks a step
        remove_unfinished_saves(self.storage)
        abort_unfinished_saves(self.storage)
        remove_unfinished_releases(self.storage)
        remove_temporary_files(self.storage)

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
        if self._mirror is not None:
            self._mirror.raise_pending()
        if self.world_size == 1:
            self._guard.check()  # distributed: the writer checks on rank 0 before it writes
        check_step(step)
        if not isinstance(state, TrainState):
            raise ConfigError.field("state", type(state).__name__, "a TrainState")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
            raise ConfigError.field("epoch", epoch, "a non-negative integer or None")
        metrics_f, tags_t = _check_metrics(metrics), _check_tags(tags)
        lineage = self._lineage
        rollback = self._pending_rollback()
        if rollback is not None and self.options.on_rollback == "refuse":
            raise RollbackRefusedError(branches.refusal(rollback, self.root))
        if _dist.world_size() != self.world_size:
            raise ConfigError(f"the job now has {_dist.world_size()} ranks, the manager was made "
                              f"for {self.world_size}: create the CheckpointManager after "
                              "init_process_group")
        if not overwrite:
            self._refuse_existing(step, rollback)
        started = time.perf_counter()
        # plan first (collective, cached), then stage only the items this rank writes
        plan, mine = self._plans.plan(lambda: state.collect(self.rank), step=step)
        try:
            staged = self._stager.stage(
                mine,
                on_wait=lambda: log.warning("step=%d rank=%d: every staging buffer is still being "
                                            "written; waiting for the writer", step, self.rank),
                deferrable=self._deferrable(state))
        except Exception as e:
            if self.world_size > 1:  # the other ranks' writers expect this save: fail it on all
                self._pipeline.submit_failed(step, e)
            raise
        if staged.mode == "direct":  # over pinned_memory_budget: nothing was copied
            (log.warning if not self._warned_direct else log.debug)(
                "step=%d rank=%d: one copy of the state is larger than pinned_memory_budget=%s "
                "bytes; saving the live tensors while training waits (every save of it will)",
                step, self.rank, self.options.pinned_memory_budget)
            self._warned_direct = blocking = True
        try:
            handle = SaveHandle(step)
            handle._set_staged(staged.bytes_staged, time.perf_counter() - started)
            manifest = Manifest(step=step, epoch=epoch, time=_utc_now(), metrics=metrics_f, tags=tags_t,
                                world_size=self.world_size, param_count=state.param_count(),
                                codec=self.options.compression, torch_version=torch.__version__,
                                git_commit=self._git, host=self._host, device=self._device,
                                milestones_reached=tuple(sorted(self._schedule_state.milestones_reached)),
                                branch=lineage.branch, parent=lineage.parent, **self._ranking())
            self._pipeline.submit(SaveJob(
                handle=handle, staged=staged, manifest=manifest, overwrite=overwrite, plan=plan,
                before_write=self._rollback_work(rollback) if rollback and self.rank == 0 else None))
        except BaseException:  # not taken by the writer: the buffers go back to the pool here
            staged.release()
            raise
        log.debug("step=%d rank=%d: staged %d bytes in %.3fs", step, self.rank,
                  staged.bytes_staged, handle.stall_s)
        self._saved_steps.add(step)
        self._last_handle = handle  # what a stop signal in maybe_save waits for
        if blocking:
            try:
                handle.result()
            except BaseException as e:
                self._saved_steps.discard(step)  # not committed: maybe_save may save it again
                self._pipeline.forget(e)  # raised here: the next call must not raise it again
                raise
        return handle

    def _ranking(self) -> dict[str, str | None]:
        """What the manifest records of the metric retention ranks by (readers' ``"best"``)."""
        metric = self.retention.primary_metric if self.retention is not None else None
        return {"rank_metric": metric,
                "rank_mode": None if metric is None else self.retention.mode_for(metric)}  # type: ignore[union-attr]

    def _pending_rollback(self) -> branches.Rollback | None:
        rollback = self._lineage.rollback
        return rollback if rollback is not None and rollback.branch not in self._rolled_back else None

    def _rollback_work(self, rollback: branches.Rollback) -> Any:
        """What rank 0's writer does before the first save after a rollback writes: set the
        abandoned branch aside (or delete it), on the backup too."""
        def work() -> None:
            if rollback.branch in self._rolled_back:
                return  # an earlier save carried it out
            branches.abandon(self.storage, rollback, self.options.on_rollback)
            self._rolled_back.add(rollback.branch)
            if self._mirror is not None:
                self._mirror.drop_abandoned()
        return work

    def _refuse_existing(self, step: int, rollback: branches.Rollback | None = None) -> None:
        exists = None
        if self.rank == 0:
            if step in self._pipeline.pending_steps():
                exists = f"a save of step {step} is already in flight"
            elif rollback is not None and step in rollback.steps:
                pass  # the abandoned branch's: set aside before this save writes
            elif self.storage.exists(f"{step_dir_name(step)}/{MANIFEST_NAME}") and \
                    not self._quarantined_unreadable(step):
                exists = f"step {step} is already committed at {self.storage.url_of(step_dir_name(step))}"
        exists = _dist.broadcast_object(exists, self._fg_group)
        if exists:
            raise CheckpointExistsError(f"{exists}; pass overwrite=True to replace it")

    def _quarantined_unreadable(self, step: int) -> bool:
        """Quarantine ``step`` if its manifest does not parse (and this manager writes the
        root); True when it was set aside, so the step may be saved again."""
        try:
            read_manifest(self.storage, step)
            return False
        except CorruptCheckpointError as e:
            if not self._may_write():
                return False
            quarantine(self.storage, step, str(e))
            return True

    def _may_write(self) -> bool:
        """Whether this process writes the root now: rank 0, holding the lease (or, with
        lease=False, no other writer holds it)."""
        if self.rank != 0:
            return False
        try:
            self._guard.check()
        except AsyncCkptError:
            return False
        return True

    def maybe_save(self, step: int, state: TrainState, *, metrics: Mapping[str, Any] | None = None,
                   epoch: int | None = None, epoch_end: bool = False, force: bool = False,
                   tags: Sequence[str] = ()) -> SaveHandle | None:
        """Save when the schedule, ``force`` or a stop signal says so; otherwise do nothing.

        A step this manager already saved (by ``save()`` or ``maybe_save``, or restored) is
        not saved again, even with ``force``: the call returns None (logged at debug).  After SIGTERM/SIGINT (``save_on_signal=True``) it saves
        at once, waits up to ``signal_grace_s`` for the commit and sets
        ``should_stop``.  Distributed, when ``save_on_signal`` is on or the
        schedule is clock-based (``every_seconds``, ``auto``), each call runs one
        tiny all_reduce on the manager's gloo group (about 0.1 ms) so all ranks
        agree; a rank's wish to save, or its signal, counts for all.
        """
        self._check_open()
        check_step(step)
        for name, flag in (("epoch_end", epoch_end), ("force", force)):
            if type(flag).__name__ not in ("bool", "bool_"):  # Python's or numpy's
                raise ConfigError.field(name, flag, "True or False")
        clock = self.options.clock
        now, sched, st = clock(), self.schedule, self._schedule_state
        st.tick(step, now)
        decision = None
        if sched is not None:
            count = state.trainable_param_count() if sched.param_milestones else None
            decision = st.decide(sched, step=step, now=now, epoch_end=epoch_end, param_count=count)
        wanted, signalled = self._agree(force or bool(decision and decision.save))
        done = step == st.last_save_step or step in self._saved_steps
        if done or not (wanted or signalled):
            if signalled:
                log.warning("step=%d rank=%d: stop signal: step already saved; stopping", step, self.rank)
                self._stop_after(self._last_handle)
                return None
            if done and wanted:
                log.debug("step=%d rank=%d: already saved in this run; not saved again", step, self.rank)
            if not self._stager.warm:
                self._prewarm_staging(state)
            return None
        extra = list(decision.tags if decision else ("epoch_end",) if epoch_end else ())
        if signalled:
            got = self._signals.received if self._signals is not None else None
            extra.append(f"signal:{signal_name(got)}" if got is not None else "signal")
            log.warning("step=%d rank=%d: %s: saving now and stopping (a second signal exits at once)",
                        step, self.rank, extra[-1])
        started = clock()
        if decision is not None:  # before save(): its manifest records the milestones reached
            st.mark_milestones(decision.milestones)
        handle = self.save(step, state, metrics=metrics, epoch=epoch, tags=[*tags, *extra])
        st.record_save(step, now, stall_s=clock() - started)  # milestones marked above
        self._last_handle = handle
        if signalled:
            self._stop_after(handle)
        elif sched is not None and sched.auto and self.rank == 0:
            change = st.interval_change(sched)
            if change is not None:
                log.info("step=%d rank=%d: auto checkpoint interval %d steps: %s", step, self.rank, *change)
        return handle

    @property
    def should_stop(self) -> bool:
        """True once ``maybe_save`` has handled a stop signal (final save done): leave the loop."""
        return self._should_stop

    def _agree(self, wanted: bool) -> tuple[bool, bool]:
        """(save, stop signal) for this call, agreed by all ranks when distributed."""
        got = self._signals is not None and self._signals.received is not None and not self._should_stop
        sched = self.schedule
        clock = sched is not None and (sched.every_seconds is not None or sched.auto)
        if self.world_size == 1 or not (self.options.save_on_signal or clock):
            return wanted, got
        agreed = _dist.all_reduce_max([int(wanted), int(got)], self._fg_group)
        return bool(agreed[0]), bool(agreed[1]) and not self._should_stop

    def _stop_after(self, handle: SaveHandle | None) -> None:
        """Wait up to ``signal_grace_s`` for the final save; then ``should_stop``."""
        self._should_stop = True
        if handle is None:
            return
        try:
            handle.result(timeout=self.options.signal_grace_s)
        except TimeoutError:
            log.error("step=%d rank=%d: the final save did not commit within signal_grace_s=%g s",
                      handle.step, self.rank, self.options.signal_grace_s)
        except Exception as e:
            if self.options.on_error != "warn":
                raise
            log.error("step=%d rank=%d: the final save failed: %s", handle.step, self.rank, e)

    def prewarm(self, state: TrainState) -> None:
        """Allocate staging buffers for ``state`` in the background, ahead of the first save."""
        self._check_open()
        self._prewarm_staging(state)

    def _prewarm_staging(self, state: TrainState) -> None:
        """Prewarm for this rank's share of the state (known once a save plan is cached)."""
        mine = self._plans.cached_selection(state.layout_tensors())
        if mine is not None:
            self._stager.prewarm(mine)

    # -- post-commit ---------------------------------------------------------------
    def _after_commit(self, manifest: Manifest) -> None:
        try:
            self._retain_and_mirror(manifest)
        finally:
            if self.options.on_commit is not None:
                info = CheckpointInfo.from_manifest(manifest, self.storage.url_of(step_dir_name(manifest.step)))
                try:
                    self.options.on_commit(info)
                except BaseException as e:  # noqa: BLE001 - sys.exit() too: a callback never breaks a save
                    log.error("step=%d rank=%d: on_commit callback raised: %r", manifest.step, self.rank, e)

    def _retain_and_mirror(self, manifest: Manifest) -> None:
        if self._mirror is not None:
            self._mirror.submit(manifest.step)
        policy = self.retention
        if policy is None:
            return
        missing = [m for m in policy.metrics if metric_value(manifest, m) is None] \
            if policy.keep_best else []
        if missing:  # a WARNING once per metric per manager; later saves lacking it: debug
            new = [m for m in missing if m not in self._warned_metrics]
            self._warned_metrics.update(missing)
            (log.warning if new else log.debug)(
                "step=%d rank=%d: no finite value of metric %s, which keep_best=%d ranks by; retention "
                "keeps this checkpoint only by its other rules%s", manifest.step, self.rank,
                ", ".join(map(repr, new or missing)), policy.keep_best,
                " (said once per metric: pass it in metrics= of the saves)" if new else "")
        if not policy.disabled:
            self._prune(policy, dry_run=False)

    def prune(self, retention: Retention | None = None, *, dry_run: bool = False,
              verify: bool = False) -> list[int]:
        """Delete what the retention policy (default: the manager's) drops, each manifest first;
        returns the steps deleted (with ``dry_run``: that would be).  Only rank 0 deletes.

        Checkpoints that would hold a kept slot are checked first (file sizes; with ``verify``
        every checksum): a damaged one is quarantined and never keeps a whole one from being kept.
        """
        policy = retention or self.retention
        if policy is None:
            raise ConfigError("prune() needs a Retention: pass one or configure retention=")
        plan = self._prune(policy, dry_run=dry_run, deep=verify)
        if plan.missing_metric:
            log.warning("%d checkpoint(s) lack a finite value of a metric keep_best ranks by "
                        "(e.g. step=%d, %r); they are kept only by the other rules",
                        len({s for s, _ in plan.missing_metric}), *plan.missing_metric[0])
        return list(plan.delete)

    def _prune(self, policy: Retention, *, dry_run: bool, deep: bool = False) -> RetentionPlan:
        """Plan over the whole committed checkpoints (releases' sources tagged ``release:<v>``),
        quarantine the damaged ones found, delete what the plan drops."""
        plan, damaged = checked_plan(self.storage, policy,
                                     with_release_tags(self.storage, list_committed(self.storage)),
                                     deep=deep)
        if not dry_run and self.rank == 0:
            if plan.delete or damaged:
                self._guard.check()
            for step, problems in damaged.items():
                quarantine(self.storage, step, "; ".join(problems))
            for step in plan.delete:
                delete_checkpoint(self.storage, step)  # manifest first: never listed half-deleted
                log.info("step=%d rank=%d: deleted by retention", step, self.rank)
            retire_expired(self.storage, policy, plan.keep)
            branches.retire_abandoned(self.storage, policy, plan.keep)
        return plan

    # -- listing, verifying and restoring ---------------------------------------------
    def verify(self, step: int | None = None) -> dict[int, list[str]]:
        """Check every file of one checkpoint (or all) against its manifest.

        Returns ``{step: [problems]}``; a checkpoint with an empty list is whole.
        A manifest that cannot be read is a problem too (``list()`` skips it).
        """
        store = self.storage
        steps = [check_step(step)] if step is not None else manifest_steps(store)
        out = {}
        for s in steps:
            problems = verify_checkpoint(store, s)
            if problems is None:  # deleted meanwhile (retention of a save in flight): not damage
                if step is not None:
                    raise CheckpointNotFoundError(f"at step {s}", self.root,
                                                  [m.step for m in list_committed(store)])
                continue
            out[s] = problems
        return out

    def list(self, *, backup: bool = False) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (on the backup with ``backup=True``)."""
        store = self._backup_or_raise() if backup else self.storage
        manifests = list_committed(store)
        if not backup:
            manifests = with_release_tags(store, manifests)
        tags = best_tags(manifests, self.retention)
        return [CheckpointInfo.from_manifest(m, store.url_of(step_dir_name(m.step)), tags.get(m.step, ()))
                for m in manifests]

    # -- releases ------------------------------------------------------------------------
    def release(self, source: int | str | TrainState, *, version: str,
                model_card: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                dtype: Any = None, format: str = "safetensors", model: str | None = None,
                step: int | None = None, metrics: Mapping[str, Any] | None = None) -> ReleaseInfo:
        """Export the model weights only to ``<root>/releases/v<version>/`` (see ``release.py``).

        ``source``: a committed checkpoint (a step, ``"latest"``, ``"best"``, ``"best:acc"``;
        pending saves are waited for first), or a live ``TrainState`` (then ``step`` and
        ``metrics`` go into the card).  Distributed: call it on every rank (gathering a sharded
        model is collective); rank 0 writes, every rank returns the ``ReleaseInfo`` or raises.
        """
        self._check_open()
        opts = ReleaseOptions(version=version, format=format, dtype=dtype, model=model,
                              model_card=model_card or {}, config=config or {})
        live = isinstance(source, TrainState)
        tensors = state_weights(source, model=model) if live else None
        if not live:
            self._pipeline.wait()
        outcome: ReleaseInfo | BaseException | None = None
        if self.rank == 0:
            try:
                outcome = self._write_release(source, opts, tensors, step=step, metrics=metrics)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it
                outcome = e
        shared = _dist.broadcast_object(outcome, self._fg_group)
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(shared, BaseException):
            raise shared
        return shared

    def _write_release(self, source: int | str | TrainState, opts: ReleaseOptions, tensors: Any, *,
                       step: int | None, metrics: Mapping[str, Any] | None) -> ReleaseInfo:
        self._guard.check()
        if isinstance(source, TrainState):
            origin = Provenance(step=None if step is None else check_step(step),
                                metrics=_check_metrics(metrics), git_commit=self._git,
                                param_count=source.param_count(), branch=self._lineage.branch)
        else:
            found = self._candidates(source)
            if not found:
                raise CheckpointNotFoundError("to release", self.root, ())
            m = found[0]
            tensors = checkpoint_weights(self.storage.child(step_dir_name(m.step)), m, model=opts.model)
            origin = Provenance.of(m)
        return write_release(self.storage, opts, tensors, source=origin,
                             torch_version=torch.__version__, now=_utc_now())

    def releases(self) -> list[ReleaseInfo]:
        """Committed releases under ``<root>/releases/``, in version order."""
        return list_releases(self.storage)

    def restore(self, state: TrainState, which: int | str | os.PathLike[str] = "latest", *,
                strict: bool = True, verify: bool | None = None,
                include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                fallback_to_backup: bool | None = None, map_location: Any = None) -> int:
        """Load a checkpoint into ``state``; returns its step, or 0 when there is none.

        ``include``/``exclude`` pick parts (``"model"``, ``"optimizer"``, ``"scheduler"``,
        ``"dataloader"``, ``"rng"``, ``"extra"``) or one model or optimizer by name
        (``"model:encoder"``); the rest of ``state`` is left as it is.  ``strict=False`` loads
        what matches and reports missing and unexpected keys (a warning, and
        ``last_restore_report``) instead of raising; shapes must still match.
        ``map_location`` (e.g. ``"cpu"``) is where tensors inside loaded objects go; model
        and optimizer tensors always land in the live tensors, on their devices.  With no
        checkpoint and ``initial_from`` set, that source is loaded (``initial_include`` only)
        and 0 is returned.

        With a backup (``fallback_to_backup`` defaults to True when one is
        configured), a checkpoint missing or damaged on the primary is read from
        the backup, with a warning.  ``which`` may be the path of a folder that
        plain ``torch.distributed.checkpoint.save`` wrote (no manifest): it is
        read as safely as ours, but has no checksums to verify, and counts as step 0.
        """
        self._check_open()
        self._pipeline.raise_pending()
        fallback = self.backup_storage is not None if fallback_to_backup is None else fallback_to_backup
        if fallback:
            self._backup_or_raise()
        verify = self.options.verify_on_restore if verify is None else verify
        parts = self._parts(include, exclude)
        _restore.check_map_location(map_location)
        load = dict(strict=strict, verify=verify, select=parts, map_location=map_location)
        if isinstance(which, os.PathLike) or (isinstance(which, str) and _is_path(which)):
            return self._restore_path(state, os.fspath(which), **load)
        candidates = self._agreed_candidates(which, fallback)
        if not candidates:
            if self._initial is not None and which == "latest":
                self._restore_path(state, os.fspath(self.options.initial_from), initial=True,
                                   **{**load, "select": self._initial})
            self._prewarm_staging(state)
            return 0
        errors = []
        for i, (m, from_backup) in enumerate(candidates):
            store = self.backup_storage if from_backup else self.storage
            assert store is not None
            if from_backup:
                log.warning("step=%d: restoring from the backup %s (the primary copy is missing "
                            "or damaged)", m.step, store.url)
            try:
                self.last_restore_report = _restore.load_into(
                    store.child(step_dir_name(m.step)), m, state, rank=self.rank,
                    group=self._fg_group, **load)
            except (IntegrityError, StorageError) as e:
                if isinstance(e, StorageError):  # a file vanished: deleted meanwhile, or trouble
                    kept = is_committed(store, m.step)
                else:  # every rank raised it (load_into agrees): rank 0 looks, all follow
                    kept = _dist.broadcast_object(
                        is_committed(store, m.step) if self.rank == 0 else None, self._fg_group)
                if kept:
                    if isinstance(e, StorageError):
                        raise
                elif which == "latest":  # deleted by retention meanwhile: not damage
                    log.info("step=%d was deleted while restoring it; trying an older one", m.step)
                    continue
                else:
                    raise CheckpointNotFoundError(f"at step {m.step}", self.root,
                                                  [c.step for c in list_committed(store)]) from e
                if which != "latest" and i == len(candidates) - 1:
                    raise
                errors.append(e)
                log.warning("step=%d is %s, falling back to %s: %s", m.step, _failure(e),
                            "another copy" if which != "latest" else "an older checkpoint", e)
                if which == "latest" and not from_backup and self._may_write():
                    quarantine(self.storage, m.step, str(e))
                continue
            self._after_restore(m, state, lineage=True)
            return m.step
        if not errors:  # every candidate was deleted while being read
            raise CheckpointNotFoundError(f"{which!r}", self.root,
                                          [c.step for c in list_committed(self.storage)])
        unsafe = sum(isinstance(e, UnsafeCheckpointError) for e in errors)
        found = ", ".join(f"{n} {what}" for n, what in ((len(errors) - unsafe, "damaged"),
                                                         (unsafe, "refused as unsafe")) if n)
        raise CorruptCheckpointError(self.root, "a restorable checkpoint", found,
                                     "; ".join(map(str, errors)))

    def _agreed_candidates(self, which: int | str, fallback: bool) -> list[tuple[Manifest, bool]]:
        """Rank 0 decides which copies to try (newest first; ``(manifest, from_backup)``)
        and every rank follows."""
        chosen: list[tuple[Manifest, bool]] | BaseException = []
        if self.rank == 0:
            try:
                chosen = self._sourced_candidates(which, fallback)
            except AsyncCkptError as e:
                chosen = e
        chosen = _dist.broadcast_object(chosen, self._fg_group)
        if isinstance(chosen, BaseException):
            raise chosen
        return chosen

    def _sourced_candidates(self, which: int | str, fallback: bool) -> list[tuple[Manifest, bool]]:
        if not fallback or self.backup_storage is None:
            return [(m, False) for m in self._candidates(which)]
        missing: CheckpointNotFoundError | None = None
        try:
            primary = self._candidates(which)
        except CheckpointNotFoundError as e:
            primary, missing = [], e
        except StorageError as e:
            log.warning("cannot list the primary %s (%s); looking in the backup", self.root, e)
            primary = []
        latest = which == "latest"
        try:
            backup = list_committed(self.backup_storage) if latest else \
                self._candidates(which, self.backup_storage)
        except CheckpointNotFoundError:
            backup = []
        backup = branches.without_abandoned(self.storage, self.backup_storage, backup)
        if not primary and not backup and missing is not None:
            raise missing
        return with_backup(primary, backup, latest=latest)

    def _backup_or_raise(self) -> Storage:
        if self.backup_storage is None:
            raise ConfigError("there is no backup: pass backup=URL to CheckpointManager")
        return self.backup_storage

    def _candidates(self, which: int | str, storage: Storage | None = None) -> list[Manifest]:
        storage = storage or self.storage
        manifests = list_committed(storage)
        if which == "latest":
            return list(reversed(manifests))
        if isinstance(which, str) and (which == "best" or which.startswith("best:")):
            return [self._best(manifests, which)]
        step = check_step(int(which) if isinstance(which, str) and which.isdigit() else which)
        if step not in {m.step for m in manifests} and \
                storage.exists(f"{step_dir_name(step)}/{MANIFEST_NAME}"):
            return [read_manifest(storage, step)]  # raises why list_committed skipped it
        if step not in {m.step for m in manifests}:
            aside = [q for q in list_quarantined(storage) if q.step == step]
            if aside:  # set aside as damaged: say so, not just "not found"
                raise CorruptCheckpointError(storage.url_of(step_dir_name(step)), "a whole checkpoint",
                                             f"one quarantined at {aside[-1].url}", aside[-1].reason)
        return [select(manifests, step, self.root)]

    def _best(self, manifests: Sequence[Manifest], which: str) -> Manifest:
        found = best_step_for(manifests, which.split(":", 1)[1] if ":" in which else None, self.retention)
        if found is None:
            raise ConfigError('restore(which="best") needs Retention(best_metric=...), checkpoints '
                              'that recorded the metric their retention ranked by, or which="best:<metric>"')
        metric, step = found
        if step is None:
            raise CheckpointNotFoundError(f"with metric {metric!r}", self.root, [m.step for m in manifests])
        return next(m for m in manifests if m.step == step)

    def _restore_path(self, state: TrainState, path: str, *, initial: bool = False, **load: Any) -> int:
        folder = Storage(path, self.options.storage_options)
        if initial:
            self.last_restore_report = self._load_initial(folder, state, **load)
            return 0
        try:
            m = read_folder_manifest(folder)
        except StorageError as e:
            plain = foreign.find_foreign(folder)  # a plain DCP folder, or a torchtitan root
            if plain is None:
                raise CheckpointNotFoundError(f"at {folder.url} (no {MANIFEST_NAME})", self.root,
                                              [m.step for m in list_committed(self.storage)]) from e
            log.warning("rank=%d: %s has no %s: reading it as a plain DCP checkpoint (files not "
                        "checksummed)", self.rank, plain.url, MANIFEST_NAME)
            self.last_restore_report = foreign.load_plain(plain, state, rank=self.rank,
                                                          group=self._fg_group, **load)
            m = Manifest(step=self.last_restore_report.step)
            self._after_restore(m, state)
            return m.step
        self.last_restore_report = _restore.load_into(folder, m, state, rank=self.rank,
                                                      group=self._fg_group, **load)
        self._after_restore(m, state)
        return m.step

    def _load_initial(self, source: Storage, state: TrainState, **load: Any) -> _restore.RestoreReport:
        """The fine-tuning start: ``initial_from`` (a release, a checkpoint or a run's root)."""
        if is_release(source):
            report = _restore.load_weights(state, release_weights(source, verify=load["verify"]),
                                           source=source.url, select=load["select"],
                                           strict=load["strict"])
        else:
            folder, m = foreign.find_source(source)
            if m is None:
                report = foreign.load_plain(folder, state, rank=self.rank, group=self._fg_group, **load)
            else:
                report = _restore.load_into(folder, m, state, rank=self.rank, group=self._fg_group,
                                            **load)
        log.info("rank=%d: %s has no checkpoint yet: started from %s (%s)", self.rank, self.root,
                 report.source, ", ".join(report.loaded))
        return report

    def _after_restore(self, m: Manifest, state: TrainState, *, lineage: bool = False) -> None:
        """Lineage, schedule and staging after a restore; ``lineage``: ``m`` is this root's."""
        self._lineage = self._decided_lineage(m) if lineage else \
            branches.Lineage(branch=self._lineage.branch, parent=m.step)
        milestones = tuple(self.schedule.param_milestones or ()) if self.schedule else ()
        if milestones:
            # reached: what the manifest records, up to the restored trainable count, or up to
            # the largest milestone tagged on it (manifests written before milestones_reached);
            # the count may be lower now than when a milestone fired, e.g. with layers frozen
            top = max([state.trainable_param_count(), *m.milestones_reached,
                       *(ms for ms in milestones if f"milestone:{format_params(ms)}" in m.tags)])
            self._schedule_state.mark_milestones(ms for ms in milestones if ms <= top)
        self._schedule_state.record_save(m.step, self.options.clock())
        self._prewarm_staging(state)
        log.info("step=%d rank=%d: restored from %s", m.step, self.rank, self.storage.url_of(step_dir_name(m.step)))

    def _decided_lineage(self, m: Manifest) -> branches.Lineage:
        """Rank 0 decides the run's branch after restoring ``m`` (a rollback when newer
        checkpoints exist; nothing moves until the next save) and every rank follows."""
        decided: branches.Lineage | BaseException | None = None
        if self.rank == 0:
            try:
                decided = branches.after_restore(m, list_committed(self.storage),
                                                 branches.abandoned_branches(self.storage))
            except AsyncCkptError as e:  # every rank must hear of it (no hang)
                decided = e
        decided = _dist.broadcast_object(decided, self._fg_group)
        if isinstance(decided, BaseException):
            raise decided
        assert decided is not None
        if decided.rollback is not None:
            log.info("step=%d rank=%d: restored an older checkpoint than the newest (%s): the next "
                     "save starts branch %s (on_rollback=%r)", m.step, self.rank,
                     decided.rollback.describe(), decided.branch, self.options.on_rollback)
        return decided

    @staticmethod
    def _parts(include: Sequence[str] | None, exclude: Sequence[str] | None) -> _restore.Selection:
        return _restore.select_parts(include, exclude)

    # -- lifecycle ---------------------------------------------------------------------
    # -- overlapped staging ----------------------------------------------------------
    def _deferrable(self, state: TrainState) -> Any:
        """Which tensors' copies may overlap the next forward/backward (CUDA, overlap=True)."""
        if not (self.options.overlap and torch.cuda.is_available()):
            return None
        for opt in state.optimizers.values():
            if id(opt) not in self._step_hooks:
                self._step_hooks[id(opt)] = opt.register_step_pre_hook(
                    lambda *_: self._stager.fence())
        guarded = state.guarded_storages()
        return lambda t: t.is_cuda and storage_ptr(t) in guarded

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Wrap in-place updates of checkpointed tensors other than ``optimizer.step``
        (which is guarded already): they wait until the last save's copies are done."""
        self._stager.fence()
        yield

    def wait(self) -> None:
        """Block until every pending save has committed, been pruned and mirrored; raise a
        background failure.  Distributed: call it on every rank; on return every rank sees
        the same committed checkpoints (rank 0's retention included)."""
        try:
            self._pipeline.wait()
            if self._mirror is not None:
                self._mirror.wait()
        finally:
            _dist.barrier(self._fg_group)

    def close(self) -> None:
        """Wait for pending writes, stop the writer, and raise any background failure."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        self._stager.fence()
        for hook in self._step_hooks.values():
            hook.remove()
        self._step_hooks.clear()
        signals, self._signals = self._signals, None
        if signals is not None and signals.received is None:
            signals.uninstall()  # nothing pending: a signal now acts as it did before us
        try:
            self._close_writers()
        finally:
            self._stager.close()  # joins the prewarm thread
            self._guard.close()
            if signals is not None:
                signals.uninstall()

    def _close_writers(self) -> None:
        """The pipeline, then the mirror (which first copies the last commit)."""
        try:
            self._pipeline.close()
        except BaseException:
            if self._mirror is not None:
                self._mirror.close(raise_errors=False)
            raise
        if self._mirror is not None:
            self._mirror.close()

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

