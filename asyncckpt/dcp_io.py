"""DCP StorageWriter and StorageReader over ``Storage`` and the codec.

Writing follows DCP's file layout (``__<rank>_<n>.distcp`` shards and a
pickled ``.metadata``), so an uncompressed checkpoint is a plain DCP
checkpoint that ``torch.distributed.checkpoint.load`` reads.  With a codec,
each tensor is stored as its raw bytes, byte-grouped and zstd-compressed
(``codec.py``), and each object blob is zstd-compressed too, so every item
carries its own CRCs (a damaged item is caught even with ``verify=False``).
Every file's checksum is computed while it is written, and every file is
fsynced before ``write_data`` returns.

Reading never unpickles arbitrary objects: ``.metadata`` goes through an
allow-list unpickler (DCP's metadata dataclasses and enums, dtypes, paths and
plain containers) and every item must have a location in the folder; tensors
of plain files go through ``torch.load(weights_only=True)``, and object blobs
are handed back as bytes (``planner.SafeLoadPlanner`` loads them weights-only).
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import logging
import pickle
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.futures import Future
from torch.distributed.checkpoint import metadata as dcp_metadata
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
from ._threads import can_start_threads
from ._torch_compat import _StorageInfo, _StoragePrefix, _create_read_items
from .errors import AsyncCkptError, CorruptCheckpointError, UnsafeCheckpointError
from .safe_metadata import CODEC_NAME, load_metadata
from .bounce import Bounce
from .manifest import FileEntry
from .storage import Storage

log = logging.getLogger(__name__)

METADATA_NAME = ".metadata"
SHARD_SUFFIX = ".distcp"
README_NAME = "README.txt"
"""Written into every compressed checkpoint (listed in its manifest, so verified like a shard):
what a user of plain DCP, whose ``dcp.load`` fails on it, should run instead."""
README_TEXT = (
    "This checkpoint was written by asyncckpt with zstd compression.\n"
    "Plain torch.distributed.checkpoint.load cannot read it (torch then says\n"
    "\"re-run with weights_only=False\": that will not help).\n"
    "Read it with asyncckpt (CheckpointManager.restore), or write a plain copy of\n"
    "its model weights:\n"
    "  asyncckpt export --format dcp ROOT --step N OUT     (a folder dcp.load reads)\n"
    "  asyncckpt export --format torch ROOT --step N OUT.pt\n"
    "(ROOT is the folder above this one; N is this checkpoint's step.)\n")


def unwrap_failures(exc: BaseException) -> dict[int, BaseException]:
    """The per-rank causes inside DCP's CheckpointException (or the error itself on rank -1)."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict):
        return {-1: exc}
    out = {}
    for rank, wrapped in failures.items():
        if isinstance(wrapped, tuple) and wrapped and isinstance(wrapped[0], BaseException):
            inner = wrapped[0]  # DCP wraps each failure as (exception, traceback summary)
        else:
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
        if len(buckets) <= 1 or not can_start_threads():  # at interpreter exit: on this thread
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
        results, raw_bytes = [], 0
        with self.storage.open_write(name) as raw:
            out = _codec.ChecksumWriter(raw)
            for item in items:
                offset = out.nbytes
                raw_bytes += self._write_item(out, item, planner.resolve_data(item))
                length = out.nbytes - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, offset, length)))
        self._record(FileEntry(path=name, size=out.nbytes, checksum=out.hexdigest(),
                               codec=CODEC_NAME if self.codec else None, rank=self.rank,
                               raw_bytes=raw_bytes if self.codec else None))
        return results

    def _write_item(self, out: Any, item: WriteItem, data: Any) -> int:
        """Write one item; returns its decoded size."""
        if item.type == WriteItemType.BYTE_IO and self.codec is None:
            out.write(data.getbuffer())
            return data.getbuffer().nbytes
        if item.type == WriteItemType.BYTE_IO:  # small: encoded for its CRCs, one chunk at a time
            for piece in _codec.encode(data.getbuffer(), itemsize=1, options=self.codec):
                out.write(piece)
            return data.getbuffer().nbytes
        t = _plain_tensor(data)
        if self.codec is None:
            torch.save(t, out)
            return t.numel() * t.element_size()
        for piece in _codec.encode(tensor_bytes(t), itemsize=t.element_size(),
                                   options=self.codec, executor=self.executor):
            out.write(piece)
        return t.numel() * t.element_size()

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
        if self.codec is not None:
            self._write_readme()
        self.storage.fsync_dir()

    def _write_readme(self) -> None:
        data = README_TEXT.encode()
        with self.storage.open_write(README_NAME) as f:
            f.write(data)
        self._record(FileEntry(path=README_NAME, size=len(data), checksum=_codec.checksum_bytes(data)))

    def storage_meta(self) -> Any:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


# -- reading ---------------------------------------------------------------------

class CheckpointReader(StorageReader):
    """Reads one checkpoint folder, verifying file checksums from the manifest."""

    def __init__(self, storage: Storage, *, files: Mapping[str, FileEntry] | None = None,
                 verify: bool = True, threads: int = 4) -> None:
        super().__init__()
        self.storage = storage
        self.files = dict(files or {})
        for entry in self.files.values():  # before anything is read into the live state
            if entry.codec not in (None, CODEC_NAME):
                raise CorruptCheckpointError(storage.url_of(entry.path), f"codec None or {CODEC_NAME!r}",
                                             repr(entry.codec), "unknown codec: written by a newer "
                                             "asyncckpt? upgrade to read it")
        self.verify = verify
        self.threads = max(1, threads)
        self.metadata: dcp_metadata.Metadata | None = None
        self._chunks: dict[tuple[str, tuple[int, ...]], tuple[torch.dtype, torch.Size]] = {}
        self._lock = threading.Lock()
        self._bounces: dict[tuple[int, torch.device], Bounce] = {}
        self._after: Any = None
        self._landed: list[tuple[Any, torch.Tensor]] = []

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_file(self, name: str) -> bytes:
        """A whole file, checked against the manifest's size and checksum."""
        url = self.storage.url_of(name)
        entry = self.files.get(name)
        try:
            data = self.storage.read_bytes(name, max_bytes=None if entry is None else entry.size)
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
            self.metadata = load_metadata(data, self.storage.url_of(METADATA_NAME), self.files or None)
            if getattr(self.metadata, "storage_meta", None) is None:
                self.metadata.storage_meta = dcp_metadata.StorageMeta()
        return self.metadata

    def set_up_storage_reader(self, metadata: dcp_metadata.Metadata, is_coordinator: bool,
                              *args: Any, **kwargs: Any) -> None:
        self.metadata = metadata
        self._chunks = {}
        tensor_bytes_in: dict[str, int] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, dcp_metadata.TensorStorageMetadata):
                for chunk in md.chunks:
                    self._chunks[(fqn, tuple(chunk.offsets))] = (md.properties.dtype, chunk.sizes)
                    path = metadata.storage_data[dcp_metadata.MetadataIndex(fqn, chunk.offsets)].relative_path
                    tensor_bytes_in[path] = tensor_bytes_in.get(path, 0) + \
                        chunk.sizes.numel() * md.properties.dtype.itemsize
        # what a file's objects may decode to: its recorded raw size less its tensors'
        self._object_budget = {name: max(0, e.raw_bytes - tensor_bytes_in.get(name, 0))
                               for name, e in self.files.items() if e.raw_bytes is not None}

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
        # the caller's stream: device copies from the reading threads must follow its work
        # (no CUDA context yet means no CUDA targets: a CPU restore does not start one)
        self._after = torch.cuda.current_stream() if torch.cuda.is_initialized() else None
        try:
            with ThreadPoolExecutor(min(self.threads, max(1, len(jobs))),
                                    thread_name_prefix="asyncckpt-read") as pool:
                list(pool.map(lambda job: self._read_one(job[0], job[1], planner), jobs))
        finally:
            bounces, self._bounces = list(self._bounces.values()), {}
            for bounce in bounces:  # every device copy has landed before DCP goes on
                bounce.finish()
        landed, self._landed = self._landed, []
        for req, target in landed:  # committed once their copies are on the device
            planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_one(self, name: str, reqs: list[Any], planner: LoadPlanner) -> None:
        assert self.metadata is not None
        encoded = (self.files.get(name) or FileEntry(path=name, size=0)).codec == CODEC_NAME
        url = self.storage.url_of(name)
        ranged = not self.verify and all(req.type == LoadItemType.BYTE_IO for req in reqs)
        data = None if ranged else memoryview(self.read_file(name))
        for req in reqs:
            info = self.metadata.storage_data[req.storage_index]
            blob = self._range(name, info.offset, info.length) if data is None else \
                data[info.offset:info.offset + info.length]
            if len(blob) != info.length:
                raise CorruptCheckpointError(url, f"an item of {info.length} bytes at {info.offset}",
                                             f"{len(blob)} bytes", "file is truncated")
            if req.type == LoadItemType.BYTE_IO:
                if encoded:
                    blob = memoryview(_codec.decode_bytes(blob, name=f"{url} (item {req.storage_index.fqn})",
                                                          max_nbytes=self._object_budget.get(name)))
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
            if target.is_cuda:  # pinned bounce buffers: pageable host-to-device copies crawl
                self._bounce(target.device).copy(target, tensor)
                with self._lock:
                    self._landed.append((req, target))  # committed after bounce.finish()
                continue
            target.copy_(tensor)  # outside the lock: the reading threads copy in parallel
            with self._lock:
                planner.commit_tensor(req, target)

    def _range(self, name: str, offset: int, length: int) -> memoryview:
        """One item's bytes, read alone (objects only, their files already checked or unchecked
        by choice: a shard's tensors are not read for its few small objects)."""
        try:
            with self.storage.open_read(name) as f:
                f.seek(offset)
                return memoryview(f.read(length))
        except OSError as e:
            raise CorruptCheckpointError(self.storage.url_of(name), "a readable file",
                                         "missing or unreadable", str(e)) from e

    def _bounce(self, device: torch.device) -> Bounce:
        """This thread's bounce buffers for ``device`` (made on first use)."""
        key = (threading.get_ident(), device)
        with self._lock:
            if key not in self._bounces:
                self._bounces[key] = Bounce(device, after=self._after)
            return self._bounces[key]

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
        out = torch.empty(sizes, dtype=dtype)  # the size .metadata gives: the header must agree
        _codec.decode_bytes(blob, out=tensor_bytes(out) if out.numel() else bytearray(),
                            name=f"{url} (item {key[0]})")
        return out

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def _narrow(t: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    for dim, (off, length) in enumerate(zip(offsets, lengths)):
        if off != 0 or length != t.size(dim):
            t = t.narrow(dim, off, length)
    return t


# -- looking inside (asyncckpt inspect / diff) ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class ItemInfo:
    """One item of a checkpoint, from its DCP metadata alone (no tensor data read)."""

    key: str
    kind: str
    """``"tensor"`` or ``"object"`` (a blob: scheduler, RNG, extra, optimizer hyperparameters)."""
    dtype: str | None
    shape: tuple[int, ...] | None
    raw_bytes: int | None
    """numel x element size for a tensor; None for an object."""
    stored_bytes: int
    """Bytes the item takes in its shard files (compressed when the checkpoint is)."""
    files: tuple[str, ...]


def describe(folder: Storage, files: Mapping[str, FileEntry] | None = None, *,
             verify: bool = True) -> list[ItemInfo]:
    """Every item of the checkpoint in ``folder``, sorted by key (reads ``.metadata`` only)."""
    md = CheckpointReader(folder, files=files, verify=verify).read_metadata()
    stored: dict[str, int] = {}
    where: dict[str, set[str]] = {}
    for index, info in md.storage_data.items():
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
        where.setdefault(index.fqn, set()).add(info.relative_path)
    out = []
    for key, meta in sorted(md.state_dict_metadata.items()):
        tensor = isinstance(meta, dcp_metadata.TensorStorageMetadata)
        dtype = meta.properties.dtype if tensor else None
        shape = tuple(meta.size) if tensor else None
        raw = meta.size.numel() * dtype.itemsize if tensor else None
        out.append(ItemInfo(key=key, kind="tensor" if tensor else "object",
                            dtype=str(dtype).removeprefix("torch.") if dtype else None, shape=shape,
                            raw_bytes=raw, stored_bytes=stored.get(key, 0),
                            files=tuple(sorted(where.get(key, ())))))
    return out


class _BytesPlanner(LoadPlanner):
    """A load planner that keeps object items as their raw bytes (nothing is unpickled)."""

    def __init__(self, targets: dict[str, Any]) -> None:
        self.targets = targets
        self.blobs: dict[str, bytes] = {}

    def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        return LoadPlan([item for key, target in self.targets.items() for item in
                         _create_read_items(key, self.metadata.state_dict_metadata[key], target)])

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.blobs[read_item.dest_index.fqn] = value.getvalue()

    def resolve_tensor(self, read_item: Any) -> torch.Tensor:
        t = self.targets[read_item.dest_index.fqn]
        return _narrow(t, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
        pass


def read_items(folder: Storage, files: Mapping[str, FileEntry] | None = None,
               keys: Sequence[str] | None = None, *, verify: bool = True,
               batch_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor | bytes]]:
    """``(key, value)`` for the checkpoint's items (all, or ``keys``), in key order: a tensor
    whole on CPU (shards put together), or an object's serialised bytes (never unpickled;
    ``planner.safe_load`` reads them weights-only).  Reads about ``batch_bytes`` at a time."""
    import warnings

    import torch.distributed.checkpoint as dcp

    reader = CheckpointReader(folder, files=files, verify=verify)
    saved = reader.read_metadata().state_dict_metadata
    wanted = sorted(saved) if keys is None else list(keys)
    batch: dict[str, Any] = {}
    size = 0
    for i, key in enumerate(wanted):
        meta = saved[key]
        if isinstance(meta, dcp_metadata.TensorStorageMetadata):
            batch[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            size += batch[key].numel() * batch[key].element_size()
        else:
            batch[key] = None
        if size >= batch_bytes or i == len(wanted) - 1:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                planner = _BytesPlanner(batch)
                try:
                    dcp.load(batch, storage_reader=reader, planner=planner, no_dist=True)
                except (Exception, dcp.CheckpointException) as e:  # DCP's is a BaseException
                    reraise_own(e)
                    raise
            yield from ((k, planner.blobs[k] if v is None else v) for k, v in batch.items())
            batch, size = {}, 0
