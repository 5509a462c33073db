"""The load path: find committed checkpoints, check, read safely, set state.

``load_into(...)`` compares the live state with the
checkpoint's DCP metadata first, so a missing key or a shape mismatch is
reported by name with both shapes, then reads with DCP (resharding to the live
layout) through ``CheckpointReader`` (checksums verified, nothing unpickled
outside the allow-list) and pushes the values into the live objects.

What is loaded is a ``Selection`` (``select_parts``): parts of the TrainState
(``"model"``, ``"optimizer"``, ``"scheduler"``, ``"dataloader"``, ``"rng"``,
``"extra"``), or one model or optimizer by name (``"model:encoder"``,
``"optimizer:encoder"``).  Every load returns a ``RestoreReport`` naming what
was loaded, what the checkpoint lacked and what it had that the live state
does not.  ``load_weights`` puts a release's (or any) plain weights into the
models, for a fine-tuning start.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata

from ._torch_compat import flatten_state_dict
from . import _dist
from .dcp_io import METADATA_NAME, CheckpointReader, reraise_own
from .errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError, StateMismatchError
from .manifest import MANIFEST_NAME, Manifest, step_dir_name
from .planner import SafeLoadPlanner
from .state import PARTS, TrainState
from .storage import Storage, list_committed, read_folder_manifest, verify_files

log = logging.getLogger(__name__)


def _top(fqn: str) -> str:
    return fqn.split(".", 1)[0]


NAMED_PARTS = {"model": "model/", "optimizer": "optim/"}
"""Parts that may name one object (``"model:encoder"``), and their state-dict key prefix."""


@dataclass(frozen=True)
class Selection:
    """What a restore loads: for each part, None (every object) or the names chosen."""

    include: Mapping[str, frozenset[str] | None]
    exclude: Mapping[str, frozenset[str] | None] = field(default_factory=dict)

    def wants(self, part: str, name: str | None = None) -> bool:
        """Whether ``part`` (one object of it, with ``name``) is loaded."""
        if part not in self.include:
            return False
        chosen, dropped = self.include[part], self.exclude.get(part, frozenset())
        if name is None:
            return dropped is not None
        return (chosen is None or name in chosen) and dropped is not None and name not in dropped

    @property
    def parts(self) -> list[str]:
        return [p for p in PARTS if self.wants(p)]

    def check(self, state: TrainState) -> None:
        """ConfigError if a name does not match an object of ``state``."""
        live = {"model": sorted(state.models), "optimizer": sorted(state.optimizers)}
        for option, given in (("include", self.include), ("exclude", self.exclude)):
            for part, names in given.items():
                unknown = sorted((names or frozenset()) - set(live.get(part, ())))
                if unknown:
                    raise ConfigError(f"{option} names {part} {unknown}, which the TrainState does "
                                      f"not have; its {part}s are {live[part]}")

    def keeps(self, key: str) -> bool:
        """Whether a top-level state-dict key (``model/<name>``, ``optim/<name>``, ...) is loaded."""
        for part, prefix in NAMED_PARTS.items():
            if key.startswith(prefix):
                return self.wants(part, key[len(prefix):])
        return True


def select_parts(include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None) -> Selection:
    """The ``Selection`` for restore's ``include``/``exclude`` (both validated).

    Items are part names (``PARTS``) or ``"model:<name>"`` / ``"optimizer:<name>"`` for one
    model or optimizer of a TrainState that has several; ``include=None`` means every part.
    """
    chosen = _parse("include", include) if include is not None else {p: None for p in PARTS}
    return Selection(include=chosen, exclude=_parse("exclude", exclude or ()))


def _parse(option: str, given: str | Sequence[str]) -> dict[str, frozenset[str] | None]:
    items = [given] if isinstance(given, str) else list(given)
    out: dict[str, frozenset[str] | None] = {}
    bad = []
    for item in items:
        part, sep, name = item.partition(":") if isinstance(item, str) else (item, "", "")
        if part not in PARTS or (sep and (part not in NAMED_PARTS or not name)):
            bad.append(item)
        elif not sep:
            out[part] = None
        elif out.get(part, frozenset()) is not None:
            out[part] = frozenset({*(out.get(part) or ()), name})
    if bad:
        raise ConfigError(f"{option}={items!r} names unknown part(s) {bad}; expected some of "
                          f"{list(PARTS)}, or 'model:<name>' / 'optimizer:<name>' for one of several")
    return out


@dataclass
class RestoreReport:
    """What one restore did (``CheckpointManager.last_restore_report``)."""

    step: int
    source: str
    """URL of the checkpoint (or release) folder read."""
    loaded: list[str] = field(default_factory=list)
    """Top-level keys loaded: ``model/<name>``, ``optim/<name>``, ``scheduler``, ``extra``, ..."""
    missing: list[str] = field(default_factory=list)
    """Keys of the live state the checkpoint lacks (left as they were)."""
    unexpected: list[str] = field(default_factory=list)
    """Keys of the checkpoint the live state lacks (ignored)."""
    refused: list[str] = field(default_factory=list)
    """Entries of a foreign checkpoint that were not restored, each with why (``foreign.py``)."""

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected


def check_map_location(map_location: Any) -> torch.device | None:
    """None, or the device ``map_location`` names ("cpu", "cuda:0", a torch.device), if usable here."""
    if map_location is None:
        return None
    try:
        device = torch.device(map_location)
    except (TypeError, RuntimeError) as e:
        raise ConfigError.field("map_location", map_location,
                                'None or a device such as "cpu" or "cuda:0"') from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError.field("map_location", map_location, 'a device this machine has, e.g. "cpu"')
    return device


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def check_compatible(target: dict[str, Any], md: dcp_metadata.Metadata, *, strict: bool,
                     source: str) -> tuple[list[str], list[str]]:
    """Raise StateMismatchError naming missing keys, unexpected keys, and shape mismatches;
    returns ``(missing, unexpected)`` (unexpected keys are allowed with ``strict=False``)."""
    flat, _ = flatten_state_dict(target)
    saved = md.state_dict_metadata
    missing = sorted(k for k, v in flat.items() if isinstance(v, torch.Tensor) and k not in saved)
    shapes = {}
    for k, v in flat.items():
        meta = saved.get(k)
        if isinstance(v, torch.Tensor) and isinstance(meta, dcp_metadata.TensorStorageMetadata):
            if tuple(meta.size) != tuple(v.shape):
                shapes[k] = (tuple(meta.size), tuple(v.shape))
    tops = {_top(k) for k in flat if _top(k).startswith(("model/", "optim/"))}
    unexpected = sorted(k for k in saved if _top(k) in tops and k not in flat)
    problems = []
    if shapes:
        problems += [f"{k}: checkpoint has shape {a}, live state has {b}" for k, (a, b) in shapes.items()]
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:10])}"
                        + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    if unexpected and strict:
        problems.append(f"in the checkpoint but not in the live state: {', '.join(unexpected[:10])}"
                        + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    if problems:
        raise StateMismatchError(f"{source} does not match the live state: " + "; ".join(problems),
                                 missing=missing, unexpected=unexpected, shapes=shapes)
    if unexpected:
        log.warning("%s: keys not in the live state were ignored: %s", source, unexpected[:10])
    return missing, unexpected


def load_into(folder: Storage, manifest: Manifest, state: TrainState, *, rank: int,
              group: Any, strict: bool = True, verify: bool = True,
              parts: Iterable[str] = PARTS, select: Selection | None = None,
              map_location: Any = None) -> RestoreReport:
    """Read the checkpoint in ``folder`` into ``state`` (every rank calls this).

    ``select`` (default: ``parts``) says what to load; the rest of ``state`` is untouched.
    ``map_location`` moves the tensors inside loaded objects (scheduler, dataloader, extra);
    model and optimizer tensors are always loaded into the live tensors, on their devices.
    """
    select = select or select_parts(list(parts))
    select.check(state)
    state = _view(state, select)
    device = check_map_location(map_location)
    files = {f.path: f for f in manifest.files}
    reader = CheckpointReader(folder, files=files, verify=verify)
    md = reader.read_metadata()
    available = {_top(k) for k in md.state_dict_metadata}
    target = {k: v for k, v in state.load_targets(rank, available, select.parts).items()
              if select.keeps(k)}
    report = RestoreReport(step=manifest.step, source=folder.url,
                           missing=_missing_objects(state, target, rank, select))
    if not strict:
        report.missing += _drop_missing(target, md)
    _, report.unexpected = check_compatible(target, md, strict=strict, source=folder.url)
    # all or nothing: every file is checked, and every object decoded and taken by its live
    # object (undoably), before the first live tensor is written
    if verify:
        _verify_agreed(folder, manifest, rank, group)
    objects = {k: v for k, v in target.items() if isinstance(v, io.BytesIO)}
    tensors = {k: v for k, v in target.items() if k not in objects}
    undo = _agreed(lambda: _apply_objects(folder, files, md, objects, state, rank, device), rank,
                   group, folder.url)
    try:
        _load(tensors, CheckpointReader(folder, files=files, verify=False), folder.url, group)
        state.apply_tensors(tensors, strict=strict)
    except BaseException:
        undo()
        raise
    report.loaded = sorted(target)
    if report.missing or report.unexpected:
        log.warning("rank=%d: restored %s with missing keys %s and unexpected keys %s", rank,
                    folder.url, report.missing[:10], report.unexpected[:10])
    return report


def _load(target: dict[str, Any], reader: CheckpointReader, source: str, group: Any) -> None:
    if not target and group is None:
        return
    try:
        dcp.load(target, storage_reader=reader, planner=SafeLoadPlanner(source),
                 process_group=group, no_dist=group is None)
    except (Exception, dcp.CheckpointException) as e:  # DCP's is a BaseException
        reraise_own(e)
        raise


def _verify_agreed(folder: Storage, manifest: Manifest, rank: int, group: Any) -> None:
    """Every file's size and checksum, streamed (bounded memory), the files shared out over
    the ranks; every rank raises if any rank found damage."""
    world = len(_dist.all_gather_object(None, group))
    mine = {e.path for i, e in enumerate(manifest.files) if i % world == rank}
    found = [p for ps in _dist.all_gather_object(verify_files(folder, manifest, paths=mine), group)
             for p in ps]
    if found:
        raise CorruptCheckpointError(folder.url, "every file as its manifest records",
                                     f"{len(found)} damaged", "; ".join(found))


def _apply_objects(folder: Storage, files: Mapping[str, Any], md: dcp_metadata.Metadata,
                   objects: dict[str, Any], state: TrainState, rank: int,
                   device: torch.device | None) -> Any:
    """Read this rank's objects (their bytes only) and push them into the live objects;
    returns the undo."""
    if objects:  # this rank's own objects: no collective
        _load(objects, CheckpointReader(folder, files=files, verify=False), folder.url, None)
    if device is not None:
        for key in objects:
            if key in ("scheduler", "extra") or key.endswith("/dataloader"):  # RNG states stay on CPU
                objects[key] = _to_device(objects[key], device)
    where = {index.fqn: folder.url_of(info.relative_path) for index, info in md.storage_data.items()}
    return state.apply_objects(objects, rank, where=lambda key: where.get(key, folder.url))


def _agreed(act: Any, rank: int, group: Any, source: str) -> Any:
    """Run ``act`` on every rank; if it raised on any, undo it where it succeeded and raise on
    every rank (so none goes on to the collective tensor load alone)."""
    result, error = None, None
    try:
        result = act()
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has heard
        error = e
    said = [m for m in _dist.all_gather_object(
        None if error is None else f"rank {rank}: {type(error).__name__}: {error}", group) if m]
    if error is not None:
        raise error
    if said:
        if result is not None:
            result()
        raise CorruptCheckpointError(source, "objects every rank can restore", "; ".join(said))
    return result


def _view(state: TrainState, select: Selection) -> TrainState:
    """``state`` with only the selected optimizers: DCP's state_dict API gives an optimizer
    without state a first (zero) step to describe it, which must not happen to one left out."""
    view = copy.copy(state)
    view.optimizers = {n: o for n, o in state.optimizers.items() if select.wants("optimizer", n)}
    return view


def _missing_objects(state: TrainState, target: Mapping[str, Any], rank: int,
                     select: Selection) -> list[str]:
    """Objects of the live state (scheduler, extra, RNG) that the checkpoint does not have."""
    return [k for k in state.objects_keys(rank, select.parts)
            if k not in target and k.replace(f"rank_{rank}/", "rank_0/") not in target
            and not (k.endswith("/dataloader") and state._resharded)]  # warned in load_targets


def _drop_missing(target: dict[str, Any], md: dcp_metadata.Metadata) -> list[str]:
    """With strict=False, keys the checkpoint lacks are left as they are; returns them.

    A model keeps the keys the checkpoint has; an optimizer is all or nothing (its state is
    indexed by parameter), so one the checkpoint lacks any key of is left untouched whole.
    """
    saved = md.state_dict_metadata
    dropped: list[str] = []
    for top, sub in list(target.items()):
        if not isinstance(sub, dict) or not top.startswith(("model/", "optim/")):
            continue
        if top not in {_top(k) for k in saved}:
            del target[top]
            dropped.append(top)
            continue
        flat, _ = flatten_state_dict({top: sub})
        gone = [k for k, v in flat.items() if isinstance(v, torch.Tensor) and k not in saved]
        if gone and top.startswith("optim/"):
            del target[top]
            dropped.append(top)
        elif gone:
            for k in gone:
                del sub[k[len(top) + 1:]]
            dropped += gone
            log.warning("%s: keys missing from the checkpoint were left as they are: %s", top, gone[:10])
    return dropped


# -- fine-tuning starts: another run's checkpoint, or plain weights ----------------------------

def find_checkpoint(source: Storage) -> tuple[Storage, Manifest]:
    """The checkpoint ``source`` points at: a checkpoint folder (with a manifest), a plain DCP
    folder (step 0, unchecked), or a run's root (its newest committed checkpoint)."""
    if source.exists(MANIFEST_NAME):
        return source, read_folder_manifest(source)
    if source.exists(METADATA_NAME):
        log.warning("%s has no %s: reading it as a plain DCP checkpoint (files not checksummed)",
                    source.url, MANIFEST_NAME)
        return source, Manifest(step=0)
    committed = list_committed(source)
    if not committed:
        raise CheckpointNotFoundError("to start from", source.url, ())
    newest = committed[-1]
    return source.child(step_dir_name(newest.step)), newest


def load_weights(state: TrainState, tensors: Mapping[str, torch.Tensor], *, source: str,
                 select: Selection | None = None, strict: bool = True,
                 step: int = 0) -> RestoreReport:
    """Load plain model weights (a release's) into the models of ``state`` that ``select`` keeps.

    Keys are a model's own (``"0.weight"``) when ``state`` has one model, or
    ``"<name>.<key>"`` for several (the layout ``release()`` writes).
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    select = select or select_parts()
    select.check(state)
    report = RestoreReport(step=step, source=source)
    names = [n for n in state.models if select.wants("model", n)]
    for name in names:
        prefix = "" if len(state.models) == 1 else f"{name}."
        given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        live = get_model_state_dict(state.models[name])
        missing = sorted(set(live) - set(given))
        unexpected = sorted(set(given) - set(live))
        shapes = {k: (tuple(given[k].shape), tuple(live[k].shape)) for k in set(live) & set(given)
                  if tuple(given[k].shape) != tuple(live[k].shape)}
        if shapes or (strict and (missing or unexpected)):
            raise StateMismatchError(
                f"{source} does not match model {name!r}: shapes {shapes}, missing {missing[:10]}, "
                f"unexpected {unexpected[:10]}", missing=missing, unexpected=unexpected, shapes=shapes)
        set_model_state_dict(state.models[name], {k: v for k, v in given.items() if k in live},
                             options=StateDictOptions(full_state_dict=True, strict=False))
        report.loaded.append(f"model/{name}")
        report.missing += [f"model/{name}.{k}" for k in missing]
        report.unexpected += [f"model/{name}.{k}" for k in unexpected]
    if report.missing or report.unexpected:
        log.warning("%s: weights loaded with missing keys %s and unexpected keys %s", source,
                    report.missing[:10], report.unexpected[:10])
    return report
