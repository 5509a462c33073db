"""Bounded work for any file: decompression bombs, files that never end, names that leave
their folder, JSON nested too deep.  Each checkpoint is crafted by the test itself from a
real one, resealed where the reader (not the checksum) is what must stand in the way."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.metadata import MetadataIndex

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.codec import MAGIC, CodecOptions, _compressor
from asyncckpt.dcp_io import METADATA_NAME, load_metadata
from asyncckpt.errors import CorruptCheckpointError, LeaseError
from asyncckpt.manifest import MANIFEST_NAME
from asyncckpt.quarantine import list_quarantined
from asyncckpt.release import CARD_NAME
from asyncckpt.storage import Storage
from helpers_crafting import replace_stored

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEP2 = "step-0000000002"
DEADLINE_S = 120


def _state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainState(model=model, optimizer=opt, extra={"seed": seed, "note": "n" * 100})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "ckpt"
    with CheckpointManager(root, compression="zstd") as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step), blocking=True)
    return root


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def _header(raw_nbytes: int, chunk_bytes: int = 8 << 20) -> bytes:
    head = struct.pack("<4sBBBQI", MAGIC, 1, 0, 1, raw_nbytes, chunk_bytes)
    return head + struct.pack("<I", zlib.crc32(head))


def _zero_frames(raw_nbytes: int, chunk_bytes: int = 8 << 20) -> bytes:
    """A valid encoded item of ``raw_nbytes`` zero bytes, made from one compressed chunk
    repeated (so the test never holds the decoded size itself)."""
    frame = _compressor(CodecOptions()).compress(bytes(chunk_bytes))
    chunk = struct.pack("<III", chunk_bytes, len(frame), zlib.crc32(frame)) + frame
    assert raw_nbytes % chunk_bytes == 0
    return _header(raw_nbytes, chunk_bytes) + chunk * (raw_nbytes // chunk_bytes)


def _weight_index(folder: Path) -> MetadataIndex:
    md = load_metadata((folder / METADATA_NAME).read_bytes(), METADATA_NAME)
    return next(k for k in md.storage_data if k.fqn == "model/model.0.weight")


_CHILD = """
import resource, sys, torch
sys.path.insert(0, {tests!r})
from test_hostile_inputs import _state
from asyncckpt import CheckpointManager
from asyncckpt.errors import CorruptCheckpointError
with CheckpointManager({root!r}) as mgr:
    state = _state(9)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        mgr.restore(state, 2)
        print("RESTORED")
    except CorruptCheckpointError as e:
        print("ERROR", e)
    print("GREW_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def _restore_in_child(root: Path) -> tuple[str, int]:
    """Restore step 2 in a fresh process; (its error message, how much its peak RSS grew, KiB)."""
    code = _CHILD.format(tests=str(Path(__file__).parent), root=str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=DEADLINE_S, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert "GREW_KB" in lines, out.stderr[-2000:]
    return lines.get("ERROR", "restored"), int(lines["GREW_KB"])


# -- decompression bombs -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tensor: 23-byte header claiming 3 GiB",
                                  "tensor: valid frames decoding to 2 GiB",
                                  "object: valid frames decoding to 2 GiB",
                                  "chunk larger than the codec allows"])
def test_decompression_bomb_fails_fast_in_bounded_memory(root: Path, kind: str) -> None:
    folder = root / STEP2
    if kind.startswith("tensor: 23"):
        index, stored = _weight_index(folder), _header(3 << 30)
    elif kind.startswith("tensor"):
        index, stored = _weight_index(folder), _zero_frames(2 << 30)
    elif kind.startswith("object"):
        index, stored = MetadataIndex("extra"), _zero_frames(2 << 30)
    else:
        index, stored = MetadataIndex("extra"), _header(3 << 30, chunk_bytes=2 << 30)
    shard = replace_stored(folder, index, stored)
    message, grew_kb = _restore_in_child(root)
    assert f"{STEP2}/{shard}" in message and f"item {index.fqn}" in message, message
    assert grew_kb < 64 << 10, f"peak RSS grew by {grew_kb} KiB"


def test_bomb_in_latest_falls_back_to_the_previous_checkpoint(root: Path) -> None:
    replace_stored(root / STEP2, _weight_index(root / STEP2), _header(3 << 30))
    with CheckpointManager(root) as mgr:
        assert mgr.restore(_state(9)) == 1


# -- reads that would never end ---------------------------------------------------------

def _shard(folder: Path) -> Path:
    return next(p for p in folder.iterdir() if p.suffix == ".distcp")


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo", "symlink out of the folder",
                                  "longer than recorded"])
def test_shard_that_is_not_the_recorded_file_is_refused_without_hanging(root: Path, tmp_path: Path,
                                                                        kind: str) -> None:
    shard = _shard(root / STEP2)
    data = shard.read_bytes()
    shard.unlink()
    if kind == "symlink to /dev/zero":
        shard.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(shard)
    elif kind == "symlink out of the folder":
        outside = tmp_path / "elsewhere.distcp"
        outside.write_bytes(data)
        shard.symlink_to(outside)
    else:
        shard.write_bytes(data + bytes(1 << 20))
    expected = {"symlink to /dev/zero": "a link to /dev/zero", "fifo": "a FIFO",
                "symlink out of the folder": "a link to", "longer than recorded": "more than"}[kind]
    with CheckpointManager(root) as mgr:
        report = mgr.verify(2)[2]
        assert len(report) == 1 and shard.name in report[0] and expected in report[0], report
        with pytest.raises(CorruptCheckpointError, match=shard.name):
            mgr.restore(_state(9), 2)
        assert mgr.restore(_state(9)) == 1


def test_a_symlink_inside_the_folder_is_read(root: Path) -> None:
    """Only links that leave the checkpoint's folder are refused."""
    folder = root / STEP2
    shard = _shard(folder)
    shard.rename(folder / "real.bin")
    shard.symlink_to("real.bin")
    with CheckpointManager(root) as mgr:
        assert mgr.verify(2) == {2: []}
        assert mgr.restore(_state(9), 2) == 2


def test_a_manifest_that_is_a_fifo_makes_the_checkpoint_invisible(root: Path) -> None:
    manifest = root / STEP2 / MANIFEST_NAME
    manifest.unlink()
    os.mkfifo(manifest)
    with CheckpointManager(root) as mgr:
        assert [c.step for c in mgr.list()] == [1]
        assert mgr.restore(_state(9)) == 1


# -- JSON nested too deep ------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_manifest_is_a_damaged_checkpoint(root: Path) -> None:
    (root / STEP2 / MANIFEST_NAME).write_text(DEEP)
    with CheckpointManager(root) as mgr:
        assert [c.step for c in mgr.list()] == [1]
        assert mgr.restore(_state(9)) == 1
        (aside,) = list_quarantined(Storage(root))
        assert aside.step == 2 and "nesting too deep" in aside.reason
        mgr.save(2, _state(2), blocking=True)  # training runs through it again
        assert [c.step for c in mgr.list()] == [1, 2]


def test_deeply_nested_lease_is_a_clear_lease_error(root: Path) -> None:
    (root / ".lease.json").write_text("[" * 20_000 + "]" * 20_000)
    with pytest.raises(LeaseError, match="nesting too deep"):
        CheckpointManager(root)


def test_rollback_record_naming_a_path_is_ignored(root: Path, tmp_path: Path) -> None:
    """A record's moves name folders that restarts move or delete: one that names a path
    outside ``abandoned/`` is never acted on."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (root / "abandoned").mkdir()
    record = {"format": 1, "state": "moving", "policy": "keep", "time": "2026-01-01T00:00:00Z",
              "from_step": 1, "branch": "ab", "abandoned_branch": None, "reason": "x",
              "moves": [{"step": 2, "manifest_crc": "crc32:00000000", "name": "../../victim"}]}
    (root / "abandoned" / "rollback-20260101T000000Z-ab.json").write_text(json.dumps(record))
    with CheckpointManager(root) as mgr:
        assert [c.step for c in mgr.list()] == [1, 2]
    assert (victim / "keep.txt").read_text() == "mine"


# -- names in a release's card ---------------------------------------------------------------

@pytest.mark.parametrize("weights", ["../../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_release_card_naming_weights_outside_its_folder_is_refused(tmp_path: Path, weights: str) -> None:
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, _state(1), blocking=True)
        mgr.release(1, version="1.0.0")
    folder = tmp_path / "run" / "releases" / "v1.0.0"
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "model.safetensors", outside)
    card = json.loads((folder / CARD_NAME).read_text())
    card["weights"] = weights
    card["files"].append({"path": weights, "size": outside.stat().st_size,
                          "checksum": card["files"][0]["checksum"]})
    (folder / CARD_NAME).write_text(json.dumps(card))
    with CheckpointManager(tmp_path / "ft", initial_from=str(folder)) as mgr:
        with pytest.raises(CorruptCheckpointError, match="damaged model card"):
            mgr.restore(_state(9))
    with CheckpointManager(tmp_path / "run") as mgr:  # a damaged card is not a release
        assert mgr.releases() == []


def test_storage_refuses_to_read_a_device(tmp_path: Path) -> None:
    (tmp_path / "dev").symlink_to("/dev/null")
    with pytest.raises(CorruptCheckpointError, match="a link to /dev/null"):
        Storage(tmp_path).read_bytes("dev")
