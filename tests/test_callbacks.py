"""on_commit / on_failure: called on the writer thread, never able to break a save."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointInfo, CheckpointManager, Retention, TrainState
from asyncckpt.errors import ConfigError, SaveError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state() -> TrainState:
    torch.manual_seed(0)
    return TrainState(model=nn.Linear(4, 2))


def test_on_commit_gets_each_checkpoint_off_the_training_thread(tmp_path):
    seen: list[tuple[CheckpointInfo, str, list[int]]] = []

    def on_commit(info: CheckpointInfo) -> None:
        seen.append((info, threading.current_thread().name, sorted(int(p.name[5:]) for p in
                                                                   (tmp_path / "ckpt").glob("step-*"))))

    state = _state()
    with CheckpointManager(tmp_path / "ckpt", on_commit=on_commit, retention=Retention(keep_last=2)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state, metrics={"loss": 1.0 / step})
        mgr.wait()
    assert [info.step for info, _, _ in seen] == [1, 2, 3]
    info, thread, on_disk = seen[-1]
    assert thread != threading.main_thread().name
    assert info.committed and info.metrics == {"loss": pytest.approx(1 / 3)}
    assert info.path.endswith("step-0000000003")
    assert on_disk == [2, 3]  # called after retention


def test_a_raising_on_commit_is_logged_and_never_breaks_saves(tmp_path, caplog):
    def on_commit(info: CheckpointInfo) -> None:
        raise RuntimeError("webhook down")

    state = _state()
    with caplog.at_level(logging.ERROR, logger="asyncckpt"):
        with CheckpointManager(tmp_path / "ckpt", on_commit=on_commit,
                               retention=Retention(keep_last=1)) as mgr:
            for step in (1, 2, 3):
                mgr.save(step, state).result(timeout=120)
            mgr.wait()  # nothing latched: no error raised here or by close()
            assert [i.step for i in mgr.list()] == [2, 3]  # retention still ran
    assert "on_commit callback raised" in caplog.text and "webhook down" in caplog.text


def test_on_failure_gets_step_and_error(tmp_path, faulty_fs):
    calls: list[tuple[int, BaseException, str]] = []
    state = _state()
    with CheckpointManager(faulty_fs.url(tmp_path / "ckpt"),
                           on_failure=lambda step, e: calls.append(
                               (step, e, threading.current_thread().name))) as mgr:
        faulty_fs.fail_on_write(1)
        handle = mgr.save(4, state)
        with pytest.raises(SaveError):
            handle.result(timeout=120)
        assert len(calls) == 1  # called before the handle finished
        step, err, thread = calls[0]
        assert step == 4 and isinstance(err, SaveError) and thread != threading.main_thread().name
        with pytest.raises(SaveError):
            mgr.wait()
        mgr.save(5, state).result(timeout=120)
    assert len(calls) == 1


def test_a_raising_on_failure_keeps_the_original_error(tmp_path, faulty_fs, caplog):
    def on_failure(step: int, e: BaseException) -> None:
        raise ValueError("pager down")

    state = _state()
    with caplog.at_level(logging.ERROR, logger="asyncckpt"):
        with CheckpointManager(faulty_fs.url(tmp_path / "ckpt"), on_failure=on_failure) as mgr:
            faulty_fs.fail_on_write(1)
            with pytest.raises(SaveError):
                mgr.save(1, state).result(timeout=120)
            with pytest.raises(SaveError):  # the save's error, not the callback's
                mgr.wait()
    assert "on_failure callback raised" in caplog.text and "pager down" in caplog.text


@pytest.mark.parametrize("name", ["on_commit", "on_failure"])
def test_callbacks_must_be_callable(tmp_path, name):
    with pytest.raises(ConfigError, match=name):
        CheckpointManager(tmp_path / "ckpt", **{name: "https://hooks.example/notify"})
