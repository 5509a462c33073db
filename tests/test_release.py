"""Releases: weights-only, versioned exports with a model card, committed card-last."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from asyncckpt import CheckpointManager, Retention, TrainState
from asyncckpt.errors import CheckpointExistsError, CheckpointNotFoundError, ConfigError
from asyncckpt.release import (CARD_NAME, ReleaseOptions, check_version, list_releases, prepare,
                               version_key, write_weights)
from asyncckpt.storage import MARKER_NAME, Storage

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Net(nn.Module):
    """Parameters, a float buffer and an integer buffer (never cast)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.body(x))


def _trained(seed: int) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()  # updates the BatchNorm buffers too
    opt.step()
    return model, opt


def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def run(tmp_path):
    """A root with steps 1-3, each with different weights; yields (manager, weights per step)."""
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        weights = {}
        for step in (1, 2, 3):
            model, opt = _trained(step)
            mgr.save(step, TrainState(model=model, optimizer=opt), blocking=True,
                     metrics={"val_loss": abs(step - 2) + 0.5, "acc": 0.5 + step / 10})
            weights[step] = _sd(model)
        yield mgr, weights


def _load_into_fresh(path: str) -> Net:
    fresh = Net()
    fresh.load_state_dict(load_file(path))
    return fresh


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_release_from_a_step_loads_into_a_fresh_model(tmp_path, compression):
    with CheckpointManager(tmp_path / "ckpt", compression=compression) as mgr:
        model, opt = _trained(7)
        mgr.save(10, TrainState(model=model, optimizer=opt), metrics={"val_loss": 0.25})
        saved = _sd(model)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # the live model moves on; the release must not
        info = mgr.release(10, version="1.0.0", model_card={"license": "mit"},
                           config={"hidden": 8})
    folder = tmp_path / "ckpt" / "releases" / "v1.0.0"
    assert sorted(p.name for p in folder.iterdir()) == [MARKER_NAME, "config.json",
                                                        "model.safetensors", CARD_NAME]
    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors.keys() == saved.keys()  # the model only: no optimizer state
    fresh = _load_into_fresh(str(folder / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert (info.version, info.step, info.format, info.dtype) == ("1.0.0", 10, "safetensors", None)
    assert info.bytes == sum(p.stat().st_size for p in folder.iterdir() if p.name not in (CARD_NAME, MARKER_NAME))
    assert json.loads((folder / "config.json").read_text()) == {"hidden": 8}


def test_model_card_records_where_the_weights_come_from(run):
    mgr, weights = run
    info = mgr.release(2, version="0.1.0", model_card={"description": "toy", "tags": ["a"]})
    card = json.loads(open(f"{info.path}/{CARD_NAME}").read())
    assert card["format_version"] == 1 and card["version"] == "0.1.0"
    assert card["step"] == 2 and card["metrics"] == {"val_loss": 0.5, "acc": 0.7}
    assert card["time"].endswith("Z") and card["checkpoint_time"].endswith("Z")
    assert card["torch_version"] == torch.__version__ and "git_commit" in card
    assert card["param_count"] == sum(p.numel() for p in Net().parameters())
    assert card["numel"] == sum(v.numel() for v in weights[2].values())
    assert card["card"] == {"description": "toy", "tags": ["a"]}
    assert {f["path"] for f in card["files"]} == {"model.safetensors", "config.json"}
    assert all(f["checksum"].startswith("crc32:") for f in card["files"])


def test_bf16_release_matches_the_bf16_cast_and_keeps_integers(run):
    mgr, weights = run
    info = mgr.release(3, version="1.0.0", dtype=torch.bfloat16)
    assert info.dtype == "bfloat16"
    loaded = load_file(f"{info.path}/model.safetensors")
    for k, v in weights[3].items():
        expected = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert loaded[k].dtype == expected.dtype and torch.equal(loaded[k], expected), k
    assert loaded["norm.num_batches_tracked"].dtype == torch.int64


def test_torch_format_loads_with_weights_only(run):
    mgr, weights = run
    info = mgr.release(1, version="1.0.0", format="torch", dtype="fp16")
    loaded = torch.load(f"{info.path}/model.pt", weights_only=True)
    assert loaded.keys() == weights[1].keys()
    for k, v in weights[1].items():
        assert torch.equal(loaded[k], v.half() if v.is_floating_point() else v), k


def test_release_from_a_live_train_state(tmp_path):
    model, opt = _trained(3)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        info = mgr.release(TrainState(model=model, optimizer=opt), version="2.0.0", step=123,
                           metrics={"acc": 0.9})
        assert mgr.list() == []  # no checkpoint needed
    fresh = _load_into_fresh(f"{info.path}/model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    card = json.loads(open(f"{info.path}/{CARD_NAME}").read())
    assert (card["step"], card["metrics"], card["checkpoint_time"]) == (123, {"acc": 0.9}, None)


def test_release_best_and_latest(run):
    mgr, weights = run
    assert mgr.release("best:val_loss", version="1.0.0").step == 2  # min, unless retention says
    assert mgr.release("latest", version="1.0.1").step == 3
    with pytest.raises(CheckpointNotFoundError, match="step 9"):
        mgr.release(9, version="1.0.3")


def test_release_of_several_models_prefixes_keys_or_picks_one(tmp_path):
    torch.manual_seed(0)
    gen, disc = nn.Linear(2, 3), nn.Linear(3, 1)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model={"gen": gen, "disc": disc}), blocking=True)
        both = load_file(f"{mgr.release(1, version='1.0.0').path}/model.safetensors")
        only = load_file(f"{mgr.release(1, version='1.1.0', model='gen').path}/model.safetensors")
        with pytest.raises(ConfigError, match=r"model='critic'.*\['disc', 'gen'\]"):
            mgr.release(1, version="1.2.0", model="critic")
    assert sorted(both) == ["disc.bias", "disc.weight", "gen.bias", "gen.weight"]
    assert sorted(only) == ["bias", "weight"] and torch.equal(only["weight"], gen.weight.detach())


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "01.0.0", "1.0.0-", "1.0.0+", "", "1.0.0 ",
                                     "1.0.0-rc..1", "../1.0.0", 1])
def test_invalid_version_is_refused_quoting_it(tmp_path, version):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        with pytest.raises(ConfigError, match=re.escape(f"version={version!r} is not valid")):
            mgr.release(1, version=version)
        assert mgr.releases() == []


def test_existing_version_is_never_overwritten(run):
    mgr, _ = run
    first = mgr.release(1, version="1.0.0")
    before = open(f"{first.path}/model.safetensors", "rb").read()
    with pytest.raises(CheckpointExistsError, match="1.0.0 already exists"):
        mgr.release(2, version="1.0.0")
    assert open(f"{first.path}/model.safetensors", "rb").read() == before
    assert [r.step for r in mgr.releases()] == [1]


@pytest.mark.parametrize("kwargs, field", [
    ({"format": "onnx"}, "format"), ({"dtype": "int8"}, "dtype"), ({"dtype": torch.int32}, "dtype"),
    ({"model_card": {"f": object()}}, "model_card"), ({"config": {1: "x"}}, "config"),
    ({"config": {"x": float("nan")}}, "config"),
])
def test_bad_release_options_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ReleaseOptions(version="1.0.0", **kwargs)


def test_unfinished_release_is_invisible_then_removed_and_can_be_redone(tmp_path):
    root = tmp_path / "ckpt"
    with CheckpointManager(root) as mgr:
        model, _ = _trained(1)
        mgr.save(1, TrainState(model=model), blocking=True)
        mgr.release(1, version="1.0.0")
    (root / "releases" / "v1.0.0" / CARD_NAME).unlink()  # as if killed before the card
    assert list_releases(Storage(root)) == []
    with CheckpointManager(root) as mgr:  # the next start removes it
        assert not (root / "releases" / "v1.0.0").exists()
        assert mgr.release(1, version="1.0.0").step == 1
        assert [r.version for r in mgr.releases()] == ["1.0.0"]


def test_releases_are_listed_in_semver_order_and_tag_their_source(run):
    mgr, _ = run
    for v, step in [("1.10.0", 3), ("1.2.0", 2), ("1.0.0", 1), ("1.0.0-rc.1", 1), ("1.0.0-alpha", 1)]:
        mgr.release(step, version=v)
    assert [r.version for r in mgr.releases()] == ["1.0.0-alpha", "1.0.0-rc.1", "1.0.0", "1.2.0",
                                                   "1.10.0"]
    tags = {i.step: i.tags for i in mgr.list()}
    assert {"release:1.0.0", "release:1.0.0-rc.1"} <= set(tags[1]) and "release:1.2.0" in tags[2]


def test_a_released_checkpoint_is_kept_by_retention(tmp_path):
    with CheckpointManager(tmp_path / "ckpt", retention=Retention(keep_last=1)) as mgr:
        model, _ = _trained(1)
        state = TrainState(model=model)
        mgr.save(1, state, blocking=True)
        mgr.release(1, version="1.0.0")
        for step in range(2, 6):
            mgr.save(step, state, blocking=True)
        mgr.wait()
        assert [i.step for i in mgr.list()] == [1, 4, 5]


def test_version_helpers():
    assert check_version("1.0.0+build.7") == "1.0.0+build.7"
    assert version_key("2.0.0-rc.2") < version_key("2.0.0-rc.10") < version_key("2.0.0")


def test_safetensors_writer_handles_every_kind_of_tensor(tmp_path):
    tensors = {"bf16": torch.randn(3, 2).bfloat16(), "bool": torch.tensor([True, False, True]),
               "i64": torch.arange(5), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "u8": torch.arange(7, dtype=torch.uint8), "view": torch.arange(12.0).view(3, 4).t(),
               "f64": torch.randn(2, dtype=torch.float64)}
    storage = Storage(tmp_path)
    entry = write_weights(storage, "w.safetensors", prepare(tensors, None), format="safetensors",
                          metadata={"format": "pt"})
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert entry.size == (tmp_path / "w.safetensors").stat().st_size
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with pytest.raises(ConfigError, match="complex"):
        write_weights(storage, "c.safetensors", prepare({"c": torch.zeros(2, dtype=torch.complex64)},
                                                        None), format="safetensors")
