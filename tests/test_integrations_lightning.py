"""Lightning on CPU: fit a tiny LightningModule, stop, resume, and end exactly where an
uninterrupted run ends; through the ``AsyncCheckpoint`` callback and through the
``AsyncCkptIO`` plugin under Lightning's own ``ModelCheckpoint``.  The modules, the one
``fit`` harness and the stop-and-resume cases are in helpers_lightning.py; the docs' table
comparing with Lightning's own resume comes from lightning_resume_table.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


from helpers_deps import need
pl = need("lightning.pytorch")
need("torchdata.stateful_dataloader")

from helpers_lightning import (CASES, MODES, Crash, Tiny, TinyVal, fit, losses,  # noqa: E402
                               reference, same_weights, stop_and_resume)

from asyncckpt import CheckpointManager, Retention, Schedule, TrainState  # noqa: E402
from asyncckpt.errors import CheckpointNotFoundError, SaveError  # noqa: E402
from asyncckpt.integrations.lightning import (AsyncCheckpoint, AsyncCkptIO,  # noqa: E402
                                              join_checkpoint, split_checkpoint)
from asyncckpt.manifest import Manifest  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
DDP_DEADLINE_S = 150  # the two-rank script below takes 10-30 s; past this it is killed


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, torch.Tensor]:
    return fit(max_steps=12).weights


def _assert_same(model: Tiny, expected: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


# -- AsyncCheckpoint: stop after any checkpoint, resume, end as an uninterrupted run -------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_callback_resume_after_any_checkpoint_matches_an_uninterrupted_run(tmp_path, name, mode):
    """Dropout(0.1) makes the RNG states count; the history holds every logged loss, the
    epoch hooks and the epoch numbers."""
    case = CASES[name]
    ref = reference(case, mode, dropout=0.1)
    r = stop_and_resume(case, mode, str(tmp_path / "ckpt"), dropout=0.1)
    if case.crash_after is not None:
        assert isinstance(r.first.error, Crash) and r.restored_step == case.crash_after
    assert r.resumed.trainer.global_step == ref.trainer.global_step
    assert r.history == ref.history
    assert same_weights(r.resumed, ref)


@pytest.mark.parametrize("name", ["mid-epoch", "after a mid-epoch validation (val_check_interval=2)",
                                  "after validation every 3 steps, across epochs",
                                  "final step, then the same run again"])
def test_callback_resume_matches_lightnings_own_where_that_is_exact(tmp_path, name):
    """Where Lightning's ModelCheckpoint + fit(ckpt_path=...) resumes exactly (no dropout;
    docs/integrations.md has the table of every case), the two resumes are the same run."""
    case, mode = CASES[name], "max_epochs"
    ours = stop_and_resume(case, mode, str(tmp_path / "ours"))
    theirs = stop_and_resume(case, mode, str(tmp_path / "theirs"), how="lightning")
    assert ours.restored_step == theirs.restored_step
    assert ours.resumed.trainer.global_step == theirs.resumed.trainer.global_step
    assert ours.history == theirs.history == reference(case, mode).history
    assert same_weights(ours.resumed, theirs.resumed)


def test_the_checkpoint_after_a_validation_run_holds_its_metric(tmp_path):
    root = tmp_path / "ckpt"
    run = fit(max_epochs=1, module=TinyVal, val_check_interval=2,
              callbacks=[AsyncCheckpoint(root, schedule=Schedule(every_n_steps=2))])
    val = {step: loss for kind, _, step, loss in run.history if kind == "val"}
    with CheckpointManager(root) as mgr:
        infos = {i.step: i for i in mgr.list()}
    assert sorted(infos) == [2, 4, 5] and sorted(val) == [2, 4]
    for step in (2, 4):
        assert infos[step].metrics["val_loss"] == pytest.approx(val[step], rel=1e-6)
    assert "epoch_end" in infos[5].tags


def test_callback_stop_and_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    root = tmp_path / "ckpt"
    kw = dict(schedule=Schedule(every_n_steps=4), retention=Retention(keep_last=2))
    fit(max_steps=7, callbacks=[AsyncCheckpoint(root, **kw)])  # stops mid-epoch 2, saves step 7
    with CheckpointManager(root) as mgr:
        assert [i.step for i in mgr.list()] == [4, 7]
    second = AsyncCheckpoint(root, **kw)
    resumed = fit(max_steps=12, callbacks=[second])
    assert second.restored_step == 7
    _assert_same(resumed.model, uninterrupted)
    with CheckpointManager(root) as mgr:
        infos = mgr.list()
    assert [i.step for i in infos] == [8, 12] and "train_loss" in infos[-1].metrics


def test_callback_resume_false_starts_fresh(tmp_path, uninterrupted):
    root = tmp_path / "ckpt"
    fit(max_steps=7, callbacks=[AsyncCheckpoint(root, schedule=Schedule(every_n_steps=100))])
    cb = AsyncCheckpoint(root, resume=False, schedule=Schedule(every_n_steps=100))
    run = fit(max_steps=12, callbacks=[cb])
    assert cb.restored_step == 0
    _assert_same(run.model, uninterrupted)


# -- AsyncCheckpoint: a fit that raises -------------------------------------------------

def test_a_fit_that_raises_closes_the_manager_and_a_retry_in_process_resumes(tmp_path):
    """Before on_exception, the manager stayed open: its lease on the root made the retry
    fail with LeaseError.  The same callback object serves the retry."""
    root, case = tmp_path / "ckpt", CASES["mid-epoch"]
    cb = AsyncCheckpoint(root, schedule=Schedule(every_n_steps=3))
    with pytest.raises(Crash):
        fit(max_epochs=3, dropout=0.1, callbacks=[cb], crash_after=7, catch=False)
    assert cb.manager is None
    with CheckpointManager(root) as mgr:  # the lease is free; step 6 committed
        assert [i.step for i in mgr.list()][-1] == 6
    retry = fit(max_epochs=3, dropout=0.1, callbacks=[cb])
    ref = reference(case, "max_epochs", dropout=0.1)
    assert cb.restored_step == 6 and cb.manager is None
    assert losses(retry.history) == [h for h in losses(ref.history) if h[2] >= 6]
    assert same_weights(retry, ref)


def test_a_failed_save_fails_the_fit_closes_the_manager_and_a_retry_resumes(tmp_path, faulty_fs):
    """Step 3 commits, the write of step 6 fails: fit raises SaveError (from the next save
    or the end, whichever comes once the writer has failed: step 9 may commit first), the
    manager is closed all the same, and a retry resumes from the newest commit."""

    class FailFromStep4(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                cb.manager.wait()               # step 3 committed
                faulty_fs.fail_on_write(1)      # the next write (step 6's) fails

    url = faulty_fs.url(tmp_path / "ckpt")
    cb = AsyncCheckpoint(url, schedule=Schedule(every_n_steps=3))
    with pytest.raises(SaveError, match="step 6"):
        fit(max_epochs=3, callbacks=[cb, FailFromStep4()], catch=False)
    assert cb.manager is None and faulty_fs.failures == 1
    with CheckpointManager(url) as mgr:  # the lease is free
        committed = [i.step for i in mgr.list()]
    assert committed[0] == 3 and 6 not in committed
    retry_cb = AsyncCheckpoint(url, schedule=Schedule(every_n_steps=3))
    retry = fit(max_epochs=3, callbacks=[retry_cb])
    ref = reference(CASES["mid-epoch"], "max_epochs")
    assert retry_cb.restored_step == committed[-1] and retry.trainer.global_step == 15
    assert losses(retry.history) == [h for h in losses(ref.history) if h[2] >= committed[-1]]
    assert same_weights(retry, ref)


@pytest.mark.dist
def test_ddp_two_ranks_save_and_resume_as_an_uninterrupted_ddp_run(tmp_path):
    """Trainer(devices=2, strategy="ddp", accelerator="cpu"): Lightning starts rank 1 by
    running the script again, so the fits run in a script of their own (killed past its
    deadline).  In it: an uninterrupted run; a run that crashes after step 3 (an epoch's end);
    a retry in the same processes that resumes from 3 and crashes after step 4; and a third
    that resumes from 4 to the end.  Every rank's history and weights must be the
    uninterrupted run's."""
    out, root = tmp_path / "out", tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, TESTS, os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, os.path.join(TESTS, "helpers_lightning_ddp.py"),
                               str(out), str(root), "3:plain", "3:3", "3:4", "3"],
                              capture_output=True, text=True, timeout=DDP_DEADLINE_S, env=env)
    except subprocess.TimeoutExpired as e:  # run() has killed the script (rank 1 dies with it)
        pytest.fail(f"the ddp script ran past {DDP_DEADLINE_S} s: {(e.stderr or b'')[-2000:]!r}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank, (ref, crashed, retried, resumed) in enumerate(ranks):
        assert [r["restored_step"] for r in (crashed, retried, resumed)] == [0, 3, 4], rank
        assert "Crash" in crashed["error"] and "Crash" in retried["error"] and resumed["error"] is None
        assert all(r["manager_closed"] for r in (crashed, retried, resumed))
        assert ref["global_step"] == resumed["global_step"] == 9
        assert crashed["history"] + retried["history"] + resumed["history"] == ref["history"], rank
        for k, v in ref["weights"].items():
            assert torch.equal(v, resumed["weights"][k]), (rank, k)
    assert ranks[0][0]["history"] != ranks[1][0]["history"]  # each rank had its own data
    manifest = Manifest.from_json((root / "step-0000000004" / "manifest.json").read_text())
    assert {"__0_0.distcp", "__1_0.distcp"} <= {f.path for f in manifest.files}  # both ranks wrote


# -- AsyncCkptIO: Lightning's ModelCheckpoint, asyncckpt's writes ------------------------

def test_checkpoint_io_plugin_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    dirpath = tmp_path / "lightning"
    mc = pl.callbacks.ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_top_k=-1,
                                      save_last=True)
    fit(max_steps=7, callbacks=[mc], plugins=[AsyncCkptIO()])
    saved = sorted(p.name for p in dirpath.iterdir())
    assert saved == ["epoch=0-step=5.ckpt", "last.ckpt"]
    assert (dirpath / "last.ckpt" / "manifest.json").exists()       # a folder, committed
    mc2 = pl.callbacks.ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_top_k=-1)
    resumed = fit(max_steps=12, callbacks=[mc2], plugins=[AsyncCkptIO()],
                  ckpt_path=str(dirpath / "last.ckpt"))
    _assert_same(resumed.model, uninterrupted)
    assert [(p / "manifest.json").exists() for p in dirpath.glob("*step=10.ckpt")] == [True]


@pytest.mark.s3
def test_checkpoint_io_plugin_on_s3_resumes_from_an_explicit_url(s3_bucket, monkeypatch, uninterrupted):
    """ModelCheckpoint's own fsspec calls (ls, exists, rm) reach the S3 server through
    AWS_ENDPOINT_URL; the plugin writes through its storage_options."""
    need("s3fs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket["endpoint"])
    dirpath = f"s3://{s3_bucket['name']}/lightning"
    io_ = AsyncCkptIO(storage_options=s3_bucket["options"])
    mc = pl.callbacks.ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_top_k=-1,
                                      save_last=True)
    fit(max_steps=7, callbacks=[mc], plugins=[io_])
    keys = {o["Key"] for o in s3_bucket["client"].list_objects_v2(
        Bucket=s3_bucket["name"], Prefix="lightning/")["Contents"]}
    assert {"lightning/last.ckpt/manifest.json", "lightning/epoch=0-step=5.ckpt/manifest.json"} <= keys
    mc2 = pl.callbacks.ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_top_k=-1)
    resumed = fit(max_steps=12, callbacks=[mc2],
                  plugins=[AsyncCkptIO(storage_options=s3_bucket["options"])],
                  ckpt_path=f"{dirpath}/last.ckpt")
    _assert_same(resumed.model, uninterrupted)


def test_checkpoint_io_round_trip_remove_and_missing(tmp_path):
    io_ = AsyncCkptIO()
    ckpt = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 1, "global_step": 9,
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(2)}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "hyper_parameters": {"width": 16, "betas": (0.9, 0.99)}, "callbacks": {"cb/x": {"n": 1}}}
    path = tmp_path / "a.ckpt"
    io_.save_checkpoint(ckpt, path)
    back = io_.load_checkpoint(path)                       # waits for the pending write
    assert torch.equal(back["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert torch.equal(back["optimizer_states"][0]["state"][0]["momentum_buffer"], torch.ones(2))
    assert back["hyper_parameters"] == {"width": 16, "betas": (0.9, 0.99)}
    assert back["callbacks"] == {"cb/x": {"n": 1}} and back["global_step"] == 9
    io_.remove_checkpoint(path)
    assert not path.exists()
    with pytest.raises(CheckpointNotFoundError):
        io_.load_checkpoint(path)
    io_.teardown()


def test_checkpoint_io_refuses_storage_options_per_call(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AsyncCkptIO().save_checkpoint({"x": 1}, tmp_path / "a.ckpt", storage_options={"a": 1})


def test_split_keeps_plain_values_and_reprs_the_rest(caplog):
    class Odd:
        def __repr__(self) -> str:
            return "Odd()"

    tensors, skeleton = split_checkpoint({"a": {"b/c": torch.ones(1)}, "odd": Odd(), "d": torch.float16})
    assert list(tensors) == ["t/a/b%2Fc"] and skeleton["odd"] == "Odd()" and skeleton["d"] == torch.float16
    assert join_checkpoint(skeleton, tensors)["a"]["b/c"].item() == 1.0
    assert "stored as its repr" in caplog.text


def test_a_failed_write_is_raised_by_the_next_call(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    io_ = AsyncCkptIO()
    io_.save_checkpoint({"w": torch.ones(1)}, tmp_path / "file" / "x.ckpt")
    with pytest.raises(SaveError, match="Not a directory"):
        io_.teardown()


def test_callback_state_uses_trainstate(tmp_path):
    # the callback's TrainState is an ordinary one: a plain manager restores its model
    root = tmp_path / "ckpt"
    fit(max_steps=3, callbacks=[AsyncCheckpoint(root, schedule=Schedule(every_n_steps=100))])
    model = Tiny()
    with CheckpointManager(root) as mgr:
        assert mgr.restore(TrainState(model=model), include=["model"]) == 3
