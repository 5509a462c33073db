"""CheckpointManager's lifecycle: every thread it starts is joined, buffers and the writer
survive failures of staging and of user callbacks, one writer per manager, and a finished
``result()`` leaves nothing in the background that a following read could race."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, Retention, TrainState
from asyncckpt.errors import SaveError
from helpers.procs import python

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

HANG_S = 30.0


def _within(fn: Callable[[], Any], what: str, timeout_s: float = HANG_S) -> Any:
    """``fn()`` on a helper thread; fails the test (instead of hanging it) if it blocks."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            out["error"] = e

    t = threading.Thread(target=run, name="test-within", daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"{what} still blocked after {timeout_s:g}s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _ours() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("asyncckpt") and t.is_alive()}


def _state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    return TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


# -- 3: every thread the manager started is joined ---------------------------------------

_RESTORE_AND_EXIT = textwrap.dedent("""
    import os, shutil, sys
    import torch
    from torch import nn
    from asyncckpt import CheckpointManager, TrainState

    root, runs = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)  # no intra-op thread pool in the parent: its children fork safely
    torch.manual_seed(0)
    # 32 MB of state: its prewarm takes long enough to be under way when the child exits
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))
    state = TrainState(model=model)

    def in_child(i, work):
        # torch is imported once; each run is a forked child that exits the normal way
        err = os.open(f"{root}.{i}.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        pid = os.fork()
        if pid == 0:
            os.dup2(err, 2)
            work(f"{root}-{i}" if i else root)
            sys.exit(0)
        os.close(err)
        _, status = os.waitpid(pid, 0)
        os.write(1, f"{i} {os.waitstatus_to_exitcode(status)}\\n".encode())

    def save(path):
        with CheckpointManager(path, compression=None) as mgr:
            mgr.save(1, state).result(timeout=120)

    def restore(path):
        mgr = CheckpointManager(path, compression=None)
        assert mgr.restore(state) == 1
        # no close(): the interpreter's exit must wait for the threads the manager started

    in_child(0, save)
    for i in range(1, runs + 1):
        shutil.copytree(root, f"{root}-{i}")  # a root each: a run that aborted holds its lease
        in_child(i, restore)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per run")
@pytest.mark.parametrize("runs", [8, pytest.param(50, marks=pytest.mark.slow)])
def test_restore_then_exit_without_close_never_aborts(tmp_path, runs):
    script = tmp_path / "restore_and_exit.py"
    script.write_text(_RESTORE_AND_EXIT)
    root = str(tmp_path / "ckpt")  # before the fix, about half of the runs aborted
    out = python(script, root, runs, timeout_s=60 + 10 * runs)
    assert out.returncode == 0, out.stderr
    codes = dict(line.split() for line in out.stdout.splitlines())
    stderr = {i: (tmp_path / f"ckpt.{i}.stderr").read_text() for i in codes}
    bad = {i: (code, stderr[i][-300:]) for i, code in codes.items()
           if code != "0" or "terminate called" in stderr[i]}
    assert len(codes) == runs + 1 and not bad, bad


def test_close_joins_every_thread_it_started(tmp_path):
    before = _ours()
    state = _state()
    mgr = CheckpointManager(tmp_path / "ckpt", backup=str(tmp_path / "backup"))
    mgr.save(1, state).result(timeout=HANG_S)
    mgr.restore(state)  # starts a prewarm thread (or finds the pool warm)
    mgr.prewarm(state)
    started = {t.name for t in _ours() - before}
    assert {"asyncckpt-writer", "asyncckpt-lease", "asyncckpt-mirror"} <= started
    _within(mgr.close, "close()")
    left = _ours() - before
    assert not left, sorted(t.name for t in left)


def test_close_that_raises_still_joins_every_thread(tmp_path, faulty_fs):
    before = _ours()
    mgr = CheckpointManager(faulty_fs.url(tmp_path / "ckpt"), backup=str(tmp_path / "backup"))
    mgr.save(1, _state()).result(timeout=HANG_S)
    faulty_fs.fail_on_write(1)
    handle = mgr.save(2, _state())
    assert handle.committed(timeout=HANG_S)
    with pytest.raises(SaveError):  # the latched failure, raised by close()
        _within(mgr.close, "close()")
    left = _ours() - before
    assert not left, sorted(t.name for t in left)


def test_close_joins_a_running_prewarm(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, state).result(timeout=HANG_S)
    before = _ours()
    mgr = CheckpointManager(tmp_path / "ckpt")
    pool = mgr._stager.host
    with pool._cond:  # the prewarm thread cannot take a buffer set while the test holds this
        mgr.restore(state)
        thread = mgr._stager._prewarm
        assert thread is not None and thread.name == "asyncckpt-prewarm" and thread.is_alive()
        closing = threading.Thread(target=mgr.close, name="test-close", daemon=True)
        closing.start()
        closing.join(1.0)  # close() must not return while the prewarm is under way
        assert thread.is_alive() and closing.is_alive(), "close() returned before the prewarm ended"
    closing.join(HANG_S)
    assert not closing.is_alive() and not thread.is_alive() and not (_ours() - before)


# -- 4: a staging copy that fails midway gives its buffers back -------------------------

class _Trap(torch.Tensor):
    """A real tensor whose copy into a staging buffer raises the next queued exception."""

    raises: list[BaseException] = []

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.copy_ and cls.raises:
            raise cls.raises.pop(0)
        return super().__torch_function__(func, types, args, kwargs or {})


def _trapped_state() -> TrainState:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    model.register_buffer("trap", torch.zeros(3).as_subclass(_Trap))  # after weight and bias
    return TrainState(model=model)


@pytest.mark.parametrize("max_pending", [1, 2])
def test_a_failed_staging_copy_gives_its_buffers_back(tmp_path, max_pending):
    state = _trapped_state()
    with CheckpointManager(tmp_path / "ckpt", compression=None, max_pending=max_pending) as mgr:
        _Trap.raises = [RuntimeError("copy failed"), KeyboardInterrupt(), RuntimeError("again")]
        for step, kind in ((1, RuntimeError), (2, KeyboardInterrupt), (3, RuntimeError)):
            with pytest.raises(kind):
                _within(lambda: mgr.save(step, state), f"save({step})")
        assert not _Trap.raises  # each save reached the copy and failed there
        pools = {id(p): p for p in (mgr._stager.host, mgr._stager.cpu_host)}.values()
        assert all(p._held == 0 for p in pools)
        info = _within(lambda: mgr.save(4, state).result(timeout=HANG_S), "save(4)")
        assert info.step == 4 and [i.step for i in mgr.list()] == [4]


def test_a_save_refused_after_staging_gives_its_buffers_back(tmp_path):
    """Staging done, then the pipeline refuses the job (here: closed): the buffers go back."""
    state = _state()
    mgr = CheckpointManager(tmp_path / "ckpt", compression=None, max_pending=1)
    mgr.save(1, state).result(timeout=HANG_S)
    mgr._pipeline.close()  # the writer stopped under the manager's feet
    with pytest.raises(Exception, match="closed"):
        mgr.save(2, state)
    assert mgr._stager.host._held == 0
    mgr.close()


# -- 5: a callback's sys.exit / KeyboardInterrupt never kills the writer ----------------

def test_on_commit_system_exit_is_logged_and_the_writer_goes_on(tmp_path, caplog):
    raises = [SystemExit(3), KeyboardInterrupt("stop")]
    seen: list[int] = []

    def on_commit(info: Any) -> None:
        seen.append(info.step)
        if raises:
            raise raises.pop(0)

    state = _state()
    with caplog.at_level(logging.ERROR, logger="asyncckpt"):
        mgr = CheckpointManager(tmp_path / "ckpt", compression=None, on_commit=on_commit)
        for step in (1, 2, 3, 4):
            assert mgr.save(step, state).result(timeout=HANG_S).step == step
        _within(mgr.close, "close()")
    assert seen == [1, 2, 3, 4] and [i.step for i in mgr.list()] == [1, 2, 3, 4]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("on_commit" in m and "SystemExit(3)" in m for m in errors), errors
    assert any("on_commit" in m and "KeyboardInterrupt" in m for m in errors), errors


def test_on_failure_system_exit_is_logged_and_the_writer_goes_on(tmp_path, faulty_fs, caplog):
    def on_failure(step: int, e: BaseException) -> None:
        sys.exit(4)

    state = _state()
    with caplog.at_level(logging.ERROR, logger="asyncckpt"):
        mgr = CheckpointManager(faulty_fs.url(tmp_path / "ckpt"), compression=None,
                                on_failure=on_failure)
        faulty_fs.fail_on_write(1)
        with pytest.raises(SaveError):
            mgr.save(1, state).result(timeout=HANG_S)
        with pytest.raises(SaveError):  # latched: the save's error, not the callback's
            mgr.wait()
        for step in (2, 3):
            assert mgr.save(step, state).result(timeout=HANG_S).step == step
        _within(mgr.close, "close()")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("on_failure" in m and "SystemExit(4)" in m for m in errors), errors


# -- 6: one writer thread per manager, however many threads make the first save ----------

def test_concurrent_first_saves_start_one_writer(tmp_path, monkeypatch):
    savers = 4
    # a writer start that waits for the others: every save that found no writer yet gets
    # here (the lock lets only one in, and then its wait times out)
    inside = threading.Barrier(2)

    class MeetingThread(threading.Thread):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.name == "asyncckpt-writer":
                try:
                    inside.wait(timeout=1.0)
                except threading.BrokenBarrierError:
                    pass

    state = _state()
    before = _ours()
    mgr = CheckpointManager(tmp_path / "ckpt", compression=None, max_pending=savers)
    go = threading.Barrier(savers)
    handles: dict[int, Any] = {}

    def save(step: int) -> None:
        go.wait(timeout=HANG_S)
        handles[step] = mgr.save(step, state)

    threads = [threading.Thread(target=save, args=(s,)) for s in range(1, savers + 1)]
    monkeypatch.setattr(threading, "Thread", MeetingThread)
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    monkeypatch.undo()
    writers = [t for t in _ours() - before if t.name == "asyncckpt-writer"]
    assert len(writers) == 1, writers
    assert sorted(_within(lambda: [h.result(timeout=HANG_S).step for h in handles.values()],
                          "results")) == [1, 2, 3, 4]
    _within(mgr.close, "close()")
    assert not (_ours() - before)


# -- 7: after result(), the manager's own retention is done: verify never races it ---------

def test_verify_after_result_never_races_retention(tmp_path):
    state = _state()
    failures = []
    with CheckpointManager(tmp_path / "ckpt", compression=None,
                           retention=Retention(keep_last=1)) as mgr:
        for step in range(1, 201):
            mgr.save(step, state).result(timeout=HANG_S)
            try:
                report = mgr.verify()
            except Exception as e:  # noqa: BLE001 - counted, reported below
                failures.append((step, repr(e)))
                continue
            if step not in report or any(report.values()) or not set(report) <= {step - 1, step}:
                failures.append((step, report))  # retention keeps the newest two
    assert not failures, failures[:5]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_save_still_pending_when_the_script_ends_is_committed_at_exit(tmp_path, compression) -> None:
    from pathlib import Path

    root = tmp_path / "ckpt"
    out = python(Path(__file__).with_name("helpers_exit_child.py"), root, compression)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PENDING False" in out.stdout, out.stdout          # still being written when the script ended
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == \
        ["step-0000000001", "step-0000000002"]
    assert not (root / ".lease.json").exists()                # closed: the lease let go
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 8))
    with CheckpointManager(root) as mgr:
        assert mgr.verify() == {1: [], 2: []}
        assert mgr.restore(TrainState(model=model, rng=False)) == 2
    expected = torch.load(f"{root}.expected.pt", weights_only=True)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
