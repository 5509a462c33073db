"""Bad inputs: one table of what a user may get wrong (options, URLs, state objects, damaged
files, a manifest from the future, an unknown codec, another model's checkpoint), each with the
exact error type raised and a piece of its message.

Every case gets its own copy of a root holding two committed checkpoints (steps 1 and 2) of
``_model()``; the case damages what it needs and performs one call.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncckpt import CheckpointManager, Retention, Schedule, TrainState
from asyncckpt.codec import checksum_bytes
from asyncckpt.manifest import seal
from asyncckpt.errors import (CheckpointExistsError, CheckpointNotFoundError, ConfigError,
                              CorruptCheckpointError, StateMismatchError, StorageError,
                              UnsafeCheckpointError)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model(width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(48, width), torch.nn.Linear(width, 4))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs") / "base"
    with CheckpointManager(root) as mgr:
        for step in (1, 2):
            mgr.save(step, TrainState(model=_model()), blocking=True)
    return root


class Case:
    """One case's root and helpers; managers it opens are closed afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._open: list[CheckpointManager] = []

    def mgr(self, **kwargs: Any) -> CheckpointManager:
        mgr = CheckpointManager(self.root, **kwargs)
        self._open.append(mgr)
        return mgr

    def state(self, width: int = 8) -> TrainState:
        return TrainState(model=_model(width))

    def folder(self, step: int) -> Path:
        return self.root / f"step-{step:010d}"

    def shard(self, step: int) -> Path:
        return next(p for p in sorted(self.folder(step).iterdir()) if p.suffix == ".distcp")

    def manifest(self, step: int) -> dict[str, Any]:
        return json.loads((self.folder(step) / "manifest.json").read_text())

    def write_manifest(self, step: int, data: dict[str, Any]) -> None:
        """Write an edited manifest, sealed: only the edit is wrong, not its own checksum."""
        (self.folder(step) / "manifest.json").write_text(json.dumps(seal(data)))

    def replace_file(self, step: int, name: str, data: bytes) -> None:
        """Replace a file and fix its size and checksum in the manifest (only its contents are bad)."""
        (self.folder(step) / name).write_bytes(data)
        m = self.manifest(step)
        for f in m["files"]:
            if f["path"] == name:
                f["size"], f["checksum"] = len(data), checksum_bytes(data)
        self.write_manifest(step, m)

    def close(self) -> None:
        for mgr in self._open:
            try:
                mgr.close()
            except Exception:  # noqa: BLE001 - the case already raised what it tests
                pass


@pytest.fixture
def case(base: Path, tmp_path: Path) -> Iterator[Case]:
    shutil.copytree(base, tmp_path / "root")
    c = Case(tmp_path / "root")
    yield c
    c.close()


def _truncate(c: Case) -> None:
    data = c.shard(2).read_bytes()
    c.shard(2).write_bytes(data[: len(data) // 2])


def _flip(c: Case) -> None:
    data = bytearray(c.shard(2).read_bytes())
    data[len(data) // 2] ^= 0x40
    c.shard(2).write_bytes(bytes(data))


def _future(c: Case) -> None:
    c.write_manifest(2, {**c.manifest(2), "format_version": 99})


def _codec(c: Case) -> None:
    m = c.manifest(2)
    for f in m["files"]:
        if f["path"].endswith(".distcp"):
            f["codec"] = "lz4"
    c.write_manifest(2, m)


def _moved_manifest(c: Case) -> None:
    shutil.copy(c.folder(1) / "manifest.json", c.folder(2) / "manifest.json")


def _frame(c: Case) -> None:
    """Damage a zstd frame but fix the file checksum: only decoding can tell."""
    data = bytearray(c.shard(2).read_bytes())
    data[-16] ^= 0xFF
    c.replace_file(2, c.shard(2).name, bytes(data))


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def _under_a_file(c: Case) -> CheckpointManager:
    (c.root.parent / "file").write_text("x")
    return CheckpointManager(c.root.parent / "file" / "ckpt")


def _restore(which: Any = 2, width: int = 8, **kw: Any) -> Callable[[Case], Any]:
    return lambda c: c.mgr().restore(c.state(width), which, **kw)


def _save(step: Any = 3, state: Any = None, **kw: Any) -> Callable[[Case], Any]:
    return lambda c: c.mgr().save(step, c.state() if state is None else state, blocking=True, **kw)


def _after(prepare: Callable[[Case], None], act: Callable[[Case], Any]) -> Callable[[Case], Any]:
    def run(c: Case) -> Any:
        prepare(c)
        return act(c)
    return run


def _yaml(c: Case) -> Any:
    path = c.root.parent / "train.yaml"
    path.write_text(f"checkpoint:\n  root: {c.root}\n  keep_lats: 3\n")
    return CheckpointManager.from_config(path)


CASES: list[tuple[str, Callable[[Case], Any], type[BaseException], str]] = [
    # -- option values ---------------------------------------------------------------------
    ("compression", lambda c: c.mgr(compression="lz4"), ConfigError, "compression='lz4' is not valid"),
    ("staging", lambda c: c.mgr(staging="gpu"), ConfigError, "staging='gpu' is not valid"),
    ("on_error", lambda c: c.mgr(on_error="ignore"), ConfigError, "on_error='ignore'"),
    ("max_pending", lambda c: c.mgr(max_pending=0), ConfigError, "max_pending=0 is not valid"),
    ("writer_threads bool", lambda c: c.mgr(writer_threads=True), ConfigError, "writer_threads=True"),
    ("part size", lambda c: c.mgr(upload_part_bytes=1024), ConfigError, "upload_part_bytes=1024"),
    ("zstd level", lambda c: c.mgr(zstd_level=0), ConfigError, "zstd_level=0"),
    ("unknown option", lambda c: c.mgr(keep_last=3), ConfigError, "unknown option(s) ['keep_last']"),
    ("retention value", lambda c: c.mgr(retention=Retention(keep_last=0)), ConfigError, "keep_last=0"),
    ("retention as dict", lambda c: c.mgr(retention={"keep_last": 3}), ConfigError,
     "retention={'keep_last': 3} is not valid: expected a Retention"),
    ("schedule value", lambda c: c.mgr(schedule=Schedule(every_n_steps=0)), ConfigError, "every_n_steps=0"),
    ("lease timeout", lambda c: c.mgr(lease_heartbeat_s=10, lease_timeout_s=5), ConfigError,
     "lease_timeout_s=5 is not valid: expected more than lease_heartbeat_s=10"),
    ("storage options", lambda c: c.mgr(storage_options="anon=true"), ConfigError, "storage_options="),
    ("yaml typo", _yaml, ConfigError, "train.yaml: checkpoint: unknown key 'keep_lats'"),
    # -- URLs ----------------------------------------------------------------------------------
    ("empty root", lambda c: CheckpointManager(""), ConfigError, "root='' is not valid"),
    ("unknown protocol", lambda c: CheckpointManager("nosuch://bucket/run"), StorageError, "nosuch"),
    ("root under a file", _under_a_file, StorageError, "create or write checkpoint root"),
    ("empty backup", lambda c: c.mgr(backup=""), ConfigError, "backup='' is not valid"),
    # -- state objects and call arguments --------------------------------------------------
    ("state as dict", _save(state={"model": _model()}), ConfigError, "state='dict' is not valid: expected a TrainState"),
    ("model not a module", lambda c: TrainState(model="resnet"), ConfigError, "TrainState model"),
    ("optimizer without model", lambda c: TrainState(optimizer=torch.optim.SGD(_model().parameters(), lr=1)),
     ConfigError, "needs its model"),
    ("negative step", _save(step=-1), ConfigError, "step=-1 is not valid"),
    ("bool step", _save(step=True), ConfigError, "step=True is not valid"),
    ("metric not a number", _save(metrics={"loss": "low"}), ConfigError, "metrics['loss']='low'"),
    ("tags as str", _save(tags="best"), ConfigError, "tags='best' is not valid"),
    ("negative epoch", _save(epoch=-2), ConfigError, "epoch=-2 is not valid"),
    ("existing step", _save(step=2), CheckpointExistsError, "step 2 is already committed"),
    ("missing step", _restore(999), CheckpointNotFoundError, "committed steps: 1, 2"),
    ("best without metric", _restore("best"), ConfigError, 'restore(which="best") needs'),
    ("unknown part", _restore(include=["weights"]), ConfigError, "unknown part(s) ['weights']"),
    ("bad map_location", _restore(map_location="nowhere"), ConfigError, "map_location='nowhere'"),
    ("not a checkpoint path", lambda c: c.mgr().restore(c.state(), str(c.root.parent)),
     CheckpointNotFoundError, "(no manifest.json)"),
    # -- another model's checkpoint --------------------------------------------------------
    ("other shapes", _restore(width=16), StateMismatchError, "checkpoint has shape (8, 48), live state has (16, 48)"),
    ("other keys", lambda c: c.mgr().restore(TrainState(model=torch.nn.Linear(48, 4)), 2),
     StateMismatchError, "missing from the checkpoint: model/model.bias"),
    # -- damaged files ------------------------------------------------------------------------
    ("truncated shard", _after(_truncate, _restore()), CorruptCheckpointError, "bytes, found"),
    ("flipped bit", _after(_flip, _restore()), CorruptCheckpointError, "checksum mismatch"),
    ("missing shard", _after(lambda c: c.shard(2).unlink(), _restore()), CorruptCheckpointError,
     ": missing"),
    ("manifest not JSON", _after(lambda c: (c.folder(2) / "manifest.json").write_text("{oops"), _restore()),
     CorruptCheckpointError, "expected JSON, found unparsable text"),
    ("manifest of another step", _after(_moved_manifest, _restore()), CorruptCheckpointError,
     "expected step 2, found step 1"),
    ("future format", _after(_future, _restore()), CorruptCheckpointError,
     "format_version <= 1, found 99: written by a newer asyncckpt"),
    ("unknown codec", _after(_codec, _restore()), CorruptCheckpointError, "found 'lz4': unknown codec"),
    ("metadata garbage", _after(lambda c: c.replace_file(2, ".metadata", b"\x80\x04garbage"), _restore()),
     CorruptCheckpointError, "unreadable pickle"),
    ("metadata runs code", _after(lambda c: c.replace_file(2, ".metadata", pickle.dumps(_Evil())), _restore()),
     UnsafeCheckpointError, "system"),
    ("bad zstd frame, verify off", _after(_frame, _restore(verify=False)), CorruptCheckpointError,
     "step-0000000002/__"),
]


@pytest.mark.parametrize("act, error, message", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(case: Case, act: Callable[[Case], Any], error: type[BaseException], message: str) -> None:
    with pytest.raises(BaseException) as raised:
        act(case)
    assert type(raised.value) is error, f"{type(raised.value).__name__}: {raised.value}"
    assert message in str(raised.value), str(raised.value)


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
