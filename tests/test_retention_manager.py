"""Retention through the CheckpointManager: each rule end to end, tags, "best" restores,
warnings, crash-safe pruning (a real child process killed in the middle), garbage collection."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, Retention, Schedule, TrainState
from asyncckpt.errors import CheckpointNotFoundError, ConfigError
from asyncckpt.manifest import MANIFEST_NAME
from asyncckpt.retention import EPOCH_END_TAG
from asyncckpt.schedule import format_params
from asyncckpt.quarantine import list_quarantined
from asyncckpt.storage import MARKER_NAME, Storage, delete_checkpoint, list_committed, verify_files
from helpers_prune_child import weights_at
from helpers.checkpoints import assert_same_tensors, committed_steps, step_folders
from helpers.procs import asyncckpt, spawn

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TESTS = Path(__file__).resolve().parent
CHILD = TESTS / "helpers_prune_child.py"


def _state(step: int = 0) -> TrainState:
    return TrainState(model=weights_at(step), rng=False)


def _save(mgr: CheckpointManager, step: int, **kw) -> None:
    mgr.save(step, _state(step), **kw)


def _tags(mgr: CheckpointManager) -> dict[int, tuple[str, ...]]:
    return {i.step: i.tags for i in mgr.list()}


# -- each rule and combinations, end to end ------------------------------------------------

LOSS = {1: 5.0, 2: 1.0, 3: 4.0, 4: 0.5, 5: 3.0, 6: 2.0, 7: 6.0, 8: 7.0, 9: 8.0, 10: 9.0}
ACC = {1: 0.9, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.95, 6: 0.4, 7: 0.5, 8: 0.6, 9: 0.7, 10: 0.8}
RULES = [
    # (retention, tags per step, expected kept steps)
    (Retention(keep_last=3), {}, [8, 9, 10]),
    (Retention(keep_last=1), {}, [9, 10]),  # the newest two, whatever keep_last says
    (Retention(keep_last=1, keep_best=2, best_metric="loss"), {}, [2, 4, 9, 10]),
    (Retention(keep_last=1, keep_best=1, best_metric="acc", best_mode="max"), {}, [5, 9, 10]),
    (Retention(keep_last=1, keep_best=1, best_metric=["loss", "acc"], best_mode={"acc": "max"}),
     {}, [4, 5, 9, 10]),
    (Retention(keep_last=2, keep_every_n_steps=4), {}, [4, 8, 9, 10]),
    (Retention(keep_last=1, keep_epoch_ends=True), {3: [EPOCH_END_TAG], 6: [EPOCH_END_TAG]},
     [3, 6, 9, 10]),
    (Retention(keep_last=1), {3: [EPOCH_END_TAG]}, [9, 10]),  # epoch ends kept only when asked
    (Retention(keep_last=1), {2: ["milestone:1.0B"], 7: ["release:x"]}, [2, 7, 9, 10]),
    (Retention(keep_last=1, keep_tags=("keep-*",)), {2: ["milestone:1.0B"], 5: ["keep-me"]},
     [5, 9, 10]),
    (Retention(keep_last=3, keep_best=1, best_metric="loss", keep_every_n_steps=5,
               keep_epoch_ends=True), {1: [EPOCH_END_TAG], 6: ["milestone:10M"]},
     [1, 4, 5, 6, 8, 9, 10]),
]


@pytest.mark.parametrize("policy, tags, kept", RULES, ids=range(len(RULES)))
def test_each_rule_end_to_end(tmp_path, policy, tags, kept):
    root = tmp_path / "ckpt"
    with CheckpointManager(root, retention=policy) as mgr:
        for step in range(1, 11):
            _save(mgr, step, metrics={"loss": LOSS[step], "acc": ACC[step]}, tags=tags.get(step, ()))
        mgr.wait()
        assert committed_steps(mgr) == kept
        assert step_folders(root) == kept
        info = {i.step: i for i in mgr.list()}
        for step, extra in tags.items():
            if step in info:
                assert set(extra) <= set(info[step].tags)
        for metric in policy.metrics:  # list() marks the best by each metric of the policy
            best = policy.best_step(list_committed(Storage(root)), metric)
            assert f"best:{metric}" in info[best].tags


def test_100_saves_keep_last_3_leave_exactly_three_and_no_stray_files(tmp_path):
    root = tmp_path / "ckpt"
    with CheckpointManager(root, retention=Retention(keep_last=3), compression=None) as mgr:
        state = _state(1)
        for step in range(1, 101):
            mgr.save(step, state)
    assert step_folders(root) == [98, 99, 100]
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    expected = []
    for m in list_committed(Storage(root)):
        folder = f"step-{m.step:010d}"
        expected += [folder, f"{folder}/{MANIFEST_NAME}", f"{folder}/{MARKER_NAME}",
                     *(f"{folder}/{f.path}" for f in m.files)]
    assert found == sorted(expected)


def test_epoch_end_and_milestone_tags_come_from_maybe_save(tmp_path):
    policy = Retention(keep_last=1, keep_epoch_ends=True)
    model = weights_at(1)
    trainable = sum(p.numel() for p in model.parameters())
    schedule = Schedule(every_n_steps=3, on_epoch_end=True, param_milestones=[trainable])
    with CheckpointManager(tmp_path / "ckpt", retention=policy, schedule=schedule) as mgr:
        state = TrainState(model=model, rng=False)
        for step in range(1, 11):
            mgr.maybe_save(step, state, epoch_end=step in (4, 8), tags=["user"])
        mgr.wait()
        tags = _tags(mgr)
    assert set(tags[1]) == {f"milestone:{format_params(trainable)}", "user"}
    assert EPOCH_END_TAG in tags[4] and EPOCH_END_TAG in tags[8] and "user" in tags[4]
    assert sorted(tags) == [1, 4, 8, 9]  # milestone and epoch ends kept; 9 newest; 6 dropped


def test_maybe_save_epoch_end_without_schedule_tags_forced_saves(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.maybe_save(1, _state(1), epoch_end=True) is None  # no schedule: not saved
        mgr.maybe_save(2, _state(2), epoch_end=True, force=True).result(timeout=120)
        assert _tags(mgr) == {2: (EPOCH_END_TAG,)}


def test_nothing_is_deleted_before_the_save_that_makes_it_surplus_commits(tmp_path, faulty_fs):
    root = tmp_path / "ckpt"
    with CheckpointManager(faulty_fs.url(root), retention=Retention(keep_last=1)) as mgr:
        for step in (1, 2, 3):
            _save(mgr, step, blocking=True)
        mgr.wait()  # retention runs after the commit that result() waits for
        assert committed_steps(mgr) == [2, 3]
        faulty_fs.pause()
        handle = mgr.save(4, _state(4))
        assert faulty_fs.paused.wait(30)
        assert committed_steps(mgr) == [2, 3]
        assert step_folders(root) == [2, 3, 4]  # 4 is written, not committed
        faulty_fs.release()
        handle.result(timeout=30)
        mgr.wait()
        assert committed_steps(mgr) == [3, 4] and step_folders(root) == [3, 4]


# -- readers never trip over retention's deletions --------------------------------------------

@pytest.mark.parametrize("at", [MANIFEST_NAME, "__0_0.distcp"])
def test_verify_and_list_skip_a_checkpoint_deleted_while_they_read_it(tmp_path, faulty_fs, asyncckpt_log, at):
    """Retention's own delete runs exactly between a reader's listing and its read."""
    root = tmp_path / "ckpt"
    with CheckpointManager(faulty_fs.url(root), compression=None) as mgr:
        for step in (1, 2, 3):
            _save(mgr, step, blocking=True)
        assert asyncckpt_log() == []
        faulty_fs.on_read = (f"step-0000000002/{at}", lambda: delete_checkpoint(Storage(root), 2))
        assert mgr.verify() == {1: [], 3: []} and faulty_fs.on_read is None
        faulty_fs.on_read = (f"step-0000000001/{MANIFEST_NAME}", lambda: delete_checkpoint(Storage(root), 1))
        assert committed_steps(mgr) == [3] and faulty_fs.on_read is None
        faulty_fs.on_read = (f"step-0000000003/{at}", lambda: delete_checkpoint(Storage(root), 3))
        with pytest.raises(CheckpointNotFoundError, match="at step 3"):
            mgr.verify(3)
    assert asyncckpt_log() == []


def test_restore_latest_moves_on_when_the_newest_is_deleted_while_it_reads(tmp_path, faulty_fs, asyncckpt_log):
    root = tmp_path / "ckpt"
    with CheckpointManager(faulty_fs.url(root)) as mgr:
        for step in (1, 2):
            _save(mgr, step, blocking=True)
        assert asyncckpt_log() == []
        faulty_fs.on_read = ("step-0000000002/__0_0", lambda: delete_checkpoint(Storage(root), 2))
        state = _state(0)
        assert mgr.restore(state) == 1 and faulty_fs.on_read is None
        assert_same_tensors(state.models["model"], weights_at(1))
        faulty_fs.on_read = ("step-0000000001/__0_0", lambda: delete_checkpoint(Storage(root), 1))
        with pytest.raises(CheckpointNotFoundError, match="at step 1"):
            mgr.restore(_state(0), 1)
    assert list_quarantined(Storage(root)) == []          # a deletion is not damage
    assert asyncckpt_log() == []


def test_readers_right_after_save_never_fail_on_the_retention_in_flight(tmp_path):
    """200 saves with keep_last=1; after each save() returns, verify() and list() run while
    the previous save's retention (on the writer thread) may be deleting."""
    root = tmp_path / "ckpt"
    failures = []
    with CheckpointManager(root, retention=Retention(keep_last=1), compression=None) as mgr:
        for step in range(1, 201):
            mgr.save(step, _state(step % 3))
            try:
                report, listed = mgr.verify(), committed_steps(mgr)
                assert all(p == [] for p in report.values()), report
                assert listed == sorted(listed) and set(listed) <= set(range(1, step + 1))
            except Exception as e:  # noqa: BLE001 - counted: the test asserts there is none
                failures.append(f"after save {step}: {type(e).__name__}: {e}")
        mgr.wait()
    assert failures == [], f"{len(failures)} of 200: {failures[:3]}"


def test_missing_metric_warns_once_per_manager_and_metric_and_never_crashes(tmp_path, caplog):
    policy = Retention(keep_last=1, keep_best=1, best_metric=["val_loss", "acc"], best_mode={"acc": "max"})
    saves = {1: {"val_loss": 1.0, "acc": 0.1}, 2: {"loss": 1.0, "acc": 0.2}, 3: {"val_loss": 3.0},
             4: {"loss": 1.0}, 5: {"val_loss": 5.0, "acc": 0.3}, 6: {"loss": 1.0}}
    with CheckpointManager(tmp_path / "ckpt", retention=policy) as mgr:
        caplog.set_level(logging.DEBUG, logger="asyncckpt")
        for step, metrics in saves.items():
            _save(mgr, step, metrics=metrics, blocking=True)
        mgr.wait()
        assert committed_steps(mgr) == [1, 5, 6]
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "no finite value of metric" in r.getMessage()]
    warned = [m for level, m in said if level == logging.WARNING]
    assert [m.split(" ")[0] for m in warned] == ["step=2", "step=3"]   # val_loss first missed, then acc
    assert "metric 'val_loss'," in warned[0] and "metric 'acc'," in warned[1]
    assert all("said once per metric" in m for m in warned)
    assert [m.split(" ")[0] for level, m in said if level == logging.DEBUG] == ["step=4", "step=6"]
    with CheckpointManager(tmp_path / "ckpt", retention=policy) as mgr:  # a new manager warns anew
        caplog.clear()
        _save(mgr, 7, metrics={"acc": 0.5}, blocking=True)
        mgr.wait()
    assert [r.getMessage().split(" ")[0] for r in caplog.records
            if r.levelno == logging.WARNING and "'val_loss'" in r.getMessage()] == ["step=7"]


def test_explicit_prune_dry_run_and_other_policy(tmp_path, caplog):
    with CheckpointManager(tmp_path / "ckpt") as mgr:  # no retention: keeps everything
        for step in range(1, 6):
            _save(mgr, step, metrics={"loss": float(step)} if step > 1 else {}, blocking=True)
        assert committed_steps(mgr) == [1, 2, 3, 4, 5]
        with pytest.raises(ConfigError, match="needs a Retention"):
            mgr.prune()
        policy = Retention(keep_last=1, keep_best=1, best_metric="loss")
        caplog.set_level(logging.WARNING, logger="asyncckpt")
        assert mgr.prune(policy, dry_run=True) == [1, 3]
        assert committed_steps(mgr) == [1, 2, 3, 4, 5]
        assert mgr.prune(policy) == [1, 3]
        assert committed_steps(mgr) == [2, 4, 5] and step_folders(tmp_path / "ckpt") == [2, 4, 5]
    assert sum("lack a finite value" in r.getMessage() for r in caplog.records) == 2  # one a call


@pytest.mark.parametrize("field, value", [("keep_last", -1), ("keep_last", 0), ("keep_best", -2),
                                          ("best_mode", "median"), ("keep_every_n_steps", -5)])
def test_bad_retention_values_name_field_and_value(tmp_path, field, value):
    kwargs = {"keep_last": 2, "best_metric": "loss", field: value}
    with pytest.raises(ConfigError, match=rf"{field}={value!r} is not valid"):
        CheckpointManager(tmp_path / "ckpt", retention=Retention(**kwargs))


# -- restoring the best ---------------------------------------------------------------------

def _params(model: nn.Module) -> float:
    return float(next(model.parameters()).detach().flatten()[0])


def test_restore_best_by_primary_metric_and_by_another(tmp_path):
    policy = Retention(keep_last=2, keep_best=1, best_metric=["loss", "acc"], best_mode={"acc": "max"})
    with CheckpointManager(tmp_path / "ckpt", retention=policy) as mgr:
        for step in range(1, 11):
            _save(mgr, step, metrics={"loss": LOSS[step], "acc": ACC[step]})
        mgr.wait()
        state = _state(0)
        assert mgr.restore(state, "best") == 4 and _params(state.models["model"]) == 4.0
        assert mgr.restore(state, "best:acc") == 5 and _params(state.models["model"]) == 5.0
        assert mgr.restore(state, "best:loss") == 4
        with pytest.raises(CheckpointNotFoundError, match="'f1'"):
            mgr.restore(state, "best:f1")


def test_restore_best_needs_a_metric(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        _save(mgr, 1, metrics={"loss": 1.0}, blocking=True)
        with pytest.raises(ConfigError, match="best_metric"):
            mgr.restore(_state(), "best")
        assert mgr.restore(_state(), "best:loss") == 1  # by name, without a retention


def _ranked_root(tmp_path, policy):
    """Steps 1..10 with LOSS and ACC, saved by a manager with ``policy``; the root."""
    with CheckpointManager(tmp_path / "ckpt", retention=policy) as mgr:
        for step in range(1, 11):
            _save(mgr, step, metrics={"loss": LOSS[step], "acc": ACC[step]})
    return tmp_path / "ckpt"


def test_manifests_record_what_retention_ranks_by(tmp_path):
    root = _ranked_root(tmp_path, Retention(keep_best=1, best_metric=["acc", "loss"], best_mode={"acc": "max"}))
    assert {(m.rank_metric, m.rank_mode) for m in list_committed(Storage(root))} == {("acc", "max")}
    with CheckpointManager(tmp_path / "plain") as mgr:
        _save(mgr, 1, metrics={"loss": 1.0}, blocking=True)
    assert [(m.rank_metric, m.rank_mode) for m in list_committed(Storage(tmp_path / "plain"))] == [(None, None)]


@pytest.mark.parametrize(
    ("policy", "which", "step"),
    [
        (Retention(keep_best=1, best_metric="acc", best_mode="max"), "best", 5),     # recorded max
        (Retention(keep_best=1, best_metric="acc", best_mode="max"), "best:acc", 5),
        (Retention(keep_best=1, best_metric="acc", best_mode="max"), "best:loss", 4),  # not recorded: min
        (Retention(keep_best=1, best_metric="acc", best_mode="min"), "best", 2),
        (Retention(keep_best=1, best_metric="loss", best_mode="max"), "best", 10),
        (Retention(keep_best=1, best_metric="loss", best_mode="max"), "best:loss", 10),
        (Retention(best_metric="loss"), "best", 4),                                  # keep_best=0 too
    ],
)
def test_a_manager_without_a_policy_restores_the_best_the_checkpoints_recorded(tmp_path, policy, which, step):
    root = _ranked_root(tmp_path, policy)
    with CheckpointManager(root, lease=False) as reader:                 # an evaluation script's
        state = _state(0)
        assert reader.restore(state, which) == step and _params(state.models["model"]) == float(step)
        if which == "best":  # list() marks the same one
            assert [i.step for i in reader.list() if f"best:{policy.primary_metric}" in i.tags] == [step]


def test_list_marks_the_recorded_best_and_a_policy_still_wins(tmp_path):
    root = _ranked_root(tmp_path, Retention(keep_best=1, best_metric="acc", best_mode="max"))
    with CheckpointManager(root, lease=False) as reader:
        assert [i.step for i in reader.list() if "best:acc" in i.tags] == [5]
        assert not any("best:loss" in i.tags for i in reader.list())
    with CheckpointManager(root, lease=False, retention=Retention(best_metric="loss")) as other:
        assert other.restore(_state(0), "best") == 4
        assert [i.step for i in other.list() if i.tags and i.tags[-1].startswith("best:")] == [4]


@pytest.mark.parametrize(
    ("args", "tagged"),
    [
        ([], {5: "best:acc"}),                                   # as the checkpoints recorded
        (["--metric", "acc"], {5: "best:acc"}),                  # the recorded mode: max
        (["--metric", "acc", "--mode", "min"], {2: "best:acc"}),
        (["--metric", "loss"], {4: "best:loss"}),                # never recorded: min
        (["--metric", "loss", "--mode", "max"], {10: "best:loss"}),
    ],
)
def test_cli_list_marks_the_best_as_recorded(tmp_path, args, tagged):
    import json

    root = _ranked_root(tmp_path, Retention(keep_best=1, best_metric="acc", best_mode="max"))
    out = asyncckpt("list", root, "--json", *args)
    assert out.returncode == 0, out.stderr
    marked = {row["step"]: t for row in json.loads(out.stdout) for t in row["tags"] if t.startswith("best:")}
    assert marked == tagged


def test_restore_best_of_old_checkpoints_without_a_policy_still_needs_a_metric(tmp_path):
    with CheckpointManager(tmp_path / "ckpt", retention=Retention(keep_last=3)) as mgr:  # no best_metric
        _save(mgr, 1, metrics={"loss": 1.0}, blocking=True)
    with CheckpointManager(tmp_path / "ckpt", lease=False) as reader:
        with pytest.raises(ConfigError, match="recorded the metric their retention ranked by"):
            reader.restore(_state(), "best")
        assert reader.restore(_state(), "best:loss") == 1


# -- garbage collection and crash safety ---------------------------------------------------------

def test_next_start_removes_half_deleted_folders_and_unfinished_releases(tmp_path, caplog):
    root = tmp_path / "ckpt"
    with CheckpointManager(root) as mgr:
        for step in (1, 2, 3):
            _save(mgr, step, blocking=True)
    (root / "step-0000000001" / MANIFEST_NAME).unlink()  # a prune cut short after the manifest
    (root / "releases" / "v2.0.0").mkdir(parents=True)  # a release cut short: marker, weights
    (root / "releases" / "v2.0.0" / MARKER_NAME).write_text("{}")
    (root / "releases" / "v2.0.0" / "model.safetensors").write_bytes(b"partial")
    assert [m.step for m in list_committed(Storage(root))] == [2, 3]  # never listed half-deleted
    caplog.set_level(logging.WARNING, logger="asyncckpt")
    with CheckpointManager(root) as mgr:
        assert committed_steps(mgr) == [2, 3] and mgr.releases() == []
    assert step_folders(root) == [2, 3] and not (root / "releases" / "v2.0.0").exists()
    assert sum("never committed" in r.getMessage() for r in caplog.records) == 2


KILL_AT = [2, 4, 6, 8]
"""Kill before the n-th deletion: 2 step 1's manifest gone; 4 and two of its files too;
6 all its files and its marker too (an empty folder left); 8 step 1 gone and step 2's
manifest.  Each checkpoint takes 6 deletions (manifest, .metadata, two shards, the marker
last, the folder)."""


def _drive(proc: subprocess.Popen, root: Path, kill_at: int) -> list[str]:
    """Answer the child's deletions; SIGKILL it before the ``kill_at``-th one in a step folder."""
    seen: list[str] = []
    assert proc.stdin is not None and proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "done":
            break
        if not line.startswith("rm "):
            continue
        path = line[3:].strip()
        if "/step-" in path:
            if not seen:  # the first deletion comes only after the newest save committed
                assert (root / "step-0000000006" / MANIFEST_NAME).exists()
            seen.append(path)
            if len(seen) == kill_at:
                proc.kill()
                break
        proc.stdin.write("go\n")
        proc.stdin.flush()
    proc.wait()
    return seen


def test_kill_in_the_middle_of_pruning_leaves_only_restorable_checkpoints(tmp_path):
    base = tmp_path / "base"
    with CheckpointManager(base) as mgr:
        for step in range(1, 6):
            mgr.save(step, TrainState(model=weights_at(step)), blocking=True)
    roots, procs = [], []
    for k in KILL_AT:
        root = tmp_path / f"kill{k}"
        shutil.copytree(base, root)
        roots.append(root)
        with open(tmp_path / f"kill{k}.err", "w") as err:
            procs.append(spawn(CHILD, root, "6", stdin=subprocess.PIPE, stderr=err))
    watchdog = threading.Timer(120, lambda: [p.kill() for p in procs])  # hard deadline
    watchdog.start()
    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            results = list(pool.map(_drive, procs, roots, KILL_AT))
    finally:
        watchdog.cancel()
        for p in procs:
            p.kill()
            p.wait()
            for pipe in (p.stdin, p.stdout):
                pipe.close()
    for k, root, seen in zip(KILL_AT, roots, results):
        err = (tmp_path / f"kill{k}.err").read_text()[-2000:]
        assert len(seen) == k, f"child for kill point {k} ended early:\n{err}"
        _check_after_crash(root, k, per_checkpoint=len(list((base / "step-0000000001").iterdir())) + 1)


def _check_after_crash(root: Path, kill_at: int, *, per_checkpoint: int) -> None:
    """``per_checkpoint``: the deletions one checkpoint takes (its files, then its folder)."""
    storage = Storage(root)
    listed = [m.step for m in list_committed(storage)]
    gone = (kill_at - 1) // per_checkpoint  # checkpoints whose manifest and files are all deleted
    half = (kill_at - 1) % per_checkpoint > 0  # one more with its manifest deleted
    assert listed == list(range(1 + gone + half, 7)), kill_at
    for m in list_committed(storage):  # every listed checkpoint is whole...
        assert verify_files(storage.child(f"step-{m.step:010d}"), m) == []
    with CheckpointManager(root) as mgr:  # ...and restores; the next start removes leftovers
        assert committed_steps(mgr) == listed
        assert step_folders(root) == listed
        for step in listed:
            state = _state(0)
            assert mgr.restore(state, step) == step
            assert _params(state.models["model"]) == float(step)


@pytest.mark.parametrize(
    ("metrics", "quoted"),
    [({"loss": 10**400}, "metrics['loss']=1000"), ({"loss": torch.tensor([1.0, 2.0])}, "metrics['loss']=tensor"),
     ({"loss": "low"}, "metrics['loss']='low'"), ({"loss": None}, "metrics['loss']=None"),
     ({"loss": True}, "metrics['loss']=True"), ({5: 1.0}, "metrics[5]=1.0"), ({"loss": [1.0]}, "metrics['loss']=[1.0]")],
)
def test_a_metric_that_is_not_one_number_is_a_config_error_and_nothing_is_saved(tmp_path, metrics, quoted):
    retention = Retention(keep_last=1, keep_best=1, best_metric="loss")
    with CheckpointManager(tmp_path / "ckpt", retention=retention) as mgr:
        with pytest.raises(ConfigError) as info:
            mgr.save(1, _state(), metrics=metrics, blocking=True)
        assert str(info.value).startswith(quoted) and "is not valid: expected a str name and a number" in str(info.value)
        assert mgr.list() == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_metric_is_kept_but_never_ranks(tmp_path, value):
    retention = Retention(keep_last=1, keep_best=1, best_metric="loss")
    with CheckpointManager(tmp_path / "ckpt", retention=retention) as mgr:
        _save(mgr, 1, metrics={"loss": 0.5}, blocking=True)
        for step in (2, 3, 4):
            _save(mgr, step, metrics={"loss": value}, blocking=True)
        mgr.wait()
        assert [i.step for i in mgr.list()] == [1, 3, 4]        # the best finite one, and the newest two
