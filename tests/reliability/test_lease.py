"""Two writers on one root: the lease (``<root>/.lease.json``) stops the second with an error
naming the first; a stale lease (dead process, or no heartbeat within its timeout) is taken
over; takeovers racing have exactly one winner; readers never need it.

The other writer is a real process (a forkserver child, see crash_tools.Child).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from crash_tools import Child

from asyncckpt import CheckpointManager, Retention, TrainState
from asyncckpt.cli import main as cli_main
from asyncckpt.errors import ConfigError, LeaseError
from asyncckpt.lease import LEASE_NAME, Holder, Lease, live_holder, read_holder, stale_reason
from asyncckpt.storage import Storage

from helpers_crash_child import weights_at

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
FAST = dict(lease_heartbeat_s=0.2, lease_timeout_s=30.0)


def _foreign(root: Path, *, host: str = "other-host", age_s: float = 0.0, pid: int = 4242) -> Holder:
    """Write a lease as another machine's writer would have."""
    now = time.time()
    holder = Holder(owner="f" * 32, host=host, pid=pid, started=now - age_s - 5, heartbeat=now - age_s,
                    timeout_s=60.0, boot_id="b", pid_ns="pid:[1]")
    root.mkdir(parents=True, exist_ok=True)
    (root / LEASE_NAME).write_bytes(holder.to_json())
    return holder


def _half_written(root: Path, step: int = 9) -> Path:
    """An in-flight save of the running writer: a step folder without a manifest yet."""
    folder = root / f"step-{step:010d}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"partial")
    return folder


def test_a_second_writer_is_refused_with_the_first_named(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    with CheckpointManager(root, **FAST) as first:
        first.save(1, TrainState(model=weights_at(1)), blocking=True)
        inflight = _half_written(root)
        with Child("open_manager", {"root": str(root)}) as second:
            said = second.recv()
        assert said.startswith("ERROR LeaseError"), said
        assert f"host {socket.gethostname()} pid {os.getpid()} since " in said, said
        assert inflight.exists(), "the refused writer must not clean up the running writer's save"
        assert [i.step for i in first.list()] == [1]
    assert not (root / LEASE_NAME).exists()


def test_a_reader_without_the_lease_lists_and_restores_but_never_writes(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    with CheckpointManager(root, **FAST) as writer:
        for step in (1, 2, 3):
            writer.save(step, TrainState(model=weights_at(step)), blocking=True)
        inflight = _half_written(root)
        with CheckpointManager(root, lease=False) as reader:  # same process: no lease, no conflict
            assert [i.step for i in reader.list()] == [1, 2, 3]
            state = TrainState(model=weights_at(0))
            assert reader.restore(state) == 3
            with pytest.raises(LeaseError, match="opened with lease=False and only lists"):
                reader.save(4, state)
            assert reader.prune(Retention(keep_last=1), dry_run=True) == [1]
            with pytest.raises(LeaseError, match="in use by another writer"):
                reader.prune(Retention(keep_last=1))
        assert inflight.exists(), "a reader must not remove the writer's in-flight save"
        assert [i.step for i in writer.list()] == [1, 2, 3]
        writer.save(4, TrainState(model=weights_at(4)), blocking=True)
    with CheckpointManager(root, lease=False) as alone:  # nobody writes: a lease-less manager may
        alone.save(5, TrainState(model=weights_at(5)), blocking=True)
        assert not (root / LEASE_NAME).exists()


def test_two_managers_of_one_process_on_one_root(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    first = CheckpointManager(root, **FAST)
    with pytest.raises(LeaseError, match="another CheckpointManager of this process.*close"):
        CheckpointManager(root)
    first.close()
    with CheckpointManager(root) as again:
        again.save(1, TrainState(model=weights_at(1)), blocking=True)


def test_the_lease_of_a_killed_writer_is_taken_over(tmp_path: Path, caplog) -> None:
    root = tmp_path / "ckpt"
    with Child("open_manager", {"root": str(root), "kwargs": FAST}) as writer:
        assert writer.recv() == "OPEN"
        writer.send("save 1")
        assert writer.recv() == "COMMITTED 1"
        pid = writer.proc.pid
        writer.kill()  # SIGKILL: the lease stays behind
    assert read_holder(Storage(str(root))).pid == pid
    with CheckpointManager(root, **FAST) as mgr:
        assert [i.step for i in mgr.list()] == [1]
        mgr.save(2, TrainState(model=weights_at(2)), blocking=True)
    assert f"its process {pid} on this host is gone" in caplog.text


def test_an_expired_heartbeat_is_taken_over_a_fresh_one_is_not(tmp_path: Path, caplog) -> None:
    root = tmp_path / "ckpt"
    _foreign(root, age_s=5)
    with pytest.raises(LeaseError) as err:
        CheckpointManager(root)
    assert "host other-host pid 4242 since" in str(err.value) and "last heartbeat 5s ago" in str(err.value)
    _foreign(root, age_s=3600)
    with CheckpointManager(root, **FAST) as mgr:
        assert read_holder(mgr.storage).host == socket.gethostname()
    assert "last heartbeat is 3600s old (timeout 60s)" in caplog.text


def test_the_heartbeat_refreshes_and_close_releases(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "ckpt"))
    clock = [1000.0]
    lease = Lease(storage, heartbeat_s=3600, timeout_s=7200, clock=lambda: clock[0])
    taken = lease.acquire()
    clock[0] = 1010.0
    lease.refresh()
    now = read_holder(storage)
    assert (now.owner, now.started, now.heartbeat) == (taken.owner, 1000.0, 1010.0)
    assert set(json.loads((tmp_path / "ckpt" / LEASE_NAME).read_text())) >= \
        {"owner", "host", "pid", "started", "heartbeat", "timeout_s"}
    lease.release()
    assert read_holder(storage) is None and not lease.lost.is_set()


def test_a_writer_whose_lease_was_taken_stops_committing_and_deleting(tmp_path: Path, caplog) -> None:
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(root, lease_heartbeat_s=0.05, lease_timeout_s=30.0)
    for step in (1, 2, 3):
        mgr.save(step, TrainState(model=weights_at(step)), blocking=True)
    thief = _foreign(root)  # e.g. the other job judged us dead: its lease replaced ours
    assert mgr._guard.lease.lost.wait(30), "the heartbeat did not notice the lease was taken"
    with pytest.raises(LeaseError, match="lost the lease .* now held by host other-host pid 4242"):
        mgr.save(4, TrainState(model=weights_at(4)))
    with pytest.raises(LeaseError):
        mgr.prune(retention=Retention(keep_last=1))
    mgr.close()
    assert read_holder(Storage(str(root))) == thief, "close() must not delete another writer's lease"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == \
        [f"step-000000000{s}" for s in (1, 2, 3)]


def _race(root: str, options: dict, n: int) -> list[str]:
    children = [Child("race_lease", {"root": root, "options": options, "heartbeat_s": 0.4,
                                     "timeout_s": 30.0}) for _ in range(n)]
    try:
        assert [c.recv() for c in children] == ["READY"] * n
        for c in children:
            c.send("GO")
        said = [c.recv() for c in children]
        for c, s in zip(children, said):
            if s.startswith("WON"):
                c.send("release")
                c.proc.join(30)
        return said
    finally:
        for c in children:
            c.close()


def _one_winner(said: list[str]) -> None:
    won = [s for s in said if s.startswith("WON")]
    assert len(won) == 1, said
    assert all(s.startswith("ERROR LeaseError") for s in said if not s.startswith("WON")), said


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_writers_racing_for_one_root_exactly_one_wins(tmp_path: Path, stale: bool) -> None:
    root = tmp_path / "ckpt"
    if stale:
        _foreign(root, age_s=3600)
    _one_winner(_race(str(root), {}, 4))
    assert not (root / LEASE_NAME).exists()  # released by the winner


@pytest.mark.s3
def test_writers_racing_for_a_stale_lease_on_s3_exactly_one_wins(s3_bucket: dict) -> None:
    root = f"s3://{s3_bucket['name']}/run"
    old = Holder(owner="f" * 32, host="other-host", pid=1, started=0.0, heartbeat=time.time() - 3600,
                 timeout_s=60.0)
    storage = Storage(root, s3_bucket["options"])
    storage.put_atomic(LEASE_NAME, old.to_json(), create_only=True)
    _one_winner(_race(root, s3_bucket["options"], 3))
    assert read_holder(storage) is None  # released by the winner


@pytest.mark.s3
def test_a_second_writer_on_s3_is_refused(s3_bucket: dict) -> None:
    root = f"s3://{s3_bucket['name']}/run"
    with CheckpointManager(root, storage_options=s3_bucket["options"], **FAST):
        with Child("open_manager", {"root": root, "kwargs": {"storage_options": s3_bucket["options"]}}) as c:
            said = c.recv()
    assert said.startswith("ERROR LeaseError") and f"pid {os.getpid()} since" in said, said
    assert live_holder(Storage(root, s3_bucket["options"])) is None


def test_cli_prune_refuses_while_a_writer_holds_the_root(tmp_path: Path, capsys) -> None:
    root = tmp_path / "ckpt"
    with CheckpointManager(root, **FAST) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, TrainState(model=weights_at(step)), blocking=True)
        assert cli_main(["prune", str(root), "--keep-last", "1"]) == 2
        assert f"being written by a running job (host {socket.gethostname()} pid {os.getpid()}" in \
            capsys.readouterr().err
        assert cli_main(["list", str(root)]) == 0  # reading needs no lease
        assert cli_main(["prune", str(root), "--keep-last", "1", "--dry-run"]) == 0
        assert [i.step for i in mgr.list()] == [1, 2, 3]
        assert cli_main(["prune", str(root), "--keep-last", "1", "--ignore-lease"]) == 0
        assert [i.step for i in mgr.list()] == [2, 3]  # the newest two always stay


def test_stale_reason_is_pure() -> None:
    here = Holder(owner="a", host="h", pid=10, started=0, heartbeat=0, timeout_s=60, boot_id="b", pid_ns="n")
    fresh = Holder(owner="b", host="h", pid=11, started=0, heartbeat=100, timeout_s=60, boot_id="b", pid_ns="n")
    assert stale_reason(fresh, now=150, here=here, alive=lambda pid: True) is None
    assert "is gone" in stale_reason(fresh, now=150, here=here, alive=lambda pid: False)
    assert "161s old" in stale_reason(fresh, now=261, here=here, alive=lambda pid: True)
    other_ns = Holder(**{**fresh.__dict__, "pid_ns": "m"})  # another container: its pids are not ours
    assert stale_reason(other_ns, now=150, here=here, alive=lambda pid: False) is None


@pytest.mark.parametrize("kwargs, field", [
    ({"lease_heartbeat_s": 0}, "lease_heartbeat_s"),
    ({"lease_timeout_s": 5, "lease_heartbeat_s": 10}, "lease_timeout_s"),
    ({"lease": "yes"}, "lease"),
])
def test_bad_lease_options(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        CheckpointManager(tmp_path / "ckpt", **kwargs)
