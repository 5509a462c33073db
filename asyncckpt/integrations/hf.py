"""Hugging Face: Accelerate and the transformers ``Trainer``.

Accelerate: build the ``TrainState`` from what ``accelerator.prepare`` returned, then use a
``CheckpointManager`` as in any loop (create it after the ``Accelerator``, which sets up
the process group)::

    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    state = accelerate_state(accelerator, model=model, optimizer=opt, scheduler=sched,
                             dataloader=loader)
    mgr = CheckpointManager("runs/exp1/ckpt", schedule=Schedule(every_n_steps=500))
    step = mgr.restore(state)        # then iterate `loader` as usual: no skip_first_batches

``accelerate_state`` unwraps Accelerate's optimizer and scheduler wrappers, keeps the
prepared model (DDP/FSDP wrappers are handled by DCP's state-dict API), adds the
accelerator's ``GradScaler`` when mixed precision has one, and saves each prepared loader's
epoch counter (``iteration``, what ``set_epoch`` gives the sampler) with its base loader's
position: a ``StatefulDataLoader``'s own state (``use_stateful_dataloader=True``), or, for a
plain ``DataLoader``, what ``LoaderPosition`` keeps (loader_position.py: the batches taken,
less the one the ``DataLoaderShard`` takes ahead, and what the epoch's order was drawn
from).  The resumed loader goes on with the next batch of the interrupted epoch, skipped
by index.  A loader whose order cannot be reproduced raises ``ConfigError``; one
dispatched from the main process (``dispatch_batches``) over a plain loader is left out,
with a warning.

transformers: ``AsyncCheckpointCallback(root, **manager_options)`` in
``Trainer(callbacks=[cb], args=TrainingArguments(..., save_strategy="no"))``, and every run
started with ``trainer.train(resume_from_checkpoint=cb.resume_from(trainer))``.  Each step
the Trainer finishes (its logs, evaluation and best metric included) is offered to the
``Schedule`` (a save at the start of the next step, before its forward pass, or before the
next epoch; the last step at ``on_train_end``): the model, optimizer, LR scheduler,
``GradScaler``, RNGs and the ``TrainerState`` as the Trainer's ``trainer_state.json`` holds
it (other callbacks' states included), asynchronously, with the step's own logged numbers
as the manifest's metrics and ``int(state.epoch)`` as its epoch.  ``resume_from`` restores
the newest checkpoint (or ``which=``) where the Trainer restores its own: it writes that
``trainer_state.json`` into a temporary folder and returns the folder, so the Trainer itself
sets its state, logging counters and data position (skipping the batches already trained)
from it, and it hooks the Trainer's ``_load_from_checkpoint``,
``_load_optimizer_and_scheduler``, ``_load_scaler`` and ``_load_rng_state`` for that folder
only (RNGs at the start of the resumed epoch, or after its first batch mid-epoch, as the
Trainer does).  A missing method, or a resume the Trainer did not load, is a
``ConfigError`` naming the transformers version; so is ``train()`` without ``resume_from``.

Neither package is a dependency of asyncckpt; each is imported when first needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..loader_position import LoaderPosition
from ..manager import CheckpointManager
from ..state import TrainState

log = logging.getLogger(__name__)


def _unwrap(obj: Any, attr: str) -> Any:
    inner = getattr(obj, attr, None)
    return inner if inner is not None and type(obj).__module__.startswith("accelerate") else obj


class _PreparedLoader:
    """An Accelerate ``DataLoaderShard`` as a stateful object: its epoch counter
    (``iteration``, which ``set_epoch`` feeds the sampler's shuffle) and its base loader's
    position: a ``StatefulDataLoader``'s own state (``use_stateful_dataloader=True``), or a
    plain ``DataLoader``'s as ``LoaderPosition`` counts it, less the one batch the shard
    takes ahead of what it has yielded."""

    def __init__(self, loader: Any, position: LoaderPosition | None = None) -> None:
        self.loader = loader
        self.position = position

    def _iterating(self) -> bool:
        refs = getattr(getattr(self.loader, "gradient_state", None), "dataloader_references", [])
        return any(r is self.loader for r in refs)

    def state_dict(self) -> dict[str, Any]:
        iterating = self._iterating()
        last_taken = iterating and bool(getattr(self.loader, "end_of_dataloader", False))
        # after the epoch's last batch the shard has not yet counted the epoch: the resumed
        # run starts the next one, as the uninterrupted run will
        iteration = int(getattr(self.loader, "iteration", 0)) + int(last_taken)
        if self.position is None:
            return {"loader": self.loader.state_dict(), "iteration": iteration}
        pos = self.position.state_dict()
        if iterating and not last_taken and pos["resume"] and pos["batches"] > 0:
            pos = {**pos, "batches": pos["batches"] - 1}  # taken ahead, not yet yielded
        return {"position": pos, "iteration": iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # the sampler's epoch first: a StatefulDataLoader builds its resumed order below
        self.loader.set_epoch(state["iteration"])
        if self.position is not None:
            self.position.load_state_dict(state["position"])
            return
        self.loader.load_state_dict(state["loader"])
        # build the resumed iterator now, before the RNGs are restored (see TrainState.apply)
        self.loader.base_dataloader.state_dict()


def _stateful(loader: Any, name: str) -> Any:
    """The loader to checkpoint, or None when it cannot report its position."""
    base = getattr(loader, "base_dataloader", None)
    if base is None:  # not prepared: TrainState takes it as it is (a plain DataLoader too)
        return loader
    if callable(getattr(base, "state_dict", None)):
        return _PreparedLoader(loader)
    if type(loader).__name__ == "DataLoaderShard" and isinstance(base, torch.utils.data.DataLoader):
        return _PreparedLoader(loader, LoaderPosition.of(base, f"accelerate_state dataloader {name!r}"))
    return None


def accelerate_state(accelerator: Any, *, model: Any = None, optimizer: Any = None,
                     scheduler: Any = None, dataloader: Any = None,
                     extra: dict[str, Any] | None = None, rng: bool = True) -> TrainState:
    """A ``TrainState`` over an ``Accelerator``'s prepared objects (single ones or dicts)."""
    def each(objs: Any, attr: str) -> Any:
        if objs is None or not isinstance(objs, Mapping):
            return None if objs is None else _unwrap(objs, attr)
        return {k: _unwrap(v, attr) for k, v in objs.items()}

    schedulers = each(scheduler, "scheduler")
    if not isinstance(schedulers, Mapping):
        schedulers = {} if schedulers is None else {"scheduler": schedulers}
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        schedulers = {**schedulers, "grad_scaler": scaler}
    loaders = dataloader if isinstance(dataloader, Mapping) else \
        ({} if dataloader is None else {"dataloader": dataloader})
    loaders = {k: _stateful(d, k) for k, d in loaders.items()}
    stateless = [k for k, d in loaders.items() if d is None]
    if stateless:
        log.warning("dataloader(s) %s (%s over a plain DataLoader) cannot report their position "
                    "and are not checkpointed: prepare them with "
                    "DataLoaderConfiguration(use_stateful_dataloader=True), or skip ahead with "
                    "accelerator.skip_first_batches", stateless,
                    ", ".join(sorted({type(dataloader[k] if isinstance(dataloader, Mapping)
                                           else dataloader).__name__ for k in stateless})))
    return TrainState(model=model, optimizer=each(optimizer, "optimizer"),
                      scheduler=schedulers or None,
                      dataloader={k: d for k, d in loaders.items() if k not in stateless} or None,
                      extra=extra, rng=rng)


def _trainer_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise ImportError("AsyncCheckpointCallback needs transformers: pip install transformers") from e
    return TrainerCallback


def __getattr__(name: str) -> Any:
    if name == "AsyncCheckpointCallback":  # built on first use: transformers is imported only then
        cls = _make_callback(_trainer_callback_base())
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_TRAINER_STATE = "hf_trainer_state"
"""The ``extra`` key holding the ``TrainerState`` as JSON (HF's ``trainer_state.json``)."""

_LOADERS = ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_rng_state")
"""The Trainer methods ``resume_from`` hooks: each takes the checkpoint folder first."""


def _step_metrics(history: list[dict[str, Any]], step: int) -> dict[str, float]:
    """The numbers the Trainer logged at ``step`` (its ``log_history`` entries, merged)."""
    out: dict[str, float] = {}
    for entry in reversed(history):  # the newest entries are this step's
        at = entry.get("step")
        if at != step:
            if isinstance(at, int) and at < step:
                break
            continue
        for k, v in entry.items():
            if k != "step" and k not in out and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
    return out


def _make_callback(base: type) -> type:
    import dataclasses
    import json
    import shutil
    import tempfile
    import weakref

    import transformers
    from transformers import TrainerState
    from transformers.trainer_callback import ExportableState

    from ..errors import ConfigError
    from ..state import PARTS

    version = transformers.__version__

    class _TrainerCheckpoint(TrainState):
        """A TrainState whose ``extra`` (the Trainer's state as JSON) is built only when a
        save takes it, not at every step the schedule is asked about."""

        make_extra: Any = None

        def objects(self, rank: int, parts: Any = PARTS) -> dict[str, Any]:
            parts = tuple(parts)
            if self.make_extra is not None and "extra" in parts:
                self.extra = self.make_extra()
            return super().objects(rank, parts)

    class AsyncCheckpointCallback(base):  # type: ignore[misc, valid-type]
        """A transformers ``TrainerCallback`` saving through a ``CheckpointManager``.

        Start every run with ``trainer.train(resume_from_checkpoint=cb.resume_from(trainer))``
        (the module doc says what is saved and what a resume restores)."""

        def __init__(self, root: str | os.PathLike[str], *, resume: bool = True,
                     **manager_options: Any) -> None:
            self.root = os.fspath(root)
            self.resume = resume
            self.manager_options = manager_options
            self.manager: CheckpointManager | None = None
            self.restored_step = 0
            """The step the last ``resume_from`` prepared (0: none)."""
            self._trainer: Any = None
            self._hooked: weakref.WeakSet[Any] = weakref.WeakSet()
            self._resume_dir: str | None = None
            self._cleanup: Any = None
            self._loaded = self._rng_loaded = self._check_rng = False
            self._pending: int | None = None  # the step whose save waits for its logs
            self._state: _TrainerCheckpoint | None = None

        # -- resume ---------------------------------------------------------------------
        def resume_from(self, trainer: Any, which: int | str = "latest") -> str | None:
            """Attach to ``trainer`` and prepare its resume from ``which`` (a step, "latest",
            "best:<metric>"); returns the folder to pass as
            ``trainer.train(resume_from_checkpoint=...)``, or None when there is nothing to
            resume (no checkpoint under the root, or ``resume=False``)."""
            self._attach(trainer)
            self._reset_resume()
            self.restored_step = 0
            if self.manager is not None:  # an earlier train() that did not reach its end
                manager, self.manager = self.manager, None
                manager.close()
            self.manager = CheckpointManager(self.root, **self.manager_options)
            if not self.resume:
                return None
            holder = TrainState(rng=False)
            step = self.manager.restore(holder, which, include=["extra"])
            if not step:
                return None
            saved = holder.extra.get(_TRAINER_STATE)
            if not isinstance(saved, str):
                raise ConfigError(
                    f"step {step} under {self.root} holds no Trainer state (saved by an older "
                    "AsyncCheckpointCallback, or not by this callback), so the Trainer cannot "
                    "resume it where it stopped; load its weights with asyncckpt.load_weights, "
                    "or pass resume=False to start over")
            folder = tempfile.mkdtemp(prefix=f"asyncckpt-resume-{step}-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, folder, True)
            name = getattr(transformers.trainer, "TRAINER_STATE_NAME", "trainer_state.json")
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(saved)
            self._resume_dir, self.restored_step = folder, step
            log.info("step=%d: the Trainer resumes from %s (trainer state in %s)", step, self.root, folder)
            return folder

        def _attach(self, trainer: Any) -> None:
            if self not in getattr(getattr(trainer, "callback_handler", None), "callbacks", ()):
                raise ConfigError("resume_from(trainer): this AsyncCheckpointCallback is not one of "
                                  "the trainer's callbacks; pass it as Trainer(callbacks=[cb])")
            missing = [n for n in _LOADERS if not callable(getattr(trainer, n, None))]
            if missing:
                raise ConfigError(
                    f"transformers {version}: Trainer has no {', '.join(missing)}(), where "
                    "AsyncCheckpointCallback loads a checkpoint as the Trainer loads its own; "
                    "this transformers version is not supported (tested with 4.46 and 5.25)")
            if getattr(trainer, "is_deepspeed_enabled", False):
                raise ConfigError("AsyncCheckpointCallback does not save DeepSpeed engines; use "
                                  "the Trainer's own checkpoints with DeepSpeed")
            self._trainer = trainer
            if trainer in self._hooked:
                return
            ours = {"_load_from_checkpoint": lambda *a, **k: None,  # the weights come with the optimizer
                    "_load_optimizer_and_scheduler": self._load_model_and_optimizer,
                    "_load_scaler": lambda *a, **k: None,  # in the scheduler part
                    "_load_rng_state": self._load_rng}
            for name, hook in ours.items():
                original = getattr(trainer, name, None)
                if callable(original):
                    setattr(trainer, name, self._hook(original, hook))
            self._hooked.add(trainer)

        def _hook(self, original: Any, ours: Any) -> Any:
            def hooked(checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
                if self._resume_dir is not None and checkpoint == self._resume_dir:
                    return ours(*args, **kwargs)
                return original(checkpoint, *args, **kwargs)
            hooked.__wrapped__ = original  # type: ignore[attr-defined]
            return hooked

        def _reset_resume(self) -> None:
            if self._cleanup is not None:
                self._cleanup()
            self._resume_dir = self._cleanup = None
            self._loaded = self._rng_loaded = self._check_rng = False

        def _load_model_and_optimizer(self, *args: Any, **kwargs: Any) -> None:
            """Where the Trainer loads its optimizer and scheduler (after accelerate's
            prepare): the model, optimizer, scheduler and grad scaler, in one read (verified
            by ``resume_from``)."""
            assert self.manager is not None
            self.manager.restore(self._train_state(), self.restored_step,
                                 exclude=["extra", "rng"], verify=False)
            self._loaded = True

        def _load_rng(self, *args: Any, **kwargs: Any) -> None:
            """Where the Trainer puts its RNGs back: at the start of the resumed epoch, or
            after its first batch when it resumes mid-epoch."""
            assert self.manager is not None
            self.manager.restore(self._train_state(), self.restored_step, include=["rng"],
                                 verify=False)
            self._rng_loaded = True

        def _train_state(self) -> _TrainerCheckpoint:
            trainer = self._trainer
            schedulers = {"scheduler": _unwrap(trainer.lr_scheduler, "scheduler")}
            scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
            if scaler is not None:
                schedulers["grad_scaler"] = scaler
            return _TrainerCheckpoint(model=trainer.model, optimizer=_unwrap(trainer.optimizer, "optimizer"),
                                      scheduler=schedulers)

        # -- events ---------------------------------------------------------------------
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.manager is None or self._trainer is None:
                raise ConfigError("AsyncCheckpointCallback: start training with "
                                  "trainer.train(resume_from_checkpoint=cb.resume_from(trainer)), "
                                  "which resumes the newest checkpoint under the root (if any) "
                                  "where the Trainer resumes its own")
            if self._resume_dir is not None and not self._loaded:
                raise ConfigError(
                    f"cb.resume_from(trainer) prepared step {self.restored_step}, but the Trainer "
                    f"did not load it: pass its return value to trainer.train(resume_from_checkpoint=...)"
                    f"; if you did, transformers {version} no longer calls "
                    "Trainer._load_optimizer_and_scheduler(checkpoint) while resuming, and "
                    "AsyncCheckpointCallback does not support it")
            self._check_rng = self._loaded
            self._pending, self._state = None, None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._check_rng:
                self._check_rng = False
                if not self._rng_loaded and not args.ignore_data_skip:
                    raise ConfigError(
                        f"transformers {version} did not call Trainer._load_rng_state(checkpoint) "
                        "before the first resumed step; AsyncCheckpointCallback restores the RNGs "
                        "there, so this resume would not continue the run exactly")
            self._flush(state, control)

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._flush(state, control)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # saved once the Trainer is done with this step: its logs, evaluation and best metric
            self._pending = state.global_step

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            try:
                self._flush(state, control, final=True)
            finally:
                manager, self.manager = self.manager, None
                self._reset_resume()
                if manager is not None:
                    manager.close()

        def _flush(self, state: Any, control: Any, *, final: bool = False) -> None:
            """Offer the pending step to the schedule (a save when it says so, or at the end)."""
            step, self._pending = self._pending, None
            if step is None or self.manager is None:
                return
            history = state.log_history
            if final and history and "train_runtime" in history[-1]:
                history = history[:-1]  # the run's summary, logged after its last step
            if self._state is None:
                self._state = self._train_state()
            self._state.make_extra = lambda: self._extra(state, control, history)
            epoch = state.epoch
            self.manager.maybe_save(
                step, self._state, metrics=_step_metrics(history, step),
                epoch=None if epoch is None else int(epoch),
                epoch_end=bool(epoch) and float(epoch).is_integer(),
                force=final and not self.manager.should_stop)
            if self.manager.should_stop:  # a stop signal: saved, so stop
                control.should_training_stop = True

        def _extra(self, state: Any, control: Any, history: list[dict[str, Any]]) -> dict[str, Any]:
            """The Trainer's state as its own ``trainer_state.json`` would hold it here."""
            saved = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}  # no copies
            saved["log_history"] = history
            # other callbacks' states now (EarlyStopping's counter...), as the Trainer gathers them
            callbacks = [*self._trainer.callback_handler.callbacks, control]
            saved["stateful_callbacks"] = TrainerState(stateful_callbacks=[
                cb for cb in callbacks if isinstance(cb, ExportableState)]).stateful_callbacks
            return {_TRAINER_STATE: json.dumps(saved, indent=2, sort_keys=True) + "\n",
                    "transformers_version": version}

    return AsyncCheckpointCallback


__all__ = ["AsyncCheckpointCallback", "accelerate_state"]
