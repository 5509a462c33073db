"""The backup mirror: copy after each commit, manifest last, its own retention, never
blocking training, failures latched; and restore falling back to the backup.

Local primaries and backups run everywhere; the S3 backup runs against moto's server
and SeaweedFS on loopback (marker ``s3``).  Faults come from the real ``faulty_fs`` filesystem.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncckpt import CheckpointManager, Retention, TrainState
from asyncckpt.errors import ConfigError, CorruptCheckpointError, ForeignFolderError, StorageError
from asyncckpt.manifest import MANIFEST_NAME, Manifest
from asyncckpt.mirror import Mirror, with_backup
from asyncckpt.quarantine import list_quarantined
from asyncckpt.storage import MARKER_NAME, Storage
from helpers.checkpoints import committed_steps, same_tensors
from helpers_s3 import keys

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state() -> tuple[TrainState, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return TrainState(model=model, optimizer=opt), model


def _step(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)


def _damage(folder: Path) -> None:
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


# -- the pure order of copies to try -----------------------------------------------------

def _m(step: int) -> Manifest:
    return Manifest(step=step)


@pytest.mark.parametrize("primary, backup, latest, expected", [
    ([3, 2], [3, 1], True, [(3, False), (3, True), (2, False), (1, True)]),
    ([], [5, 4], True, [(5, True), (4, True)]),
    ([2], [4], True, [(4, True), (2, False)]),
    ([], [], True, []),
    ([2], [1, 2], False, [(2, False), (2, True)]),
    ([2], [1], False, [(2, False)]),
    ([], [7], False, [(7, True)]),
])
def test_with_backup_orders_the_copies(primary, backup, latest, expected) -> None:
    got = with_backup([_m(s) for s in primary], [_m(s) for s in backup], latest=latest)
    assert [(m.step, b) for m, b in got] == expected


# -- mirroring ---------------------------------------------------------------------------

class _WriteLog(dict):
    """A memory filesystem's store that records the order in which files become visible."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def __setitem__(self, path: str, value: Any) -> None:
        self.order.append(path)
        super().__setitem__(path, value)


def test_the_backup_manifest_is_written_after_every_file_of_its_checkpoint(tmp_path) -> None:
    import uuid

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    proto = f"writelog{uuid.uuid4().hex[:8]}"
    fs_cls = type("WriteLogMemory", (MemoryFileSystem,),
                  {"protocol": (proto,), "store": _WriteLog(), "pseudo_dirs": [""]})
    fsspec.register_implementation(proto, fs_cls, clobber=True)
    state, model = _state()
    with CheckpointManager(tmp_path / "primary", backup=f"{proto}://backup") as mgr:
        for step in (1, 2):
            _step(model)
            mgr.save(step, state)
            mgr.wait()
    for step in (1, 2):
        name = f"step-{step:010d}"
        files = {f["path"] for f in json.loads((tmp_path / "primary" / name / MANIFEST_NAME).read_text())["files"]}
        writes = [w.split(f"/{name}/", 1)[1] for w in fs_cls.store.order if f"/{name}/" in w]
        assert set(writes) == files | {MARKER_NAME, MANIFEST_NAME}, writes
        assert writes[0] == MARKER_NAME, writes              # the folder is claimed first
        assert writes[-1] == MANIFEST_NAME and writes.count(MANIFEST_NAME) == 1, writes


def test_mirror_copies_each_commit_under_its_own_retention(tmp_path) -> None:
    state, model = _state()
    with CheckpointManager(tmp_path / "primary", backup=str(tmp_path / "backup"),
                           retention=Retention(keep_last=3),
                           backup_retention=Retention(keep_last=2)) as mgr:
        for step in range(1, 6):
            _step(model)
            mgr.save(step, state)
            mgr.wait()                                  # waits for the mirror too
        assert [i.step for i in mgr.list(backup=True)] == [4, 5]
        assert all(i.path.startswith(str(tmp_path / "backup")) for i in mgr.list(backup=True))
    assert committed_steps(tmp_path / "primary") == [3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["step-0000000004",
                                                                       "step-0000000005"]
    for step in (4, 5):
        name = f"step-{step:010d}"
        assert (tmp_path / "backup" / name / "manifest.json").read_bytes() == \
            (tmp_path / "primary" / name / "manifest.json").read_bytes()
    with CheckpointManager(tmp_path / "backup") as backup:
        assert backup.verify() == {4: [], 5: []}


def test_backup_retention_defaults_to_the_primary_retention(tmp_path) -> None:
    state, model = _state()
    with CheckpointManager(tmp_path / "p", backup=str(tmp_path / "b"),
                           retention=Retention(keep_last=2)) as mgr:
        for step in range(1, 5):
            mgr.save(step, state)
    assert committed_steps(tmp_path / "b") == [3, 4] == committed_steps(tmp_path / "p")


def test_a_mirror_that_falls_behind_skips_to_the_newest_without_blocking(tmp_path, faulty_fs,
                                                                         caplog) -> None:
    state, model = _state()
    faulty_fs.pause()                                   # every write to the backup waits
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        mgr = CheckpointManager(tmp_path / "p", backup=faulty_fs.url(tmp_path / "b"))
        mgr.save(1, state).result(timeout=120)
        assert faulty_fs.paused.wait(30)                # the mirror is stuck copying step 1
        for step in (2, 3, 4):                          # training and commits go on meanwhile
            _step(model)
            mgr.save(step, state).result(timeout=120)
        faulty_fs.release()
        mgr.close()
    assert committed_steps(tmp_path / "p") == [1, 2, 3, 4]
    assert committed_steps(tmp_path / "b") == [1, 4]
    assert "the mirror to" in caplog.text and "is behind" in caplog.text


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_mirror_failure_is_latched_and_surfaces_per_on_error(tmp_path, faulty_fs, on_error,
                                                               caplog) -> None:
    state, model = _state()
    mgr = CheckpointManager(tmp_path / "p", backup=faulty_fs.url(tmp_path / "b"), on_error=on_error)
    faulty_fs.fail_on_write(1)
    with caplog.at_level(logging.ERROR, logger="asyncckpt"):
        mgr.save(1, state).result(timeout=120)                     # the save itself commits
        if on_error == "raise":
            with pytest.raises(StorageError, match="injected write failure"):
                mgr.wait()
        else:
            mgr.wait()
    assert "mirroring to" in caplog.text
    assert committed_steps(tmp_path / "b") == [] and not any((tmp_path / "b").glob("step-*/*"))
    faulty_fs.disarm()
    mgr.save(2, state)
    mgr.close()
    assert committed_steps(tmp_path / "b") == [2]


def test_a_damaged_primary_is_never_mirrored(tmp_path) -> None:
    state, _ = _state()
    with CheckpointManager(tmp_path / "p") as mgr:
        mgr.save(1, state)
    _damage(tmp_path / "p" / "step-0000000001")
    mirror = Mirror(Storage(tmp_path / "p"), Storage(tmp_path / "b"))
    mirror.submit(1)
    with pytest.raises(CorruptCheckpointError, match="not mirrored"):
        mirror.close()
    assert committed_steps(tmp_path / "b") == [] and not any((tmp_path / "b").glob("step-*/*"))


def test_a_step_pruned_from_the_primary_first_is_skipped(tmp_path, caplog) -> None:
    mirror = Mirror(Storage(tmp_path / "p"), Storage(tmp_path / "b"))
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        mirror.submit(7)
        mirror.close()
    assert mirror.skipped == [7] and "deleted from the primary" in caplog.text


def test_the_mirror_removes_leftovers_of_a_killed_mirror(tmp_path) -> None:
    state, _ = _state()
    torn = tmp_path / "b" / "step-0000000009"
    torn.mkdir(parents=True)
    (torn / MARKER_NAME).write_text("{}")  # what a mirror writes first into a copy
    (torn / "__0_0.distcp").write_bytes(b"half")
    with CheckpointManager(tmp_path / "p", backup=str(tmp_path / "b")) as mgr:
        mgr.save(1, state)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-0000000001"]


def test_the_mirror_never_deletes_files_it_did_not_write_on_the_backup(tmp_path) -> None:
    state, _ = _state()
    theirs = tmp_path / "b" / "step-0000000001"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("not a checkpoint")
    mgr = CheckpointManager(tmp_path / "p", backup=str(tmp_path / "b"))
    mgr.save(1, state, blocking=True)
    with pytest.raises(ForeignFolderError, match="notes.txt"):
        mgr.close()
    assert (theirs / "notes.txt").read_text() == "not a checkpoint"
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]


# -- restoring from the backup ----------------------------------------------------------------

def _saved(tmp_path: Path, backup: str, options: dict | None = None) -> dict[int, dict[str, Any]]:
    state, model = _state()
    params = {}
    with CheckpointManager(tmp_path / "p", backup=backup, backup_storage_options=options) as mgr:
        for step in (1, 2, 3):
            _step(model)
            mgr.save(step, state)
            mgr.wait()                                  # mirrored before the next save
            params[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return params


def _restore(tmp_path: Path, backup: str | None, options: dict | None = None, which: Any = "latest",
             **kw: Any) -> tuple[int, torch.nn.Module]:
    state, model = _state()
    with CheckpointManager(tmp_path / "p", backup=backup, backup_storage_options=options) as mgr:
        return mgr.restore(state, which, **kw), model


def test_restore_falls_back_to_the_backup_when_the_primary_is_damaged_or_gone(tmp_path, caplog):
    backup = str(tmp_path / "b")
    params = _saved(tmp_path, backup)
    _damage(tmp_path / "p" / "step-0000000003")
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        step, model = _restore(tmp_path, backup)
    assert step == 3 and same_tensors(model, params[3])        # the backup's 3, not the primary's 2
    assert "restoring from the backup" in caplog.text
    assert not (tmp_path / "p" / "step-0000000003").exists()  # the damaged primary copy set aside
    assert [q.name[:15] for q in list_quarantined(Storage(tmp_path / "p"))] == ["step-0000000003"]
    step, model = _restore(tmp_path, backup, fallback_to_backup=False)
    assert step == 2 and same_tensors(model, params[2])        # without it: an older primary copy
    shutil.rmtree(tmp_path / "p" / "step-0000000002")
    step, model = _restore(tmp_path, backup, which=2)   # a step the primary lost
    assert step == 2 and same_tensors(model, params[2])
    shutil.rmtree(tmp_path / "p")                       # the whole primary is gone
    step, model = _restore(tmp_path, backup)
    assert step == 3 and same_tensors(model, params[3])


def test_fallback_without_a_backup_is_a_config_error(tmp_path) -> None:
    state, _ = _state()
    with CheckpointManager(tmp_path / "p") as mgr:
        with pytest.raises(ConfigError, match="backup"):
            mgr.restore(state, fallback_to_backup=True)
        with pytest.raises(ConfigError, match="backup"):
            mgr.list(backup=True)


@pytest.mark.s3
def test_local_primary_with_an_s3_backup(tmp_path, s3_bucket) -> None:
    backup, options = f"s3://{s3_bucket['name']}/backup", s3_bucket["options"]
    params = _saved(tmp_path, backup, options)
    assert committed_steps(backup, options) == [1, 2, 3]
    assert {k.split("/")[1] for k in keys(s3_bucket)} == {f"step-{s:010d}" for s in (1, 2, 3)}
    shutil.rmtree(tmp_path / "p")
    step, model = _restore(tmp_path, backup, options)
    assert step == 3 and same_tensors(model, params[3])
