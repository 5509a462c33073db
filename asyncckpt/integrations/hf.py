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
``Trainer(callbacks=[...])`` saves the model, optimizer, LR scheduler and RNGs when its
``Schedule`` says so (and at the last step), asynchronously, with its ``Retention``; use
``save_strategy="no"`` so the Trainer does not also save.  At ``on_train_begin`` it restores
the newest checkpoint under ``root`` and sets ``state.global_step``; the Trainer has by
then decided where its data starts, so the resumed run sees the data from the start of its
first epoch again: weights, optimizer and schedule resume exactly, the data order does not.

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


def _make_callback(base: type) -> type:
    class AsyncCheckpointCallback(base):  # type: ignore[misc, valid-type]
        """A transformers ``TrainerCallback`` saving through a ``CheckpointManager`` (module doc)."""

        def __init__(self, root: str | os.PathLike[str], *, resume: bool = True,
                     **manager_options: Any) -> None:
            self.root = os.fspath(root)
            self.resume = resume
            self.manager_options = manager_options
            self.manager: CheckpointManager | None = None
            self.restored_step = 0
            self._state: TrainState | None = None
            self._metrics: dict[str, float] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
            self.manager = CheckpointManager(self.root, **self.manager_options)
            self._state = TrainState(model=model, optimizer=_unwrap(optimizer, "optimizer"),
                                     scheduler=_unwrap(lr_scheduler, "scheduler"))
            if self.resume:
                self.restored_step = self.manager.restore(self._state)
                if self.restored_step:
                    state.global_step = self.restored_step
                    log.info("step=%d: resumed from %s", self.restored_step, self.root)

        def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
                   **kwargs: Any) -> None:
            for k, v in (logs or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._metrics[k] = float(v)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.manager is None or self._state is None:
                return
            last = bool(state.max_steps) and state.global_step >= state.max_steps
            self.manager.maybe_save(state.global_step, self._state, metrics=self._metrics,
                                    epoch=None if state.epoch is None else int(state.epoch),
                                    force=last or bool(control.should_training_stop))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.manager is not None and self._state is not None:
                self.manager.maybe_save(state.global_step, self._state, metrics=self._metrics,
                                        force=True)
                manager, self.manager = self.manager, None
                manager.close()

    return AsyncCheckpointCallback


__all__ = ["AsyncCheckpointCallback", "accelerate_state"]
