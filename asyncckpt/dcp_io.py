"""DCP StorageWriter and StorageReader over ``Storage`` and the codec.

Writing follows DCP's file layout (``__<rank>_<n>.distcp`` shards and a
pickled ``.metadata``), so an uncompressed checkpoint is a plain DCP
checkpoint that ``torch.distributed.checkpoint.load`` reads.  With a codec,
each tensor is stored as its raw bytes, byte-grouped and zstd-compressed
(``codec.py``); object blobs are stored as they are.  Every file's checksum is
computed while it is written, and every file is fsynced before ``write_data``
returns.

Reading never unpickles arbitrary objects: ``.metadata`` goes through an
allow-list unpickler, tensors of plain files through ``torch.load
(weights_only=True)``, and object blobs are handed back as bytes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import logging
import pickle
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.futures import Future
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from . import codec as _codec
from .errors import AsyncCkptError, CorruptCheckpointError, UnsafeCheckpointError
from .manifest import FileEntry
from .storage import Storage

log = logging.getLogger(__name__)

METADATA_NAME = ".metadata"
SHARD_SUFFIX = ".distcp"
CODEC_NAME = "zstd"


def unwrap_failures(exc: BaseException) -> dict[int, BaseException]:
    """The per-rank causes inside DCP's CheckpointException (or the error itself on rank -1)."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict):
        return {-1: exc}
    out = {}
    for rank, wrapped in failures.items():
        inner = getattr(wrapped, "exception", wrapped)
        out[int(rank)] = inner if isinstance(inner, BaseException) else RuntimeError(str(inner))
    return out


def reraise_own(exc: BaseException) -> None:
    """Re-raise the first asyncckpt error wrapped in a DCP CheckpointException, if any."""
    for inner in unwrap_failures(exc).values():
        if isinstance(inner, AsyncCkptError):
            raise inner from exc


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (``t`` must stay alive)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def _split(items: list[WriteItem], bins: int) -> list[list[WriteItem]]:
    """Spread items over ``bins`` files, largest first, each to the lightest file."""
    def size(it: WriteItem) -> int:
        if it.tensor_data is None:
            return 0
        return it.tensor_data.size.numel() * it.tensor_data.properties.dtype.itemsize
    buckets: list[list[WriteItem]] = [[] for _ in range(max(1, bins))]
    loads = [0] * len(buckets)
    for it in sorted(items, key=size, reverse=True):
        i = loads.index(min(loads))
        buckets[i].append(it)
        loads[i] += size(it)
    return [b for b in buckets if b]


class CheckpointWriter(StorageWriter):
    """Writes one checkpoint folder; ``files`` lists what this rank wrote."""

    def __init__(self, storage: Storage, *, codec: _codec.CodecOptions | None = None,
                 thread_count: int = 2, executor: ThreadPoolExecutor | None = None) -> None:
        super().__init__()
        self.storage = storage
        self.codec = codec
        self.thread_count = max(1, thread_count)
        self.executor = executor
        self.files: list[FileEntry] = []
        self.bytes_written = 0
        self.rank = 0
        self.is_coordinator = True
        self._lock = threading.Lock()

    def reset(self, checkpoint_id: Any = None) -> None:
        self.files = []
        self.bytes_written = 0

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.storage.makedirs()
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=_StoragePrefix(f"__{i}_"))
                for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix = plan.storage_data.prefix
        buckets = _split(list(plan.items), self.thread_count)
        names = [f"{prefix}{i}{SHARD_SUFFIX}" for i in range(len(buckets))]
        results: list[WriteResult] = []
        if len(buckets) <= 1:
            for name, bucket in zip(names, buckets):
                results += self._write_file(name, bucket, planner)
        else:
            with ThreadPoolExecutor(len(buckets), thread_name_prefix="asyncckpt-shard") as pool:
                for part in pool.map(self._write_file, names, buckets, [planner] * len(buckets)):
                    results += part
        self.storage.fsync_dir()
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_file(self, name: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        results = []
        with self.storage.open_write(name) as raw:
            out = _codec.ChecksumWriter(raw)
            for item in items:
                offset = out.nbytes
                self._write_item(out, item, planner.resolve_data(item))
                length = out.nbytes - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, offset, length)))
        self._record(FileEntry(path=name, size=out.nbytes, checksum=out.hexdigest(),
                               codec=CODEC_NAME if self.codec else None, rank=self.rank))
        return results

    def _write_item(self, out: Any, item: WriteItem, data: Any) -> None:
        if item.type == WriteItemType.BYTE_IO:
            out.write(data.getbuffer())
            return
        t = _plain_tensor(data)
        if self.codec is None:
            torch.save(t, out)
            return
        for piece in _codec.encode(tensor_bytes(t), itemsize=t.element_size(),
                                   options=self.codec, executor=self.executor):
            out.write(piece)

    def _record(self, entry: FileEntry) -> None:
        with self._lock:
            self.files.append(entry)
            self.bytes_written += entry.size

    def finish(self, metadata: dcp_metadata.Metadata, results: list[list[WriteResult]]) -> None:
        storage_md = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        with self.storage.open_write(METADATA_NAME) as raw:
            out = _codec.ChecksumWriter(raw)
            pickle.dump(metadata, out)
        self._record(FileEntry(path=METADATA_NAME, size=out.nbytes, checksum=out.hexdigest()))
        self.storage.fsync_dir()

    def storage_meta(self) -> Any:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


# -- reading ---------------------------------------------------------------------

_METADATA_MODULES = {
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
}
_BUILTINS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
             ("builtins", "slice"), ("builtins", "tuple"), ("builtins", "list"),
             ("builtins", "dict"), ("builtins", "object"), ("copyreg", "_reconstructor"),
             ("torch", "Size"),
             # looks a torch.layout up by name in a fixed table; runs nothing else
             ("torch.serialization", "_get_layout")}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata classes, torch dtypes and plain containers."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(io.BytesIO(data))
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _BUILTINS:
            return super().find_class(module, name)
        if module in _METADATA_MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(self.name, "DCP metadata classes only",
                                    f"a pickle that imports {module}.{name}",
                                    "refused to load; nothing was executed")


def load_metadata(data: bytes, name: str) -> dcp_metadata.Metadata:
    try:
        md = _MetadataUnpickler(data, name).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CorruptCheckpointError(name, "DCP metadata", "unreadable pickle", str(e)) from e
    if not isinstance(md, dcp_metadata.Metadata):
        raise CorruptCheckpointError(name, "DCP Metadata", type(md).__name__)
    return md


class CheckpointReader(StorageReader):
    """Reads one checkpoint folder, verifying file checksums from the manifest."""

    def __init__(self, storage: Storage, *, files: Mapping[str, FileEntry] | None = None,
                 verify: bool = True, threads: int = 4) -> None:
        super().__init__()
        self.storage = storage
        self.files = dict(files or {})
        self.verify = verify
        self.threads = max(1, threads)
        self.metadata: dcp_metadata.Metadata | None = None
        self._chunks: dict[tuple[str, tuple[int, ...]], tuple[torch.dtype, torch.Size]] = {}
        self._lock = threading.Lock()

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_file(self, name: str) -> bytes:
        """A whole file, checked against the manifest's size and checksum."""
        url = self.storage.url_of(name)
        entry = self.files.get(name)
        try:
            data = self.storage.read_bytes(name)
        except OSError as e:
            raise CorruptCheckpointError(url, "a readable file", "missing or unreadable", str(e)) from e
        if self.verify and entry is not None:
            if len(data) != entry.size:
                raise CorruptCheckpointError(url, f"{entry.size} bytes", f"{len(data)} bytes")
            if entry.checksum and (actual := _codec.checksum_bytes(data)) != entry.checksum:
                raise CorruptCheckpointError(url, entry.checksum, actual, "checksum mismatch")
        return data

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if self.metadata is None:
            data = self.read_file(METADATA_NAME)
            self.metadata = load_metadata(data, self.storage.url_of(METADATA_NAME))
            if getattr(self.metadata, "storage_meta", None) is None:
                self.metadata.storage_meta = dcp_metadata.StorageMeta()
        return self.metadata

    def set_up_storage_reader(self, metadata: dcp_metadata.Metadata, is_coordinator: bool,
                              *args: Any, **kwargs: Any) -> None:
        self.metadata = metadata
        self._chunks = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, dcp_metadata.TensorStorageMetadata):
                for chunk in md.chunks:
                    self._chunks[(fqn, tuple(chunk.offsets))] = (md.properties.dtype, chunk.sizes)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self.metadata is not None
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            info = self.metadata.storage_data[req.storage_index]
            per_file.setdefault(info.relative_path, []).append(req)
        jobs = list(per_file.items())
        with ThreadPoolExecutor(min(self.threads, max(1, len(jobs))),
                                thread_name_prefix="asyncckpt-read") as pool:
            list(pool.map(lambda job: self._read_one(job[0], job[1], planner), jobs))
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_one(self, name: str, reqs: list[Any], planner: LoadPlanner) -> None:
        assert self.metadata is not None
        data = memoryview(self.read_file(name))
        encoded = (self.files.get(name) or FileEntry(path=name, size=0)).codec == CODEC_NAME
        url = self.storage.url_of(name)
        for req in reqs:
            info = self.metadata.storage_data[req.storage_index]
            blob = data[info.offset:info.offset + info.length]
            if len(blob) != info.length:
                raise CorruptCheckpointError(url, f"an item of {info.length} bytes at {info.offset}",
                                             f"{len(blob)} bytes", "file is truncated")
            if req.type == LoadItemType.BYTE_IO:
                with self._lock:
                    planner.load_bytes(req, io.BytesIO(blob))
                continue
            tensor = self._tensor(req, blob, encoded, url)
            tensor = _narrow(tensor, req.storage_offsets, req.lengths)
            with self._lock:
                target = planner.resolve_tensor(req).detach()
                if target.size() != tensor.size():
                    raise CorruptCheckpointError(url, f"shape {tuple(target.size())}",
                                                 f"shape {tuple(tensor.size())}",
                                                 f"item {req.storage_index.fqn}")
                target.copy_(tensor)
                planner.commit_tensor(req, target)

    def _tensor(self, req: Any, blob: memoryview, encoded: bool, url: str) -> torch.Tensor:
        if not encoded:
            try:
                return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(url, "a tensor", "a pickle that imports code",
                                            str(e).splitlines()[0]) from e
            except Exception as e:  # noqa: BLE001 - a bad item is a corrupt file
                raise CorruptCheckpointError(url, "a torch.save tensor", "unreadable item", str(e)) from e
        key = (req.storage_index.fqn, tuple(req.storage_index.offset or ()))
        dtype, sizes = self._chunks[key]
        raw = _codec.decode_bytes(blob, name=url)
        expected = sizes.numel() * dtype.itemsize
        if len(raw) != expected:
            raise CorruptCheckpointError(url, f"{expected} bytes for {key[0]}", f"{len(raw)} bytes")
        if expected == 0:
            return torch.empty(sizes, dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype).reshape(sizes)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def _narrow(t: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    for dim, (off, length) in enumerate(zip(offsets, lengths)):
        if off != 0 or length != t.size(dim):
            t = t.narrow(dim, off, length)
    return t
