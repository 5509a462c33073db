"""Reading DCP's pickled ``.metadata`` without letting the file change the process.

``load_metadata`` unpickles with an allow-list: DCP's metadata classes, torch
dtypes, layouts and memory formats, paths and plain containers; any other
global is ``UnsafeCheckpointError`` and nothing runs.  An allow-list of classes
is not enough by itself: pickle's BUILD opcode sets attributes on whatever is
on its stack, and on a class (or a shared enum member) that would change it for
the whole process (``PosixPath.__truediv__``, say).  So the unpickler is
pickle's own Python implementation with BUILD checked: it applies only to an
instance of an allowed metadata dataclass, with the fields that class defines.

What comes out is then checked as a structure (``check_structure``): the
types of every field, shapes and chunk bounds, each item's location a plain
file name of the folder with its byte range inside that file's recorded size,
and a tensor's decoded size within what its stored bytes can hold.  Anything
else is ``CorruptCheckpointError`` naming the file and the item, so a damaged
or type-confused file is a damaged checkpoint (``"latest"`` falls back past
it), never an ``AttributeError`` later inside DCP.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import pickle
import reprlib
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata

from .codec import MAX_RATIO
from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .manifest import FileEntry, is_plain_name

CODEC_NAME = "zstd"
_DATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}
_ENUMS = {("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
          ("torch.distributed.checkpoint.filesystem", "SerializationFormat")}
_BUILTINS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
             ("builtins", "slice"), ("builtins", "tuple"), ("builtins", "list"),
             ("builtins", "dict"), ("builtins", "object"), ("copyreg", "_reconstructor"),
             ("torch", "Size"),
             # looks a torch.layout up by name in a fixed table; runs nothing else
             ("torch.serialization", "_get_layout"),
             # plain DCP records StorageMeta.checkpoint_id as a path; constructing one runs nothing
             ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
             ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


def _allowed(module: str, name: str) -> Any:
    """The object an allowed global names, or None."""
    if (module, name) in _BUILTINS or (module, name) in _DATA_CLASSES or (module, name) in _ENUMS:
        return getattr(importlib.import_module(module), name)
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
        return getattr(torch, name)
    return None


_FIELDS = {cls: frozenset(f.name for f in dataclasses.fields(cls))
           for cls in (_allowed(m, n) for m, n in sorted(_DATA_CLASSES))}
"""The classes BUILD may fill, with the attributes each defines."""


class _MetadataUnpickler(pickle._Unpickler):  # the Python one: its BUILD can be checked
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(io.BytesIO(data))
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed(module, name)
        if obj is None:
            raise UnsafeCheckpointError(self.name, "DCP metadata classes only",
                                        f"a pickle that imports {module}.{name}",
                                        "refused to load; nothing was executed")
        return obj

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        problem = _build_problem(inst, state)
        if problem:
            raise UnsafeCheckpointError(self.name, "attributes of DCP metadata objects only",
                                        problem, "refused to load; nothing was changed")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def _build_problem(inst: Any, state: Any) -> str:
    """Why BUILD of ``state`` into ``inst`` is refused ("" when it is allowed)."""
    cls = type(inst)
    if isinstance(inst, type) or cls not in _FIELDS:
        return f"a pickle that sets attributes of {type(inst).__name__} {_show(inst)}"
    if cls is dcp_metadata.TensorProperties:  # its __setstate__ takes a 5-tuple and checks it
        return "" if isinstance(state, tuple) and len(state) == 5 else \
            f"TensorProperties state {type(state).__name__}"
    fields = _FIELDS[cls]
    parts = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
    for part in parts:
        if part is not None and (not isinstance(part, dict) or not set(part) <= fields):
            keys = sorted(map(str, part)) if isinstance(part, dict) else type(part).__name__
            return f"{cls.__name__} fields {keys} (it has {sorted(fields)})"
    return ""


def load_metadata(data: bytes, name: str,
                  files: Mapping[str, FileEntry] | None = None) -> dcp_metadata.Metadata:
    """DCP's ``Metadata`` from the bytes of ``.metadata`` (named ``name`` in errors), checked
    against ``files`` (the manifest's entries: sizes and codecs) when given."""
    try:
        md = _MetadataUnpickler(data, name).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CorruptCheckpointError(name, "DCP metadata", "unreadable pickle",
                                     f"{type(e).__name__}: {e}"[:200]) from e
    check_structure(md, name, files)
    return md


def check_structure(md: Any, name: str, files: Mapping[str, FileEntry] | None = None) -> None:
    """CorruptCheckpointError unless ``md`` is DCP metadata whose every field has its type and
    every item a location inside the folder's files (see the module docstring)."""
    if not isinstance(md, dcp_metadata.Metadata):
        raise CorruptCheckpointError(name, "DCP Metadata", type(md).__name__)
    items, where = md.state_dict_metadata, md.storage_data
    if not isinstance(items, dict) or not isinstance(where, dict):
        raise CorruptCheckpointError(name, "DCP metadata with items and their locations",
                                     f"{type(items).__name__}, {type(where).__name__}")
    if not (md.planner_data is None or isinstance(md.planner_data, dict)) or \
            not (md.storage_meta is None or isinstance(md.storage_meta, dcp_metadata.StorageMeta)) or \
            not (md.version is None or isinstance(md.version, str)):
        raise CorruptCheckpointError(name, "planner_data a dict, storage_meta and version", "other types")
    for fqn, item in items.items():
        _check_item(fqn, item, where, name, files)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 100


def _show(value: object) -> str:
    """A short repr, whatever ``value`` holds (a crafted one may nest too deep for ``repr``)."""
    try:
        return _REPR.repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deep>"


def _bad(name: str, fqn: object, expected: str, found: object) -> CorruptCheckpointError:
    """``found`` is shown as is when it is a string, else by ``_show``."""
    key = fqn[:200] if isinstance(fqn, str) else _show(fqn)
    return CorruptCheckpointError(name, f"{expected} for item {key}",
                                  found if isinstance(found, str) else _show(found), "damaged metadata")


def _is_size(v: Any, ndim: int | None = None) -> bool:
    return (isinstance(v, torch.Size) and (ndim is None or len(v) == ndim)
            and all(isinstance(d, int) and d >= 0 for d in v))


def _check_item(fqn: Any, item: Any, where: dict[Any, Any], name: str,
                files: Mapping[str, FileEntry] | None) -> None:
    if not isinstance(fqn, str):
        raise _bad(name, fqn, "a string key", f"a {type(fqn).__name__}")
    if isinstance(item, dcp_metadata.BytesStorageMetadata):
        _check_location(fqn, where.get(dcp_metadata.MetadataIndex(fqn)), name, files, None)
        return
    if not isinstance(item, dcp_metadata.TensorStorageMetadata):
        raise _bad(name, fqn, "tensor or bytes metadata", f"a {type(item).__name__}")
    props = item.properties
    if not isinstance(props, dcp_metadata.TensorProperties) or not isinstance(props.dtype, torch.dtype) \
            or not _is_size(item.size) or not isinstance(item.chunks, list):
        raise _bad(name, fqn, "a dtype, a size and a list of chunks",
                   (type(props).__name__, getattr(props, "dtype", None), item.size, type(item.chunks)))
    itemsize = props.dtype.itemsize
    for chunk in item.chunks:
        ok = isinstance(chunk, dcp_metadata.ChunkStorageMetadata) and \
            _is_size(chunk.offsets, len(item.size)) and _is_size(chunk.sizes, len(item.size))
        if not ok or any(o + s > d for o, s, d in zip(chunk.offsets, chunk.sizes, item.size)):
            raise _bad(name, fqn, f"chunks inside its size {tuple(item.size)}", chunk)
        info = where.get(dcp_metadata.MetadataIndex(fqn, chunk.offsets))
        _check_location(fqn, info, name, files, chunk.sizes.numel() * itemsize)


def _check_location(fqn: str, info: Any, name: str, files: Mapping[str, FileEntry] | None,
                    raw_bytes: int | None) -> None:
    """One item's (or chunk's) location: a plain file name of the folder and a byte range in
    it; with the manifest, inside that file, and a tensor's raw size one its bytes can hold."""
    path = getattr(info, "relative_path", None)
    offset, length = getattr(info, "offset", None), getattr(info, "length", None)
    if not (isinstance(info, dcp_filesystem._StorageInfo) and is_plain_name(path)
            and isinstance(offset, int) and offset >= 0 and isinstance(length, int) and length >= 0):
        found = f"{type(info).__name__} (path={_show(path)}, offset={_show(offset)}, length={_show(length)})"
        raise _bad(name, fqn, "a file and byte range", found)
    entry = None if files is None else files.get(path)
    if files is not None and entry is None:
        raise _bad(name, fqn, "a file the manifest lists", repr(path))
    if entry is not None and offset + length > entry.size:
        raise _bad(name, fqn, f"a range inside {path} ({entry.size} bytes)", (offset, length))
    if entry is not None and raw_bytes is not None:
        most = length * MAX_RATIO if entry.codec == CODEC_NAME else length
        if raw_bytes > most:
            raise _bad(name, fqn, f"at most {most} raw bytes in {length} stored", raw_bytes)
