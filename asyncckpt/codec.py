"""Encoding of one tensor's raw bytes (or one object blob) inside a shard file.

An encoded item is a header followed by independent chunks, so that encoding
and decoding hold one chunk at a time and chunks can be compressed in
parallel.  All integers are little-endian.

Header (23 bytes)::

    magic        4s   b"ACZ1"
    version      u8   1
    flags        u8   bit 0: byte-grouped; other bits must be 0
    itemsize     u8   element size in bytes (1 = no grouping)
    raw_nbytes   u64  length of the decoded item
    chunk_bytes  u32  raw length of every chunk but the last (a multiple of itemsize)
    header_crc   u32  zlib.crc32 of the 19 bytes above

Then ``ceil(raw_nbytes / chunk_bytes)`` chunks (none for an empty item)::

    raw_len      u32  decoded length of this chunk: min(chunk_bytes, what is left)
    zstd_len     u32  length of the zstd frame that follows
    frame_crc    u32  zlib.crc32 of that frame
    frame        zstd frame with its content size and content checksum

Byte grouping is per chunk: the chunk's whole elements are stored as all
their byte 0, then all their byte 1, and so on; trailing bytes that do not
fill an element (possible only in the last chunk) follow unchanged.  Grouping
puts the slowly varying sign/exponent bytes of floats together, which zstd
compresses much better.

Every length is checked against the header when decoding, and each frame
against its CRC and zstd's checksum: a flipped, missing or extra byte anywhere
raises ``CorruptCheckpointError`` naming the item.  The frame CRC is needed
because zstd ignores some frame-header bits (the window size) when decoding
in one shot, so a flip there would otherwise pass unnoticed.

Whole-file checksums for the manifest are separate: ``Checksum``,
``ChecksumWriter`` and ``ChecksumReader`` produce strings like
``"crc32:0a1b2c3d"``.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Protocol

import zstandard

from asyncckpt.errors import ConfigError, CorruptCheckpointError

log = logging.getLogger(__name__)

MAGIC = b"ACZ1"
FORMAT_VERSION = 1
FLAG_GROUPED = 0x01
CHECKSUM_ALGO = "crc32"
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 1 << 30
MAX_ITEMSIZE = 255
MAX_RATIO = 1 << 15
"""zstd's best compression: an RLE block, 4 bytes for 128 KiB.  An item decodes to at most this
many times its encoded length, so a header claiming more is damage, refused before allocating."""

_HEADER = struct.Struct("<4sBBBQI")
_HEADER_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size + _HEADER_CRC.size
_CHUNK = struct.Struct("<III")

Buffer = bytes | bytearray | memoryview
Reader = Callable[[int], bytes]


@dataclass(frozen=True, kw_only=True)
class CodecOptions:
    """How items are compressed; decoding needs none of these."""

    level: int = 1
    """zstd level: 1 (fastest) to 22 (smallest), or a fast level -5..-1."""

    threads: int = 0
    """zstd worker threads per compressor: 0 = none (zstd's default), -1 = one per core."""

    chunk_bytes: int = 8 * 1024 * 1024
    """Raw bytes per independent chunk (at least 64 KiB); bounds memory per chunk in flight."""

    def __post_init__(self) -> None:
        level, threads, chunk = self.level, self.threads, self.chunk_bytes
        if not _is_int(level) or not (1 <= level <= 22 or -5 <= level <= -1):
            raise ConfigError.field("level", level, "an int in 1..22, or a fast level in -5..-1")
        if not _is_int(threads) or not -1 <= threads <= 256:
            raise ConfigError.field("threads", threads, "an int in 0..256, or -1 for all cores")
        if not _is_int(chunk) or not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
            expected = f"an int in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}"
            raise ConfigError.field("chunk_bytes", chunk, expected)


@dataclass(frozen=True)
class FrameHeader:
    """The parsed header of one encoded item."""

    raw_nbytes: int
    itemsize: int
    grouped: bool
    chunk_bytes: int

    def chunk_sizes(self) -> Iterator[int]:
        """Raw length of each chunk, in order."""
        for pos in range(0, self.raw_nbytes, self.chunk_bytes):
            yield min(self.chunk_bytes, self.raw_nbytes - pos)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_encoded(prefix: Buffer) -> bool:
    """True when ``prefix`` (the first bytes of an item) starts with the codec's magic."""
    return bytes(prefix[: len(MAGIC)]) == MAGIC


# ---------------------------------------------------------------- byte grouping
#
# With numpy installed (imported on first use, never at import time, so the
# torch-free CLI stays fast) each byte plane is one strided copy that releases
# the GIL: about 1.5 GB/s per core, scaling with threads.  The pure-Python
# fallback gives the same bytes at about 0.3 GB/s, holding the GIL.


@functools.cache
def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch in practice
        log.info("numpy is not installed: byte grouping runs in pure Python (slower)")
        return None
    return numpy


def _group(raw: memoryview, itemsize: int) -> bytes | bytearray:
    """All elements' byte 0, then all their byte 1, ...; a partial element's bytes at the end."""
    n = raw.nbytes
    full = n - n % itemsize
    np = _numpy()
    if np is None:
        data = bytes(raw)
        return b"".join([*(data[i:full:itemsize] for i in range(itemsize)), data[full:]])
    out = bytearray(n)
    src, dst = np.frombuffer(raw, np.uint8), np.frombuffer(out, np.uint8)
    items, planes = src[:full].reshape(-1, itemsize), dst[:full].reshape(itemsize, -1)
    for i in range(itemsize):
        planes[i] = items[:, i]
    dst[full:] = src[full:]
    return out


def _ungroup_into(grouped: bytes, itemsize: int, out: memoryview) -> None:
    """Undo ``_group``, writing the element bytes into ``out`` (of the same length)."""
    n = len(grouped)
    full = n - n % itemsize
    np = _numpy()
    if np is None:
        count = full // itemsize
        for i in range(itemsize):
            out[i:full:itemsize] = grouped[i * count : (i + 1) * count]
        out[full:] = grouped[full:]
        return
    src, dst = np.frombuffer(grouped, np.uint8), np.frombuffer(out, np.uint8)
    planes, items = src[:full].reshape(itemsize, -1), dst[:full].reshape(-1, itemsize)
    for i in range(itemsize):
        items[:, i] = planes[i]
    dst[full:] = src[full:]


# --------------------------------------------------------------------- encoding


def _compressor(options: CodecOptions) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(
        level=options.level, threads=options.threads, write_checksum=True, write_content_size=True
    )


def _encode_chunk(
    piece: memoryview, itemsize: int, cctx: zstandard.ZstdCompressor
) -> tuple[bytes, bytes]:
    data: Buffer = _group(piece, itemsize) if itemsize > 1 else piece
    frame = cctx.compress(data)
    return _CHUNK.pack(len(piece), len(frame), zlib.crc32(frame)), frame


def _compress_job(piece: memoryview, itemsize: int, options: CodecOptions) -> tuple[bytes, bytes]:
    # ZstdCompressor is not thread-safe: one per job (cheap next to a chunk's work).
    return _encode_chunk(piece, itemsize, _compressor(options))


def _byte_view(data: Buffer, what: str, *, writable: bool = False) -> memoryview:
    # Messages name the type only: the repr of a tensor's bytes would be huge.
    view = memoryview(data)
    problem = "" if view.c_contiguous else "a C-contiguous buffer"
    problem = problem or ("a writable buffer" if writable and view.readonly else "")
    if problem:
        raise ConfigError(f"{what} ({type(data).__name__}) is not valid: expected {problem}")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def encode(
    data: Buffer,
    *,
    itemsize: int,
    options: CodecOptions,
    executor: Executor | None = None,
    max_in_flight: int | None = None,
) -> Iterator[bytes]:
    """Encode ``data``; return the pieces to write in order: header, then each chunk's two.

    ``itemsize`` is the element size (e.g. 4 for float32); above 1 the bytes
    are grouped.  ``data`` is read one chunk at a time and must not change
    until the iterator is exhausted.  With an ``executor``, chunks are
    compressed on its threads (zstd releases the GIL), at most
    ``max_in_flight`` at once (default: twice its workers); the output is the
    same bytes as without one.  Arguments are checked before this returns.
    """
    view = _byte_view(data, "data")
    if not _is_int(itemsize) or not 1 <= itemsize <= MAX_ITEMSIZE:
        raise ConfigError.field("itemsize", itemsize, f"an int in 1..{MAX_ITEMSIZE}")
    if max_in_flight is not None and (not _is_int(max_in_flight) or max_in_flight < 1):
        raise ConfigError.field("max_in_flight", max_in_flight, "a positive int or None")
    chunk = options.chunk_bytes - options.chunk_bytes % itemsize
    flags = FLAG_GROUPED if itemsize > 1 else 0
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, itemsize, view.nbytes, chunk)
    header = head + _HEADER_CRC.pack(zlib.crc32(head))
    log.debug(
        "encoding %d bytes (itemsize=%d, level=%d, chunk_bytes=%d, parallel=%s)",
        view.nbytes, itemsize, options.level, chunk, executor is not None,
    )
    pieces = (view[pos : pos + chunk] for pos in range(0, view.nbytes, chunk))
    if executor is None:
        return _encode_serial(header, pieces, itemsize, options)
    workers = getattr(executor, "_max_workers", None) or os.cpu_count() or 1
    limit = max_in_flight or 2 * workers
    return _encode_parallel(header, pieces, itemsize, options, executor, limit)


def _encode_serial(
    header: bytes, pieces: Iterable[memoryview], itemsize: int, options: CodecOptions
) -> Iterator[bytes]:
    yield header
    cctx = _compressor(options)
    for piece in pieces:
        yield from _encode_chunk(piece, itemsize, cctx)


def _encode_parallel(
    header: bytes,
    pieces: Iterable[memoryview],
    itemsize: int,
    options: CodecOptions,
    executor: Executor,
    limit: int,
) -> Iterator[bytes]:
    yield header
    pending: deque[Future[tuple[bytes, bytes]]] = deque()
    try:
        for piece in pieces:
            if len(pending) >= limit:
                yield from pending.popleft().result()
            pending.append(executor.submit(_compress_job, piece, itemsize, options))
        while pending:
            yield from pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def encode_bytes(data: Buffer, *, itemsize: int, options: CodecOptions) -> bytes:
    """The whole encoding of ``data`` as one ``bytes`` (for small items and tests)."""
    return b"".join(encode(data, itemsize=itemsize, options=options))


# --------------------------------------------------------------------- decoding


def _read_exact(read: Reader, n: int, name: str, what: str) -> bytes:
    data = read(n)
    if len(data) == n:
        return data
    parts, got = [data], len(data)
    while data and got < n:
        data = read(n - got)
        parts.append(data)
        got += len(data)
    if got != n:
        raise CorruptCheckpointError(name, f"{n} bytes of {what}", got, "truncated item")
    return b"".join(parts)


def parse_header(buf: bytes, *, name: str = "<buffer>") -> FrameHeader:
    """Parse and check the first ``HEADER_BYTES`` bytes of an encoded item."""
    if len(buf) < HEADER_BYTES:
        raise CorruptCheckpointError(name, f"{HEADER_BYTES} header bytes", len(buf), "truncated")
    magic, version, flags, itemsize, raw_nbytes, chunk_bytes = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptCheckpointError(name, f"magic {MAGIC!r}", repr(magic), "not an encoded item")
    if version != FORMAT_VERSION:
        raise CorruptCheckpointError(
            name, f"codec version {FORMAT_VERSION}", version, "unknown codec version"
        )
    (stored_crc,) = _HEADER_CRC.unpack_from(buf, _HEADER.size)
    actual_crc = zlib.crc32(buf[: _HEADER.size])
    if stored_crc != actual_crc:
        expected = f"header crc {stored_crc:08x}"
        raise CorruptCheckpointError(name, expected, f"{actual_crc:08x}", "damaged header")
    if (flags & ~FLAG_GROUPED or itemsize == 0 or chunk_bytes == 0 or chunk_bytes % itemsize
            or chunk_bytes > MAX_CHUNK_BYTES):
        detail = f"flags={flags:#x} itemsize={itemsize} chunk_bytes={chunk_bytes}"
        raise CorruptCheckpointError(name, "consistent fields", detail, "impossible header")
    return FrameHeader(raw_nbytes, itemsize, bool(flags & FLAG_GROUPED), chunk_bytes)


def _read_chunk(read: Reader, dctx: zstandard.ZstdDecompressor, raw_n: int, name: str) -> bytes:
    """One chunk's decoded (still grouped) bytes; ``raw_n`` is its length per the header."""
    head = _read_exact(read, _CHUNK.size, name, "chunk header")
    raw_len, zstd_len, frame_crc = _CHUNK.unpack(head)
    if raw_len != raw_n:
        raise CorruptCheckpointError(name, f"a {raw_n}-byte chunk", raw_len, "bad chunk length")
    if zstd_len > raw_n + (raw_n >> 7) + 1024:  # above zstd's worst case
        expected = f"a frame for {raw_n} bytes"
        raise CorruptCheckpointError(name, expected, zstd_len, "bad frame length")
    frame = _read_exact(read, zstd_len, name, "zstd frame")
    actual_crc = zlib.crc32(frame)
    if actual_crc != frame_crc:
        expected = f"frame crc {frame_crc:08x}"
        raise CorruptCheckpointError(name, expected, f"{actual_crc:08x}", "damaged chunk")
    try:
        content_n = zstandard.frame_content_size(frame)  # checked before allocating it
        if content_n != raw_n:
            raise CorruptCheckpointError(name, f"a {raw_n}-byte chunk", content_n, "bad zstd frame")
        data = dctx.decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CorruptCheckpointError(name, "a valid zstd frame", "an invalid one", str(e)) from e
    if len(data) != raw_n:
        raise CorruptCheckpointError(name, f"a {raw_n}-byte chunk", len(data), "bad zstd frame")
    return data


def _output_view(target: bytearray | memoryview, raw_nbytes: int, name: str) -> memoryview:
    view = _byte_view(target, "out", writable=True)
    if view.nbytes != raw_nbytes:
        expected = f"{view.nbytes} bytes (the size of out)"
        raise CorruptCheckpointError(name, expected, raw_nbytes, "stored length differs")
    return view


def decode(
    read: Reader,
    *,
    out: bytearray | memoryview | None = None,
    name: str = "<buffer>",
    max_nbytes: int | None = None,
) -> bytearray | memoryview:
    """Read one encoded item through ``read`` (like ``file.read``) and return its raw bytes.

    Reads exactly the item's bytes, so items can follow each other in a file.
    With ``out`` (a writable contiguous buffer of the decoded size) the bytes
    are written there and ``out`` is returned; otherwise a new ``bytearray``
    of the size the header gives, which must not exceed ``max_nbytes`` (checked
    before anything is allocated; every chunk is at most ``MAX_CHUNK_BYTES``).
    Any malformation raises ``CorruptCheckpointError`` with ``name`` as path.
    """
    header = parse_header(_read_exact(read, HEADER_BYTES, name, "header"), name=name)
    if out is None and max_nbytes is not None and header.raw_nbytes > max_nbytes:
        raise CorruptCheckpointError(name, f"at most {max_nbytes} decoded bytes", header.raw_nbytes,
                                     "the item's header claims more than the checkpoint can hold")
    target = bytearray(header.raw_nbytes) if out is None else out
    view = _output_view(target, header.raw_nbytes, name)
    dctx = zstandard.ZstdDecompressor()
    pos = 0
    for raw_n in header.chunk_sizes():
        data = _read_chunk(read, dctx, raw_n, name)
        if header.grouped:
            _ungroup_into(data, header.itemsize, view[pos : pos + raw_n])
        else:
            view[pos : pos + raw_n] = data
        pos += raw_n
    return target


class _BufferReader:
    def __init__(self, buf: Buffer) -> None:
        self.view = _byte_view(buf, "buf")
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = bytes(self.view[self.pos : self.pos + n])
        self.pos += len(data)
        return data


def decode_bytes(
    buf: Buffer, *, out: bytearray | memoryview | None = None, name: str = "<buffer>",
    max_nbytes: int | None = None,
) -> bytearray | memoryview:
    """Decode an item held whole in ``buf``; trailing bytes after it are corruption too.  The
    decoded size is bounded by ``max_nbytes`` and by ``MAX_RATIO`` times ``len(buf)``."""
    reader = _BufferReader(buf)
    bound = MAX_RATIO * reader.view.nbytes
    bound = bound if max_nbytes is None else min(bound, max_nbytes)
    result = decode(reader.read, out=out, name=name, max_nbytes=bound)
    total = reader.view.nbytes
    if reader.pos != total:
        raise CorruptCheckpointError(name, f"{reader.pos} bytes", total, "trailing bytes")
    return result


# -------------------------------------------------------------------- checksums


class Checksum:
    """Running CRC-32 over a byte stream; ``hexdigest()`` is ``"crc32:%08x"``."""

    __slots__ = ("_crc", "_nbytes")

    def __init__(self) -> None:
        self._crc = 0
        self._nbytes = 0

    def update(self, buf: Buffer) -> None:
        self._crc = zlib.crc32(buf, self._crc)
        self._nbytes += memoryview(buf).nbytes

    def hexdigest(self) -> str:
        return f"{CHECKSUM_ALGO}:{self._crc:08x}"

    @property
    def nbytes(self) -> int:
        return self._nbytes


def checksum_bytes(buf: Buffer) -> str:
    """The digest string of one buffer."""
    checksum = Checksum()
    checksum.update(buf)
    return checksum.hexdigest()


class _Writable(Protocol):
    def write(self, b: Buffer, /) -> int | None: ...


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Checksummed:
    def __init__(self) -> None:
        self.checksum = Checksum()

    def hexdigest(self) -> str:
        """Digest of the bytes that went through so far, e.g. ``"crc32:0a1b2c3d"``."""
        return self.checksum.hexdigest()

    @property
    def nbytes(self) -> int:
        return self.checksum.nbytes


class ChecksumWriter(_Checksummed):
    """Forwards writes to the binary file ``raw``, checksumming and counting what it accepted."""

    def __init__(self, raw: _Writable) -> None:
        super().__init__()
        self.raw = raw

    def write(self, b: Buffer) -> int:
        view = _byte_view(b, "b")
        written = self.raw.write(view)
        n = view.nbytes if written is None else written
        self.checksum.update(view[:n])
        return n

    def flush(self) -> None:
        flush = getattr(self.raw, "flush", None)
        if flush is not None:
            flush()


class ChecksumReader(_Checksummed):
    """Reads from the binary file ``raw``, checksumming and counting what it returned."""

    def __init__(self, raw: _Readable) -> None:
        super().__init__()
        self.raw = raw

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.checksum.update(data)
        return data
