"""Foreign DCP checkpoints: folders that plain ``dcp.save`` or torchtitan wrote.

A DCP folder without ``manifest.json`` whose keys are not asyncckpt's own
(``model/<name>``, ``optim/<name>``, see ``state.py``) is read through a key mapping,
``map_keys(saved, live, groups)``: a pure function from the checkpoint metadata's keys
and the live TrainState's (flattened) keys to ``{live key: checkpoint key}``.  It
maps onto a TrainState with one model, at most one optimizer and at most one scheduler:

=====================  ==============================  ===================================
live key               checkpoint key                  layouts
=====================  ==============================  ===================================
model ``<fqn>``        ``model.<fqn>``                 ``dcp.save({"model": sd, ...})``,
                                                       ``get_state_dict`` (``"state_dict"``)
model ``<fqn>``        ``<fqn>`` (top level)           torchtitan's ModelWrapper (``"flat"``)
optim ``state.<fqn>.<k>``  ``optimizer.state.<fqn>.<k>``   ``get_optimizer_state_dict``, torchtitan
optim ``state.<fqn>.<k>``  ``optimizer.state.<i>.<k>``     ``optimizer.state_dict()`` (``i``: the
                                                       parameter's position in the live
                                                       optimizer's groups)
optim ``param_groups.<g>.<k>``  ``optimizer.param_groups.<g>.<k>``  both of the above
optim ``param_groups.<g>.<k>``  ``optimizer.param_groups.<fqn>.<k>``  torchtitan (``fqn``: the
                                                       group's first parameter)
scheduler              ``lr_scheduler.*`` or           ``LambdaLR.state_dict()``; torchtitan's
                       ``scheduler.*``                 ``{"last_epoch": n}``
step                   ``train_state.step``, else      torchtitan; else the step is 0
                       the folder name ``step-<n>``
=====================  ==============================  ===================================

The optimizer's ``params`` lists are never read (the live ones are kept).  Everything else
the checkpoint has (torchtitan's ``dataloader``, whose loader state is a plain pickle that
asyncckpt never unpickles; ``train_state.ntokens_seen``) is not restored and is named in
``RestoreReport.refused``.  A mapping that would load nothing is a ``StateMismatchError``
naming what the checkpoint has and what the live state expected.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata

from ._torch_compat import flatten_state_dict, set_element
from .dcp_io import METADATA_NAME, CheckpointReader
from .errors import CheckpointNotFoundError, StateMismatchError
from .manifest import MANIFEST_NAME, Manifest
from .restore import RestoreReport, Selection, _load, _view, find_checkpoint, load_into, select_parts
from .state import TrainState
from .storage import Storage

log = logging.getLogger(__name__)

OPTIMIZER_PREFIX = "optimizer"
SCHEDULER_PREFIXES = ("lr_scheduler", "scheduler")
STEP_KEY = "train_state.step"
RESERVED = ("optimizer", "lr_scheduler", "scheduler", "dataloader", "train_state")
"""Top-level entries that are not model weights in a layout whose weights are at the top."""
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass(frozen=True)
class KeyMapping:
    """What ``map_keys`` found: how a foreign checkpoint's keys feed the live state."""

    layout: str
    """``"state_dict"`` (weights under ``model.``) or ``"flat"`` (weights at the top level)."""
    keys: dict[str, str] = field(default_factory=dict)
    """Live flat key (``model/<name>.<fqn>``, ``optim/<name>.state...``) -> checkpoint key."""
    scheduler: str | None = None
    """The checkpoint's scheduler entry (``lr_scheduler``), if the live state has one to feed."""
    missing: list[str] = field(default_factory=list)
    """Live tensor keys the checkpoint lacks."""
    unmapped: list[str] = field(default_factory=list)
    """Checkpoint keys nothing in the live state takes."""


def is_own_layout(saved: Collection[str]) -> bool:
    """Whether the checkpoint keys are asyncckpt's own (``model/<name>``...)."""
    return any(k.startswith(("model/", "optim/")) for k in saved)


def weight_keys(saved: Collection[str]) -> tuple[str, dict[str, str]]:
    """``(layout, {fqn: checkpoint key})`` for the model weights of a foreign checkpoint,
    without a live model: under ``model.`` if any key is, else every top-level key that is
    not one of ``RESERVED`` (torchtitan's flattened model)."""
    under = {k[len("model."):]: k for k in saved if k.startswith("model.")}
    if under:
        return "state_dict", under
    return "flat", {k: k for k in saved if k.split(".", 1)[0] not in RESERVED}


def map_keys(saved: Collection[str], live: Sequence[str],
             groups: Mapping[str, Sequence[Sequence[str]]] | None = None) -> KeyMapping:
    """The mapping of a foreign checkpoint (keys ``saved``) onto the live flat keys ``live``.

    ``groups``: for each live optimizer, the FQNs of each of its param groups, in order
    (the numbering of ``optimizer.state_dict()``).  Pure: keys in, mapping out.
    """
    saved = set(saved)
    models = sorted({k.split(".", 1)[0] for k in live if k.startswith("model/")})
    optims = sorted({k.split(".", 1)[0] for k in live if k.startswith("optim/")})
    if len(models) > 1 or len(optims) > 1:
        raise StateMismatchError(
            f"a foreign checkpoint maps onto one model and one optimizer; the live state has "
            f"models {models} and optimizers {optims}")
    keys: dict[str, str] = {}
    layout = "flat"
    if models:
        layout, model_keys = _map_model(saved, models[0], [k for k in live if k.startswith(models[0] + ".")])
        keys.update(model_keys)
    if optims:
        fqns = [f for g in (groups or {}).get(optims[0][len("optim/"):], ()) for f in g]
        opt_groups = (groups or {}).get(optims[0][len("optim/"):], ())
        keys.update(_map_optimizer(saved, optims[0], [k for k in live if k.startswith(optims[0] + ".")],
                                   fqns, opt_groups))
    scheduler = next((p for p in SCHEDULER_PREFIXES if any(_under(k, p) for k in saved)), None)
    taken = set(keys.values()) | {k for k in saved if scheduler and _under(k, scheduler)}
    taken |= {k for k in saved if k == STEP_KEY or (_under(k, OPTIMIZER_PREFIX) and k.endswith(".params"))}
    missing = sorted(k for k in live if k not in keys and not _is_meta(k))
    return KeyMapping(layout=layout, keys=keys, scheduler=scheduler, missing=missing,
                      unmapped=sorted(saved - taken))


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _is_meta(live_key: str) -> bool:
    """Live optimizer keys that are not state: ``param_groups.<g>.params`` (kept live)."""
    return live_key.startswith("optim/") and live_key.endswith(".params")


def _map_model(saved: set[str], top: str, live: Sequence[str]) -> tuple[str, dict[str, str]]:
    fqns = {k[len(top) + 1:]: k for k in live}
    under = {key: f"model.{fqn}" for fqn, key in fqns.items() if f"model.{fqn}" in saved}
    flat = {key: fqn for fqn, key in fqns.items()
            if fqn in saved and fqn.split(".", 1)[0] not in RESERVED}
    return ("state_dict", under) if len(under) >= len(flat) and under else ("flat", flat)


def _map_optimizer(saved: set[str], top: str, live: Sequence[str], fqns: Sequence[str],
                   groups: Sequence[Sequence[str]]) -> dict[str, str]:
    index = {fqn: str(i) for i, fqn in enumerate(fqns)}
    out = {}
    for key in live:
        rest = key[len(top) + 1:]
        if rest.startswith("state."):
            fqn, _, name = rest[len("state."):].rpartition(".")
            options = [f"state.{fqn}.{name}"] + ([f"state.{index[fqn]}.{name}"] if fqn in index else [])
        elif rest.startswith("param_groups.") and not rest.endswith(".params"):
            g, _, name = rest[len("param_groups."):].partition(".")
            first = groups[int(g)][0] if g.isdigit() and int(g) < len(groups) and groups[int(g)] else None
            options = [rest] + ([f"param_groups.{first}.{name}"] if first else [])
        else:
            continue
        found = next((f"{OPTIMIZER_PREFIX}.{o}" for o in options if f"{OPTIMIZER_PREFIX}.{o}" in saved), None)
        if found is not None:
            out[key] = found
    return out


# -- finding and loading -----------------------------------------------------------------

def find_foreign(source: Storage) -> Storage | None:
    """The DCP folder ``source`` names: itself (it has ``.metadata``), or a torchtitan root's
    newest ``step-<n>`` folder with one (not zero-padded, no manifest); None if neither."""
    if source.exists(METADATA_NAME):
        return source
    names = [n for n in source.list_dirs() if _STEP_DIR.fullmatch(n)]
    if any(n.startswith("step-0") and n != "step-0" for n in names) or \
            any(source.exists(f"{n}/{MANIFEST_NAME}") for n in names):
        return None  # asyncckpt's own root (step-0000000010/, manifests): never read as foreign
    steps = sorted((int(n[len("step-"):]), n) for n in names if source.exists(f"{n}/{METADATA_NAME}"))
    return source.child(steps[-1][1]) if steps else None


def find_source(source: Storage) -> tuple[Storage, Manifest | None]:
    """What ``initial_from`` names: ``restore.find_checkpoint``'s answer (a manifest), or a DCP
    folder without one, or a torchtitan root's newest ``step-<n>`` (``None``: no manifest)."""
    try:
        folder, m = find_checkpoint(source)
    except CheckpointNotFoundError:
        found = find_foreign(source)
        if found is None:
            raise
        return found, None
    return folder, m if folder.exists(MANIFEST_NAME) else None


def load_plain(folder: Storage, state: TrainState, *, rank: int, group: Any, strict: bool = True,
               verify: bool = True, select: Selection | None = None,
               map_location: Any = None) -> RestoreReport:
    """A DCP folder without a manifest: asyncckpt's own keys through ``load_into`` (step 0),
    any other layout through ``map_keys`` (``load_foreign``)."""
    md = CheckpointReader(folder, verify=False).read_metadata()
    if is_own_layout(md.state_dict_metadata):
        return load_into(folder, Manifest(step=0), state, rank=rank, group=group, strict=strict,
                         verify=verify, select=select, map_location=map_location)
    return load_foreign(folder, md, state, rank=rank, group=group, strict=strict, select=select)


def live_layout(state: TrainState, parts: Sequence[str]) -> tuple[dict[str, Any], Any, dict[str, list[list[str]]]]:
    """The live state's flat tensors (no copy), their unflatten mapping, and each optimizer's
    param groups as FQN lists."""
    nested = state.tensors(parts)
    flat, mapping = flatten_state_dict(nested)
    groups = {}
    for key, sd in nested.items():
        if key.startswith("optim/"):
            groups[key[len("optim/"):]] = [list(g.get("params", ())) for g in sd.get("param_groups", ())]
    return flat, mapping, groups


def load_foreign(folder: Storage, md: dcp_metadata.Metadata, state: TrainState, *, rank: int,
                 group: Any, strict: bool = True, select: Selection | None = None) -> RestoreReport:
    """Read the foreign DCP checkpoint in ``folder`` (metadata ``md``) into ``state`` through
    ``map_keys``; the scheduler first (undone if the tensors then fail), then the tensors.
    With ``strict=False`` an optimizer whose state the checkpoint lacks in part is left whole."""
    select = select or select_parts()
    select.check(state)
    state = _view(state, select)
    saved = md.state_dict_metadata
    tensor_parts = [p for p in ("model", "optimizer") if p in select.parts]
    flat, unflatten, groups = live_layout(state, tensor_parts)
    mapping = map_keys(saved, list(flat), groups)
    partial_optim = [k for k in mapping.missing if k.startswith("optim/")]
    if partial_optim and not strict:
        flat, unflatten, groups = live_layout(state, [p for p in tensor_parts if p != "optimizer"])
        mapping = map_keys(saved, list(flat), groups)
        mapping.missing.extend(sorted({k.split(".", 1)[0] for k in partial_optim}))
    _check(mapping, flat, saved, folder.url, strict)
    wants_sched = "scheduler" in select.parts and len(state.schedulers) == 1
    report = RestoreReport(step=_step(folder, saved), source=folder.url,
                           missing=list(mapping.missing), unexpected=list(mapping.unmapped))
    report.missing += [k for k in state.objects_keys(rank, select.parts)
                       if not (k == "scheduler" and wants_sched and mapping.scheduler)]
    if not any(isinstance(flat[k], torch.Tensor) for k in mapping.keys) and \
            not (wants_sched and mapping.scheduler):
        raise StateMismatchError(_nothing(folder.url, saved, flat), missing=sorted(flat),
                                 unexpected=sorted(saved))
    loaded_sched = _load_scheduler(folder, saved, mapping.scheduler, state) if wants_sched else None
    try:
        target = {ckpt: flat[live] for live, ckpt in mapping.keys.items()}
        _load(target, CheckpointReader(folder, verify=False), folder.url, group)
        for live, ckpt in mapping.keys.items():
            flat[live] = target[ckpt]
        nested: dict[str, Any] = {}
        for live, value in flat.items():
            set_element(nested, unflatten[live], value)
        state.apply_tensors(nested, strict=strict)
    except BaseException:
        if loaded_sched is not None:
            loaded_sched.undo()
        raise
    if loaded_sched is not None:
        loaded_sched.finish()
    tops = sorted({k.split(".", 1)[0] for k in mapping.keys})
    report.loaded = tops + (["scheduler"] if loaded_sched is not None else [])
    report.refused = _refused(saved, mapping, state, select)
    log.warning("%s: read as a foreign DCP checkpoint (layout %s, step=%d): loaded %s; not "
                "restored: %s", folder.url, mapping.layout, report.step, report.loaded,
                report.refused or "nothing")
    return report


def _check(mapping: KeyMapping, flat: Mapping[str, Any], saved: Mapping[str, Any], source: str,
           strict: bool) -> None:
    shapes = {}
    for live, ckpt in mapping.keys.items():
        meta, value = saved[ckpt], flat[live]
        if isinstance(value, torch.Tensor) and isinstance(meta, dcp_metadata.TensorStorageMetadata) \
                and tuple(meta.size) != tuple(value.shape):
            shapes[live] = (tuple(meta.size), tuple(value.shape))
    tensors_missing = [k for k in mapping.missing if isinstance(flat.get(k), torch.Tensor)]
    extra = [k for k in mapping.unmapped if k.startswith(f"{OPTIMIZER_PREFIX}.state.")
             or (k.startswith("model.") if mapping.layout == "state_dict"
                 else k.split(".", 1)[0] not in RESERVED)]
    if shapes or (strict and mapping.keys and (tensors_missing or extra)):
        raise StateMismatchError(
            f"{source} (a foreign DCP checkpoint, layout {mapping.layout}) does not match the live "
            f"state: shapes {shapes}, missing from the checkpoint {tensors_missing[:10]}, in the "
            f"checkpoint but not in the live state {extra[:10]}",
            missing=tensors_missing, unexpected=extra, shapes=shapes)


def _nothing(source: str, saved: Collection[str], flat: Collection[str]) -> str:
    tops = sorted({k.split(".", 1)[0] for k in saved})
    want = list(flat)
    return (f"{source} is a DCP checkpoint in no layout asyncckpt can map onto this TrainState: "
            f"it has top-level entries {tops[:20]}{' ...' if len(tops) > 20 else ''}; the live "
            f"state expected keys such as {want[:5]} (model weights under 'model.<fqn>' or "
            f"at the top level, optimizer state under 'optimizer.state')")


def _step(folder: Storage, saved: Mapping[str, Any]) -> int:
    if STEP_KEY in saved:
        target: dict[str, Any] = {STEP_KEY: None}
        _load(target, CheckpointReader(folder, verify=False), folder.url, None)
        value = target[STEP_KEY]
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = int(value.item())
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    m = _STEP_DIR.fullmatch(folder.url.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else 0


def _load_scheduler(folder: Storage, saved: Mapping[str, Any], prefix: str | None,
                    state: TrainState) -> "_SchedulerLoad | None":
    """Load the checkpoint's scheduler entry into the one live scheduler (None when the
    checkpoint has none)."""
    if prefix is None:
        return None
    keys = [k for k in saved if _under(k, prefix)]
    target: dict[str, Any] = {k: None for k in keys}
    _load(target, CheckpointReader(folder, verify=False), folder.url, None)
    sd: dict[str, Any] = {}
    for k in keys:
        set_element(sd, tuple(k[len(prefix) + 1:].split(".")), target[k])
    name, live = next(iter(state.schedulers.items()))
    before = live.state_dict()
    given = set(sd)
    sd = {**copy.deepcopy(before), **sd}  # torchtitan saves last_epoch alone: the rest stays
    if "last_epoch" in given and "_step_count" not in given:
        sd["_step_count"] = sd["last_epoch"] + 1
    live.load_state_dict(sd)
    log.info("scheduler %r restored from %s entry %r", name, folder.url, prefix)
    return _SchedulerLoad(live, before, last_lr_given="_last_lr" in given)


@dataclass
class _SchedulerLoad:
    """A scheduler loaded from a foreign checkpoint: ``undo()`` puts its state back;
    ``finish()`` (after the optimizer is loaded) takes its last lr from the optimizer when
    the checkpoint had none (torchtitan's)."""

    live: Any
    before: dict[str, Any]
    last_lr_given: bool

    def undo(self) -> None:
        self.live.load_state_dict(self.before)

    def finish(self) -> None:
        if not self.last_lr_given and hasattr(self.live, "optimizer"):
            self.live._last_lr = [g["lr"] for g in self.live.optimizer.param_groups]


def _refused(saved: Collection[str], mapping: KeyMapping, state: TrainState,
             select: Selection) -> list[str]:
    out = []
    tops = sorted({k.split(".", 1)[0] for k in mapping.unmapped})
    for top in tops:
        why = ("a plain pickle of the loader state, never unpickled" if top == "dataloader"
               else "nothing in the TrainState takes it")
        out.append(f"{top} ({why})")
    if "scheduler" in select.parts and state.schedulers and mapping.scheduler is None:
        out.append("scheduler (the checkpoint has no lr_scheduler or scheduler entry)")
    if "scheduler" in select.parts and len(state.schedulers) > 1:
        out.append("scheduler (a foreign checkpoint feeds one live scheduler; this state has several)")
    return out
