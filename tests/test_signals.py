"""SIGTERM/SIGINT: the handlers (in process) and a final save in a training subprocess.

The subprocess tests synchronise on lines from the child's stdout (a pipe),
never on sleeps, and a timer kills a child that passes its deadline.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncckpt import CheckpointManager, Schedule, TrainState
from asyncckpt.signals import StopSignals, signal_name
from helpers.procs import spawn

CHILD = Path(__file__).with_name("helpers_signal_child.py")
DEADLINE_S = 120.0

# ---------------------------------------------------------------- StopSignals in this process


@pytest.fixture
def restore_handlers() -> Any:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield saved
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_first_signal_sets_the_flag_and_uninstall_restores(restore_handlers: dict) -> None:
    stops = StopSignals()
    assert stops.install() and stops.received is None
    assert signal.getsignal(signal.SIGTERM) == stops._handle
    signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: recorded only
    assert stops.received == signal.SIGINT and stops.count == 1
    stops.uninstall()
    assert {s: signal.getsignal(s) for s in restore_handlers} == restore_handlers


def test_previous_python_handler_is_chained(restore_handlers: dict) -> None:
    seen = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    stops = StopSignals()
    stops.install()
    signal.raise_signal(signal.SIGTERM)
    assert stops.received == signal.SIGTERM and seen == [signal.SIGTERM]
    stops.uninstall()
    signal.raise_signal(signal.SIGTERM)  # the previous handler is back
    assert seen == [signal.SIGTERM, signal.SIGTERM]


def test_ignored_signal_stays_ignored(restore_handlers: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stops = StopSignals()
    stops.install()
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == stops._handle
    stops.uninstall()


def test_uninstall_leaves_a_newer_handler(restore_handlers: dict) -> None:
    stops = StopSignals()
    stops.install()
    newer = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGTERM, newer)
    stops.uninstall()
    assert signal.getsignal(signal.SIGTERM) is newer
    assert signal.getsignal(signal.SIGINT) == restore_handlers[signal.SIGINT]


def test_install_off_the_main_thread_warns(restore_handlers: dict, caplog: pytest.LogCaptureFixture) -> None:
    result = []
    thread = threading.Thread(target=lambda: result.append(StopSignals().install()))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert result == [False] and "only be installed from the main thread" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == restore_handlers[signal.SIGTERM]


def test_signal_name() -> None:
    assert (signal_name(15), signal_name(2), signal_name(999)) == ("SIGTERM", "SIGINT", "999")


# ---------------------------------------------------------------- the manager in this process


def test_manager_saves_at_once_after_a_signal(tmp_path: Path, restore_handlers: dict) -> None:
    state = TrainState(model=torch.nn.Linear(4, 4))
    with CheckpointManager(tmp_path / "ckpt", schedule=Schedule(every_n_steps=100), save_on_signal=True,
                           signal_grace_s=30) as mgr:
        assert mgr.maybe_save(1, state) is None and not mgr.should_stop
        signal.raise_signal(signal.SIGTERM)
        assert not mgr.should_stop  # only maybe_save acts on it
        handle = mgr.maybe_save(2, state, metrics={"loss": 1.5}, tags=["mine"])
        assert handle is not None and handle.done() and handle.exception() is None  # committed
        assert mgr.should_stop
        info = mgr.list()[-1]
        assert (info.step, info.tags, info.metrics) == (2, ("mine", "signal:SIGTERM"), {"loss": 1.5})
        assert mgr.maybe_save(3, state) is None  # the signal was handled once
    assert {s: signal.getsignal(s) for s in restore_handlers} == restore_handlers  # close() restored


def test_signal_grace_bounds_the_wait_for_the_final_save(tmp_path: Path, restore_handlers: dict,
                                                         faulty_fs, caplog) -> None:
    """The writer is held inside the final save's write: maybe_save gives up after
    signal_grace_s, logs it, and the loop may stop; the save still commits at close()."""
    state = TrainState(model=torch.nn.Linear(4, 4))
    with CheckpointManager(faulty_fs.url(tmp_path / "ckpt"), save_on_signal=True,
                           signal_grace_s=0.2) as mgr:
        signal.raise_signal(signal.SIGTERM)
        faulty_fs.pause()
        with caplog.at_level(logging.ERROR, logger="asyncckpt"):
            handle = mgr.maybe_save(5, state)
        assert handle is not None and mgr.should_stop
        assert faulty_fs.paused.wait(30) and not handle.committed(timeout=0)   # still held
        assert any("did not commit within signal_grace_s=0.2" in r.getMessage() for r in caplog.records)
        faulty_fs.release()
    assert handle.result(timeout=120).step == 5
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        assert [i.step for i in mgr.list()] == [5]


def test_manager_signal_on_a_saved_step_just_stops(tmp_path: Path, restore_handlers: dict) -> None:
    state = TrainState(model=torch.nn.Linear(4, 4))
    with CheckpointManager(tmp_path / "ckpt", schedule=Schedule(every_n_steps=2), save_on_signal=True) as mgr:
        assert mgr.maybe_save(2, state) is not None
        signal.raise_signal(signal.SIGINT)
        assert mgr.maybe_save(2, state) is None and mgr.should_stop
        assert [i.step for i in mgr.list()] == [2]


def test_manager_without_save_on_signal_installs_nothing(tmp_path: Path, restore_handlers: dict) -> None:
    with CheckpointManager(tmp_path / "ckpt"):
        assert {s: signal.getsignal(s) for s in restore_handlers} == restore_handlers


# ---------------------------------------------------------------- a training subprocess


class Child:
    """helpers_signal_child.py under a deadline; lines are read from its stdout pipe."""

    def __init__(self, tmp_path: Path, *args: str, name: str = "child") -> None:
        self.stderr_path = tmp_path / f"{name}.stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = spawn(CHILD, *args, stdin=subprocess.PIPE, stderr=err, bufsize=1)
        self.timer = threading.Timer(DEADLINE_S, self.proc.kill)
        self.timer.start()

    def expect(self, prefix: str) -> str:
        line = self.proc.stdout.readline()
        if not line.startswith(prefix):
            self.proc.kill()
            pytest.fail(f"expected {prefix!r} from the child, got {line!r}; stderr:\n{self.stderr()}")
        return line.strip()

    def send(self, text: str = "") -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        finally:
            self.timer.cancel()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()


def _manifest(root: Path, step: int) -> dict | None:
    path = root / f"step-{step:010d}" / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_sigterm_commits_a_final_save_and_a_restart_resumes(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    with Child(tmp_path, str(root), "100", name="first") as child:
        child.expect("START 0")
        child.expect("READY step 1")
        child.send()
        child.expect("READY step 2")  # step 2 saved (every 2) and committed
        child.signal(signal.SIGTERM)  # the child waits on stdin: the handler runs there
        child.send()
        assert child.expect("STOPPED") == "STOPPED step 3 chained=1"  # at once, not at step 4
        assert child.expect("DONE") == "DONE handler_restored=1"
        assert child.wait() == 0, child.stderr()
    assert "SIGTERM: saving now and stopping" in child.stderr()
    final = _manifest(root, 3)
    assert final is not None and "signal:SIGTERM" in final["tags"]

    with Child(tmp_path, str(root), "5", name="restart") as child:
        assert child.expect("START") == "START 3 pos=3"  # resumed from the final save
        for step in (4, 5):
            child.expect(f"READY step {step}")
            child.send()
        child.expect("DONE")
        assert child.wait() == 0, child.stderr()
    assert _manifest(root, 4) is not None


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    with Child(tmp_path, str(root), "100") as child:
        child.expect("START 0")
        child.expect("READY step 1")
        child.send()
        child.expect("READY step 2")
        child.signal(signal.SIGTERM)
        child.send("block")  # the final save (step 3) will hang in the dataloader's state_dict
        child.expect("IN FINAL SAVE")
        child.signal(signal.SIGTERM)
        assert child.wait() == 128 + signal.SIGTERM
    assert "second stop signal (SIGTERM): exiting now with status 143" in child.stderr()
    assert _manifest(root, 2) is not None and _manifest(root, 3) is None  # nothing half-written counts
    with CheckpointManager(root) as mgr:
        assert [i.step for i in mgr.list()] == [2]


@pytest.mark.dist
def test_all_ranks_agree_on_a_signal_one_rank_got(tmp_path: Path) -> None:
    children = [Child(tmp_path, "--dist", str(rank), "2", str(tmp_path), name=f"rank{rank}")
                for rank in range(2)]
    try:
        lines = [child.expect(f"RANK {rank} STOPPED") for rank, child in enumerate(children)]
        codes = [child.wait() for child in children]
    finally:
        for child in children:
            child.__exit__(None, None, None)
    assert codes == [0, 0], [c.stderr() for c in children]
    assert lines == ["RANK 0 STOPPED step 3", "RANK 1 STOPPED step 3"]
    final = _manifest(tmp_path / "ckpt", 3)
    assert final is not None and final["world_size"] == 2 and "signal" in final["tags"]
