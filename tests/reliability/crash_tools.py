"""The parent side of the crash matrix: trial roots, the freezing S3 proxy, running one
trial under a deadline, and the checks after a kill.  See test_crash_matrix.py."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import helpers_crash_child as child
import helpers_s3 as h
from asyncckpt import CheckpointManager, TrainState
from asyncckpt.manifest import step_dir_name
from asyncckpt.restore import load_into
from asyncckpt.storage import Storage, list_committed, uncommitted_steps, verify_files

CTX = mp.get_context("forkserver")
# Imported once by the forkserver, not per trial (it does not see tests/ on its path).
CTX.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed.checkpoint.state_dict",
                            "asyncckpt.manager", "s3fs", "pytest"])
DEADLINE_S = 90.0
PARENT_LEASE = dict(lease_heartbeat_s=0.4, lease_timeout_s=30.0)

S3_KINDS: dict[str, Callable[[str, str], bool]] = {
    "save": lambda m, p: m in ("PUT", "POST", "DELETE"),
    "prune": lambda m, p: m == "DELETE" or (m == "POST" and "delete" in p.split("?", 1)[-1]),
    "mirror": lambda m, p: m in ("PUT", "POST", "DELETE"),
    "restore": lambda m, p: True,
}
"""Which S3 requests count as events in each phase (the proxy holds the chosen one)."""


class FreezingProxy(h.FaultProxy):
    """The fault proxy, plus: once armed, count the requests ``match`` accepts and, from the
    ``kill_at``-th on, hold every one of them (the ``kill_at``-th is first forwarded when
    ``land`` is set: it takes effect but its reply is lost).  ``frozen`` is set then."""

    def __init__(self, target: str) -> None:
        self.match: Callable[[str, str], bool] | None = None
        self.kill_at, self.count, self.land, self.chosen = 0, 0, False, ""
        self.frozen, self.gate = threading.Event(), threading.Event()
        super().__init__(target)
        self._server.handle_error = lambda *args: None  # a killed client resets its connections

    def arm(self, match: Callable[[str, str], bool], kill_at: int, land: bool) -> None:
        with self._lock:
            self.match, self.kill_at, self.land = match, kill_at, land

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            self.seen.append((method, path))
            if self.match is None or not self.match(method, path):
                return "pass"
            self.count += 1
            if self.kill_at and self.count == self.kill_at:
                self.chosen = f"{method} {path}"
                return "land" if self.land else "hold"
            return "hold" if self.kill_at and self.count > self.kill_at else "pass"

    def close(self) -> None:
        self.gate.set()
        super().close()

    def _handler(self) -> type:
        base, proxy = super()._handler(), self

        class Handler(base):  # type: ignore[misc, valid-type]
            disable_nagle_algorithm = True  # else each reply waits ~40 ms for a delayed ACK

            def _serve(self) -> None:
                body = self._body()
                action = proxy._decide(self.command, self.path)
                if action == "pass":
                    self._forward(body, reply=True)
                    return
                if action == "land":
                    self._forward(body, reply=False)
                proxy.frozen.set()
                proxy.gate.wait(DEADLINE_S)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler


@dataclass
class Trial:
    """One child run: where it works, where it is killed, what it reported."""

    phase: str
    backend: str
    index: int
    kill_at: int
    root: str
    backup: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    backup_options: dict[str, Any] = field(default_factory=dict)
    land: bool = False
    big: bool = False
    killed_at: str = ""
    """The event or request the child was frozen at ("" when it ran to the end)."""
    messages: list[str] = field(default_factory=list)
    events: int = 0
    """Events (local) or matching requests (S3) counted: the calibration run's total."""

    @property
    def committed(self) -> set[int]:
        return {int(m.split()[1]) for m in self.messages if m.startswith("COMMITTED")}

    def said(self, word: str) -> list[str]:
        return [m for m in self.messages if m.startswith(word)]

    def describe(self) -> str:
        return (f"{self.phase}/{self.backend} trial {self.index} kill_at={self.kill_at}"
                f"{' (landed)' if self.land else ''}: {self.killed_at or 'ran to the end'}; "
                f"messages {self.messages}")


def run_child(trial: Trial, spec: dict[str, Any], endpoint: str | None, log: Path) -> Trial:
    """Start the child, let it go, SIGKILL it at its freeze point; raise past the deadline."""
    proxy = FreezingProxy(endpoint) if endpoint else None
    if proxy is not None:
        spec = {**spec, **_through(proxy, trial)}
    ours, theirs = CTX.Pipe()
    proc = CTX.Process(target=child.run_trial, args=(theirs, {**spec, "log": str(log)}), daemon=True)
    proc.start()
    theirs.close()
    deadline = time.monotonic() + DEADLINE_S
    try:
        _expect(ours, proc, "READY", deadline, log)
        if proxy is not None:
            proxy.arm(S3_KINDS[trial.phase], trial.kill_at, trial.land)
        ours.send("GO")
        _drive(trial, ours, proc, proxy, deadline, log)
    finally:
        if proc.is_alive():
            proc.kill()  # SIGKILL: nothing runs in the child after this
        proc.join(DEADLINE_S)
        ours.close()
        if proxy is not None:
            trial.events = trial.events or proxy.count
            proxy.close()
    return trial


def _through(proxy: FreezingProxy, trial: Trial) -> dict[str, Any]:
    """The child's storage options, pointed at the proxy (botocore does not retry)."""
    opts = h.options(proxy.url, **h.NO_CLIENT_RETRIES)
    return {"options": opts} if trial.phase != "mirror" else {"backup_options": opts}


def _expect(conn: Any, proc: Any, word: str, deadline: float, log: Path) -> str:
    while time.monotonic() < deadline:
        if conn.poll(0.05):
            msg = conn.recv()
            if msg.startswith(word):
                return msg
            raise AssertionError(f"expected {word!r} from the child, got {msg!r}\n{_tail(log)}")
        if not proc.is_alive():
            break
    raise AssertionError(f"the child did not say {word!r} (deadline or exit {proc.exitcode})\n{_tail(log)}")


def _drive(trial: Trial, conn: Any, proc: Any, proxy: FreezingProxy | None, deadline: float,
           log: Path) -> None:
    """Collect the child's messages until it is frozen (event or held request) or done."""
    while True:
        if proxy is not None and proxy.frozen.is_set():
            trial.killed_at = proxy.chosen
            return
        ready = mpc.wait([conn, proc.sentinel], timeout=0.05)
        msg = None
        if conn in ready:
            with contextlib.suppress(EOFError):
                msg = conn.recv()
        if msg is not None:
            trial.messages.append(msg)
            if msg.startswith("AT "):
                trial.killed_at = msg
                return
            if msg.startswith("DONE"):
                trial.events = trial.events or int(msg.split("=")[1])
                return
        elif ready:
            raise AssertionError(f"the child died by itself (exit {proc.exitcode}): "
                                 f"{trial.describe()}\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"deadline passed: {trial.describe()}\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else "(no log)"


# -- checks after the kill ----------------------------------------------------------------------

def weights_equal(model: torch.nn.Module, step: int, big: bool) -> bool:
    want = child.weights_at(step, big).state_dict()
    return all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def check_readable(store: Storage, big: bool, where: str) -> list[int]:
    """Every listed checkpoint verifies and restores to exactly what was saved (reads only)."""
    listed = list_committed(store)
    for m in listed:
        folder = store.child(step_dir_name(m.step))
        assert verify_files(folder, m) == [], f"{where}: step {m.step} does not verify"
        state = TrainState(model=child.weights_at(0, big))
        load_into(folder, m, state, rank=0, group=None)
        assert weights_equal(state.models["model"], m.step, big), f"{where}: step {m.step} differs"
    return [m.step for m in listed]


def leftovers(store: Storage) -> list[str]:
    """What a crash may leave: uncommitted step folders, temporary files at the root."""
    names = [step_dir_name(s) for s in uncommitted_steps(store)]
    return names + [n for n in store.list_files() if n not in (".lease.json",)]


def carry_on(trial: Trial, step: int, **extra: Any) -> tuple[list[int], list[int]]:
    """A new manager on the same root(s): nothing left over, ``step`` saves, restores and (with a
    backup) is mirrored; returns the steps listed on the primary and on the backup after."""
    opts = dict(storage_options=trial.options, **PARENT_LEASE, **extra)
    if trial.backup:
        opts.update(backup=trial.backup, backup_storage_options=trial.backup_options)
    store = Storage(trial.root, trial.options)
    before = [m.step for m in list_committed(store)]
    with CheckpointManager(trial.root, **opts) as mgr:
        left = leftovers(store)
        assert left == [], f"leftovers after a new start: {left}; {trial.describe()}"
        assert [i.step for i in mgr.list()] == before, "a new start removed a committed checkpoint"
        mgr.save(step, TrainState(model=child.weights_at(step, trial.big)), blocking=True)
        mgr.wait()
        state = TrainState(model=child.weights_at(0, trial.big))
        assert mgr.restore(state) == step and weights_equal(state.models["model"], step, trial.big)
        after = [i.step for i in mgr.list()]
        backup = [i.step for i in mgr.list(backup=True)] if trial.backup else []
    assert ".lease.json" not in store.list_files(), "close() left the lease behind"
    if trial.backup:
        bstore = Storage(trial.backup, trial.backup_options)
        left = [step_dir_name(s) for s in uncommitted_steps(bstore)]
        assert left == [], f"backup leftovers: {left}; {trial.describe()}"
        check_readable(bstore, trial.big, "backup after the restart")
    return after, backup


def copy_prefix(client: Any, bucket: str, src: str, dst: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=src + "/"):
        for obj in page.get("Contents", []):
            client.copy_object(Bucket=bucket, Key=dst + obj["Key"][len(src):],
                               CopySource={"Bucket": bucket, "Key": obj["Key"]})


def unfinished_uploads(client: Any, bucket: str, prefix: str) -> list[str]:
    return h.unfinished_uploads({"client": client, "name": bucket}, prefix + "/")


def build_base(root: str, options: dict[str, Any], steps: range, big: bool,
               backup: str | None = None, backup_options: dict[str, Any] | None = None) -> None:
    """Committed checkpoints ``steps`` (mirrored to ``backup`` too), saved by this process."""
    opts: dict[str, Any] = dict(storage_options=options, **PARENT_LEASE)
    if backup:
        opts.update(backup=backup, backup_storage_options=backup_options or {})
    with CheckpointManager(root, **opts) as mgr:
        for step in steps:
            mgr.save(step, TrainState(model=child.weights_at(step, big)), blocking=True)
        mgr.wait()


class Child:
    """``helpers_crash_child.<target>(conn, spec)`` in a forkserver child, under a deadline."""

    def __init__(self, target: str, spec: dict[str, Any]) -> None:
        self.conn, theirs = CTX.Pipe()
        self.proc = CTX.Process(target=getattr(child, target), args=(theirs, spec), daemon=True)
        self.proc.start()
        theirs.close()

    def recv(self, timeout: float = DEADLINE_S) -> str:
        if not self.conn.poll(timeout):
            self.close()
            raise AssertionError(f"no message from the child within {timeout}s")
        return str(self.conn.recv())

    def send(self, msg: str) -> None:
        self.conn.send(msg)

    def kill(self) -> None:
        """SIGKILL, and reap it (a zombie's pid would still look alive)."""
        self.proc.kill()
        self.proc.join(DEADLINE_S)

    def close(self) -> None:
        if self.proc.is_alive():
            self.kill()
        self.proc.join(DEADLINE_S)
        self.conn.close()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
