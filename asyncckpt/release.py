"""Releases: versioned, weights-only exports of a model, with a model card.

A release is a folder ``<root>/releases/v<version>/`` holding

- ``model.safetensors`` (or ``model.pt`` with ``format="torch"``): the model's
  tensors only (no optimizer), full (gathered from every rank), in one file;
- ``config.json``: the user's model config (``{}`` when none is given);
- ``model_card.json``: what the release is (see ``write_release``), written
  LAST, like a checkpoint's manifest.

A release exists only once its ``model_card.json`` exists: the weights and
config are written and made durable first (fsync on disks, completed upload
on object stores), then the card is published with a create-only put.  A
folder without a card is an unfinished release: ``list_releases`` ignores it,
and ``remove_unfinished_releases`` (run by the manager on start) deletes it.
An existing version is never overwritten (``CheckpointExistsError``).

Versions are semantic versions (``MAJOR.MINOR.PATCH``, optional
``-prerelease`` and ``+build``), listed in SemVer precedence.

Listing is torch-free, so ``asyncckpt list``/``prune`` start fast; torch (and
the DCP reader) is imported only by the functions that read or write tensors.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import codec as _codec
from .errors import (CheckpointExistsError, ConfigError, CorruptCheckpointError,
                     StateMismatchError, StorageError)
from .manifest import MAX_JSON_BYTES, FileEntry, Manifest, is_plain_name, parse_json
from .storage import Storage, claim_folder, remove_unfinished

if TYPE_CHECKING:
    import torch

    from .state import TrainState

log = logging.getLogger(__name__)

RELEASES_DIR = "releases"
CARD_NAME = "model_card.json"
"""Written last: its presence makes a release exist."""
CONFIG_NAME = "config.json"
WEIGHT_FILES = {"safetensors": "model.safetensors", "torch": "model.pt"}
"""The weights file of each ``format``."""
CARD_FORMAT_VERSION = 1

_IDENT = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
SEMVER = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
                    rf"(?:-({_IDENT}(?:\.{_IDENT})*))?(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?")
"""Semantic Versioning 2.0.0 (ASCII only; matched with ``fullmatch``)."""

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "f16": "float16",
           "half": "float16", "float16": "float16", "fp32": "float32", "f32": "float32",
           "float": "float32", "float32": "float32", "fp64": "float64", "double": "float64",
           "float64": "float64", "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2"}
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
              "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16",
              "uint32": "U32", "uint64": "U64", "bool": "BOOL"}


def check_version(version: object) -> str:
    """``version`` if it is a semantic version such as ``"1.0.0"``; else ConfigError quoting it."""
    if not isinstance(version, str) or not SEMVER.fullmatch(version):
        raise ConfigError.field("version", version, "a semantic version MAJOR.MINOR.PATCH such as "
                                "'1.0.0' or '2.1.0-rc.1' (no leading 'v')")
    return version


def release_dir(version: str) -> str:
    """The folder of a release under the root: ``releases/v1.0.0``."""
    return f"{RELEASES_DIR}/v{check_version(version)}"


def version_key(version: str) -> tuple[Any, ...]:
    """Sort key giving SemVer precedence (a pre-release sorts before its release)."""
    m = SEMVER.fullmatch(version)
    if m is None:
        raise ConfigError.field("version", version, "a semantic version")
    pre = m.group(4)
    idents = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")) if pre else ()
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), pre is None, idents, m.group(5) or "")


def dtype_name(dtype: object) -> str | None:
    """The torch name (``"bfloat16"``) of a floating dtype given as ``torch.bfloat16`` or ``"bf16"``."""
    if dtype is None:
        return None
    text = str(dtype).removeprefix("torch.") if type(dtype).__module__ == "torch" else dtype
    if not isinstance(text, str) or text.lower() not in _DTYPES:
        raise ConfigError.field("dtype", dtype, "None or a floating dtype: torch.bfloat16, "
                                "'bf16', 'fp16', 'fp32', 'fp64', 'float8_e4m3fn', 'float8_e5m2'")
    return _DTYPES[text.lower()]


def _json_object(name: str, value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError.field(name, value, "a dict with string keys")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} is not valid: expected plain JSON values (str, numbers, bools, "
                          f"None, lists, dicts): {e}") from e


@dataclass(frozen=True, kw_only=True)
class ReleaseOptions:
    """What ``CheckpointManager.release`` writes."""

    version: str
    """Semantic version, e.g. ``"1.0.0"``; the folder is ``releases/v1.0.0``."""
    format: str = "safetensors"
    """``"safetensors"`` (``model.safetensors``) or ``"torch"`` (``model.pt``: a dict of
    tensors that ``torch.load(..., weights_only=True)`` reads)."""
    dtype: str | None = None
    """Cast floating tensors to this dtype (``torch.bfloat16``, ``"bf16"``, ``"fp16"``...; kept
    as the torch name); None keeps every tensor's dtype.  Integer tensors are never cast."""
    model: str | None = None
    """Which model of the ``TrainState`` (by name) to export; None: the only one, or every
    model with its keys prefixed ``<name>.``."""
    model_card: Mapping[str, Any] = field(default_factory=dict)
    """Your card (description, license, datasets...), stored under ``"card"`` in model_card.json."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """The model's config, written as config.json."""

    def __post_init__(self) -> None:
        check_version(self.version)
        if self.format not in WEIGHT_FILES:
            raise ConfigError.field("format", self.format, f"one of {sorted(WEIGHT_FILES)}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ConfigError.field("model", self.model, "a model name of the TrainState, or None")
        object.__setattr__(self, "model_card", _json_object("model_card", self.model_card or {}))
        object.__setattr__(self, "config", _json_object("config", self.config or {}))


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Where released weights come from: a committed checkpoint, or a live model."""

    step: int | None = None
    epoch: int | None = None
    checkpoint_time: str | None = None
    """UTC time of the source checkpoint's save (None for a live model)."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    git_commit: str | None = None
    param_count: int = 0
    branch: str | None = None
    """The lineage branch of the source checkpoint (or of the live run); see ``branches.py``."""

    @classmethod
    def of(cls, m: Manifest) -> "Provenance":
        return cls(step=m.step, epoch=m.epoch, checkpoint_time=m.time, metrics=dict(m.metrics),
                   git_commit=m.git_commit, param_count=m.param_count, branch=m.branch)


@dataclass(frozen=True, kw_only=True)
class ReleaseInfo:
    """A committed release, as ``CheckpointManager.releases()`` reports it."""

    version: str
    step: int | None
    time: str
    """UTC time the release was written."""
    path: str
    """URL of the release folder (credentials never included)."""
    bytes: int
    format: str
    dtype: str | None
    metrics: Mapping[str, float]

    @classmethod
    def from_card(cls, card: Mapping[str, Any], path: str) -> "ReleaseInfo":
        return cls(version=check_version(card["version"]), step=card.get("step"),
                   time=str(card["time"]), path=path,
                   bytes=sum(int(f["size"]) for f in card["files"]), format=str(card["format"]),
                   dtype=card.get("dtype"), metrics=dict(card.get("metrics") or {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- listing (torch-free) --------------------------------------------------------------

def read_card(storage: Storage, version: str) -> dict[str, Any]:
    """The model card of one release; CorruptCheckpointError if unreadable."""
    return _read_card(storage.child(release_dir(version)), version)


def _read_card(folder: Storage, version: str | None) -> dict[str, Any]:
    """The card in a release ``folder``, checked (``check_card``)."""
    source = folder.url_of(CARD_NAME)
    return check_card(parse_json(folder.read_bytes(CARD_NAME, max_bytes=MAX_JSON_BYTES), source),
                      source, version)


def check_card(card: Any, source: str, version: str | None = None) -> dict[str, Any]:
    """``card`` if it is a model card (of ``version``, when given) whose every file is a plain
    name inside the release folder with a size and checksum, and whose ``weights`` is one of
    them; else CorruptCheckpointError naming ``source`` and the field."""
    def bad(expected: str, found: object) -> CorruptCheckpointError:
        return CorruptCheckpointError(source, expected, repr(found)[:80], "damaged model card")

    if not isinstance(card, dict):
        raise bad("a JSON object", card)
    if version is not None and card.get("version") != version:
        raise bad(f"version {version!r}", card.get("version"))
    files = card.get("files")
    if not isinstance(files, list) or not all(_is_card_file(f) for f in files):
        raise bad("files: a list of {path: a plain file name, size, checksum}", files)
    if card.get("format") not in WEIGHT_FILES or card.get("weights") != WEIGHT_FILES[card["format"]]:
        raise bad(f"format and weights one of {WEIGHT_FILES}", (card.get("format"), card.get("weights")))
    if card["weights"] not in {f["path"] for f in files}:
        raise bad(f"{card['weights']} among the files", [f["path"] for f in files])
    return card


def _is_card_file(f: Any) -> bool:
    return (isinstance(f, dict) and is_plain_name(f.get("path")) and isinstance(f.get("size"), int)
            and not isinstance(f["size"], bool) and f["size"] >= 0
            and isinstance(f.get("checksum"), (str, type(None))))


def _release_folders(storage: Storage) -> list[tuple[str, str]]:
    """``(folder name, version)`` of every ``v<semver>`` folder under ``releases/``."""
    names = storage.list_dirs(RELEASES_DIR)
    return [(n, n[1:]) for n in names if n.startswith("v") and SEMVER.fullmatch(n[1:])]


def list_releases(storage: Storage) -> list[ReleaseInfo]:
    """Committed releases under the root, in version order; unreadable cards are skipped with
    a warning, folders without a card silently."""
    out = []
    for name, version in _release_folders(storage):
        if CARD_NAME not in storage.list_files(f"{RELEASES_DIR}/{name}"):
            continue
        try:
            card = read_card(storage, version)
            out.append(ReleaseInfo.from_card(card, storage.url_of(f"{RELEASES_DIR}/{name}")))
        except (CorruptCheckpointError, StorageError, ConfigError, KeyError, TypeError,
                ValueError) as e:
            log.warning("skipping release %s: %s", storage.url_of(f"{RELEASES_DIR}/{name}"), e)
    return sorted(out, key=lambda r: version_key(r.version))


def remove_unfinished_releases(storage: Storage) -> list[str]:
    """Delete release folders without a model card (a release cut short); returns their versions.

    Call only while no release is being written under this root.
    """
    gone = []
    for name, version in _release_folders(storage):
        if remove_unfinished(storage, f"{RELEASES_DIR}/{name}", commit_file=CARD_NAME, what="a release"):
            gone.append(version)
    return gone


def with_release_tags(storage: Storage, manifests: Sequence[Manifest]) -> list[Manifest]:
    """``manifests`` with a ``release:<version>`` tag added to each step a release was made from,
    so that ``Retention(keep_tags=("release:*",))`` keeps it and ``list()`` shows it."""
    tags: dict[int, list[str]] = {}
    for r in list_releases(storage):
        if r.step is not None:
            tags.setdefault(r.step, []).append(f"release:{r.version}")
    return [replace(m, tags=tuple(dict.fromkeys((*m.tags, *tags[m.step])))) if m.step in tags else m
            for m in manifests]


# -- reading weights (torch) -----------------------------------------------------------------

def _model_names(keys: Iterable[str]) -> list[str]:
    return sorted({k.split(".", 1)[0][len("model/"):] for k in keys
                   if k.startswith("model/") and "." in k})


def _pick(names: Sequence[str], model: str | None, source: str) -> list[str]:
    if not names:
        raise StateMismatchError(f"{source} holds no model weights", missing=["model"])
    if model is None:
        return list(names)
    if model not in names:
        raise ConfigError.field("model", model, f"one of the models in {source}: {list(names)}")
    return [model]


def _out_key(name: str, fqn: str, chosen: Sequence[str]) -> str:
    return fqn if len(chosen) == 1 else f"{name}.{fqn}"


def checkpoint_weights(folder: Storage, manifest: Manifest, *, model: str | None = None,
                       verify: bool = True) -> dict[str, torch.Tensor]:
    """The model tensors of a committed checkpoint, full, on CPU; no live model needed.

    Reads through ``CheckpointReader`` (checksums verified, nothing unpickled) into plain
    tensors shaped from the checkpoint's DCP metadata, so a sharded (FSDP) checkpoint comes
    back whole.  Keys are the model's own (``"0.weight"``), or ``"<name>.<key>"`` when
    several models are exported.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .dcp_io import CheckpointReader, reraise_own
    from .planner import SafeLoadPlanner

    reader = CheckpointReader(folder, files={f.path: f for f in manifest.files}, verify=verify)
    saved = reader.read_metadata().state_dict_metadata
    chosen = _pick(_model_names(saved), model, folder.url)
    target: dict[str, torch.Tensor] = {}
    for key, meta in saved.items():
        name, _, fqn = key.removeprefix("model/").partition(".")
        if not key.startswith("model/") or name not in chosen or not fqn:
            continue
        if not isinstance(meta, TensorStorageMetadata):
            log.warning("%s: %s is not a tensor; left out of the weights", folder.url, key)
            continue
        target[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled...": intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, storage_reader=reader, planner=SafeLoadPlanner(folder.url),
                     no_dist=True)
    except (Exception, dcp.CheckpointException) as e:  # DCP's is a BaseException
        reraise_own(e)
        raise
    out = {}
    for key, t in target.items():
        name, _, fqn = key.removeprefix("model/").partition(".")
        out[_out_key(name, fqn, chosen)] = t
    return out


def plain_dcp_weights(folder: Storage) -> dict[str, torch.Tensor]:
    """Every tensor of a plain DCP checkpoint (no manifest, so no checksums), full, on CPU,
    under its DCP key; read through ``CheckpointReader`` (nothing unpickled)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .dcp_io import CheckpointReader, reraise_own
    from .planner import SafeLoadPlanner

    reader = CheckpointReader(folder, verify=False)
    target = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
              for key, meta in reader.read_metadata().state_dict_metadata.items()
              if isinstance(meta, TensorStorageMetadata)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, storage_reader=reader, planner=SafeLoadPlanner(folder.url), no_dist=True)
    except (Exception, dcp.CheckpointException) as e:  # DCP's is a BaseException
        reraise_own(e)
        raise
    return target


def state_weights(state: TrainState, *, model: str | None = None) -> dict[str, torch.Tensor]:
    """The full (gathered) model tensors of a live ``TrainState``, on CPU.

    Collective with FSDP: every rank must call it; rank 0 gets the tensors, others may get
    an empty dict.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    chosen = _pick(sorted(state.models), model, "the TrainState")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {}
    for name in chosen:
        for fqn, t in get_model_state_dict(state.models[name], options=options).items():
            out[_out_key(name, fqn, chosen)] = t
    return out


def is_release(folder: Storage) -> bool:
    """Whether ``folder`` is a committed release (it has its model card)."""
    return folder.exists(CARD_NAME)


def release_weights(folder: Storage, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of the committed release in ``folder``, checked against its card; nothing is
    unpickled (safetensors, or ``torch.load(weights_only=True)`` for ``format="torch"``)."""
    import torch
    from safetensors.torch import load as load_safetensors

    card = _read_card(folder, None)
    name = card["weights"]
    entry = next(f for f in card["files"] if f["path"] == name)
    data = folder.read_bytes(name, max_bytes=entry["size"])
    if verify and (len(data) != entry["size"] or _codec.checksum_bytes(data) != entry["checksum"]):
        raise CorruptCheckpointError(folder.url_of(name), entry["checksum"],
                                     _codec.checksum_bytes(data), "checksum or size mismatch")
    if card.get("format") == "torch":
        import io

        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    return load_safetensors(data)


def prepare(tensors: Mapping[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies-or-views, floating ones cast to ``dtype``; sorted by key."""
    import torch

    target = getattr(torch, dtype) if dtype is not None else None
    out = {}
    for key in sorted(tensors):
        t = tensors[key].detach().cpu()
        if target is not None and t.is_floating_point():
            t = t.to(target)
        out[key] = t.contiguous()
    return out


# -- writing ----------------------------------------------------------------------------------

def safetensors_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding ``tensors`` in order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        code = _ST_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if code is None:
            raise ConfigError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot "
                              "store; use format='torch'")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensor data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_weights(storage: Storage, rel: str, tensors: Mapping[str, torch.Tensor], *,
                  format: str, metadata: Mapping[str, str] | None = None) -> FileEntry:
    """Write prepared tensors (see ``prepare``) as one durable file; returns its entry.

    safetensors is streamed tensor by tensor (no second copy of the model in memory).
    """
    import torch

    from .dcp_io import tensor_bytes

    if format == "safetensors" and sys.byteorder != "little":
        raise ConfigError("safetensors files are little-endian; this machine is big-endian")
    header = safetensors_header(tensors, metadata or {}) if format == "safetensors" else b""
    with storage.open_write(rel) as raw:
        out = _codec.ChecksumWriter(raw)
        if format == "safetensors":
            out.write(header)
            for t in tensors.values():
                out.write(tensor_bytes(t))
        else:
            torch.save(dict(tensors), out)
    return FileEntry(path=rel.rsplit("/", 1)[-1], size=out.nbytes, checksum=out.hexdigest())


def write_dcp(folder: Storage, tensors: Mapping[str, torch.Tensor]) -> list[FileEntry]:
    """Write prepared tensors as a plain, uncompressed DCP checkpoint in ``folder`` (shards and
    ``.metadata``, durable; no manifest) that ``torch.distributed.checkpoint.load`` reads into a
    state dict with the same keys; returns its files."""
    import torch.distributed.checkpoint as dcp

    from .dcp_io import CheckpointWriter, reraise_own

    writer = CheckpointWriter(folder, codec=None)
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled...": intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(dict(tensors), storage_writer=writer, no_dist=True)
    except (Exception, dcp.CheckpointException) as e:  # DCP's is a BaseException
        reraise_own(e)
        raise
    return sorted(writer.files, key=lambda f: f.path)


def write_release(storage: Storage, options: ReleaseOptions, tensors: Mapping[str, torch.Tensor], *,
                  source: Provenance, torch_version: str, now: str) -> ReleaseInfo:
    """Write a release (weights, config, then the card last); see the module docstring.

    ``tensors`` are the model's (from ``checkpoint_weights`` or ``state_weights``); they are
    cast to ``options.dtype`` here.  Raises CheckpointExistsError if the version exists.
    """
    folder_rel = release_dir(options.version)
    if storage.exists(f"{folder_rel}/{CARD_NAME}"):
        raise CheckpointExistsError(f"release {options.version} already exists at "
                                    f"{storage.url_of(folder_rel)}; releases are never overwritten")
    folder = storage.child(folder_rel)
    claim_folder(folder, commit_file=CARD_NAME, kind="release")
    ready = prepare(tensors, options.dtype)
    weights = write_weights(folder, WEIGHT_FILES[options.format], ready, format=options.format,
                            metadata={"format": "pt", "version": options.version})
    config = (json.dumps(options.config, indent=1, allow_nan=False) + "\n").encode()
    with folder.open_write(CONFIG_NAME) as f:
        f.write(config)
    folder.fsync_dir()
    files = [weights, FileEntry(path=CONFIG_NAME, size=len(config),
                                checksum=_codec.checksum_bytes(config))]
    card = _card(options, source, files, ready, torch_version=torch_version, now=now)
    folder.put_atomic(CARD_NAME, (json.dumps(card, indent=1, allow_nan=False) + "\n").encode(),
                      create_only=True)
    log.info("release %s: wrote %s (%d bytes, step=%s)", options.version, folder.url,
             weights.size, source.step)
    return ReleaseInfo.from_card(card, folder.url)


def _card(options: ReleaseOptions, source: Provenance, files: Sequence[FileEntry],
          tensors: Mapping[str, torch.Tensor], *, torch_version: str, now: str) -> dict[str, Any]:
    metrics = {k: v for k, v in source.metrics.items() if math.isfinite(v)}
    return {"format_version": CARD_FORMAT_VERSION, "version": options.version,
            "step": source.step, "epoch": source.epoch, "time": now,
            "checkpoint_time": source.checkpoint_time, "branch": source.branch, "metrics": metrics,
            "git_commit": source.git_commit, "torch_version": torch_version,
            "param_count": source.param_count, "tensor_count": len(tensors),
            "numel": sum(t.numel() for t in tensors.values()), "format": options.format,
            "dtype": options.dtype, "weights": WEIGHT_FILES[options.format],
            "files": [{"path": f.path, "size": f.size, "checksum": f.checksum} for f in files],
            "card": dict(options.model_card)}
