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
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.metadata import MetadataIndex

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.dcp_io import METADATA_NAME, load_metadata
from asyncckpt.errors import CorruptCheckpointError, UnsafeCheckpointError
from helpers_crafting import replace_item as _replace_item, rewrite_file as _rewrite
from helpers.checkpoints import assert_same_tensors
from helpers.training import adam_state

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
    return adam_state(seed, (8, 16, 2), step_size=5, scheduler=rng, extra={"seed": seed} if rng else {},
                      rng=rng)


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
    assert_same_tensors(state.models["model"], saved.models["model"])
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


# -- (d) BUILD: a pickle that would change a class or a shared object for the whole process ---

# Each sets an attribute with BUILD's slot state on something an allowed global gives: the
# PosixPath class itself (so ``Path("/data/run") / "best.pt"`` would become a slice), or a
# shared enum member; the third gives a DCP dataclass a field it does not define.
_ON_CLASS = b"cpathlib\nPosixPath\nN}S'__truediv__'\ncbuiltins\nslice\ns\x86b."
_ON_ENUM = (b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n(I0\ntR"
            b"N}S'name_'\nS'evil'\ns\x86b.")


def _with_unknown_field(folder: Path) -> bytes:
    md = load_metadata((folder / METADATA_NAME).read_bytes(), METADATA_NAME)
    info = next(iter(md.storage_data.values()))
    info.__dict__["on_load"] = "x"  # a field _StorageInfo does not have
    return pickle.dumps(md)


def test_the_build_payload_is_real() -> None:
    """Plain pickle applies it (in a child process, so this one is not changed)."""
    import subprocess
    import sys

    code = ("import pickle, pathlib; pickle.loads(%r); "
            "print(type(pathlib.Path('/data/run') / 'best.pt').__name__)" % _ON_CLASS)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "slice"


@pytest.mark.parametrize("kind", ["on a class", "on an enum member", "unknown field"])
def test_metadata_build_cannot_change_the_process(root: Path, kind: str) -> None:
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    folder = root / STEP2
    data = {"on a class": _ON_CLASS, "on an enum member": _ON_ENUM,
            "unknown field": None}[kind] or _with_unknown_field(folder)
    _rewrite(folder, METADATA_NAME, data)
    with CheckpointManager(root) as mgr:
        with pytest.raises(UnsafeCheckpointError, match="refused") as info:
            mgr.restore(_state(9), 2)
        assert f"{STEP2}/{METADATA_NAME}" in str(info.value)
        assert mgr.restore(_state(9)) == 1  # "latest" falls back past it
    assert Path("/data/run") / "best.pt" == Path("/data/run/best.pt")
    assert _MEM_FORMAT_ENCODING(0).name == "TORCH_CONTIGUOUS_FORMAT"


def _confused(md: Any, how: str) -> Any:
    """``md`` (real metadata) with one field of the wrong type or out of bounds."""
    key = next(k for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks"))
    item = md.state_dict_metadata[key]
    index = next(iter(md.storage_data))
    if how == "items a list":
        md.state_dict_metadata = list(md.state_dict_metadata.items())
    elif how == "item an int":
        md.state_dict_metadata[key] = 7
    elif how == "properties None":
        item.properties = None
    elif how == "size a list":
        item.size = list(item.size)
    elif how == "chunk outside":
        item.chunks[0] = dataclasses.replace(item.chunks[0], offsets=torch.Size([d + 1 for d in item.size]))
    elif how == "chunks a dict":
        item.chunks = {0: item.chunks[0]}
    elif how == "location a dict":
        md.storage_data[index] = {"relative_path": "x"}
    elif how == "length past the file":
        md.storage_data[index] = dataclasses.replace(md.storage_data[index], length=10**9)
    elif how == "negative offset":
        md.storage_data[index] = dataclasses.replace(md.storage_data[index], offset=-5)
    elif how == "key an int":
        md.state_dict_metadata[5] = md.state_dict_metadata.pop(key)
    return md


CONFUSIONS = ["items a list", "item an int", "properties None", "size a list", "chunk outside",
              "chunks a dict", "location a dict", "length past the file", "negative offset",
              "key an int"]


@pytest.mark.parametrize("how", CONFUSIONS)
def test_type_confused_metadata_is_a_damaged_checkpoint(root: Path, how: str) -> None:
    folder = root / STEP2
    md = _confused(load_metadata((folder / METADATA_NAME).read_bytes(), METADATA_NAME), how)
    _rewrite(folder, METADATA_NAME, pickle.dumps(md, protocol=4))
    with CheckpointManager(root) as mgr:
        with pytest.raises(CorruptCheckpointError) as info:
            mgr.restore(_state(9), 2)
        assert f"{STEP2}/{METADATA_NAME}" in str(info.value)
        assert mgr.restore(_state(9)) == 1
