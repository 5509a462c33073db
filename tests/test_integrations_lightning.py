"""Lightning on CPU: fit a tiny LightningModule, stop, resume, and end exactly where an
uninterrupted run ends; through the ``AsyncCheckpoint`` callback and through the
``AsyncCkptIO`` plugin under Lightning's own ``ModelCheckpoint``."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

from asyncckpt import CheckpointManager, Retention, Schedule, TrainState  # noqa: E402
from asyncckpt.errors import CheckpointNotFoundError, SaveError  # noqa: E402
from asyncckpt.integrations.lightning import (AsyncCheckpoint, AsyncCkptIO,  # noqa: E402
                                              join_checkpoint, split_checkpoint)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.7)}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(40, 6, generator=g)
        data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        return StatefulDataLoader(data, batch_size=8, shuffle=True)  # 5 batches an epoch


def _fit(max_steps: int, *, callbacks=(), plugins=(), ckpt_path=None) -> Tiny:
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint)
                                                  for c in callbacks),
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=list(callbacks), plugins=list(plugins))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _fit(12).state_dict().items()}


def _assert_same(model: Tiny, expected: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_callback_stop_and_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    root = tmp_path / "ckpt"
    kw = dict(schedule=Schedule(every_n_steps=4), retention=Retention(keep_last=2))
    first = AsyncCheckpoint(root, **kw)
    _fit(7, callbacks=[first])                     # stops mid-epoch 2, saves step 7 (the last)
    with CheckpointManager(root) as mgr:
        assert [i.step for i in mgr.list()] == [4, 7]
    second = AsyncCheckpoint(root, **kw)
    resumed = _fit(12, callbacks=[second])
    assert second.restored_step == 7
    _assert_same(resumed, uninterrupted)
    with CheckpointManager(root) as mgr:
        infos = mgr.list()
    assert [i.step for i in infos] == [8, 12] and "train_loss" in infos[-1].metrics


def test_callback_resume_false_starts_fresh(tmp_path, uninterrupted):
    root = tmp_path / "ckpt"
    _fit(7, callbacks=[AsyncCheckpoint(root, schedule=Schedule(every_n_steps=100))])
    cb = AsyncCheckpoint(root, resume=False, schedule=Schedule(every_n_steps=100))
    model = _fit(12, callbacks=[cb])
    assert cb.restored_step == 0
    _assert_same(model, uninterrupted)


def test_checkpoint_io_plugin_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    dirpath = tmp_path / "lightning"
    mc = pl.callbacks.ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_top_k=-1,
                                      save_last=True)
    _fit(7, callbacks=[mc], plugins=[AsyncCkptIO()])
    saved = sorted(p.name for p in dirpath.iterdir())
    assert saved == ["epoch=0-step=5.ckpt", "last.ckpt"]
    assert (dirpath / "last.ckpt" / "manifest.json").exists()       # a folder, committed
    mc2 = pl.callbacks.ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_top_k=-1)
    resumed = _fit(12, callbacks=[mc2], plugins=[AsyncCkptIO()], ckpt_path=str(dirpath / "last.ckpt"))
    _assert_same(resumed, uninterrupted)
    assert [(p / "manifest.json").exists() for p in dirpath.glob("*step=10.ckpt")] == [True]


@pytest.mark.s3
def test_checkpoint_io_plugin_on_s3_resumes_from_an_explicit_url(s3_bucket, monkeypatch, uninterrupted):
    """ModelCheckpoint's own fsspec calls (ls, exists, rm) reach the S3 server through
    AWS_ENDPOINT_URL; the plugin writes through its storage_options."""
    pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket["endpoint"])
    dirpath = f"s3://{s3_bucket['name']}/lightning"
    io_ = AsyncCkptIO(storage_options=s3_bucket["options"])
    mc = pl.callbacks.ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_top_k=-1,
                                      save_last=True)
    _fit(7, callbacks=[mc], plugins=[io_])
    keys = {o["Key"] for o in s3_bucket["client"].list_objects_v2(
        Bucket=s3_bucket["name"], Prefix="lightning/")["Contents"]}
    assert {"lightning/last.ckpt/manifest.json", "lightning/epoch=0-step=5.ckpt/manifest.json"} <= keys
    mc2 = pl.callbacks.ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_top_k=-1)
    resumed = _fit(12, callbacks=[mc2], plugins=[AsyncCkptIO(storage_options=s3_bucket["options"])],
                   ckpt_path=f"{dirpath}/last.ckpt")
    _assert_same(resumed, uninterrupted)


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
    _fit(3, callbacks=[AsyncCheckpoint(root, schedule=Schedule(every_n_steps=100))])
    model = Tiny()
    with CheckpointManager(root) as mgr:
        assert mgr.restore(TrainState(model=model), include=["model"]) == 3
