"""asyncckpt.load_weights (asyncckpt/weights.py): one model's state dict from a root, a
checkpoint folder, a release or a foreign DCP checkpoint, with no TrainState."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

import asyncckpt
from asyncckpt import CheckpointManager, TrainState
from asyncckpt.errors import (CheckpointNotFoundError, ConfigError, IntegrityError,
                              StateMismatchError)
from helpers.checkpoints import same_tensors
from helpers.training import small_model
from test_foreign import Tiny, _run, _step, _weights, save_torchtitan

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def root(tmp_path):
    """A root with steps 10, 20, 30 (loss 0.5, 0.2, 0.4), each a different model's weights."""
    models = {}
    with CheckpointManager(tmp_path / "run") as mgr:
        for step, loss in ((10, 0.5), (20, 0.2), (30, 0.4)):
            models[step] = small_model(step)
            mgr.save(step, TrainState(model=models[step]), metrics={"loss": loss}).result(timeout=120)
    return tmp_path / "run", models


@pytest.mark.parametrize("which,step", [("latest", 30), (10, 10), ("20", 20), ("best:loss", 20)])
def test_a_root_gives_the_chosen_checkpoint(root, which, step):
    path, models = root
    assert same_tensors(asyncckpt.load_weights(path, which), models[step])


def test_a_checkpoint_folder_and_a_release(root):
    path, models = root
    assert same_tensors(asyncckpt.load_weights(path / "step-0000000020"), models[20])
    with CheckpointManager(path) as mgr:
        info = mgr.release(10, version="1.0.0")
    got = asyncckpt.load_weights(info.path)
    assert same_tensors(got, models[10])


def test_best_needs_a_metric_and_missing_steps_are_named(root):
    path, _ = root
    with pytest.raises(ConfigError, match="best:<metric>"):
        asyncckpt.load_weights(path, "best")
    with pytest.raises(CheckpointNotFoundError, match="acc"):
        asyncckpt.load_weights(path, "best:acc")
    with pytest.raises(CheckpointNotFoundError, match="40"):
        asyncckpt.load_weights(path, 40)
    with pytest.raises(ConfigError, match="which"):
        asyncckpt.load_weights(path / "step-0000000020", 10)


def test_best_follows_the_ranking_the_run_recorded(tmp_path):
    """A run that kept the best by ``acc`` (max) records it: ``"best"`` needs no metric then."""
    models = {}
    with CheckpointManager(tmp_path / "run", retention=asyncckpt.Retention(
            keep_last=3, best_metric="acc", best_mode="max", keep_best=1)) as mgr:
        for step, acc in ((10, 0.5), (20, 0.9), (30, 0.7)):
            models[step] = small_model(step)
            mgr.save(step, TrainState(model=models[step]), metrics={"acc": acc}).result(timeout=120)
    assert same_tensors(asyncckpt.load_weights(tmp_path / "run", "best"), models[20])
    assert same_tensors(asyncckpt.load_weights(tmp_path / "run", "best:acc"), models[20])  # its mode: max


def test_checksums_are_verified(root):
    path, _ = root
    shard = next((path / "step-0000000030").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        asyncckpt.load_weights(path)


def test_one_model_of_several_by_name(tmp_path):
    enc, dec = small_model(1), small_model(2)
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, TrainState(model={"enc": enc, "dec": dec})).result(timeout=120)
    assert same_tensors(asyncckpt.load_weights(tmp_path / "run", model_name="dec"), dec)
    with pytest.raises(ConfigError, match="enc"):
        asyncckpt.load_weights(tmp_path / "run", model_name="nope")


def test_foreign_layouts(tmp_path):
    model, opt, sched = _run(0)
    _step(model, opt, sched, 0)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp_path / "api"))
    save_torchtitan(model, opt, sched, tmp_path / "titan", 1)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "bare"))
    for source in (tmp_path / "api", tmp_path / "titan", tmp_path / "titan" / "step-1",
                   tmp_path / "bare"):
        got = asyncckpt.load_weights(source)
        assert same_tensors(got, model), source
        fresh = Tiny(5)
        fresh.load_state_dict(got)   # usable as it is
        assert _weights(fresh).keys() == _weights(model).keys()


def test_nothing_there_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError):
        asyncckpt.load_weights(tmp_path / "empty")
    dcp.save({"optimizer": {"state": {}}, "train_state": {"step": 1}},
             checkpoint_id=str(tmp_path / "no-weights"))
    with pytest.raises(StateMismatchError, match="no model weights"):
        asyncckpt.load_weights(tmp_path / "no-weights")


def test_map_location_is_checked(root):
    path, models = root
    got = asyncckpt.load_weights(path, map_location=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in got.values())
    with pytest.raises(ConfigError, match="map_location"):
        asyncckpt.load_weights(path, map_location="nonsense")
