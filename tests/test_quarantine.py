"""Damaged checkpoints are set aside, and recovery never dead-ends.

A run whose newest checkpoint is damaged falls back to an older one, trains through the
damaged step and saves it again; an edited manifest never blocks a step; retention and
``asyncckpt prune`` never keep a damaged checkpoint in place of a whole one, and remove a
quarantined one later like any old checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, Retention, Schedule, TrainState
from asyncckpt.manifest import MANIFEST_NAME
from asyncckpt.quarantine import QUARANTINE_DIR, list_quarantined
from asyncckpt.retention import Retention as PureRetention
from asyncckpt.storage import Storage
from helpers.checkpoints import flip_byte, shard_of, step_folder, step_folders
from helpers.procs import asyncckpt
from helpers.training import train_steps

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state() -> TrainState:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    return TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def _run(root: Path, mgr_kw: dict, start: int, stop: int) -> int:
    """One run of the training job: restore, train to ``stop``, close; returns the resumed step."""
    state = _state()
    with CheckpointManager(root, schedule=Schedule(every_n_steps=100), **mgr_kw) as mgr:
        resumed = mgr.restore(state)
        assert start == -1 or resumed == start
        train_steps(mgr, state, resumed, stop)
    return resumed


def test_run_resumed_past_a_damaged_newest_checkpoint_trains_through_it(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _run(root, {}, 0, 400)
    flip_byte(shard_of(step_folder(root, 400)), 20)
    assert _run(root, {}, 300, 500) == 300  # fell back; saving 400 again must not raise
    assert step_folders(root, with_manifest=True) == [100, 200, 300, 400, 500]
    (aside,) = list_quarantined(Storage(root))
    assert aside.step == 400 and "checksum" in aside.reason and aside.name.startswith("step-0000000400.")
    assert (root / QUARANTINE_DIR / aside.name / MANIFEST_NAME).exists()  # kept for inspection
    verify = asyncckpt("verify", str(root))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "step 400: ok" in verify.stdout and "step 400: quarantined" in verify.stdout
    listed = asyncckpt("list", "--all", str(root))
    assert listed.returncode == 0 and "quarantined" in listed.stdout
    assert "quarantined" not in asyncckpt("list", str(root)).stdout
    assert _run(root, {}, 500, 500) == 500


@pytest.mark.parametrize("edit", ["not json", "another value"])
def test_an_edited_manifest_never_blocks_its_step(tmp_path: Path, edit: str) -> None:
    root = tmp_path / "ckpt"
    _run(root, {}, 0, 400)
    path = root / "step-0000000400" / MANIFEST_NAME
    if edit == "not json":
        path.write_text(path.read_text()[:-20])
    else:  # valid JSON whose content checksum no longer matches
        raw = json.loads(path.read_text())
        raw["metrics"] = {"loss": -1.0}
        path.write_text(json.dumps(raw))
    assert _run(root, {}, 300, 450) == 300
    assert step_folders(root, with_manifest=True) == [100, 200, 300, 400]
    assert [q.step for q in list_quarantined(Storage(root))] == [400]


def test_prune_never_keeps_a_damaged_newest_in_place_of_a_whole_one(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _run(root, {}, 0, 400)
    flip_byte(shard_of(step_folder(root, 400)), 20)
    dry = asyncckpt("prune", str(root), "--keep-last", "1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["quarantined"] == [400] and "would be quarantined" in dry.stderr
    assert step_folders(root, with_manifest=True) == [100, 200, 300, 400]
    assert not (root / QUARANTINE_DIR).exists()
    done = asyncckpt("prune", str(root), "--keep-last", "1", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["kept"] == [200, 300] and out["deleted"] == [100] and out["quarantined"] == [400]
    assert step_folders(root, with_manifest=True) == [200, 300]
    assert [q.step for q in list_quarantined(Storage(root))] == [400]
    assert asyncckpt("verify", str(root)).returncode == 0


def test_prune_checks_checksums_unless_told_sizes_only(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _run(root, {}, 0, 300)
    flip_byte(shard_of(step_folder(root, 300)), 20)  # same size: only a checksum finds it
    sizes_only = json.loads(asyncckpt("prune", str(root), "--keep-last", "1", "--no-verify", "--dry-run",
                                 "--json").stdout)
    assert sizes_only["quarantined"] == [] and sizes_only["deleted"] == [100]
    deep = json.loads(asyncckpt("prune", str(root), "--keep-last", "1", "--dry-run", "--json").stdout)
    assert deep["quarantined"] == [300] and deep["deleted"] == []


def test_background_retention_quarantines_a_truncated_slot_holder_and_keeps_a_whole_one(
        tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    state = _state()
    with CheckpointManager(root, schedule=Schedule(every_n_steps=100),
                           retention=Retention(keep_last=2)) as mgr:
        train_steps(mgr, state, 0, 200)
        mgr.wait()
        shard = shard_of(step_folder(root, 200))
        shard.write_bytes(shard.read_bytes()[:-1])
        train_steps(mgr, state, 200, 300)
        mgr.wait()
        assert step_folders(root, with_manifest=True) == [100, 300]  # not [200, 300]: 200 is damaged
        assert [q.step for q in list_quarantined(mgr.storage)] == [200]
        train_steps(mgr, state, 300, 500)
        mgr.wait()
        # 200 is now older than keep_last=2 committed checkpoints: removed like any old one
        assert step_folders(root, with_manifest=True) == [400, 500]
        assert list_quarantined(mgr.storage) == []


def test_restore_of_a_named_step_raises_and_quarantines_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _run(root, {}, 0, 200)
    flip_byte(shard_of(step_folder(root, 200)), 20)
    with CheckpointManager(root) as mgr, pytest.raises(Exception, match="checksum"):
        mgr.restore(_state(), 200)
    assert step_folders(root, with_manifest=True) == [100, 200] and not (root / QUARANTINE_DIR).exists()


def test_a_reader_that_does_not_hold_the_root_quarantines_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _run(root, {}, 0, 200)
    flip_byte(shard_of(step_folder(root, 200)), 20)
    with CheckpointManager(root) as writer:  # holds the lease
        with CheckpointManager(root, lease=False) as reader:
            assert reader.restore(_state()) == 100
        assert step_folders(root, with_manifest=True) == [100, 200] and not (root / QUARANTINE_DIR).exists()
        assert writer.restore(_state()) == 100
    assert step_folders(root, with_manifest=True) == [100]


def test_expired_quarantine_follows_keep_last() -> None:
    policy = PureRetention(keep_last=3)
    assert policy.expired_quarantine([200], [100, 300, 400]) == frozenset()
    assert policy.expired_quarantine([200, 450], [100, 300, 400, 500]) == frozenset({200})
    assert PureRetention(keep_last=1).expired_quarantine([200], [300]) == frozenset()  # two newer
    assert PureRetention(keep_last=1).expired_quarantine([200], [300, 400]) == frozenset({200})
    assert PureRetention().expired_quarantine([1], range(2, 100)) == frozenset()  # deletes nothing


def test_slot_holders_leave_out_checkpoints_kept_forever() -> None:
    class Item:
        def __init__(self, step: int, tags: tuple[str, ...] = ()) -> None:
            self.step, self.metrics, self.tags = step, {}, tags

    plan = PureRetention(keep_last=1, keep_every_n_steps=100).plan(
        [Item(100), Item(150), Item(200, ("milestone:1M",)), Item(250), Item(260)])
    assert plan.keep == (100, 200, 250, 260) and plan.slot_holders == (250, 260)
