"""TrainState: what a checkpoint holds, as a DCP state dict and back.

Tensors come from ``torch.distributed.checkpoint.state_dict`` (so DDP, FSDP2
and plain modules all give fully qualified names without wrapper prefixes).
Everything that is not a tensor (scheduler, dataloader position, RNG states,
``extra``) is checked against the type rule of ``values.py`` (``collect``, which also
checks the model and optimizer state) and serialised into a blob at ``save()`` time with
``torch.save``
(capturing it early freezes its value) and read back by
``planner.SafeLoadPlanner`` with ``torch.load(weights_only=True)``, so reading
never runs code from the checkpoint.

Layout of the state dict handed to DCP::

    model/<name>      model state (one key per model; "model" for a single one)
    optim/<name>      optimizer state, keyed by parameter FQN
    scheduler         blob: {name: scheduler.state_dict()}
    extra             blob: the user's plain values
    rank_<r>/rng      blob: python, numpy, torch CPU and CUDA generator states
    rank_<r>/dataloader  blob: {name: loader.state_dict()}, and under "sampler.epoch" the
                         epoch of a stateful loader's DistributedSampler

A plain ``torch.utils.data.DataLoader`` (no ``state_dict``) is wrapped in a
``loader_position.LoaderPosition``, which counts the batches taken from it and saves what
the epoch's order was drawn from, so that the resumed loader skips those batches (by
index, loading none) and shuffles on as an uninterrupted run; a loader whose order cannot
be reproduced so is refused with ``ConfigError`` naming torchdata's ``StatefulDataLoader``.

Per-rank objects live under ``rank_<r>`` so DCP's de-duplication of identical
keys across ranks never drops one rank's RNG or loader position.

Restoring on a different number of ranks (the saved world size is the number
of ``rank_<r>`` entries): tensors are resharded by DCP.  RNG: when the world
size matches, rank ``r`` gets back exactly the generators rank ``r`` saved.
When it differs, every rank reads the saved rank-0 state and re-seeds python,
numpy, torch CPU and every CUDA generator with
``seed = sha256(saved rank-0 torch CPU state || r)`` (first 8 bytes, 63 bits),
see ``reseed_rng``: deterministic for a given checkpoint and rank, different
across ranks.  Dataloader state is per rank and tied to how the data was
split over the old ranks, so it is not restored when the world size changes:
each loader starts from its own initial state (a warning says so); use the
restored step or ``extra`` to skip ahead or set the sampler's epoch.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import random
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import ConfigError, CorruptCheckpointError, StateMismatchError
from .loader_position import LoaderPosition, sampler_epochs, set_sampler_epochs
from .values import plain

log = logging.getLogger(__name__)

PARTS = ("model", "optimizer", "scheduler", "dataloader", "rng", "extra")
SAMPLER_EPOCHS = "sampler.epoch"
"""Key of the dataloader blob holding the sampler epochs of stateful loaders ({name: {path: epoch}})."""


def _as_dict(obj: Any, default_name: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    return {default_name: obj}


def _has_state(obj: Any) -> bool:
    return all(callable(getattr(obj, m, None)) for m in ("state_dict", "load_state_dict"))


def _require(obj: Any, where: str, methods: tuple[str, ...] = ("state_dict", "load_state_dict")) -> None:
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise ConfigError(f"TrainState {where}: {type(obj).__name__} object has no "
                          f"{' or '.join(missing)}(); expected an object with state_dict() "
                          "and load_state_dict()")


def to_blob(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [t.clone() for t in torch.cuda.get_rng_state_all()]
    return state


_RANK_KEY = re.compile(r"rank_(\d+)/(?:rng|dataloader)")


def saved_world_size(available: Iterable[str]) -> int | None:
    """The world size a checkpoint was saved with, from its ``rank_<r>/...`` keys (None: unknown)."""
    ranks = [int(m.group(1)) for k in available if (m := _RANK_KEY.fullmatch(k))]
    return max(ranks) + 1 if ranks else None


def current_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reseed_seed(saved: Mapping[str, Any], rank: int) -> int:
    """The seed rank ``rank`` gets from a saved rank-0 RNG state when the world size changed."""
    data = bytes(saved["torch"].tolist()) + int(rank).to_bytes(8, "little")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


def reseed_rng(saved: Mapping[str, Any], rank: int) -> int:
    """Seed python, numpy, torch CPU and CUDA generators from ``reseed_seed``; returns the seed."""
    seed = reseed_seed(saved, rank)
    random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device
    try:
        import numpy as np
    except ImportError:
        return seed
    np.random.seed(seed % 2**32)
    return seed


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(_tupleize(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"],
                             s["has_gauss"], s["cached"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = min(len(cuda), torch.cuda.device_count())
        for i in range(count):
            torch.cuda.set_rng_state(cuda[i], i)


def storage_ptr(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.untyped_storage().data_ptr()


def _tupleize(v: Any) -> Any:
    return tuple(_tupleize(x) for x in v) if isinstance(v, (list, tuple)) else v


class TrainState:
    """The parts of a training run a checkpoint saves and restores.

    ``model`` and ``optimizer`` may be single objects or dicts of several.
    ``scheduler`` may be anything with ``state_dict``/``load_state_dict``, or a dict of
    them; so may ``dataloader`` (torchdata's ``StatefulDataLoader``), or a plain
    ``torch.utils.data.DataLoader``, whose position ``loader_position.LoaderPosition``
    keeps (make the ``TrainState`` before iterating it).
    ``extra`` is a dict of plain values restored in place (the type rule every saved
    value follows, and what is converted or refused, is in ``values.py``).  ``rng`` saves and
    restores python, numpy, torch CPU and every CUDA generator.
    """

    def __init__(self, model: nn.Module | Mapping[str, nn.Module] | None = None,
                 optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None = None,
                 scheduler: Any = None, dataloader: Any = None,
                 extra: dict[str, Any] | None = None, rng: bool = True) -> None:
        self.models = _as_dict(model, "model")
        self.optimizers = _as_dict(optimizer, "optimizer")
        self.schedulers = _as_dict(scheduler, "scheduler")
        self.dataloaders = _as_dict(dataloader, "dataloader")
        self.extra = extra if extra is not None else {}
        self.rng = bool(rng)
        self._resharded = False
        for kind, objs in (("model", self.models), ("optimizer", self.optimizers),
                           ("scheduler", self.schedulers), ("dataloader", self.dataloaders)):
            for name in objs:
                if not isinstance(name, str) or not name or "." in name or "/" in name:
                    raise ConfigError(f"TrainState {kind} name {name!r} is not valid: expected a "
                                      "non-empty string without '.' or '/'")
        for name, m in self.models.items():
            if not isinstance(m, nn.Module):
                _require(m, f"model {name!r}")
                raise ConfigError(f"TrainState model {name!r} is a {type(m).__name__}; "
                                  "expected a torch.nn.Module")
        for name, o in self.optimizers.items():
            _require(o, f"optimizer {name!r}")
            if not self.models:
                raise ConfigError(f"TrainState optimizer {name!r} needs its model: pass model=")
        for name, obj in self.schedulers.items():
            _require(obj, f"scheduler {name!r}")
        self._plain_loaders: list[Any] = []
        for name, obj in self.dataloaders.items():
            if isinstance(obj, torch.utils.data.DataLoader) and not _has_state(obj):
                # a plain DataLoader: its position is counted and restored (loader_position.py)
                self.dataloaders[name] = LoaderPosition.of(obj, f"TrainState dataloader {name!r}")
                self._plain_loaders.append(obj)  # kept alive with the state, as any loader is
            else:
                _require(obj, f"dataloader {name!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"TrainState extra is a {type(self.extra).__name__}; expected a dict")

    # -- helpers --------------------------------------------------------------
    def _model_for(self, opt_name: str) -> nn.Module:
        if opt_name in self.models:
            return self.models[opt_name]
        if len(self.models) == 1:
            return next(iter(self.models.values()))
        return nn.ModuleDict(self.models)

    def param_count(self) -> int:
        seen: set[int] = set()
        total = 0
        for m in self.models.values():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return total

    def trainable_param_count(self) -> int:
        return sum(p.numel() for m in self.models.values() for p in m.parameters() if p.requires_grad)

    # -- save side ----------------------------------------------------------------
    def tensors(self, parts: Iterable[str] = PARTS) -> dict[str, Any]:
        """Live model and optimizer state (no copy) for the chosen parts."""
        parts = set(parts)
        out: dict[str, Any] = {}
        if "model" in parts:
            for name, m in self.models.items():
                out[f"model/{name}"] = get_model_state_dict(m, options=StateDictOptions())
        if "optimizer" in parts:
            for name, o in self.optimizers.items():
                out[f"optim/{name}"] = get_optimizer_state_dict(self._model_for(name), o)
        return out

    def guarded_storages(self) -> set[int]:
        """Storage addresses of parameters and optimizer state: what only ``optimizer.step``
        (or user code under ``mgr.guard()``) changes in place."""
        out = set()
        for m in self.models.values():
            out.update(storage_ptr(p) for p in m.parameters())
        for o in self.optimizers.values():
            for per_param in o.state.values():
                out.update(storage_ptr(v) for v in per_param.values() if isinstance(v, torch.Tensor))
        return out

    def layout_tensors(self) -> dict[str, Any]:
        """Like ``tensors()``, without side effects: optimizers with no state yet are left out
        (DCP's state_dict API would create their state to describe it)."""
        parts = ["model"] + (["optimizer"] if all(o.state for o in self.optimizers.values()) else [])
        return self.tensors(parts)

    def objects(self, rank: int, parts: Iterable[str] = PARTS) -> dict[str, Any]:
        """Everything that is not a tensor, serialised now (its value at this moment)."""
        parts = set(parts)
        out: dict[str, Any] = {}
        if "scheduler" in parts and self.schedulers:
            out["scheduler"] = to_blob({k: plain(s.state_dict(), f"scheduler {k!r} state_dict()")
                                        for k, s in self.schedulers.items()})
        if "extra" in parts:
            out["extra"] = to_blob(plain(dict(self.extra), "TrainState extra"))
        if "rng" in parts and self.rng:
            out[f"rank_{rank}/rng"] = to_blob(capture_rng())
        if "dataloader" in parts and self.dataloaders:
            blob: dict[str, Any] = {k: plain(d.state_dict(), f"dataloader {k!r} state_dict()")
                                    for k, d in self.dataloaders.items()}
            epochs = {k: e for k, d in self.dataloaders.items()
                      if not isinstance(d, LoaderPosition) and (e := sampler_epochs(d))}
            if epochs:  # never a loader's name: those have no '.'
                blob[SAMPLER_EPOCHS] = epochs
            out[f"rank_{rank}/dataloader"] = to_blob(blob)
        return out

    def collect(self, rank: int) -> dict[str, Any]:
        """What ``save()`` hands to DCP: ``tensors()`` and ``objects()``, every value checked
        (and converted) under the type rule of ``values.py``, so that whatever is saved
        restores; a value that would not raises ``ConfigError`` naming its key path."""
        out = {}
        for key, sd in self.tensors().items():
            kind, name = key.split("/", 1)
            what = "model" if kind == "model" else "optimizer"
            out[key] = plain(sd, f"{what} {name!r} state_dict()", dcp=True)
        return {**out, **self.objects(rank)}

    # -- load side ----------------------------------------------------------------
    def load_targets(self, rank: int, available: set[str], parts: Iterable[str] = PARTS) -> dict[str, Any]:
        """The state dict DCP loads into: live tensors plus placeholders for blobs.

        ``available`` is the set of top-level keys present in the checkpoint; a
        blob the checkpoint does not have is skipped (and reported by the caller).
        """
        out = self.tensors(parts)
        saved = saved_world_size(available)
        self._resharded = saved is not None and saved != current_world_size()
        for key in self.objects_keys(rank, parts):
            if self._resharded and key.endswith("/rng"):
                key = "rank_0/rng"  # re-seeded from it in apply()
            elif self._resharded and key.endswith("/dataloader"):
                log.warning("rank=%d: checkpoint saved on %d ranks, restoring on %d: dataloader "
                            "state is not restored", rank, saved, current_world_size())
                continue
            if key in available:
                out[key] = io.BytesIO()
        return out

    def objects_keys(self, rank: int, parts: Iterable[str] = PARTS) -> list[str]:
        parts = set(parts)
        keys = []
        if "scheduler" in parts and self.schedulers:
            keys.append("scheduler")
        if "extra" in parts:
            keys.append("extra")
        if "rng" in parts and self.rng:
            keys.append(f"rank_{rank}/rng")
        if "dataloader" in parts and self.dataloaders:
            keys.append(f"rank_{rank}/dataloader")
        return keys

    def apply(self, loaded: Mapping[str, Any], rank: int, *, strict: bool = True) -> None:
        """Push loaded values (tensors in place, objects already deserialised) into the live objects."""
        undo = self.apply_objects(loaded, rank)
        try:
            self.apply_tensors(loaded, strict=strict)
        except BaseException:
            undo()
            raise

    def apply_tensors(self, loaded: Mapping[str, Any], *, strict: bool = True) -> None:
        """Models and optimizers from loaded state dicts (their tensors already in place)."""
        for name, m in self.models.items():
            key = f"model/{name}"
            if key in loaded:
                res = set_model_state_dict(m, loaded[key], options=StateDictOptions(strict=strict))
                if not strict and (res.missing_keys or res.unexpected_keys):
                    log.warning("model %r: missing keys %s, unexpected keys %s", name,
                                res.missing_keys, res.unexpected_keys)
        for name, o in self.optimizers.items():
            key = f"optim/{name}"
            if key in loaded:
                set_optimizer_state_dict(self._model_for(name), o, loaded[key])

    def apply_objects(self, loaded: Mapping[str, Any], rank: int,
                      where: Callable[[str], str] = str) -> Callable[[], None]:
        """Push the loaded objects (scheduler, dataloader, RNG, extra) into the live ones, all or
        none; returns an undo that puts back what was there before.

        A value that a live object refuses (a damaged item whose checksum was recomputed, a
        foreign checkpoint) raises ``CorruptCheckpointError`` naming ``where(key)`` and the
        reason, after whatever was already pushed has been put back.
        """
        undo: list[Callable[[], None]] = []
        rng_before: dict[str, Any] | None = None

        def rollback() -> None:
            for step in reversed(undo):
                step()
            if rng_before is not None:  # last: putting a loader back draws from the torch RNG
                restore_rng(rng_before)

        key = ""
        try:
            key = "scheduler"
            if key in loaded:
                before = {n: copy.deepcopy(o.state_dict()) for n, o in self.schedulers.items()}
                undo.append(lambda: self._put_back(self.schedulers, before))
                self._load_each("scheduler", self.schedulers, _mapping(loaded[key], key))
            key = f"rank_{rank}/dataloader"
            if key in loaded:
                saved_dl = _mapping(loaded[key], key)
                before_dl = {n: copy.deepcopy(o.state_dict()) for n, o in self.dataloaders.items()}
                undo.append(lambda: self._put_back(self.dataloaders, before_dl, rebuild=True))
                # A stateful loader's resumed iterator is built below, with its sampler's epoch
                # as it is then (a DistributedSampler's order): put back the saved one first.
                epochs = _mapping(saved_dl.get(SAMPLER_EPOCHS, {}), key)
                epochs_before = {n: sampler_epochs(self.dataloaders[n]) for n in epochs
                                 if n in self.dataloaders}
                undo.append(lambda: [set_sampler_epochs(self.dataloaders[n], e)
                                     for n, e in epochs_before.items()])
                for name in epochs_before:
                    set_sampler_epochs(self.dataloaders[name], _mapping(epochs[name], key))
                self._load_each("dataloader", self.dataloaders,
                                {k: v for k, v in saved_dl.items() if k != SAMPLER_EPOCHS})
                for loader in self.dataloaders.values():
                    # A StatefulDataLoader builds its resumed iterator here (the next iter() returns
                    # it).  Building one draws a seed from the global torch RNG, so it must happen
                    # before that RNG is restored below, or the resumed run is one draw off.
                    loader.state_dict()
            key = "rank_0/rng" if self._resharded else f"rank_{rank}/rng"
            if key in loaded:
                saved = _mapping(loaded[key], key)
                rng_before = capture_rng()
                if self._resharded:
                    seed = reseed_rng(saved, rank)
                    log.info("rank=%d: world size changed; RNG re-seeded with %d", rank, seed)
                else:
                    restore_rng(saved)
            key = "extra"
            if key in loaded:
                values = dict(_mapping(loaded[key], key))
                extra_before = dict(self.extra)
                undo.append(lambda: (self.extra.clear(), self.extra.update(extra_before)))
                self.extra.clear()
                self.extra.update(values)
        except StateMismatchError:
            rollback()
            raise
        except Exception as e:  # noqa: BLE001 - whatever a live object refuses is a bad checkpoint item
            rollback()
            raise CorruptCheckpointError(where(key), f"a {key} state this TrainState accepts",
                                         f"{type(e).__name__}: {e}", f"item {key}") from e
        return rollback

    @staticmethod
    def _put_back(live: Mapping[str, Any], before: Mapping[str, Any], rebuild: bool = False) -> None:
        for name, obj in live.items():
            obj.load_state_dict(before[name])
            if rebuild:
                obj.state_dict()

    @staticmethod
    def _load_each(kind: str, live: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
        for name, obj in live.items():
            if name not in saved:
                raise StateMismatchError(
                    f"{kind} {name!r} is not in the checkpoint (it has {sorted(saved)})",
                    missing=[f"{kind}/{name}"])
            obj.load_state_dict(saved[name])


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{key} holds a {type(value).__name__}, expected a dict")
    return value
