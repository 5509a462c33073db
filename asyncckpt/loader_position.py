"""The position of a plain ``torch.utils.data.DataLoader``, as a stateful object.

``TrainState(dataloader=loader)`` with a plain ``DataLoader`` (no ``state_dict``) wraps it
in a ``LoaderPosition``; the loader itself is not changed for the user, who iterates it as
before.  What a checkpoint then holds for it, the way Accelerate's ``skip_first_batches``
resumes but without a step count to pass by hand:

- the epoch in progress: how many batches the user has taken from the loader's newest
  iterator (``_num_yielded``, so batches a worker prefetched do not count) and how many
  it has in all;
- what its order was drawn from, captured as the epoch began: the global torch RNG and
  every ``torch.Generator`` of the loader and its samplers, once when the iterator was
  made (``DataLoader`` draws the workers' base seed there) and again at its first pull of
  indices (a ``RandomSampler`` without a generator draws its seed from the global RNG
  there, lazily), and the ``epoch`` of a ``DistributedSampler``;
- the generators and sampler epochs as they are now.

Restored, the next ``iter(loader)`` makes the interrupted epoch again: it puts those
states back for the two draws (and the global RNG back as it was after each, so the
restored RNG of the ``TrainState`` is untouched), then discards the consumed batches'
indices from the sampler, so their samples are never loaded, and yields the next batch.
Later epochs shuffle as an uninterrupted run would: their seeds come from RNG states
that ``TrainState`` restores.  A checkpoint taken after the last batch of an epoch (the
iterator not yet exhausted) resumes with the next epoch.

Reproducible are map-style datasets whose index order comes from torch's
``SequentialSampler``, ``RandomSampler`` (with or without ``generator=``),
``SubsetRandomSampler``, ``WeightedRandomSampler`` or ``DistributedSampler``, batched by
torch's ``BatchSampler`` (the default, ``drop_last`` either way) or not batched, with any
``num_workers``; and Accelerate's own samplers and batch samplers over those.  Anything
else (a sampler or batch sampler of another class, an ``IterableDataset``, a ``DataLoader``
subclass with its own iteration) raises ``ConfigError`` naming the loader, why, and the
fix: torchdata's ``StatefulDataLoader``.

Limits: make the ``TrainState`` before iterating the loader (an iterator made earlier is
not counted); a generator given to the loader should serve the loader alone (draws from it
elsewhere are not replayed); the newest iterator is the one resumed, even one the loop left
early.  With ``num_workers > 0`` the rest of the interrupted epoch comes from freshly seeded
workers that never loaded the skipped batches, so randomness drawn inside the workers
(augmentation) differs there and matches again from the next epoch on; with
``persistent_workers=True`` the workers' RNGs run on across epochs and are not restored
(the order is).

Built on torch's private iterator classes (from ``_torch_compat``: ``_SingleProcessDataLoaderIter``,
``_MultiProcessingDataLoaderIter``: ``_next_index``, ``_reset``, ``_num_yielded``), the
same in torch 2.11 to 2.13.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import (BatchSampler, DataLoader, IterableDataset, RandomSampler,
                              SequentialSampler, SubsetRandomSampler, WeightedRandomSampler)
from torch.utils.data.distributed import DistributedSampler

from ._torch_compat import _MultiProcessingDataLoaderIter, _SingleProcessDataLoaderIter
from .errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = 1

_FIX = ("use torchdata's StatefulDataLoader, which saves its own position: "
        "`from torchdata.stateful_dataloader import StatefulDataLoader` and "
        "`StatefulDataLoader(...)` in place of `DataLoader(...)`, same arguments")

# Samplers whose order for an epoch follows from the RNG states and ``epoch`` captured at
# its first pull: recognised by their ``__iter__`` (a subclass that keeps it is fine).
_SAMPLER_ITERS = {c.__iter__ for c in (SequentialSampler, RandomSampler, SubsetRandomSampler,
                                       WeightedRandomSampler, DistributedSampler)}
# Accelerate's (recognised by name: accelerate is not imported here): a seeded sampler,
# and batch samplers over another batch sampler (its ``batch_sampler``).
_ACCELERATE_SAMPLERS = {"SeedableRandomSampler"}
_ACCELERATE_BATCH_SAMPLERS = {"BatchSamplerShard", "SkipBatchSampler"}


def _accelerate_class(obj: Any, names: set[str]) -> bool:
    cls = type(obj)
    return cls.__module__.startswith("accelerate.") and cls.__name__ in names


def _sampler_chain(loader: DataLoader, where: str) -> list[tuple[str, Any]]:
    """(path, object) for the loader's index samplers, outermost first; ConfigError when an order
    along it cannot be reproduced."""
    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"{where}: this DataLoader cannot resume at the right batch: {reason}; "
                           f"{_FIX}")

    if isinstance(loader.dataset, IterableDataset):
        raise refuse(f"its dataset is an IterableDataset ({type(loader.dataset).__name__}), whose "
                     "position only the dataset knows (give the dataset state_dict() and "
                     "load_state_dict() as well)")
    cls = type(loader)
    if cls.__iter__ is not DataLoader.__iter__ or cls._get_iterator is not DataLoader._get_iterator:
        raise refuse(f"its class {cls.__name__} iterates in its own way")
    chain: list[tuple[str, Any]] = []
    path, node = ("batch_sampler", loader.batch_sampler) if loader.batch_sampler is not None \
        else ("sampler", loader.sampler)
    while True:
        chain.append((path, node))
        if type(node).__iter__ is BatchSampler.__iter__:
            path, node = f"{path}.sampler", node.sampler
        elif _accelerate_class(node, _ACCELERATE_BATCH_SAMPLERS):
            path, node = f"{path}.batch_sampler", node.batch_sampler
        elif type(node).__iter__ in _SAMPLER_ITERS or _accelerate_class(node, _ACCELERATE_SAMPLERS):
            return chain
        else:
            kind = "batch_sampler" if path == "batch_sampler" else "sampler"
            own = callable(getattr(node, "state_dict", None))
            raise refuse(f"its {kind} is a {type(node).__name__}, a custom class whose order a "
                         "checkpoint cannot reproduce " + (
                             "(a StatefulDataLoader saves it through its state_dict())" if own
                             else "(it has no state_dict())"))


def _rng_states(nodes: Mapping[str, Any], *, global_rng: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"generators": {}, "epochs": {}}
    if global_rng:
        out["torch"] = torch.get_rng_state()
    for path, node in nodes.items():
        gen = getattr(node, "generator", None)
        if isinstance(gen, torch.Generator):
            out["generators"][path] = gen.get_state()
        epoch = getattr(node, "epoch", None)
        if path != "loader" and isinstance(epoch, int) and not isinstance(epoch, bool):
            out["epochs"][path] = epoch
    return out


class LoaderPosition:
    """``state_dict``/``load_state_dict`` for a plain ``DataLoader`` (module doc).

    ``LoaderPosition.of(loader, where)`` returns the one of that loader (a loader is tracked
    once, however many ``TrainState`` hold it); ``where`` names it in errors.  Make it before
    iterating the loader: an iterator made earlier is not counted.
    """

    def __init__(self, loader: DataLoader, where: str) -> None:
        self._loader = weakref.ref(loader)
        self.where = where
        self._samplers = dict(_sampler_chain(loader, where))  # never the loader: no cycle
        self._iter: weakref.ref[Any] | None = None
        self._epoch = 0               # iterations started (the one in progress included)
        self._start: dict[str, Any] | None = None   # captured as the newest iterator was made
        self._pull: dict[str, Any] | None = None    # ... and at its first pull of indices
        self._pending: dict[str, Any] | None = None  # a restored epoch, made again at next iter()
        self._fresh_workers_seeded = False  # restored after an epoch of a persistent-workers loader
        loader.__dict__["_get_iterator"] = _Hook(self)

    @classmethod
    def of(cls, loader: DataLoader, where: str) -> LoaderPosition:
        hook = loader.__dict__.get("_get_iterator")
        if isinstance(hook, _Hook) and hook.position.loader is loader:
            return hook.position
        return cls(loader, where)

    @property
    def loader(self) -> DataLoader:
        loader = self._loader()
        if loader is None:
            raise RuntimeError(f"{self.where}: the DataLoader is gone")
        return loader

    # -- tracking -------------------------------------------------------------------------
    def _make_iterator(self) -> Any:
        """What the loader's ``__iter__`` calls for a new iterator (torch's ``_get_iterator``)."""
        loader = self.loader
        replay, self._pending = self._pending, None
        undo_seed, self._fresh_workers_seeded = self._fresh_workers_seeded, False
        outer = torch.get_rng_state()
        if replay is not None:
            self._warn_if_epoch_differs(replay)
            self._epoch = replay["epoch"]
            self._start = replay["start"]
            self._set(replay["start"])
        else:
            self._epoch += 1
            self._start = _rng_states(self._nodes(), global_rng=True)
        self._pull = None
        try:
            cls = _Single if loader.num_workers == 0 else _Multi
            if cls is _Multi:
                loader.check_worker_number_rationality()
            it = cls(loader, self, replay, undo_seed)
        except BaseException:
            self._pending, self._fresh_workers_seeded = replay, undo_seed  # for the next try
            raise
        finally:
            if replay is not None:
                torch.set_rng_state(outer)
        it._num_yielded = it._asyncckpt_skip
        self._iter = weakref.ref(it)
        return it

    def _epoch_begins(self, it: Any) -> None:
        """A persistent-workers iterator starts its next epoch (``_reset``)."""
        self._epoch += 1
        self._start = _rng_states(self._nodes(), global_rng=True)
        self._pull = None
        it._asyncckpt_replay, it._asyncckpt_skip, it._asyncckpt_undo_seed = None, 0, False

    def _first_pull(self, it: Any) -> Any:
        """The first index (batch) of an epoch: captures what its order is drawn from, or, for
        a restored epoch, draws it again from the saved states and skips the consumed part."""
        replay = it._asyncckpt_replay
        sampler_iter = it._sampler_iter
        if replay is not None and replay["pull"] is not None:
            pull = replay["pull"]
            outer = torch.get_rng_state()
            self._set(pull)
            try:
                index = next(sampler_iter)
            finally:
                torch.set_rng_state(outer)
            self._pull = pull
        else:
            if it._asyncckpt_undo_seed and self._start is not None:
                # an uninterrupted run would reuse its persistent workers here, not seed new ones
                self._set(self._start)
            self._pull = _rng_states(self._nodes(), global_rng=True)
            index = next(sampler_iter)
        for _ in range(it._asyncckpt_skip):
            index = next(sampler_iter)
        return index

    def _warn_if_epoch_differs(self, replay: Mapping[str, Any]) -> None:
        saved = (replay["pull"] or replay["start"])["epochs"]
        for path, epoch in saved.items():
            live = getattr(self._samplers.get(path), "epoch", epoch)
            if live != epoch:
                log.warning("%s: its %s was set to epoch %s, but the checkpoint was taken in "
                            "epoch %d of it (batch %d of %d): resuming that epoch", self.where,
                            path, live, epoch, replay["batches"], replay["length"])

    def _nodes(self) -> dict[str, Any]:
        return {"loader": self.loader, **self._samplers}

    def _set(self, states: Mapping[str, Any]) -> None:
        # .cpu(): restore(map_location=...) moves the tensors of loader state to that device
        if "torch" in states:
            torch.set_rng_state(states["torch"].cpu())
        for path, state in states["generators"].items():
            gen = getattr(self._nodes().get(path), "generator", None)
            if isinstance(gen, torch.Generator):
                gen.set_state(state.cpu())
        for path, epoch in states["epochs"].items():
            if path in self._samplers:
                self._samplers[path].epoch = epoch

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return self._pending
        it = self._iter() if self._iter is not None else None
        batches = int(it._num_yielded) if it is not None else 0
        length = len(it) if it is not None else len(self.loader)
        resume = it is not None and batches < length
        persistent = getattr(self.loader, "_iterator", None) is not None
        return {"format": FORMAT, "epoch": self._epoch, "batches": batches, "length": length,
                "resume": resume, "persistent_workers_started": persistent,
                "start": self._start if resume else None, "pull": self._pull if resume else None,
                "now": _rng_states(self._nodes(), global_rng=False)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != FORMAT:
            raise ValueError(f"not a DataLoader position of format {FORMAT}: keys {sorted(state)}")
        state = dict(state)
        paths = self._nodes()
        for kind in ("generators", "epochs"):
            missing = sorted(set(state["now"][kind]) - set(paths))
            if missing:
                log.warning("%s: the checkpoint has %s for %s, which this loader lacks; the order "
                            "after the resume may differ", self.where, kind, missing)
        for path in paths:
            if isinstance(getattr(paths[path], "generator", None), torch.Generator) and \
                    path not in state["now"]["generators"]:
                log.warning("%s: its %s has a generator the checkpoint did not save; the order "
                            "after the resume may differ", self.where, path)
        self._set(state["now"])
        if getattr(self.loader, "_iterator", None) is not None:
            # persistent workers of this process: the next iter() must make a new iterator
            self.loader._iterator = None
        self._iter = None
        self._start = self._pull = None
        self._epoch = int(state["epoch"])
        self._pending = state if state["resume"] else None
        self._fresh_workers_seeded = bool(state.get("persistent_workers_started")) and \
            not state["resume"] and self.loader.persistent_workers and self.loader.num_workers > 0
        if self._pending is not None and int(state["length"]) != len(self.loader):
            log.warning("%s: the checkpoint was taken at batch %d of an epoch of %d batches; this "
                        "loader has %d an epoch", self.where, state["batches"], state["length"],
                        len(self.loader))

    def __repr__(self) -> str:
        return f"LoaderPosition({self.where})"


_EPOCH_PATHS = ("sampler", "batch_sampler", "batch_sampler.sampler")


def sampler_epochs(loader: Any) -> dict[str, int]:
    """The ``epoch`` of each sampler under a loader (``DistributedSampler.set_epoch``'s), by
    path: what a stateful loader (torchdata's ``StatefulDataLoader``) does not save itself."""
    out: dict[str, int] = {}
    for path in _EPOCH_PATHS:
        node: Any = loader
        for attr in path.split("."):
            node = getattr(node, attr, None)
        epoch = getattr(node, "epoch", None)
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            out[path] = epoch
    return out


def set_sampler_epochs(loader: Any, epochs: Mapping[str, int]) -> None:
    for path, epoch in epochs.items():
        *parents, last = path.split(".")
        node: Any = loader
        for attr in parents + [last]:
            node = getattr(node, attr, None)
        if node is not None and isinstance(getattr(node, "epoch", None), int):
            node.epoch = int(epoch)


class _Hook:
    """What the loader's ``_get_iterator`` becomes (torch's ``DataLoader.__iter__`` calls it).

    The loader owns its position (through this hook and its iterators); the position refers
    to the loader weakly, so nothing makes a cycle and the loader, its persistent workers
    included, is freed when it would be without asyncckpt.  A copied or pickled loader is an
    untracked one.
    """

    __slots__ = ("position",)

    def __init__(self, position: LoaderPosition) -> None:
        self.position = position

    def __call__(self) -> Any:
        return self.position._make_iterator()

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial, (DataLoader._get_iterator, self.position.loader)


class _Tracked:
    """Mixed into torch's iterators: counts the epoch's first pull of indices, where the
    order is captured or, on a resume, drawn again and the consumed batches skipped."""

    _asyncckpt_first = True

    def __init__(self, loader: DataLoader, position: LoaderPosition,
                 replay: Mapping[str, Any] | None, undo_seed: bool) -> None:
        self._asyncckpt_position = position
        self._asyncckpt_replay = replay
        self._asyncckpt_skip = int(replay["batches"]) if replay is not None else 0
        self._asyncckpt_undo_seed = undo_seed
        self._asyncckpt_first = True
        super().__init__(loader)  # type: ignore[call-arg]

    def _reset(self, loader: DataLoader, first_iter: bool = False) -> None:
        if not first_iter:
            self._asyncckpt_position._epoch_begins(self)
        self._asyncckpt_first = True
        super()._reset(loader, first_iter)  # type: ignore[misc]

    def _next_index(self) -> Any:
        if self._asyncckpt_first:
            self._asyncckpt_first = False
            return self._asyncckpt_position._first_pull(self)
        return next(self._sampler_iter)  # type: ignore[attr-defined]


class _Single(_Tracked, _SingleProcessDataLoaderIter):
    pass


class _Multi(_Tracked, _MultiProcessingDataLoaderIter):
    pass


# torch names its profiler ranges after the iterator's class: keep them as they were.
for _cls, _base in ((_Single, _SingleProcessDataLoaderIter),
                    (_Multi, _MultiProcessingDataLoaderIter)):
    _cls.__name__ = _cls.__qualname__ = _base.__name__


__all__ = ["LoaderPosition", "sampler_epochs", "set_sampler_epochs"]
