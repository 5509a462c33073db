"""Two writers on one root: the lease (``<root>/.lease.json``) stops the second with an error
naming the first; a stale lease (dead process, or no heartbeat within its timeout) is taken
over; takeovers racing have exactly one winner; readers never need it.

The other writer is a real process (a forkserver child, see crash_tools.Child).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from crash_tools import Child
from hypothesis import given
from hypothesis import strategies as st

from asyncckpt import CheckpointManager, Retention, TrainState
from asyncckpt.cli import main as cli_main
from asyncckpt.errors import ConfigError, LeaseError
from asyncckpt.lease import (LEASE_NAME, Holder, Lease, is_same_process, live_holder, process_start,
                             read_holder, root_key, same_pid_space, stale_reason)
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
    assert "host other-host pid 4242 since" in str(err.value)
    age = re.search(r"last heartbeat (\d+)s ago", str(err.value))   # 5 s, plus however slow this is
    assert age and 5 <= int(age.group(1)) < 60, str(err.value)
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


@pytest.mark.parametrize("kwargs, field", [
    ({"lease_heartbeat_s": 0}, "lease_heartbeat_s"),
    ({"lease_timeout_s": 5, "lease_heartbeat_s": 10}, "lease_timeout_s"),
    ({"lease": "yes"}, "lease"),
])
def test_bad_lease_options(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        CheckpointManager(tmp_path / "ckpt", **kwargs)


# ---------------------------------------------------------------- who holds a lease

HERE = Holder(owner="a", host="h", pid=10, started=0, heartbeat=0, timeout_s=60, boot_id="b",
              pid_ns="n", pid_start_ticks=500)
"""This process, as stale_reason's ``here``."""
OTHER = Holder(owner="o", host="h", pid=11, started=0, heartbeat=100, timeout_s=60, boot_id="b",
               pid_ns="n", pid_start_ticks=700)
"""Another process of this machine, boot and pid namespace, heartbeat fresh at now=150."""


@pytest.mark.parametrize("changes, running, expected", [
    ({}, 700, None),  # its pid runs, started when it did: it holds the lease
    ({}, None, "its process 11 on this host is gone"),
    ({}, 900, "pid 11 is now another process (started 900 clock ticks after boot, the holder 700)"),
    ({}, 0, None),  # it runs, start time unreadable: alive
    ({"pid_start_ticks": 0}, 900, None),  # an older lease: no start time to compare
    ({"pid": 10, "pid_start_ticks": 400}, None, "pid 10 is now another process"),  # we have its pid
    ({"pid": 10, "pid_start_ticks": 500}, None, None),  # it is us
    ({"pid": 10, "pid_ns": "m"}, None, None),  # another container's pid 10: only its heartbeat tells
    ({"pid_ns": "m"}, None, None),
    ({"boot_id": "c"}, None, None),  # before a reboot of this host (or a clone with its name)
    ({"host": "g"}, None, None),
    ({"boot_id": "", "pid_ns": ""}, None, None),  # an old lease without boot and namespace
    ({"heartbeat": -11}, 700, "its last heartbeat is 161s old (timeout 60s)"),
], ids=["live", "gone", "pid-reused", "ticks-unknown", "old-lease", "own-pid-reused", "self",
        "other-ns-same-pid", "other-ns", "other-boot", "other-host", "no-ns-recorded", "expired"])
def test_stale_reason(changes: dict, running: int | None, expected: str | None) -> None:
    asked: list[int] = []

    def started(pid: int) -> int | None:
        asked.append(pid)
        return running

    holder = replace(OTHER, **changes)
    reason = stale_reason(holder, now=150, here=HERE, started=started)
    assert reason == expected if expected is None else expected in reason, reason
    assert set(asked) <= {11}, "only another pid of this pid space is looked up"


_holders = st.builds(
    Holder, owner=st.text(max_size=4), host=st.sampled_from(["h", "g"]), pid=st.sampled_from([1, 10, 11]),
    started=st.floats(0, 200), heartbeat=st.floats(0, 200), timeout_s=st.floats(1, 100),
    boot_id=st.sampled_from(["", "b", "c"]), pid_ns=st.sampled_from(["", "n", "m"]),
    pid_start_ticks=st.sampled_from([0, 400, 500, 700]))


@given(holder=_holders, running=st.sampled_from([None, 0, 500, 700]))
def test_only_a_holder_of_this_pid_space_is_judged_by_its_process(holder: Holder, running: int | None) -> None:
    reason = stale_reason(holder, now=150, here=HERE, started=lambda pid: running)
    if 150 - holder.heartbeat > holder.timeout_s:
        assert reason is not None and "heartbeat" in reason
    elif not same_pid_space(holder, HERE) or is_same_process(holder, HERE):
        assert reason is None, "another host, boot or container, or this very process, is live"


@given(holder=_holders)
def test_this_process_only_when_pid_space_pid_and_start_time_match(holder: Holder) -> None:
    same = (holder.host, holder.boot_id, holder.pid_ns, holder.pid, holder.pid_start_ticks) == \
        (HERE.host, HERE.boot_id, HERE.pid_ns, HERE.pid, HERE.pid_start_ticks)
    assert is_same_process(holder, HERE) == same
    assert Holder.from_json(holder.to_json(), "x") == holder


def test_an_old_lease_file_parses_and_is_not_taken_as_ours(tmp_path: Path) -> None:
    """A lease written before the start time (or namespace) was recorded, by a process with our
    host and pid: it may be another container's pid, so it is live until its heartbeat stops."""
    me = Holder.for_this_process(now=time.time(), timeout_s=60.0)
    for dropped in (["pid_start_ticks"], ["pid_start_ticks", "boot_id", "pid_ns"]):
        record = {k: v for k, v in json.loads(me.to_json()).items() if k not in dropped}
        holder = Holder.from_json(json.dumps(record).encode(), "old")
        assert holder == replace(me, **{k: Holder.__dataclass_fields__[k].default for k in dropped})
        assert not is_same_process(holder, me)
        root = tmp_path / "-".join(dropped)
        root.mkdir()
        (root / LEASE_NAME).write_text(json.dumps(record))
        with pytest.raises(LeaseError, match=f"in use by another writer: host {me.host} pid {me.pid} "):
            CheckpointManager(root)
        assert read_holder(Storage(str(root))) == holder


def test_a_live_pid_with_another_start_time_is_a_reused_pid(tmp_path: Path, caplog) -> None:
    """A lease of this host, boot and pid namespace whose pid now runs another process (the
    holder died and the pid was given out again) is stale; with the right start time it is live."""
    root = tmp_path / "ckpt"
    root.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        ticks = process_start(other.pid)
        assert ticks, "the start time of a running child is readable here"
        holder = replace(Holder.for_this_process(now=time.time(), timeout_s=60.0), owner="f" * 32,
                         pid=other.pid, pid_start_ticks=ticks)
        (root / LEASE_NAME).write_bytes(holder.to_json())
        with pytest.raises(LeaseError, match=f"in use by another writer: host .* pid {other.pid} "):
            CheckpointManager(root)
        (root / LEASE_NAME).write_bytes(replace(holder, pid_start_ticks=ticks - 1).to_json())
        assert live_holder(Storage(str(root))) is None
        with CheckpointManager(root, **FAST) as mgr:
            assert read_holder(mgr.storage).pid == os.getpid()
        assert f"pid {other.pid} is now another process (started {ticks} clock ticks" in caplog.text
    finally:
        other.kill()
        other.wait()


def test_one_root_however_it_is_spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to("ckpt", target_is_directory=True)
    with CheckpointManager(tmp_path / "ckpt", **FAST) as first:
        owner = first._guard.lease.holder.owner
        for spelling in ("ckpt", "./ckpt", "link", f"file://{tmp_path}/ckpt", str(tmp_path / "ckpt") + "/"):
            with pytest.raises(LeaseError, match="another CheckpointManager of this process.*close"):
                CheckpointManager(spelling)
            assert read_holder(first.storage).owner == owner, spelling
        first.save(1, TrainState(model=weights_at(1)), blocking=True)
        assert not first._guard.lease.lost.is_set()
    with CheckpointManager("./ckpt") as again:  # released under one spelling, free under all
        assert [i.step for i in again.list()] == [1]
    assert root_key(Storage("link")) == root_key(Storage(str(tmp_path / "ckpt")))
    assert root_key(Storage("memory://run/a/")) == root_key(Storage("memory:///run/a"))


# ---------------------------------------------------------------- two containers on one host

CHILD = Path(__file__).resolve().parent.parent / "helpers_lease_child.py"
UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--map-root-user"]
DEADLINE_S = 120.0


def _unshare_refusal() -> str | None:
    """Why a new pid namespace cannot be made here (None: it can)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    done = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    return None if done.returncode == 0 else f"unshare is not permitted here: {done.stderr.strip()}"


class Container:
    """helpers_lease_child.py as pid 1 of its own pid namespace, killed at a deadline."""

    def __init__(self, root: Path, name: str) -> None:
        import asyncckpt

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(asyncckpt.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
        self.stderr_path = root.parent / f"{name}.stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([*UNSHARE, sys.executable, str(CHILD), str(root)], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, bufsize=1)
        self.timer = threading.Timer(DEADLINE_S, self.proc.kill)  # --kill-child takes pid 1 along
        self.timer.start()

    def say(self, text: str) -> str:
        if text:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        assert line, f"the child said nothing (killed at the deadline?); stderr:\n{self.stderr_path.read_text()}"
        return line

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def test_two_containers_as_pid_1_on_one_host_do_not_share_a_root(tmp_path: Path) -> None:
    """Same host name, same boot, both pid 1, each in its own pid namespace: the second writer
    is refused with the first named, and the first keeps the lease and keeps committing."""
    refusal = _unshare_refusal()
    if refusal:
        pytest.skip(refusal)
    root = tmp_path / "ckpt"
    with Container(root, "first") as first:
        opened = first.say("")
        assert opened.startswith("OPEN 1 "), opened
        owner = opened.split()[2]
        holder = read_holder(Storage(str(root)))
        assert (holder.owner, holder.pid) == (owner, 1)
        assert holder.pid_ns and holder.pid_ns != Holder.for_this_process(now=0, timeout_s=0).pid_ns
        with Container(root, "second") as second:
            said = second.say("")
        assert said.startswith("ERROR LeaseError"), said
        assert f"in use by another writer: host {socket.gethostname()} pid 1 since " in said, said
        assert read_holder(Storage(str(root))).owner == owner, "the refused writer took the lease"
        assert first.say("save 1") == "COMMITTED 1"
        assert first.say("close") == "CLOSED"
    assert not (root / LEASE_NAME).exists()


@pytest.mark.parametrize("changes", [
    {"started": 1e400}, {"started": "nan"}, {"heartbeat": float("nan")}, {"heartbeat": -1e300},
    {"timeout_s": float("inf")}, {"timeout_s": 0}, {"timeout_s": -5}, {"pid": 10**30}, {"pid": 0},
    {"pid": 1e30}, {"pid_start_ticks": -1}, {"pid_start_ticks": 10**30},
])
def test_a_lease_file_with_impossible_numbers_is_a_lease_error_naming_it(tmp_path: Path, changes: dict) -> None:
    # such a file once raised OverflowError/ValueError (datetime, os.kill) or never went stale
    record = {**json.loads(replace(OTHER, heartbeat=time.time()).to_json()), **changes}
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / LEASE_NAME).write_text(json.dumps(record))
    with pytest.raises(LeaseError) as info:
        CheckpointManager(root)
    text = str(info.value)
    assert f"{root / LEASE_NAME} is not a readable lease (ValueError: " in text and list(changes)[0] in text
