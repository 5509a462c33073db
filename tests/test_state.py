"""TrainState round trips through a real checkpoint, part by part, and its input checks.

Every round trip saves with one manager and restores with a fresh one into
freshly built objects that start out different, so a part that is not
restored shows up as a difference.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.errors import ConfigError

pytestmark = [pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


@pytest.fixture(params=[None, "zstd"], ids=["plain", "zstd"])
def compression(request: pytest.FixtureRequest) -> str | None:
    return request.param


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched=None, steps: int = 3) -> None:
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(6, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def _round_trip(tmp_path, compression, src: TrainState, dst: TrainState, **restore_kw) -> int:
    root = tmp_path / "ckpt"
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.save(7, src).result()
    with CheckpointManager(root, compression=compression) as mgr:
        return mgr.restore(dst, **restore_kw)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _assert_same_optim(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, st in a["state"].items():
        assert st.keys() == b["state"][pid].keys()
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][name])), (pid, name)


# -- model ------------------------------------------------------------------------

def test_model_params_and_buffers_round_trip(tmp_path, compression):
    src, dst = _net(0), _net(1)
    _train(src, torch.optim.SGD(src.parameters(), lr=0.1))
    assert src[1].num_batches_tracked.item() == 3
    assert not torch.equal(src[1].running_mean, dst[1].running_mean)

    step = _round_trip(tmp_path, compression, TrainState(model=src), TrainState(model=dst))

    assert step == 7
    _assert_same_tensors(src.state_dict(), dst.state_dict())
    assert dst[1].num_batches_tracked.dtype == torch.int64


def test_model_with_odd_dtypes_and_empty_tensor_round_trips(tmp_path, compression):
    def build(fill: float) -> nn.Module:
        m = nn.Module()
        m.register_buffer("f16", torch.full((5,), fill, dtype=torch.float16))
        m.register_buffer("bf16", torch.full((3, 2), fill, dtype=torch.bfloat16))
        m.register_buffer("flags", torch.tensor([fill > 0, False, True]))
        m.register_buffer("empty", torch.empty(0, 4))
        m.register_buffer("scalar", torch.tensor(fill, dtype=torch.float64))
        return m

    src, dst = build(1.5), build(-2.0)
    _round_trip(tmp_path, compression, TrainState(model=src), TrainState(model=dst))
    _assert_same_tensors(src.state_dict(), dst.state_dict())


# -- optimizer ----------------------------------------------------------------------

def test_adamw_state_round_trip(tmp_path, compression):
    src = _net(0)
    opt = torch.optim.AdamW(src.parameters(), lr=0.01, weight_decay=0.1)
    _train(src, opt)
    dst = _net(1)
    dst_opt = torch.optim.AdamW(dst.parameters(), lr=0.5)

    _round_trip(tmp_path, compression, TrainState(model=src, optimizer=opt),
                TrainState(model=dst, optimizer=dst_opt))

    _assert_same_optim(opt.state_dict(), dst_opt.state_dict())
    first = dst_opt.state_dict()["state"][0]
    assert {"step", "exp_avg", "exp_avg_sq"} <= first.keys()
    assert float(first["step"]) == 3.0
    assert dst_opt.param_groups[0]["lr"] == 0.01


def test_restored_optimizer_takes_the_same_next_step(tmp_path, compression):
    src = _net(0)
    opt = torch.optim.AdamW(src.parameters(), lr=0.01)
    _train(src, opt)
    dst = _net(1)
    dst_opt = torch.optim.AdamW(dst.parameters(), lr=0.01)
    _round_trip(tmp_path, compression, TrainState(model=src, optimizer=opt, rng=False),
                TrainState(model=dst, optimizer=dst_opt, rng=False))

    torch.manual_seed(5)
    _train(src, opt, steps=2)
    torch.manual_seed(5)
    _train(dst, dst_opt, steps=2)
    _assert_same_tensors(src.state_dict(), dst.state_dict())


# -- scheduler -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["step", "onecycle"])
def test_scheduler_round_trip(tmp_path, compression, kind):
    def build(seed: int):
        m = _net(seed)
        opt = torch.optim.AdamW(m.parameters(), lr=0.1)
        if kind == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
        return m, opt, sched

    m, opt, sched = build(0)
    _train(m, opt, sched, steps=5)
    m2, opt2, sched2 = build(1)
    assert sched2.state_dict() != sched.state_dict()

    _round_trip(tmp_path, compression, TrainState(model=m, optimizer=opt, scheduler=sched),
                TrainState(model=m2, optimizer=opt2, scheduler=sched2))

    assert sched2.state_dict() == sched.state_dict()
    assert sched2.get_last_lr() == sched.get_last_lr()
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


# -- dataloader ---------------------------------------------------------------------------

def _loader() -> StatefulDataLoader:
    data = TensorDataset(torch.arange(40), torch.arange(40) * 10)
    return StatefulDataLoader(data, batch_size=4, shuffle=True, num_workers=0)


def test_dataloader_resumes_mid_epoch(tmp_path, compression):
    torch.manual_seed(0)
    loader = _loader()
    it = iter(loader)
    seen = [next(it)[0].tolist() for _ in range(3)]
    src = TrainState(dataloader=loader, rng=False)
    root = tmp_path / "ckpt"
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.save(3, src).result()
    expected = [b[0].tolist() for b in it]
    assert len(expected) == 7

    torch.manual_seed(1234)  # a fresh process would shuffle differently
    fresh = _loader()
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.restore(TrainState(dataloader=fresh, rng=False))
    resumed = [b[0].tolist() for b in fresh]

    assert resumed == expected
    assert sorted(sum(seen + resumed, [])) == list(range(40))


def test_dataloader_and_rng_resume_across_epochs(tmp_path, compression):
    torch.manual_seed(0)
    loader = _loader()
    it = iter(loader)
    for _ in range(9):  # 10 batches an epoch: one left in this one
        next(it)
    root = tmp_path / "ckpt"
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.save(9, TrainState(dataloader=loader)).result()
    expected = [b[0].tolist() for b in it] + [b[0].tolist() for b in loader]

    torch.manual_seed(99)
    fresh = _loader()
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.restore(TrainState(dataloader=fresh))
    resumed = [b[0].tolist() for b in fresh] + [b[0].tolist() for b in fresh]

    assert len(expected) == 1 + 10
    assert resumed == expected


def test_rng_after_resuming_a_loader_matches_an_uninterrupted_run(tmp_path, compression):
    """Building the resumed iterator must not use up a draw of the restored torch RNG."""
    torch.manual_seed(0)
    loader = _loader()
    it = iter(loader)
    next(it), next(it)
    root = tmp_path / "ckpt"
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.save(2, TrainState(dataloader=loader)).result()
    expected_batch, expected_draw = next(it)[0], torch.rand(3)

    torch.manual_seed(77)
    fresh = _loader()
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.restore(TrainState(dataloader=fresh))
    batch = next(iter(fresh))[0]
    assert torch.equal(batch, expected_batch)
    assert torch.equal(torch.rand(3), expected_draw)


# -- RNG ------------------------------------------------------------------------------------

def _draw() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.randn(3).tolist(), torch.rand(4), torch.randn(2))


def test_rng_round_trip(tmp_path, compression):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)        # leaves a cached second gaussian in python's state
    np.random.randn(1)        # and in numpy's legacy state
    root = tmp_path / "ckpt"
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.save(1, TrainState()).result()
    after_save = _draw()

    random.seed(10), np.random.seed(20), torch.manual_seed(30)
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.restore(TrainState())
    after_restore = _draw()

    assert after_restore[:4] == after_save[:4]
    assert torch.equal(after_restore[4], after_save[4])
    assert torch.equal(after_restore[5], after_save[5])


def test_rng_false_leaves_generators_alone(tmp_path, compression):
    torch.manual_seed(3)
    root = tmp_path / "ckpt"
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.save(1, TrainState(rng=False)).result()
    torch.manual_seed(30)
    expected = torch.get_rng_state()
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.restore(TrainState())
    assert torch.equal(torch.get_rng_state(), expected)


# -- extra ----------------------------------------------------------------------------------

def test_extra_is_restored_in_place(tmp_path, compression):
    saved = {"epoch": 3, "best": 0.25, "name": "run-a", "done": False, "none": None,
             "raw": b"\x00\x01", "hist": [1.0, 2.5], "pair": (1, "x"),
             "nested": {"count": 4, "t": torch.arange(5)}}
    live = {"stale": 1, "epoch": 0}

    state = TrainState(extra=live)
    _round_trip(tmp_path, compression, TrainState(extra=copy.deepcopy(saved)), state)

    assert state.extra is live
    assert "stale" not in live
    t = live["nested"].pop("t")
    saved_t = saved["nested"].pop("t")
    assert torch.equal(t, saved_t)
    assert live == saved


# -- several models and optimizers -------------------------------------------------------------

def test_dicts_of_models_optimizers_and_schedulers(tmp_path, compression):
    def build(seed: int):
        gen, disc = _net(seed), _net(seed + 100)
        opts = {"gen": torch.optim.AdamW(gen.parameters(), lr=0.01),
                "disc": torch.optim.SGD(disc.parameters(), lr=0.1, momentum=0.9)}
        scheds = {"gen": torch.optim.lr_scheduler.StepLR(opts["gen"], 1, gamma=0.9),
                  "disc": torch.optim.lr_scheduler.ExponentialLR(opts["disc"], gamma=0.5)}
        return {"gen": gen, "disc": disc}, opts, scheds

    models, opts, scheds = build(0)
    for name in models:
        _train(models[name], opts[name], scheds[name], steps=2 if name == "gen" else 3)
    models2, opts2, scheds2 = build(1)

    _round_trip(tmp_path, compression,
                TrainState(model=models, optimizer=opts, scheduler=scheds),
                TrainState(model=models2, optimizer=opts2, scheduler=scheds2))

    for name in models:
        _assert_same_tensors(models[name].state_dict(), models2[name].state_dict())
        _assert_same_optim(opts[name].state_dict(), opts2[name].state_dict())
        assert scheds[name].state_dict() == scheds2[name].state_dict()


# -- what TrainState refuses ----------------------------------------------------------------------

class _NoState:
    pass


def test_model_without_state_dict_is_refused():
    with pytest.raises(ConfigError, match="state_dict"):
        TrainState(model=object())


def test_scheduler_without_state_dict_is_refused():
    with pytest.raises(ConfigError, match=r"scheduler.*state_dict"):
        TrainState(model=_net(0), scheduler=_NoState())


def test_dataloader_without_state_dict_is_refused():
    with pytest.raises(ConfigError, match=r"dataloader.*state_dict"):
        TrainState(dataloader=[1, 2, 3])


def test_optimizer_without_model_is_refused():
    m = _net(0)
    with pytest.raises(ConfigError, match="model"):
        TrainState(optimizer=torch.optim.SGD(m.parameters(), lr=0.1))


@pytest.mark.parametrize("name", ["", "a.b", "a/b"])
def test_bad_part_names_are_refused(name):
    with pytest.raises(ConfigError, match="name"):
        TrainState(model={name: _net(0)})


def test_extra_must_be_a_dict():
    with pytest.raises(ConfigError, match="extra"):
        TrainState(extra=[1, 2])


@pytest.mark.parametrize("bad", [lambda: 1, _NoState(), {1.5: "float key"}, [1, {"deep": object()}]],
                         ids=["lambda", "custom-object", "float-key", "nested-object"])
def test_extra_with_non_plain_values_is_refused_at_save(tmp_path, bad):
    state = TrainState(extra={"ok": 1, "bad_key": bad})
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        with pytest.raises(ConfigError, match="bad_key"):
            mgr.save(1, state)
        assert mgr.list() == []
