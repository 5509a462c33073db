"""CheckpointManager: options, inputs, async semantics, failures, listing, and DCP interop."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from asyncckpt import CheckpointManager, SaveHandle, TrainState
from asyncckpt.errors import (
    AsyncCkptError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    ForeignFolderError,
    SaveError,
    StateMismatchError,
    StorageError,
)
from asyncckpt.manifest import seal
from asyncckpt.storage import MARKER_NAME
from helpers.checkpoints import assert_same_tensors, committed_steps

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _net(seed: int = 0, hidden: int = 8, layers: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    mods = [nn.Linear(4, hidden)]
    mods += [nn.Linear(hidden, hidden) for _ in range(layers - 1)]
    return nn.Sequential(*mods)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def mgr(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as m:
        yield m


# -- options and inputs -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field, value", [
    ({"compression": "lz4"}, "compression", "lz4"),
    ({"on_error": "ignore"}, "on_error", "ignore"),
    ({"staging": "gpu"}, "staging", "gpu"),
    ({"max_pending": 0}, "max_pending", "0"),
    ({"writer_threads": True}, "writer_threads", "True"),
    ({"zstd_level": 0}, "zstd_level", "0"),
    ({"retention": 3}, "retention", "3"),
])
def test_bad_option_values_name_field_and_value(tmp_path, kwargs, field, value):
    with pytest.raises(ConfigError) as ei:
        CheckpointManager(tmp_path / "ckpt", **kwargs)
    assert field in str(ei.value) and value in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_unknown_option_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="compresion"):
        CheckpointManager(tmp_path / "ckpt", compresion=None)


def test_root_that_cannot_be_created_names_the_root(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    root = blocker / "ckpt"
    with pytest.raises(StorageError) as ei:
        CheckpointManager(root)
    assert str(root) in str(ei.value)
    assert isinstance(ei.value, OSError)


@pytest.mark.parametrize("step", [-1, 1.0, True, "3", None, 10**10])
def test_bad_steps_are_refused(mgr, step):
    state = TrainState(model=_net())
    with pytest.raises(ConfigError, match="step"):
        mgr.save(step, state)
    with pytest.raises(ConfigError, match="step"):
        mgr.maybe_save(step, state, force=True)
    assert mgr.list() == []


@pytest.mark.parametrize("kwargs, word", [
    ({"epoch": -1}, "epoch"), ({"epoch": 1.5}, "epoch"),
    ({"metrics": {"loss": "low"}}, "loss"), ({"metrics": [1.0]}, "metrics"),
    ({"tags": "best"}, "tags"), ({"tags": [""]}, "tags"),
])
def test_bad_save_arguments_are_refused(mgr, kwargs, word):
    with pytest.raises(ConfigError, match=word):
        mgr.save(1, TrainState(model=_net()), **kwargs)


def test_state_must_be_a_trainstate(mgr):
    with pytest.raises(ConfigError, match="TrainState"):
        mgr.save(1, {"model": _net()})


@pytest.mark.parametrize("kw", [{"include": ["weights"]}, {"exclude": ["model", "rngs"]}])
def test_restore_refuses_unknown_parts(mgr, kw):
    with pytest.raises(ConfigError, match="unknown part"):
        mgr.restore(TrainState(model=_net()), **kw)


# -- existing, missing and mismatched checkpoints ------------------------------------------------

def test_saving_an_existing_step_needs_overwrite(tmp_path):
    model = _net(0)
    state = TrainState(model=model)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(5, state).result(timeout=120)
        with pytest.raises(CheckpointExistsError, match="overwrite=True"):
            mgr.save(5, state)
        with torch.no_grad():
            model[0].weight.fill_(3.0)
        expected = _snapshot(model)
        mgr.save(5, state, overwrite=True).result(timeout=120)
        assert committed_steps(mgr) == [5]

    fresh = _net(1)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.restore(TrainState(model=fresh), 5) == 5
    assert_same_tensors(fresh, expected)


def test_restoring_a_missing_step_lists_those_that_exist(mgr):
    state = TrainState(model=_net())
    for step in (10, 30):
        mgr.save(step, state)
    mgr.wait()
    with pytest.raises(CheckpointNotFoundError) as ei:
        mgr.restore(state, 20)
    assert "20" in str(ei.value) and "10, 30" in str(ei.value)
    assert ei.value.available == [10, 30]
    assert isinstance(ei.value, LookupError)


def test_restore_with_nothing_saved_returns_zero_and_changes_nothing(mgr):
    model = _net()
    before = _snapshot(model)
    assert mgr.restore(TrainState(model=model)) == 0
    assert_same_tensors(model, before)


def test_missing_key_is_named(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model=_net(layers=1))).result(timeout=120)
        with pytest.raises(StateMismatchError, match=r"1\.weight") as ei:
            mgr.restore(TrainState(model=_net(layers=2)))
    assert "missing" in str(ei.value)
    assert any(k.endswith("1.weight") for k in ei.value.missing)


def test_missing_key_with_strict_false_loads_the_rest(tmp_path):
    src = _net(0, layers=1)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model=src)).result(timeout=120)
        dst = _net(1, layers=2)
        untouched = dst[1].weight.detach().clone()
        assert mgr.restore(TrainState(model=dst), strict=False) == 1
    assert torch.equal(dst[0].weight, src[0].weight)
    assert torch.equal(dst[1].weight, untouched)


def test_unexpected_key_is_named(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model=_net(layers=2))).result(timeout=120)
        with pytest.raises(StateMismatchError, match=r"1\.weight"):
            mgr.restore(TrainState(model=_net(layers=1)))


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model=_net(hidden=8))).result(timeout=120)
        live = _net(1, hidden=6)
        before = _snapshot(live)
        with pytest.raises(StateMismatchError) as ei:
            mgr.restore(TrainState(model=live))
    msg = str(ei.value)
    assert "0.weight" in msg and "(8, 4)" in msg and "(6, 4)" in msg
    assert any(k.endswith("0.weight") for k in ei.value.shapes)
    assert_same_tensors(live, before)


def test_include_restores_only_the_chosen_parts(tmp_path):
    model = _net(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model=model, optimizer=opt, extra={"k": 1})).result(timeout=120)
        model2 = _net(1)
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
        extra2: dict = {}
        mgr.restore(TrainState(model=model2, optimizer=opt2, extra=extra2), include=["model"])
    assert_same_tensors(model2, _snapshot(model))
    assert opt2.state_dict()["state"] == {}
    assert extra2 == {}


# -- async semantics -----------------------------------------------------------------------

def test_values_are_those_at_save_time(tmp_path, faulty_fs):
    """The writer is held on its first write until training has mutated everything."""
    model = _net(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    extra = {"epoch": 1, "hist": [1.0]}
    state = TrainState(model=model, optimizer=opt, extra=extra)
    expected_model = _snapshot(model)
    expected_avg = opt.state[model[0].weight]["exp_avg"].clone()

    with CheckpointManager(faulty_fs.url(tmp_path / "ckpt")) as mgr:
        faulty_fs.pause()
        handle = mgr.save(1, state)
        assert faulty_fs.paused.wait(30)
        assert not handle.done()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1)
        opt.state[model[0].weight]["exp_avg"].mul_(-5)
        extra["epoch"] = 99
        extra["hist"].append(2.0)
        faulty_fs.release()
        handle.result(timeout=120)

    fresh = _net(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_extra: dict = {}
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.restore(TrainState(model=fresh, optimizer=fresh_opt, extra=fresh_extra))
    assert_same_tensors(fresh, expected_model)
    assert torch.equal(fresh_opt.state[fresh[0].weight]["exp_avg"], expected_avg)
    assert fresh_extra == {"epoch": 1, "hist": [1.0]}


def test_a_second_save_never_waits_for_the_first_ones_write(tmp_path, faulty_fs):
    """max_pending=2 (the default): with the writer held inside save 1's write, save 2 still
    returns staged; both commit, in order, once the writer goes on."""
    state = TrainState(model=_net())
    with CheckpointManager(faulty_fs.url(tmp_path / "ckpt")) as mgr:
        assert mgr.options.max_pending == 2
        faulty_fs.pause()
        first = mgr.save(1, state)
        assert faulty_fs.paused.wait(30)                 # the writer is inside save 1's write
        with torch.no_grad():
            state.models["model"][0].weight.add_(1)
        second = mgr.save(2, state)                     # returns: training is not held
        assert second.staged(timeout=0) is True and second.bytes_staged > 0
        assert first.committed(timeout=0) is False and second.committed(timeout=0) is False
        faulty_fs.release()
        assert [first.result(timeout=120).step, second.result(timeout=120).step] == [1, 2]
        assert committed_steps(mgr) == [1, 2]


def test_with_max_pending_saves_in_flight_the_next_save_waits_for_one_to_finish(tmp_path, faulty_fs):
    """max_pending=1: with save 1 held inside its write, save 2 blocks in save() (training is
    held: memory for a second copy is not taken), and goes on once save 1 committed."""
    import threading

    state = TrainState(model=_net())
    with CheckpointManager(faulty_fs.url(tmp_path / "ckpt"), max_pending=1) as mgr:
        faulty_fs.pause()
        first = mgr.save(1, state)
        assert faulty_fs.paused.wait(30)                 # the writer is inside save 1's write
        with torch.no_grad():
            state.models["model"][0].weight.add_(1)
        expected = {k: v.clone() for k, v in state.models["model"].state_dict().items()}
        second: list[SaveHandle] = []
        caller = threading.Thread(target=lambda: second.append(mgr.save(2, state)))
        caller.start()
        caller.join(timeout=2.0)
        assert caller.is_alive() and not second and not first.done()   # held back
        faulty_fs.release()
        caller.join(timeout=120)
        assert not caller.is_alive() and first.done()                    # save 1 finished first
        assert [first.result(timeout=120).step, second[0].result(timeout=120).step] == [1, 2]
    fresh = _net(seed=5)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.restore(TrainState(model=fresh)) == 2
    assert_same_tensors(fresh, expected)


@pytest.mark.parametrize("options", [{"compression": None}, {"zstd_level": -5}, {"zstd_level": 19}])
def test_non_default_codec_settings_save_and_restore_exactly(tmp_path, options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    with CheckpointManager(tmp_path / "ckpt", **options) as mgr:
        mgr.save(1, TrainState(model=model, optimizer=opt), blocking=True)
        assert mgr.verify() == {1: []}
    manifest = json.loads((tmp_path / "ckpt" / "step-0000000001" / "manifest.json").read_text())
    assert manifest["codec"] == (None if options.get("compression", "zstd") is None else "zstd")
    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).to(torch.bfloat16)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    with CheckpointManager(tmp_path / "ckpt") as mgr:                 # read with the defaults
        assert mgr.restore(TrainState(model=fresh, optimizer=fresh_opt)) == 1
    assert_same_tensors(fresh, {k: v.clone() for k, v in model.state_dict().items()})
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"])


def test_handle_while_the_writer_is_held(tmp_path, faulty_fs):
    state = TrainState(model=_net())
    with CheckpointManager(faulty_fs.url(tmp_path / "ckpt")) as mgr:
        faulty_fs.pause()
        handle = mgr.save(4, state)
        assert isinstance(handle, SaveHandle) and handle.step == 4
        assert faulty_fs.paused.wait(30)
        assert handle.done() is False
        assert handle.staged(timeout=0) is True
        assert handle.bytes_staged > 0
        assert handle.committed(timeout=0) is False
        with pytest.raises(TimeoutError):
            handle.result(timeout=0)
        with pytest.raises(CheckpointExistsError, match="in flight"):
            mgr.save(4, state)
        assert committed_steps(mgr) == []          # nothing exists before its manifest does
        faulty_fs.release()
        info = handle.result(timeout=120)
        assert handle.done() is True
        assert handle.committed(timeout=120) is True
        assert info.step == 4 and info.committed
        assert handle.bytes_written == info.bytes > 0
        assert committed_steps(mgr) == [4]


@pytest.mark.parametrize("max_pending", [1, 2])
def test_many_saves_in_a_row_all_commit(tmp_path, max_pending):
    model = _net(0)
    state = TrainState(model=model)
    expected = {}
    with CheckpointManager(tmp_path / "ckpt", max_pending=max_pending) as mgr:
        handles = []
        for step in range(1, 7):
            with torch.no_grad():
                model[0].bias.fill_(float(step))
            expected[step] = _snapshot(model)
            handles.append(mgr.save(step, state))
        infos = [h.result(timeout=120) for h in handles]
        assert all(h.done() and h.committed(timeout=0) for h in handles)
        assert [i.step for i in infos] == list(range(1, 7))
        assert committed_steps(mgr) == list(range(1, 7))
        for step in range(1, 7):          # each its own values, though staging reuses buffers
            fresh = _net(1)
            assert mgr.restore(TrainState(model=fresh), step) == step
            assert_same_tensors(fresh, expected[step])


def test_blocking_save_has_committed_on_return(mgr):
    handle = mgr.save(3, TrainState(model=_net()), blocking=True)
    assert handle.done() and handle.committed(timeout=0)
    assert committed_steps(mgr) == [3]


def test_closed_manager_refuses_work(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        handle = mgr.save(1, TrainState(model=_net()))
    assert handle.done()                  # leaving the block waited for the write
    mgr.close()                           # closing twice is harmless
    with pytest.raises(AsyncCkptError, match="closed"):
        mgr.save(2, TrainState(model=_net()))
    with pytest.raises(AsyncCkptError, match="closed"):
        mgr.restore(TrainState(model=_net()))


# -- background failures ---------------------------------------------------------------------

def _fail_second_save(faulty_fs, tmp_path, on_error="raise", fail_at=1):
    """Commit step 1, then make write ``fail_at`` of step 2 fail; returns (mgr, handle, model, snapshot)."""
    model = _net(0)
    state = TrainState(model=model)
    mgr = CheckpointManager(faulty_fs.url(tmp_path / "ckpt"), on_error=on_error)
    mgr.save(1, state).result(timeout=120)
    snapshot = _snapshot(model)
    with torch.no_grad():
        model[0].weight.mul_(2)
    faulty_fs.fail_on_write(fail_at)
    handle = mgr.save(2, state)           # returns: the failure happens in the background
    assert handle.committed(timeout=120), "the failing save never finished"
    faulty_fs.disarm()
    assert faulty_fs.failures == 1
    return mgr, handle, state, snapshot


def _assert_step1_restorable(tmp_path, snapshot):
    fresh = _net(1)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        assert committed_steps(mgr) == [1]
        assert mgr.restore(TrainState(model=fresh)) == 1
    assert_same_tensors(fresh, snapshot)
    assert not (tmp_path / "ckpt" / "step-0000000002").exists()


@pytest.mark.parametrize("surface", ["save", "wait", "close"])
def test_failed_save_is_raised_by_the_next_call(tmp_path, faulty_fs, surface):
    mgr, handle, state, snapshot = _fail_second_save(faulty_fs, tmp_path)
    with pytest.raises(SaveError) as ei:
        handle.result(timeout=120)
    assert ei.value.step == 2 and "injected write failure" in str(ei.value)
    cause = ei.value.failures[0]          # DCP's wrapper is unwrapped to the real error
    assert isinstance(cause, StorageError) and "step-0000000002" in str(cause)
    assert "Traceback" not in str(ei.value)
    assert isinstance(handle.exception(), SaveError)
    assert committed_steps(mgr) == [1]

    with pytest.raises(SaveError, match="step 2"):
        if surface == "save":
            mgr.save(3, state)
        elif surface == "wait":
            mgr.wait()
        else:
            mgr.close()
    if surface != "close":                # raised once; the manager goes on working
        mgr.save(3, state).result(timeout=120)
        assert committed_steps(mgr) == [1, 3]
        mgr.close()
    else:
        _assert_step1_restorable(tmp_path, snapshot)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_failure_at_any_write_leaves_only_committed_checkpoints(tmp_path, faulty_fs, where):
    probe = CheckpointManager(faulty_fs.url(tmp_path / "probe"))
    faulty_fs.reset_count()
    probe.save(1, TrainState(model=_net(0))).result(timeout=120)
    writes_per_save = faulty_fs.writes
    probe.close()
    assert writes_per_save >= 3
    fail_at = {"first": 1, "middle": writes_per_save // 2, "last": writes_per_save}[where]

    mgr, handle, _, snapshot = _fail_second_save(faulty_fs, tmp_path, fail_at=fail_at)
    with pytest.raises(SaveError):
        handle.result(timeout=120)
    assert committed_steps(mgr) == [1]
    with pytest.raises(SaveError):
        mgr.close()
    _assert_step1_restorable(tmp_path, snapshot)


def test_on_error_warn_logs_and_training_goes_on(tmp_path, faulty_fs, caplog):
    caplog.set_level(logging.ERROR, logger="asyncckpt")
    mgr, handle, state, snapshot = _fail_second_save(faulty_fs, tmp_path, on_error="warn")
    with pytest.raises(SaveError):
        handle.result(timeout=120)                   # the handle still tells the truth
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and "step=2" in r.getMessage()]
    assert failures and "injected write failure" in failures[0].getMessage()

    mgr.wait()
    info = mgr.save(3, state).result(timeout=120)
    assert info.step == 3
    mgr.close()
    with CheckpointManager(tmp_path / "ckpt") as again:
        assert committed_steps(again) == [1, 3]


# -- what counts as a checkpoint ------------------------------------------------------------------

def _write_two(tmp_path) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path / "ckpt")
    state = TrainState(model=_net())
    mgr.save(1, state)
    mgr.save(2, state)
    mgr.wait()
    return mgr


def test_folder_without_manifest_is_ignored(tmp_path):
    mgr = _write_two(tmp_path)
    (tmp_path / "ckpt" / "step-0000000002" / "manifest.json").unlink()
    (tmp_path / "ckpt" / "step-0000000009").mkdir()
    (tmp_path / "ckpt" / "notes").mkdir()
    assert committed_steps(mgr) == [1]
    assert mgr.restore(TrainState(model=_net())) == 1
    with pytest.raises(CheckpointNotFoundError):
        mgr.restore(TrainState(model=_net()), 2)
    mgr.close()


def test_new_manager_removes_uncommitted_folders(tmp_path, caplog):
    _write_two(tmp_path).close()
    (tmp_path / "ckpt" / "step-0000000002" / "manifest.json").unlink()
    (tmp_path / "ckpt" / "notes").mkdir()
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        mgr = CheckpointManager(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "step-0000000002").exists()
    assert (tmp_path / "ckpt" / "notes").exists()
    assert "never committed" in caplog.text
    assert committed_steps(mgr) == [1]
    mgr.close()


def test_files_asyncckpt_did_not_write_are_never_deleted(tmp_path, caplog):
    """Cleanup and failed saves touch only folders proven asyncckpt's by their marker."""
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "step-0000000005").mkdir()
    (root / "step-0000000005" / "notes.txt").write_text("mine")   # a user's folder
    (root / "step-0000000006").write_text("my file")              # a user's file
    (root / "data.tmp-202401011230").write_text("my data")
    (root / "releases" / "v3.0.0").mkdir(parents=True)
    (root / "releases" / "v3.0.0" / "weights.bin").write_text("my weights")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        mgr = CheckpointManager(root)
    assert f"leaving {root / 'step-0000000005'} alone" in caplog.text
    assert "never committed" not in caplog.text
    mgr.save(4, TrainState(model=_net()), blocking=True)
    for step, why in ((5, "holds files asyncckpt did not write"), (6, "is a file, not a folder")):
        with pytest.raises(SaveError, match=why) as ei:
            mgr.save(step, TrainState(model=_net()), blocking=True)
        assert str(root / f"step-{step:010d}") in str(ei.value)
    with pytest.raises(ForeignFolderError, match="weights.bin"):
        mgr.release(4, version="3.0.0")
    mgr.close()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p in before} == before
    assert all(p.exists() for p in before)
    assert committed_steps(CheckpointManager(root, lease=False)) == [4]


def test_an_empty_step_folder_goes_quietly(tmp_path, caplog):
    root = tmp_path / "ckpt"
    (root / "step-0000000003").mkdir(parents=True)  # a save killed between mkdir and its marker
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        CheckpointManager(root).close()
    assert not (root / "step-0000000003").exists() and caplog.records == []


@pytest.mark.parametrize("corrupt", ["bad-json", "bad-field"])
def test_corrupt_manifest_is_skipped_with_a_warning(tmp_path, caplog, corrupt):
    mgr = _write_two(tmp_path)
    path = tmp_path / "ckpt" / "step-0000000002" / "manifest.json"
    if corrupt == "bad-json":
        path.write_text("{not json")
    else:
        path.write_text(path.read_text().replace('"metrics": {}', '"metrics": [1.0]'))
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert committed_steps(mgr) == [1]
        assert mgr.restore(TrainState(model=_net())) == 1
    assert "step-0000000002" in caplog.text
    mgr.close()


def _set_format_version(tmp_path, step: int, version: int) -> None:
    path = tmp_path / "ckpt" / f"step-{step:010d}" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["format_version"] = version
    path.write_text(json.dumps(seal(raw)))


def test_newer_format_version_is_skipped_for_latest(tmp_path, caplog):
    mgr = _write_two(tmp_path)
    _set_format_version(tmp_path, 2, 99)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert mgr.restore(TrainState(model=_net())) == 1
    assert "format_version" in caplog.text
    mgr.close()


def test_newer_format_version_is_an_error_when_asked_for(tmp_path):
    mgr = _write_two(tmp_path)
    _set_format_version(tmp_path, 2, 99)
    with pytest.raises(CorruptCheckpointError, match="format_version"):
        mgr.restore(TrainState(model=_net()), 2)
    with pytest.raises(CorruptCheckpointError, match="format_version"):
        mgr.restore(TrainState(model=_net()), tmp_path / "ckpt" / "step-0000000002")
    mgr.close()


def test_damaged_shard_falls_back_for_latest_and_raises_when_asked_for(tmp_path):
    model = _net(0)
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, TrainState(model=model)).result(timeout=120)
    expected = _snapshot(model)
    with torch.no_grad():
        model[0].weight.add_(1)
    mgr.save(2, TrainState(model=model)).result(timeout=120)
    shard = next(p for p in (tmp_path / "ckpt" / "step-0000000002").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    with pytest.raises(CorruptCheckpointError):
        mgr.restore(TrainState(model=_net(1)), 2)
    fresh = _net(1)
    assert mgr.restore(TrainState(model=fresh)) == 1
    assert_same_tensors(fresh, expected)
    mgr.close()


# -- listing and choosing ---------------------------------------------------------------------

def test_list_reports_what_was_saved(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        state = TrainState(model=_net())
        mgr.save(20, state, metrics={"loss": torch.tensor(0.5)}, epoch=2, tags=["a", "b", "a"])
        mgr.save(10, state, metrics={"loss": 0.25}, epoch=1)
        mgr.wait()
        infos = mgr.list()
    assert [i.step for i in infos] == [10, 20]
    last = infos[1]
    assert last.epoch == 2 and last.metrics == {"loss": 0.5} and last.tags == ("a", "b")
    assert last.committed and last.bytes > 0
    assert last.path.endswith("step-0000000020")
    assert os.path.isdir(last.path)
    assert last.time.endswith("Z")


@pytest.mark.parametrize("in_git", [True, False])
def test_manifest_records_provenance_and_every_file(tmp_path, monkeypatch, in_git):
    work = tmp_path / "work"
    work.mkdir()
    commit = None
    if in_git:
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run([*git, "init", "-q"], cwd=work, check=True)
        (work / "f").write_text("x")
        subprocess.run([*git, "add", "f"], cwd=work, check=True)
        subprocess.run([*git, "commit", "-qm", "c"], cwd=work, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, check=True,
                                capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(work)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path
    model = _net()
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(3, TrainState(model=model), epoch=1).result(timeout=120)
    folder = tmp_path / "ckpt" / "step-0000000003"
    raw = json.loads((folder / "manifest.json").read_text())
    assert next(iter(raw)) == "format_version"
    assert raw["step"] == 3 and raw["epoch"] == 1 and raw["world_size"] == 1
    assert raw["param_count"] == sum(p.numel() for p in model.parameters())
    assert raw["torch_version"] == torch.__version__ and raw["git_commit"] == commit
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    assert raw["host"] == socket.gethostname() and raw["device"] == device
    on_disk = {p.name: p.stat().st_size for p in folder.iterdir()
               if p.name not in ("manifest.json", MARKER_NAME)}
    assert {f["path"]: f["size"] for f in raw["files"]} == on_disk
    assert (folder / MARKER_NAME).is_file()  # proof for a cleanup that the folder is asyncckpt's
    assert all(f["checksum"] for f in raw["files"])


def test_restore_best_by_metric_and_by_path(tmp_path):
    model = _net(0)
    state = TrainState(model=model)
    snapshots = {}
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        for step, loss in ((1, 0.9), (2, 0.1), (3, 0.5)):
            with torch.no_grad():
                model[0].bias.fill_(float(step))
            snapshots[step] = _snapshot(model)
            mgr.save(step, state, metrics={"loss": loss})
        mgr.wait()
        fresh = _net(1)
        assert mgr.restore(TrainState(model=fresh), "best:loss") == 2   # min is the default mode
        assert_same_tensors(fresh, snapshots[2])
        path = mgr.list()[0].path
        assert mgr.restore(TrainState(model=fresh), path) == 1
        assert_same_tensors(fresh, snapshots[1])
        with pytest.raises(ConfigError, match="best"):
            mgr.restore(TrainState(model=fresh), "best")


def test_maybe_save_does_nothing_unless_forced(mgr):
    state = TrainState(model=_net())
    assert mgr.maybe_save(1, state) is None
    handle = mgr.maybe_save(2, state, force=True, epoch_end=True)
    assert handle is not None and handle.result(timeout=120).step == 2
    assert "epoch_end" in mgr.list()[0].tags


@pytest.mark.parametrize("blocking", [True, False])  # committed, or still in flight
def test_forced_maybe_save_of_a_step_save_took_does_not_save_it_again(mgr, caplog, blocking):
    state = TrainState(model=_net())
    first = mgr.save(5, state, metrics={"loss": 1.0}, blocking=blocking)
    caplog.set_level(logging.DEBUG, logger="asyncckpt")
    assert mgr.maybe_save(5, state, force=True, metrics={"loss": 9.0}) is None   # used to raise
    assert first.result(timeout=120).step == 5
    assert [(i.step, i.metrics) for i in mgr.list()] == [(5, {"loss": 1.0})]   # the first save's
    said = [r for r in caplog.records if "already saved in this run" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG] and said[0].getMessage().startswith("step=5 ")
    assert mgr.maybe_save(6, state, force=True).result(timeout=120).step == 6             # other steps still save
    with pytest.raises(CheckpointExistsError):
        mgr.save(5, state)                                                     # save() itself refuses


def test_a_step_whose_blocking_save_failed_can_be_forced_again(tmp_path, faulty_fs):
    with CheckpointManager(faulty_fs.url(tmp_path / "ckpt")) as mgr:
        state = TrainState(model=_net())
        faulty_fs.fail_on_write(1)
        with pytest.raises(SaveError):
            mgr.save(3, state, blocking=True)
        faulty_fs.disarm()
        assert mgr.maybe_save(3, state, force=True).result(timeout=120).step == 3   # not committed: saved now
        assert committed_steps(mgr) == [3]


# -- plain DCP can read an uncompressed checkpoint -------------------------------------------------

def _plain_checkpoint(tmp_path):
    model = _net(0, layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    with CheckpointManager(tmp_path / "ckpt", compression=None) as mgr:
        info = mgr.save(3, TrainState(model=model, optimizer=opt)).result(timeout=120)
    return model, info.path


def test_dcp_to_torch_save_reads_an_uncompressed_checkpoint(tmp_path):
    model, folder = _plain_checkpoint(tmp_path)
    out = tmp_path / "out.pt"
    dcp_to_torch_save(folder, out)
    loaded = torch.load(out, weights_only=False)
    saved_model = loaded["model/model"]
    assert_same_tensors(model, {k: saved_model[k] for k in model.state_dict()})
    assert loaded["optim/optimizer"]["state"]["0.weight"]["momentum_buffer"].shape == (8, 4)


def test_plain_dcp_load_reads_an_uncompressed_checkpoint(tmp_path):
    model, folder = _plain_checkpoint(tmp_path)
    target = {"model/model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(target, checkpoint_id=folder)
    assert_same_tensors(model, target["model/model"])
