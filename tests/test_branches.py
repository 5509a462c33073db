"""Roll back and go on: a restore of an older checkpoint, then saves, starts a new branch.

The checkpoints newer than the restored one (the abandoned branch) leave the step folders
at the first save after the restore, so the new branch saves those step numbers again and
``latest`` (restore, CLI, retention) is the current branch, even after a crash.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, ConfigError, Retention, RollbackRefusedError, Schedule, TrainState
from asyncckpt.branches import ABANDONED_DIR, list_abandoned, manifest_crc
from asyncckpt.manifest import MANIFEST_NAME
from asyncckpt.release import CARD_NAME
from asyncckpt.storage import Storage, list_committed
from helpers.checkpoints import committed_steps
from helpers.procs import asyncckpt, finish, spawn
from helpers.training import train_steps

CHILD = textwrap.dedent('''
    import sys
    import warnings

    import torch
    from torch import nn

    from asyncckpt import CheckpointManager, Schedule, TrainState

    warnings.filterwarnings("ignore")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    root, out, mode, stop, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = TrainState(model=model, optimizer=opt)
    every = 100 if mode == "first" else 50
    with CheckpointManager(root, schedule=Schedule(every_n_steps=every)) as mgr:
        step = {"first": lambda: 0, "rollback": lambda: mgr.restore(state, 200),
                "resume": lambda: mgr.restore(state)}[mode]()
        print(f"RESUMED {step}", flush=True)
        while step < stop:
            torch.manual_seed(step)
            opt.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            step += 1
            mgr.maybe_save(step, state, metrics={"loss": float(step)})
            if step == kill_at:
                mgr.wait()  # what was saved is committed: the kill comes after a known point
                print(f"AT {step}", flush=True)
                sys.stdin.readline()  # blocks until the parent's SIGKILL
    torch.save({"params": model.state_dict(), "resumed": step}, out)
    print("DONE", flush=True)
''')


def _child(script: Path, root: Path, out: Path, mode: str, stop: int, kill_at: int = -1) -> subprocess.Popen:
    return spawn(script, root, out, mode, stop, kill_at, stdin=subprocess.PIPE)


def _kill_at(proc: subprocess.Popen, line: str) -> list[str]:
    """Read the child's lines until ``line``, then SIGKILL it (synchronised on its message)."""
    seen = []
    assert proc.stdout is not None
    for got in proc.stdout:
        seen.append(got.rstrip("\n"))
        if got.strip() == line:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return seen
    proc.wait(timeout=60)
    pytest.fail(f"the child ended before {line!r}:\n" + "\n".join(seen))


def test_rollback_crash_and_resume_continues_the_new_branch_bit_exactly(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root, ref = tmp_path / "ckpt", tmp_path / "ref"
    finish(_child(script, root, tmp_path / "first.pt", "first", 400), "first")
    assert committed_steps(root) == [100, 200, 300, 400]
    old = {m.step: m for m in list_committed(Storage(root))}
    shutil.copytree(root, ref)

    reference = _child(script, ref, tmp_path / "ref.pt", "rollback", 400)  # rolled back, never killed
    crashed = _child(script, root, tmp_path / "crash.pt", "rollback", 400, kill_at=330)
    lines = _kill_at(crashed, "AT 330")
    assert crashed.returncode == -signal.SIGKILL and "RESUMED 200" in lines
    finish(reference, "reference")

    new = {m.step: m for m in list_committed(Storage(root))}
    assert sorted(new) == [100, 200, 250, 300]
    assert new[300].branch != old[300].branch and new[300].parent == 200
    assert new[250].branch == new[300].branch and new[200] == old[200]
    assert [(a.step, a.branch, a.from_step) for a in list_abandoned(Storage(root))] == \
        [(300, old[400].branch, 200), (400, old[400].branch, 200)]

    out = finish(_child(script, root, tmp_path / "resumed.pt", "resume", 400), "resume")
    assert "RESUMED 300" in out  # the new branch's 300, not the abandoned 400
    resumed, expected = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("resumed", "ref"))
    assert resumed["params"].keys() == expected["params"].keys()
    for k, v in expected["params"].items():
        assert torch.equal(v, resumed["params"][k]), k
    final = {m.step: m for m in list_committed(Storage(root))}
    assert sorted(final) == [100, 200, 250, 300, 350, 400]
    assert final[400].branch == new[300].branch and final[400].parent == 300

    plain = asyncckpt("list", root)
    assert plain.returncode == 0, plain.stderr
    rows = plain.stdout.splitlines()
    assert rows[0].split()[:5] == ["step", "epoch", "time", "size", "branch"]
    assert [r.split()[0] for r in rows[1:]] == ["100", "200", "250", "300", "350", "400"]
    assert new[300].branch in rows[-1] and "abandoned" not in plain.stdout
    every = asyncckpt("list", root, "--all")
    marked = [r for r in every.stdout.splitlines() if "abandoned" in r]
    assert [r.split()[0] for r in marked] == ["300", "400"] and all(old[400].branch in r for r in marked)
    as_json = json.loads(asyncckpt("list", root, "--all", "--json").stdout)
    assert [(d["step"], d["branch"]) for d in as_json if d.get("abandoned")] == \
        [(300, old[400].branch), (400, old[400].branch)]
    verify = asyncckpt("verify", root)
    assert verify.returncode == 0 and "step 400: abandoned" in verify.stdout


def _state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Linear(8, 4)
    return TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def _first_run(root: Path, stop: int = 400, **kw: object) -> None:
    with CheckpointManager(root, schedule=Schedule(every_n_steps=100), **kw) as mgr:
        train_steps(mgr, _state(), 0, stop)


def _rollback(root: Path, to: int, stop: int, **kw: object) -> None:
    state = _state()
    with CheckpointManager(root, schedule=Schedule(every_n_steps=50), **kw) as mgr:
        assert mgr.restore(state, to) == to
        train_steps(mgr, state, to, stop)


def test_retention_keeps_the_current_branch_and_retires_abandoned_ones_later(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _first_run(root)
    _rollback(root, 200, 300, retention=Retention(keep_last=2))
    assert committed_steps(root) == [250, 300]  # the abandoned 300 and 400 never pushed these out
    assert [a.step for a in list_abandoned(Storage(root))] == [300, 400]
    state = _state()
    with CheckpointManager(root, schedule=Schedule(every_n_steps=50), retention=Retention(keep_last=2)) as mgr:
        assert mgr.restore(state) == 300
        assert [i.step for i in mgr.list()] == [250, 300]
        train_steps(mgr, state, 300, 500)
    assert committed_steps(root) == [450, 500]
    assert list_abandoned(Storage(root)) == []  # as old as what keep_last let go: removed


def test_a_second_rollback_abandons_the_first_new_branch(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _first_run(root)
    _rollback(root, 200, 300)
    first_new = {m.step: m.branch for m in list_committed(Storage(root))}
    _rollback(root, 250, 350)
    now = {m.step: m for m in list_committed(Storage(root))}
    assert sorted(now) == [100, 200, 250, 300, 350]
    assert now[300].branch not in (first_new[300], first_new[100]) and now[300].parent == 250
    assert now[250].branch == first_new[250]
    assert [(a.step, a.branch) for a in list_abandoned(Storage(root))] == \
        [(300, first_new[100]), (300, first_new[300]), (400, first_new[100])]
    state = _state()
    with CheckpointManager(root) as mgr:
        assert mgr.restore(state) == 350


def test_a_rollback_whose_first_save_never_committed_still_goes_on_as_a_new_branch(tmp_path: Path) -> None:
    """The move-aside done, the first save lost (killed mid-write): the run restores 200, the
    newest now, and must not go on under the branch it abandoned."""
    root = tmp_path / "ckpt"
    _first_run(root)
    old = {m.step: m.branch for m in list_committed(Storage(root))}
    _rollback(root, 200, 250)
    shutil.rmtree(root / "step-0000000250")  # as if its write had never committed
    state = _state()
    with CheckpointManager(root) as mgr:
        assert mgr.restore(state) == 200
        mgr.save(300, state, blocking=True)
    now = {m.step: m for m in list_committed(Storage(root))}
    assert now[300].branch != old[400] and now[300].parent == 200


def test_on_rollback_refuse_names_the_steps_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _first_run(root)
    state = _state()
    with CheckpointManager(root, on_rollback="refuse") as mgr:
        mgr.restore(state, 200)
        with pytest.raises(RollbackRefusedError, match=r"\[300, 400\]") as ei:
            mgr.save(250, state)
        assert "step 400" in str(ei.value) and "on_rollback='keep'" in str(ei.value)
        assert mgr.restore(state) == 400  # restoring the newest: no rollback, saving goes on
        mgr.save(450, state, blocking=True)
    assert committed_steps(root) == [100, 200, 300, 400, 450]
    assert not (root / ABANDONED_DIR).exists()


def test_on_rollback_delete_deletes_at_once_and_says_so(tmp_path: Path, caplog) -> None:
    root = tmp_path / "ckpt"
    _first_run(root)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        _rollback(root, 200, 300, on_rollback="delete")
    assert committed_steps(root) == [100, 200, 250, 300]
    assert list_abandoned(Storage(root)) == []
    said = [r.getMessage() for r in caplog.records if "rollback" in r.getMessage()]
    assert said and "300 deleted" in said[0] and "400 deleted" in said[0]


def test_keep_logs_a_warning_naming_where_each_step_went(tmp_path: Path, caplog) -> None:
    root = tmp_path / "ckpt"
    _first_run(root)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        _rollback(root, 300, 350)
    (said,) = [r for r in caplog.records if "rollback" in r.getMessage()]
    assert said.levelno == logging.WARNING and f"400 -> {root / ABANDONED_DIR}" in said.getMessage()
    assert committed_steps(root) == [100, 200, 300, 350]


def test_a_move_aside_cut_short_is_finished_at_the_next_start(tmp_path: Path) -> None:
    """The record is written first; a kill after moving 300 leaves 400 in place: the next
    manager moves 400 (its manifest unchanged) and leaves a changed step alone."""
    root = tmp_path / "ckpt"
    _first_run(root, stop=500)
    store = Storage(root)
    crc = {s: manifest_crc((root / f"step-{s:010d}" / MANIFEST_NAME).read_bytes()) for s in (300, 400, 500)}
    moves = [{"step": s, "manifest_crc": crc[s] if s != 500 else "crc32:00000000",
              "name": f"step-{s:010d}.20260101T000000.000000Z"} for s in (300, 400, 500)]
    record = {"format": 1, "state": "moving", "policy": "keep", "time": "2026-01-01T00:00:00Z",
              "from_step": 200, "branch": "beef", "abandoned_branch": None, "moves": moves,
              "reason": "rollback: the run restored step 200 and saved on"}
    (root / ABANDONED_DIR).mkdir()
    (root / ABANDONED_DIR / "rollback-2026-01-01T000000Z-beef.json").write_text(json.dumps(record))
    store.move_dir("step-0000000300", f"{ABANDONED_DIR}/{moves[0]['name']}")  # then the kill
    state = _state()
    with CheckpointManager(root) as mgr:
        assert [i.step for i in mgr.list()] == [100, 200, 500]  # 500's manifest is not the recorded one
        assert mgr.restore(state) == 500
    assert [(a.step, a.from_step) for a in list_abandoned(store)] == [(300, 200), (400, 200)]
    done = json.loads((root / ABANDONED_DIR / "rollback-2026-01-01T000000Z-beef.json").read_text())
    assert done["state"] == "done"


def test_the_backup_drops_its_copies_of_the_abandoned_branch(tmp_path: Path) -> None:
    root, backup = tmp_path / "ckpt", tmp_path / "backup"
    with CheckpointManager(root, schedule=Schedule(every_n_steps=100), backup=str(backup)) as mgr:
        state = _state()
        for stop in (100, 200, 300, 400):
            train_steps(mgr, state, stop - 100, stop)
            mgr.wait()  # each one mirrored
    assert committed_steps(backup) == [100, 200, 300, 400]
    _rollback(root, 200, 250, backup=str(backup))
    on_backup = {m.step: m for m in list_committed(Storage(backup))}
    assert 400 not in on_backup and on_backup[250].parent == 200
    assert 300 not in on_backup  # the abandoned 300: never the backup's latest
    state = _state()
    with CheckpointManager(root, backup=str(backup)) as mgr:
        assert mgr.restore(state) == 250


def test_a_restore_from_the_backup_never_picks_an_abandoned_copy_the_mirror_kept(tmp_path: Path) -> None:
    """A crash before the mirror dropped them: the backup still holds the abandoned 400."""
    root, backup = tmp_path / "ckpt", tmp_path / "backup"
    _first_run(root, backup=str(backup))
    _rollback(root, 200, 250)  # no backup configured this time: the backup keeps 100 .. 400
    assert 400 in committed_steps(backup)
    shutil.rmtree(root / "step-0000000250")  # the primary lost its newest: fall back to the backup
    state = _state()
    with CheckpointManager(root, backup=str(backup)) as mgr:
        assert mgr.restore(state) == 200  # not the backup's 400 of the abandoned branch
        mgr.save(201, state, blocking=True)
        mgr.wait()
    assert 400 not in committed_steps(backup) and 300 not in committed_steps(backup)  # the mirror dropped them


def test_a_release_records_the_branch_it_came_from(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _first_run(root)
    _rollback(root, 200, 250)
    branch = {m.step: m.branch for m in list_committed(Storage(root))}[250]
    with CheckpointManager(root) as mgr:
        info = mgr.release("latest", version="1.0.0")
    card = json.loads((Path(info.path) / CARD_NAME).read_text())
    assert (card["step"], card["branch"]) == (250, branch)


def test_on_rollback_must_be_one_of_the_policies(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="on_rollback"):
        CheckpointManager(tmp_path / "ckpt", on_rollback="ignore")


@pytest.mark.s3
def test_a_rollback_on_s3_moves_the_abandoned_branch_aside_and_resumes_on_the_new_one(s3_bucket) -> None:
    """On an object store a move is copy-then-delete (manifest first): the same outcome."""
    root, options = f"s3://{s3_bucket['name']}/run", s3_bucket["options"]
    _first_run(root, stop=300, storage_options=options)
    _rollback(root, 100, 150, storage_options=options)
    store = Storage(root, options)
    assert [(m.step, m.parent) for m in list_committed(store)] == [(100, None), (150, 100)]
    assert [a.step for a in list_abandoned(store)] == [200, 300]
    state = _state()
    with CheckpointManager(root, storage_options=options) as mgr:
        assert mgr.restore(state) == 150
        mgr.save(200, state, blocking=True)  # the abandoned 200 is no obstacle
    assert [m.step for m in list_committed(store)] == [100, 150, 200]
