"""Loading a checkpoint never executes code from it, even when its checksums match.

Each crafted pickle would create a marker file if it were unpickled normally
(the first test shows it does).  It is planted in a checkpoint, in ``.metadata``
or in an object blob inside a shard, and the manifest's sizes and checksums are
rewritten to match, so ``verify`` passes and the safe reader itself is what is
tested.  The same holds for folders written by plain
``torch.distributed.checkpoint.save`` (no manifest at all).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.metadata import MetadataIndex

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.codec import CodecOptions, checksum_bytes, encode_bytes
from asyncckpt.dcp_io import METADATA_NAME, load_metadata
from asyncckpt.errors import CorruptCheckpointError, UnsafeCheckpointError
from asyncckpt.manifest import MANIFEST_NAME, seal

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEP2 = "step-0000000002"


# -- payloads: each one's __reduce__ would create ``marker`` when unpickled ------------------

@dataclasses.dataclass
class Shell:
    marker: str

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@dataclasses.dataclass
class Exec:
    marker: str

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@dataclasses.dataclass
class Open:
    marker: str

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


PAYLOADS: dict[str, Callable[[str], object]] = {"os.system": Shell, "builtins.exec": Exec,
                                                "builtins.open": Open}


def _state(seed: int, *, rng: bool = True) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
    return TrainState(model=model, optimizer=opt, scheduler=sched if rng else None,
                      extra={"seed": seed} if rng else {}, rng=rng)


@pytest.fixture(scope="module", params=["zstd", None], ids=["zstd", "plain"])
def pristine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(f"safe-{request.param}") / "ckpt"
    with CheckpointManager(root, compression=request.param) as mgr:
        mgr.save(1, _state(1), blocking=True)
        mgr.save(2, _state(2), blocking=True)
    return root


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine checkpoints, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def _rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace one file and make the manifest agree with it (size and checksum)."""
    (folder / name).write_bytes(data)
    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    (entry,) = [f for f in manifest["files"] if f["path"] == name]
    entry.update(size=len(data), checksum=checksum_bytes(data))
    manifest_path.write_text(json.dumps(seal(manifest), indent=1))


def _replace_item(folder: Path, fqn: str, blob: bytes) -> str:
    """Put ``blob`` in place of object item ``fqn`` (re-laying out its shard); returns the shard."""
    md = load_metadata((folder / METADATA_NAME).read_bytes(), METADATA_NAME)
    key = MetadataIndex(fqn)
    info = md.storage_data[key]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    codec = next(f["codec"] for f in manifest["files"] if f["path"] == info.relative_path)
    stored = encode_bytes(blob, itemsize=1, options=CodecOptions()) if codec else blob
    shard = (folder / info.relative_path).read_bytes()
    delta = len(stored) - info.length
    for k, v in md.storage_data.items():
        if v.relative_path == info.relative_path and v.offset > info.offset:
            md.storage_data[k] = dataclasses.replace(v, offset=v.offset + delta)
    md.storage_data[key] = dataclasses.replace(info, length=len(stored))
    _rewrite(folder, info.relative_path,
             shard[:info.offset] + stored + shard[info.offset + info.length:])
    _rewrite(folder, METADATA_NAME, pickle.dumps(md))
    return info.relative_path


def _torch_saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# -- the payloads are real ---------------------------------------------------------------

@pytest.mark.parametrize("payload", PAYLOADS)
def test_payloads_do_run_when_unpickled_normally(payload: str, marker: Path) -> None:
    pickle.loads(pickle.dumps(PAYLOADS[payload](str(marker))))
    assert marker.exists()


# -- (a) .metadata ---------------------------------------------------------------------------

def _crafted_metadata(kind: str, marker: Path, folder: Path) -> bytes:
    if kind == "nested in real metadata":
        md = load_metadata((folder / METADATA_NAME).read_bytes(), METADATA_NAME)
        md.planner_data = {"model/model": (Shell(str(marker)),)}
        return pickle.dumps(md)
    return pickle.dumps(PAYLOADS[kind](str(marker)), protocol=2 if kind == "builtins.exec" else 5)


@pytest.mark.parametrize("kind", [*PAYLOADS, "nested in real metadata"])
def test_crafted_metadata_is_refused_and_runs_nothing(root: Path, marker: Path, kind: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    folder = root / STEP2
    _rewrite(folder, METADATA_NAME, _crafted_metadata(kind, marker, folder))
    with CheckpointManager(root) as mgr:
        assert mgr.verify(2) == {2: []}  # checksums match: only the unpickler stands in the way
        with pytest.raises(UnsafeCheckpointError) as info:
            mgr.restore(_state(9), 2)
        assert f"{STEP2}/{METADATA_NAME}" in str(info.value)
        assert "nothing was executed" in str(info.value)
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            assert mgr.restore(_state(9)) == 1  # "latest" skips it, saying why
    assert any("step=2 is refused as unsafe" in r.getMessage() and METADATA_NAME in r.getMessage()
               for r in caplog.records)
    assert not marker.exists()


class _Gadget:
    def __reduce__(self) -> tuple[Any, ...]:
        return (FileSystemWriter, ("x",))


@pytest.mark.parametrize("data", [
    pytest.param(pickle.dumps(_Gadget()), id="DCP writer class"),
    # protocol 0 by hand: call the pathlib.Path that the DCP filesystem module imports
    pytest.param(b"ctorch.distributed.checkpoint.filesystem\nPath\n(S'x'\ntR.",
                 id="class imported into a DCP module"),
    pytest.param(b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__class__'\ntR.", id="getattr"),
])
def test_metadata_allows_dcp_data_classes_only(data: bytes) -> None:
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_metadata(data, "crafted/.metadata")


@pytest.mark.parametrize("path", ["../outside.distcp", "sub/x.distcp", "", ".."])
def test_metadata_pointing_outside_the_folder_is_refused(root: Path, path: str) -> None:
    folder = root / STEP2
    md = load_metadata((folder / METADATA_NAME).read_bytes(), METADATA_NAME)
    key = next(iter(md.storage_data))
    md.storage_data[key] = dataclasses.replace(md.storage_data[key], relative_path=path)
    with pytest.raises(CorruptCheckpointError, match=f"item {key.fqn}"):
        load_metadata(pickle.dumps(md), "x/.metadata")


def test_metadata_missing_an_item_location_is_refused(root: Path) -> None:
    folder = root / STEP2
    md = load_metadata((folder / METADATA_NAME).read_bytes(), METADATA_NAME)
    del md.storage_data[MetadataIndex("extra")]
    with pytest.raises(CorruptCheckpointError, match="item extra"):
        load_metadata(pickle.dumps(md), "x/.metadata")


# -- (b) object blobs inside a shard -------------------------------------------------------

@pytest.mark.parametrize("fqn, fmt", [("extra", "torch.save"), ("scheduler", "torch.save"),
                                      ("rank_0/rng", "torch.save"), ("extra", "raw pickle")])
def test_crafted_object_blob_is_refused_and_runs_nothing(root: Path, marker: Path, fqn: str,
                                                         fmt: str) -> None:
    evil = Shell(str(marker))
    blob = _torch_saved({"seed": evil}) if fmt == "torch.save" else pickle.dumps(evil, protocol=2)
    shard = _replace_item(root / STEP2, fqn, blob)
    with CheckpointManager(root) as mgr:
        assert mgr.verify(2) == {2: []}
        with pytest.raises(UnsafeCheckpointError) as info:
            mgr.restore(_state(9), 2)
    assert f"{STEP2}/{shard}" in str(info.value) and f"item {fqn}" in str(info.value)
    assert not marker.exists()


def test_rewritten_blob_with_plain_values_loads(root: Path) -> None:
    """Control: the re-layout above is sound, so the refusals are the unpickler's."""
    _replace_item(root / STEP2, "extra", _torch_saved({"seed": 42, "note": "x" * 3000}))
    state = _state(9)
    with CheckpointManager(root) as mgr:
        assert mgr.verify(2) == {2: []}
        assert mgr.restore(state, 2) == 2
    assert state.extra == {"seed": 42, "note": "x" * 3000}


# -- (c) folders written by plain DCP ------------------------------------------------------

def _plain_dcp(path: Path, **objects: object) -> TrainState:
    state = _state(3, rng=False)
    dcp.save({**state.tensors(), **objects}, checkpoint_id=str(path))
    return state


def test_plain_dcp_folder_restores_through_the_safe_reader(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    saved = _plain_dcp(tmp_path / "plain")
    state = _state(9, rng=False)
    with CheckpointManager(tmp_path / "root") as mgr, \
            caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert mgr.restore(state, tmp_path / "plain") == 0
    for a, b in zip(saved.models["model"].state_dict().values(),
                    state.models["model"].state_dict().values()):
        assert torch.equal(a, b)
    assert any("plain DCP" in r.getMessage() for r in caplog.records)


def test_plain_dcp_crafted_metadata_is_refused(tmp_path: Path, marker: Path) -> None:
    _plain_dcp(tmp_path / "plain")
    (tmp_path / "plain" / METADATA_NAME).write_bytes(pickle.dumps(Shell(str(marker))))
    with CheckpointManager(tmp_path / "root") as mgr:
        with pytest.raises(UnsafeCheckpointError, match=f"plain/{METADATA_NAME}"):
            mgr.restore(_state(9, rng=False), tmp_path / "plain")
    assert not marker.exists()


def test_plain_dcp_crafted_object_is_refused(tmp_path: Path, marker: Path) -> None:
    _plain_dcp(tmp_path / "plain", extra=Shell(str(marker)))  # DCP pickles it with torch.save
    state = _state(9, rng=False)
    state.extra["seed"] = 0
    with CheckpointManager(tmp_path / "root") as mgr:
        with pytest.raises(UnsafeCheckpointError) as info:
            mgr.restore(state, tmp_path / "plain")
    assert "plain/__0_0.distcp" in str(info.value) and "item extra" in str(info.value)
    assert not marker.exists()


def test_folder_without_manifest_or_metadata_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with CheckpointManager(tmp_path / "root") as mgr, pytest.raises(LookupError):
        mgr.restore(_state(9), tmp_path / "empty")
