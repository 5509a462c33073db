"""Tests of asyncckpt.codec: round trips, parallel encoding, corruption, checksums."""

from __future__ import annotations

import io
import random
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt import codec
from asyncckpt.codec import (
    CHECKSUM_ALGO,
    HEADER_BYTES,
    Checksum,
    ChecksumReader,
    ChecksumWriter,
    CodecOptions,
    checksum_bytes,
    decode,
    decode_bytes,
    encode,
    encode_bytes,
    is_encoded,
    parse_header,
)
from asyncckpt.errors import ConfigError, CorruptCheckpointError

KIB = 1024
SMALL = CodecOptions(chunk_bytes=64 * KIB)
CHUNK_HEADER_BYTES = 12


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _weights(n: int, seed: int = 0) -> bytes:
    """float32 bytes that look like trained weights."""
    return np.random.default_rng(seed).normal(0.0, 0.02, n).astype(np.float32).tobytes()


# ----------------------------------------------------------------- options


@pytest.mark.parametrize(
    "field, value",
    [
        ("level", 0),
        ("level", 23),
        ("level", -6),
        ("level", True),
        ("level", 1.5),
        ("level", "3"),
        ("threads", -2),
        ("threads", 257),
        ("threads", 1.0),
        ("chunk_bytes", 64 * KIB - 1),
        ("chunk_bytes", 0),
        ("chunk_bytes", 2**31),
        ("chunk_bytes", None),
    ],
)
def test_options_reject_bad_values_naming_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        CodecOptions(**{field: value})
    assert f"{field}={value!r}" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"level": 22}, {"level": -5}, {"level": -1}, {"threads": -1}, {"threads": 4},
     {"chunk_bytes": 64 * KIB}, {"chunk_bytes": 100_003}],
)
def test_options_accept_valid_values(kwargs: dict[str, int]) -> None:
    options = CodecOptions(**kwargs)
    for key, value in kwargs.items():
        assert getattr(options, key) == value


def test_options_are_frozen_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        CodecOptions(3)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        SMALL.level = 3  # type: ignore[misc]


def test_encode_checks_arguments_before_iterating() -> None:
    with pytest.raises(ConfigError, match="itemsize=0"):
        encode(b"abc", itemsize=0, options=SMALL)
    with pytest.raises(ConfigError, match="itemsize=256"):
        encode(b"abc", itemsize=256, options=SMALL)
    with pytest.raises(ConfigError, match="max_in_flight=0"):
        encode(b"abc", itemsize=1, options=SMALL, executor=None, max_in_flight=0)
    strided = memoryview(bytearray(64))[::2]
    with pytest.raises(ConfigError, match="C-contiguous"):
        encode(strided, itemsize=1, options=SMALL)


# -------------------------------------------------------------- round trips

CH = 64 * KIB


@pytest.mark.parametrize("itemsize", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(
    "size", [0, 1, 3, 4, 7, 8, 1000, CH - 1, CH, CH + 1, 2 * CH, 3 * CH + 5, 4 * CH]
)
def test_round_trip_sizes(size: int, itemsize: int) -> None:
    data = _random_bytes(size, seed=size)
    blob = encode_bytes(data, itemsize=itemsize, options=SMALL)
    assert is_encoded(blob)
    assert decode_bytes(blob) == data
    header = parse_header(blob[:HEADER_BYTES])
    assert header.raw_nbytes == size
    assert header.itemsize == itemsize
    assert header.grouped == (itemsize > 1)
    assert header.chunk_bytes % itemsize == 0
    assert sum(header.chunk_sizes()) == size


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 300_000),
    seed=st.integers(0, 2**32 - 1),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    chunk_bytes=st.sampled_from([64 * KIB, 64 * KIB + 3, 100_003]),
    compressible=st.booleans(),
    level=st.sampled_from([-3, 1, 3]),
)
def test_round_trip_property(
    size: int, seed: int, itemsize: int, chunk_bytes: int, compressible: bool, level: int
) -> None:
    if compressible:
        data = _weights(size // 4 + 1, seed)[:size]
    else:
        data = _random_bytes(size, seed)
    options = CodecOptions(level=level, chunk_bytes=chunk_bytes)
    blob = encode_bytes(data, itemsize=itemsize, options=options)
    assert bytes(decode_bytes(blob)) == data


def test_round_trip_typed_memoryview_and_out_buffer() -> None:
    weights = np.random.default_rng(1).normal(0, 0.02, (300, 301)).astype(np.float32)
    blob = encode_bytes(memoryview(weights), itemsize=4, options=SMALL)
    restored = np.empty_like(weights)
    result = decode_bytes(blob, out=memoryview(restored))
    assert isinstance(result, memoryview)
    np.testing.assert_array_equal(restored, weights)

    out = bytearray(weights.nbytes)
    assert decode(io.BytesIO(blob).read, out=out) is out
    assert bytes(out) == weights.tobytes()


def test_decode_out_of_wrong_size_or_readonly() -> None:
    blob = encode_bytes(b"x" * 100, itemsize=4, options=SMALL)
    with pytest.raises(CorruptCheckpointError, match="w.bin"):
        decode_bytes(blob, out=bytearray(99), name="w.bin")
    with pytest.raises(ConfigError, match="writable"):
        decode_bytes(blob, out=memoryview(bytes(100)))  # type: ignore[arg-type]


def test_items_follow_each_other_in_a_stream() -> None:
    first, second = _weights(40_000, 1), _random_bytes(5000, 2)
    stream = io.BytesIO(
        encode_bytes(first, itemsize=4, options=SMALL)
        + encode_bytes(second, itemsize=1, options=SMALL)
        + b"rest"
    )
    assert decode(stream.read, name="s") == first
    assert decode(stream.read, name="s") == second
    assert stream.read() == b"rest"


def test_decode_copes_with_short_reads() -> None:
    data = _weights(50_000, 3)
    stream = io.BytesIO(encode_bytes(data, itemsize=4, options=SMALL))
    assert decode(lambda n: stream.read(min(n, 777))) == data


def test_is_encoded() -> None:
    assert is_encoded(encode_bytes(b"", itemsize=1, options=SMALL))
    assert not is_encoded(b"PK\x03\x04")
    assert not is_encoded(b"")


# ------------------------------------------------------------------ parallel


@pytest.mark.parametrize("itemsize", [1, 4])
@pytest.mark.parametrize("max_in_flight", [None, 1, 3])
def test_parallel_encoding_gives_the_serial_bytes(itemsize: int, max_in_flight: int | None) -> None:
    data = _weights(300_000, 4)[:-3]  # 1.2 MB, not a multiple of the chunk or itemsize
    serial = encode_bytes(data, itemsize=itemsize, options=SMALL)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pieces = encode(
            data, itemsize=itemsize, options=SMALL, executor=pool, max_in_flight=max_in_flight
        )
        parallel = b"".join(pieces)
    assert parallel == serial
    assert decode_bytes(parallel) == data


class _CountingPool(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_parallel_encoding_bounds_chunks_in_flight() -> None:
    data = _random_bytes(40 * CH, 5)
    with _CountingPool() as pool:
        pieces = encode(data, itemsize=1, options=SMALL, executor=pool, max_in_flight=3)
        next(pieces)  # the header
        consumed, worst = 0, 0
        for index, _ in enumerate(pieces):
            consumed += index % 2  # two pieces per chunk
            worst = max(worst, pool.submitted - consumed)
    assert pool.submitted == 40
    assert worst <= 3


def test_abandoned_parallel_encoding_does_not_hang() -> None:
    data = _random_bytes(20 * CH, 6)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pieces = encode(data, itemsize=1, options=SMALL, executor=pool)
        next(pieces)
        next(pieces)
        pieces.close()  # type: ignore[attr-defined]
        with pytest.raises(StopIteration):
            next(pieces)
        # the pool is not left busy with the abandoned chunks: new work runs at once
        assert pool.submit(sum, (1, 2)).result(timeout=30) == 3


# ------------------------------------------------------------ compression ratio


GROUPING_CASES = [(itemsize, size) for itemsize in (2, 3, 4, 8) for size in (0, 1, 7, 4096, 70_001)]
_WITHOUT_NUMPY = """
import pickle, random, sys
sys.modules["numpy"] = None                    # numpy cannot be imported in this process
from asyncckpt import codec
from asyncckpt.codec import CodecOptions, decode_bytes, encode_bytes
assert codec._numpy() is None
cases, encoded = pickle.loads(sys.stdin.buffer.read()), {}
for itemsize, size, data, with_numpy in cases:
    encoded[itemsize, size] = (encode_bytes(data, itemsize=itemsize, options=CodecOptions(chunk_bytes=64 << 10)),
                               bytes(decode_bytes(with_numpy)))
sys.stdout.buffer.write(pickle.dumps(encoded))
"""


@pytest.fixture(scope="module")
def without_numpy() -> dict:
    """What a process without numpy encodes (and decodes from numpy's bytes), for every case."""
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    cases = [(i, n, _random_bytes(n, n), encode_bytes(_random_bytes(n, n), itemsize=i, options=SMALL))
             for i, n in GROUPING_CASES]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _WITHOUT_NUMPY], input=pickle.dumps(cases),
                         capture_output=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return pickle.loads(out.stdout)


@pytest.mark.parametrize("itemsize, size", GROUPING_CASES)
def test_pure_python_grouping_writes_the_same_bytes(without_numpy: dict, itemsize: int, size: int) -> None:
    """Without numpy the format is identical: each decodes what the other encoded."""
    data = _random_bytes(size, size)
    with_numpy = encode_bytes(data, itemsize=itemsize, options=SMALL)
    pure, pure_decoded = without_numpy[itemsize, size]
    assert pure == with_numpy
    assert pure_decoded == data                       # pure Python decodes numpy's bytes
    assert bytes(decode_bytes(pure)) == data          # and numpy decodes pure Python's


def test_grouping_puts_byte_planes_in_order() -> None:
    data = bytes(range(10))  # elements 0123 4567 and a partial 89
    out = codec._group(memoryview(data), 4)
    assert bytes(out) == bytes([0, 4, 1, 5, 2, 6, 3, 7, 8, 9])
    back = bytearray(10)
    codec._ungroup_into(bytes(out), 4, memoryview(back))
    assert bytes(back) == data


def test_byte_grouping_compresses_float32_weights_better() -> None:
    data = _weights(1 << 20, 7)
    options = CodecOptions(level=1)
    plain = len(encode_bytes(data, itemsize=1, options=options))
    grouped = len(encode_bytes(data, itemsize=4, options=options))
    assert grouped < plain < len(data) * 1.01
    assert grouped / len(data) < 0.9


# --------------------------------------------------------------- corruption


def _chunk_offsets(blob: bytes) -> list[tuple[int, int]]:
    """(offset of chunk header, frame length) for each chunk of a well-formed blob."""
    offsets, pos = [], HEADER_BYTES
    while pos < len(blob):
        _, zstd_len, _ = struct.unpack_from("<III", blob, pos)
        offsets.append((pos, zstd_len))
        pos += CHUNK_HEADER_BYTES + zstd_len
    return offsets


@pytest.fixture(scope="module")
def blob() -> bytes:
    data = _weights(60_000, 8)  # 240 KB: four chunks of 64 KiB
    encoded = encode_bytes(data, itemsize=4, options=SMALL)
    assert len(_chunk_offsets(encoded)) == 4
    return encoded


def _flip_positions(blob: bytes) -> list[int]:
    positions = set(range(HEADER_BYTES))
    for start, zstd_len in _chunk_offsets(blob):
        frame = start + CHUNK_HEADER_BYTES
        positions.update(range(start, frame + 24))  # chunk header and zstd frame header
        positions.update(range(frame + zstd_len - 8, frame + zstd_len))  # zstd checksum
    rng = random.Random(9)
    positions.update(rng.randrange(len(blob)) for _ in range(150))
    return sorted(positions)


def test_every_flipped_byte_is_detected(blob: bytes) -> None:
    positions = _flip_positions(blob)
    assert len(positions) > 200
    for pos in positions:
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(blob)
            damaged[pos] ^= mask
            with pytest.raises(CorruptCheckpointError, match=r"^shard-3\.distcp: ") as info:
                decode_bytes(damaged, name="shard-3.distcp")
            assert info.value.path == "shard-3.distcp"


def test_every_truncation_is_detected(blob: bytes) -> None:
    cuts = list(range(0, 40)) + list(range(40, len(blob), 997)) + [len(blob) - 1]
    for cut in cuts:
        with pytest.raises(CorruptCheckpointError, match="truncated") as info:
            decode(io.BytesIO(blob[:cut]).read, name="t.bin")
        assert info.value.path == "t.bin"


def test_trailing_bytes_are_corruption_for_decode_bytes(blob: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match="trailing bytes"):
        decode_bytes(blob + b"\0", name="t.bin")


@pytest.mark.parametrize(
    "offset, value, message",
    [(0, b"PK\x03\x04", "not an encoded item"), (4, b"\x02", "unknown codec version"),
     (5, b"\x03", "damaged header"), (HEADER_BYTES, b"\x07", "bad chunk length")],
)
def test_corruption_messages_say_what_is_wrong(
    blob: bytes, offset: int, value: bytes, message: str
) -> None:
    damaged = bytearray(blob)
    damaged[offset : offset + len(value)] = value
    with pytest.raises(CorruptCheckpointError, match=message):
        decode_bytes(damaged, name="m.bin")


def _crafted(raw_nbytes: int, frame: bytes) -> bytes:
    """A one-chunk item whose header and frame CRCs are right whatever the frame holds."""
    head = struct.pack("<4sBBBQI", b"ACZ1", 1, 0, 1, raw_nbytes, 64 * KIB)
    chunk = struct.pack("<III", raw_nbytes, len(frame), zlib.crc32(frame))
    return head + struct.pack("<I", zlib.crc32(head)) + chunk + frame


@pytest.mark.parametrize(
    "frame",
    [
        zstandard.ZstdCompressor(write_checksum=True).compress(b"y" * 99),  # wrong length
        zstandard.ZstdCompressor(write_content_size=False).compress(b"y" * 100),
        zstandard.ZstdCompressor().compress(b"y" * 100) + b"extra",
        b"\x28\xb5\x2f\xfd" + b"\x00" * 20,
        b"not zstd at all",
    ],
)
def test_bad_zstd_frames_with_valid_crcs_are_detected(frame: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match=r"^z\.bin: .*zstd frame"):
        decode_bytes(_crafted(100, frame), name="z.bin")


def test_header_fields_that_cannot_be_are_rejected_even_with_a_valid_crc() -> None:
    head = struct.pack("<4sBBBQI", b"ACZ1", 1, 0x02, 4, 10, 64 * KIB)
    buf = head + struct.pack("<I", zlib.crc32(head))
    with pytest.raises(CorruptCheckpointError, match="impossible header"):
        parse_header(buf, name="h.bin")


# ---------------------------------------------------------------- checksums


@settings(max_examples=50, deadline=None)
@given(parts=st.lists(st.binary(max_size=3000), max_size=8))
def test_checksum_is_crc32_of_the_concatenation(parts: list[bytes]) -> None:
    checksum = Checksum()
    for part in parts:
        checksum.update(part)
    whole = b"".join(parts)
    assert checksum.hexdigest() == f"{CHECKSUM_ALGO}:{zlib.crc32(whole):08x}"
    assert checksum.hexdigest() == checksum_bytes(whole)
    assert checksum.nbytes == len(whole)


def test_checksum_counts_bytes_of_typed_buffers() -> None:
    values = np.arange(10, dtype=np.float64)
    checksum = Checksum()
    checksum.update(memoryview(values))
    assert checksum.nbytes == 80
    assert checksum.hexdigest() == checksum_bytes(values.tobytes())


def test_checksum_writer_and_reader_agree_with_the_file() -> None:
    sink = io.BytesIO()
    writer = ChecksumWriter(sink)
    for piece in encode(_weights(50_000, 10), itemsize=4, options=SMALL):
        assert writer.write(piece) == len(piece)
    writer.flush()
    written = sink.getvalue()
    assert writer.nbytes == len(written)
    assert writer.hexdigest() == checksum_bytes(written)

    reader = ChecksumReader(io.BytesIO(written))
    decode(reader.read)
    assert reader.nbytes == len(written)
    assert reader.hexdigest() == checksum_bytes(written)


class _ShortWriter:
    """A raw file that accepts at most 5 bytes per write."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> int:
        self.data += bytes(b[:5])
        return min(len(b), 5)


def test_checksum_writer_counts_only_accepted_bytes() -> None:
    raw = _ShortWriter()
    writer = ChecksumWriter(raw)
    assert writer.write(b"0123456789") == 5
    assert writer.nbytes == 5
    assert writer.hexdigest() == checksum_bytes(b"01234")


def test_module_imports_neither_torch_nor_numpy_at_import_time() -> None:
    """numpy is imported lazily, on the first byte grouping; the CLI never groups."""
    imported = {name.split(".")[0] for name in _imports(codec.__file__, top_level=True)}
    assert imported <= {
        "__future__", "functools", "logging", "os", "struct", "zlib", "collections",
        "concurrent", "dataclasses", "typing", "zstandard", "asyncckpt",
    }
    assert {name.split(".")[0] for name in _imports(codec.__file__)} - imported == {"numpy"}
    import subprocess
    import sys

    probe = "import sys, asyncckpt.codec; print('numpy' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def _imports(path: str, *, top_level: bool = False) -> list[str]:
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names: list[str] = []
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names
