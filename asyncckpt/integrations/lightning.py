"""Lightning: asynchronous, atomic checkpoints through a ``CheckpointIO`` plugin or a ``Callback``.

Two ways in, pick one per run:

``AsyncCkptIO`` keeps Lightning's ``ModelCheckpoint`` (its file names, top-k, ``last``),
and changes how each checkpoint is written::

    trainer = Trainer(plugins=[AsyncCkptIO()], callbacks=[ModelCheckpoint(dirpath="runs/exp1")])
    trainer.fit(model, ckpt_path="last")

Each checkpoint "file" becomes a folder at the same path (any fsspec URL): every tensor
of Lightning's checkpoint dict is a DCP item (byte-grouped zstd), everything else one
blob read back with ``torch.load(weights_only=True)``, and ``manifest.json`` is written
last, so a path holds a whole checkpoint or none.  ``save_checkpoint`` copies the
tensors to CPU and returns; one writer thread does the rest.  Limits: values in the
dict other than tensors, numbers, strings, bools, None, bytes, torch dtypes/devices and
lists/tuples/dicts of them (an ``argparse.Namespace`` in ``hyper_parameters``, say) are
stored as their ``repr()`` with a warning; a path saved again (``last.ckpt``) is replaced,
manifest first, so a crash meanwhile leaves that path empty, never torn; the folder is
read by this plugin (or asyncckpt), not by ``torch.load``.

``AsyncCheckpoint`` replaces ``ModelCheckpoint`` with a ``CheckpointManager`` (its
``Retention`` and ``Schedule``, backups, releases)::

    ckpt = AsyncCheckpoint("runs/exp1/ckpt", schedule=Schedule(every_n_steps=500),
                           retention=Retention(keep_last=2, keep_best=1, best_metric="val_loss"))
    trainer = Trainer(callbacks=[ckpt], enable_checkpointing=False)
    trainer.fit(model)  # resumes from the newest checkpoint under the root, if any

To resume, run the same again (a new Trainer and callback on the same root; no
``ckpt_path``).  A checkpoint holds the LightningModule, the optimizers and LR schedulers,
each rank's RNG states and Lightning's fit-loop state (its progress counters and the train
loaders' ``state_dict()``: a ``StatefulDataLoader``'s position and shuffle generator).  A
step is saved where an uninterrupted run goes on from it: at ``on_train_batch_end``; after
its validation run (``on_validation_end``) when one follows; at ``on_train_epoch_end`` for
an epoch's last step.  Resume happens in ``on_fit_start`` (the loop state loaded as
Lightning's ``restore_training_state`` loads it; from an epoch's end, the next epoch starts
afresh with the loaders' saved state, where Lightning would drop it or restart into the
finished epoch), the RNG states go back in ``on_train_start``, so the resumed run logs the
same losses and ends with the same weights as an uninterrupted one, from any checkpoint
(tested; docs/integrations.md compares with Lightning's own resume).  ``on_exception``
closes the manager when ``fit`` raises, so a retry in the same process resumes.  Not
saved: other callbacks' state (EarlyStopping...), ``on_save_checkpoint`` additions, the
precision plugin's state (an AMP GradScaler).
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.loops.loop import _Loop
except ImportError:  # pragma: no cover - exercised where only pytorch_lightning is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[no-redef]
        from pytorch_lightning.loops.loop import _Loop  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError("asyncckpt.integrations.lightning needs Lightning: "
                          "pip install lightning (or pytorch-lightning)") from e

import torch
import torch.distributed.checkpoint as dcp

from .. import __version__
from ..codec import CodecOptions
from ..dcp_io import CheckpointWriter, read_items, unwrap_failures
from ..errors import CheckpointNotFoundError, ConfigError, SaveError
from ..manager import CheckpointManager
from ..manifest import MANIFEST_NAME, Manifest
from ..planner import SavePlanner, safe_load
from ..state import TrainState, capture_rng, restore_rng, to_blob
from ..storage import Storage, read_folder_manifest

log = logging.getLogger(__name__)

SKELETON = "lightning/skeleton"
"""The blob holding everything of Lightning's dict but its tensors (each a marker)."""
_MARK = "__asyncckpt_tensor__"
_PLAIN = (int, float, str, bool, bytes, type(None), torch.dtype, torch.device)


def split_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors copied to CPU now, keyed by their path; the rest with a marker per tensor)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            key = "t/" + "/".join(quote(p, safe="") for p in path)
            tensors[key] = value.detach().to("cpu", copy=True)
            return {_MARK: key}
        if isinstance(value, Mapping):
            return {k: walk(v, (*path, str(k))) for k, v in value.items()}
        if isinstance(value, (list, tuple)):  # a namedtuple comes back as a list
            items = [walk(v, (*path, str(i))) for i, v in enumerate(value)]
            return tuple(items) if type(value) is tuple else items
        if isinstance(value, _PLAIN):
            return value
        log.warning("checkpoint[%s] is a %s: stored as its repr()", "/".join(path), type(value).__name__)
        return repr(value)

    return tensors, walk(checkpoint, ())


def join_checkpoint(skeleton: Any, tensors: Mapping[str, torch.Tensor], device: Any = None) -> Any:
    """The checkpoint dict back from ``split_checkpoint``'s parts."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_MARK}:
            t = tensors[skeleton[_MARK]]
            return t if device is None else t.to(device)
        return {k: join_checkpoint(v, tensors, device) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(join_checkpoint(v, tensors, device) for v in skeleton)
    return skeleton


class AsyncCkptIO(CheckpointIO):
    """Lightning ``CheckpointIO`` writing asyncckpt folders in the background (see the module doc)."""

    def __init__(self, *, storage_options: Mapping[str, Any] | None = None,
                 compression: str | None = "zstd", max_pending: int = 2) -> None:
        if compression not in ("zstd", None):
            raise ConfigError.field("compression", compression, '"zstd" or None')
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError.field("max_pending", max_pending, "an integer >= 1")
        self.storage_options = dict(storage_options or {})
        self.codec = CodecOptions() if compression else None
        self.max_pending = max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future[None]] = {}
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    # -- Lightning's API ---------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options; "
                            "give them to the plugin: AsyncCkptIO(storage_options=...)")
        self._raise_error()
        url = os.fspath(path)
        self._wait(url)
        while len(self._pending) >= self.max_pending:
            self._wait(next(iter(self._pending)))
        tensors, skeleton = split_checkpoint(checkpoint)
        blob = to_blob(skeleton)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-lightning")
        meta = {"step": int(checkpoint.get("global_step") or 0), "epoch": checkpoint.get("epoch")}
        self._pending[url] = self._pool.submit(self._write, url, tensors, blob, meta)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        url = os.fspath(path)
        self._wait(url)
        folder = Storage(url, self.storage_options)
        if not folder.exists(MANIFEST_NAME):
            raise CheckpointNotFoundError(f"at {folder.url} (no {MANIFEST_NAME}: not an asyncckpt "
                                          "checkpoint, or one that never committed)", folder.url)
        manifest = read_folder_manifest(folder)
        items = dict(read_items(folder, {f.path: f for f in manifest.files}))
        skeleton = safe_load(items.pop(SKELETON), folder.url)
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        return join_checkpoint(skeleton, items, device)

    def remove_checkpoint(self, path: Any) -> None:
        url = os.fspath(path)
        self._wait(url)
        folder = Storage(url, self.storage_options)
        folder.remove(MANIFEST_NAME)  # first: never a listed, half-deleted checkpoint
        folder.remove("", recursive=True)
        log.debug("removed checkpoint %s", folder.url)

    def teardown(self) -> None:
        """Wait for every pending write; raise the first failure."""
        for url in list(self._pending):
            self._wait(url)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._raise_error()

    # -- the writer thread -------------------------------------------------------------
    def _write(self, url: str, tensors: dict[str, torch.Tensor], blob: io.BytesIO,
               meta: Mapping[str, Any]) -> None:
        try:
            folder = Storage(url, self.storage_options)
            if folder.exists(MANIFEST_NAME):
                log.info("replacing checkpoint %s", folder.url)
                folder.remove(MANIFEST_NAME)
            if folder.exists(""):
                folder.remove("", recursive=True)
            writer = CheckpointWriter(folder, codec=self.codec)
            try:
                dcp.save({**tensors, SKELETON: blob}, storage_writer=writer, planner=SavePlanner(),
                         no_dist=True)
            except (Exception, dcp.CheckpointException) as e:  # DCP's is a BaseException
                raise SaveError(meta["step"], unwrap_failures(e)) from e
            now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
            manifest = Manifest(step=meta["step"], epoch=meta["epoch"], time=now.replace("+00:00", "Z"),
                                files=tuple(sorted(writer.files, key=lambda f: f.path)),
                                codec="zstd" if self.codec else None, torch_version=torch.__version__,
                                param_count=sum(t.numel() for k, t in tensors.items()
                                                if k.startswith("t/state_dict/")),
                                tags=(f"lightning:{pl.__version__}", f"asyncckpt:{__version__}"))
            folder.put_atomic(MANIFEST_NAME, manifest.to_json().encode(), create_only=True)
            log.info("step=%d: committed %s", manifest.step, folder.url)
        except Exception as e:
            log.error("step=%d: checkpoint %s failed: %s", meta["step"], url, e)
            with self._lock:
                self._error = self._error or e
            raise

    def _wait(self, url: str) -> None:
        fut = self._pending.pop(url, None)
        if fut is not None:
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 - latched in _write, raised by _raise_error
                pass

    def _raise_error(self) -> None:
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise err


class AsyncCheckpoint(pl.Callback):
    """A Lightning ``Callback`` that saves and resumes through a ``CheckpointManager``.

    ``root`` and ``manager_options`` are ``CheckpointManager``'s (``retention``,
    ``schedule``, ``backup``...); the manager is made in ``setup`` (after the process
    group exists) and closed in ``teardown``, or in ``on_exception`` when ``fit`` raises
    (``self.manager``; None between fits).  ``resume=False`` starts fresh even when the
    root has checkpoints.  One instance may serve several ``fit`` calls in turn.

    Where a step is saved (see the module doc): at ``on_train_batch_end``; after the
    step's validation run (``on_validation_end``) when one follows; at
    ``on_train_epoch_end`` for an epoch's last step.
    """

    def __init__(self, root: str | os.PathLike[str], *, resume: bool = True,
                 **manager_options: Any) -> None:
        self.root = os.fspath(root)
        self.resume = resume
        self.manager_options = manager_options
        self.manager: CheckpointManager | None = None
        self._reset()

    def _reset(self) -> None:
        """The per-fit state."""
        self.restored_step = 0
        self._extra: dict[str, Any] = {}
        self._rng: dict[str, Any] | None = None
        self._loader_states: list[Any] | None = None
        self._last_step = -1
        self._pending: _Pending | None = None

    def _state(self, trainer: Any, pl_module: Any) -> TrainState:
        opts = {f"optimizer{i or ''}": o for i, o in enumerate(trainer.optimizers)}
        scheds = {f"scheduler{i or ''}": c.scheduler for i, c in enumerate(trainer.lr_scheduler_configs)}
        return TrainState(model=pl_module, optimizer=opts or None, scheduler=scheds or None,
                          extra=self._extra)

    # -- set up, resume ----------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.manager is None:
            self._reset()
            self.manager = CheckpointManager(self.root, **self.manager_options)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        assert self.manager is not None
        if not self.resume:
            return
        self.restored_step = self.manager.restore(self._state(trainer, pl_module))
        loops = self._extra.get("lightning_loops")
        if not (self.restored_step and loops is not None):
            return
        fit_loop = trainer.fit_loop
        fit_loop.load_state_dict(loops)  # what Lightning's restore_training_state does
        if _epoch_done(loops):
            # Saved at an epoch's end.  Lightning resumes such a state by starting the next
            # epoch, but with max_epochs it drops the loaders' states (a new loader: its
            # shuffle starts over) and with max_steps it "restarts" into the finished epoch.
            # Start the next epoch as an uninterrupted run does: no restart, the loaders'
            # states loaded (on_train_start) before Lightning's iter() for the epoch.
            _Loop.restarting.fset(fit_loop, False)
            fit_loop._resuming_from_checkpoint = False  # Lightning makes the epoch's iterator
            self._loader_states = fit_loop._combined_loader_states_to_load
            fit_loop._combined_loader_states_to_load = []
        # Lightning draws from the RNGs while it sets up the data (a new loader seeds its
        # sampler); the saved states go back when training starts (on_train_start).
        self._rng = capture_rng()
        self._last_step = trainer.global_step
        log.info("step=%d: resumed from %s", self.restored_step, self.root)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        combined = trainer.fit_loop._combined_loader
        if self._loader_states and combined is not None:
            combined._load_state_dicts(self._loader_states)
            for loader in combined.flattened:
                if callable(getattr(loader, "load_state_dict", None)):
                    # Finish the loaded epoch now, before the RNGs go back (an iterator draws
                    # a seed): its sampler's shuffle generator (or a StatefulDistributedSampler's
                    # pending "yielded") is then where the uninterrupted run had it, and the
                    # epoch's own iter() starts the next epoch.  An epoch that
                    # ended at limit_train_batches gives one more batch here, unused.
                    next(iter(loader), None)
        self._loader_states = None
        if self._rng is not None:
            restore_rng(self._rng)
            self._rng = None

    # -- save --------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:  # a validation run was expected but none came
            self._flush(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        last_batch = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        final = (trainer.max_steps not in (-1, None) and step >= trainer.max_steps) or (
            last_batch and trainer.max_epochs not in (-1, None)
            and trainer.current_epoch + 1 >= trainer.max_epochs)
        if last_batch:  # saved at on_train_epoch_end, after the epoch's validation and end
            self._pending = _Pending(step, epoch_end=True, force=final)
        elif _validation_follows(trainer):  # saved at on_validation_end
            self._pending = _Pending(step, epoch_end=False, force=final,
                                     loops=trainer.fit_loop.state_dict())
        else:
            self._save(trainer, pl_module, step, epoch_end=False, force=final)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        pending = self._pending
        if pending is not None and not pending.epoch_end and not trainer.sanity_checking:
            pending.loops = None  # the state now: the validation run is done
            self._flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is not None:
            self._flush(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.manager is not None:  # the last step, if the schedule skipped it (early stop)
            if self._pending is not None:
                self._flush(trainer, pl_module)
            self._save(trainer, pl_module, trainer.global_step, epoch_end=False, force=True)
            self.manager.wait()

    # -- close -------------------------------------------------------------------------
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """``fit`` raised: close the manager (its pending saves commit; its lease on the root
        is released), so that a new ``fit`` in this process can resume."""
        self._close(raise_errors=False, reason=exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close(raise_errors=True)

    def _close(self, *, raise_errors: bool, reason: BaseException | None = None) -> None:
        manager, self.manager = self.manager, None
        self._pending = self._rng = self._loader_states = None
        if manager is None:
            return
        try:
            manager.close()
        except Exception as e:
            if raise_errors:
                raise
            log.error("closing the checkpoint manager of %s after %s: %s", self.root,
                      type(reason).__name__, e)

    def _flush(self, trainer: Any, pl_module: Any) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        self._save(trainer, pl_module, pending.step, epoch_end=pending.epoch_end,
                   force=pending.force, loops=pending.loops)

    def _save(self, trainer: Any, pl_module: Any, step: int, *, epoch_end: bool, force: bool,
              loops: dict[str, Any] | None = None) -> None:
        assert self.manager is not None
        self._extra["lightning_loops"] = loops or trainer.fit_loop.state_dict()
        metrics = {k: v for k, v in trainer.callback_metrics.items()
                   if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
        self.manager.maybe_save(step, self._state(trainer, pl_module), metrics=metrics,
                                epoch=trainer.current_epoch, epoch_end=epoch_end, force=force)


@dataclass
class _Pending:
    """A step whose save waits for its validation run or its epoch's end."""

    step: int
    epoch_end: bool
    force: bool
    loops: dict[str, Any] | None = None
    """The fit loop's state at the step's ``on_train_batch_end``: saved if the validation
    run expected does not come (an empty validation set)."""


def _epoch_done(loops: Mapping[str, Any]) -> bool:
    """Whether a fit-loop state was saved after its epoch's training part ended."""
    total = loops.get("epoch_progress", {}).get("total", {})
    return bool(total.get("started")) and total.get("processed") == total.get("started")


def _validation_follows(trainer: Any) -> bool:
    """Whether Lightning runs validation right after this training batch (its own test, at
    ``on_train_batch_end``); False with a time-based ``val_check_interval``."""
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return False
    fit_loop = trainer.fit_loop
    try:
        return bool(fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # pragma: no cover - another Lightning's internals
        return False
