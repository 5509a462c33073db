"""Partial restores (include/exclude, by part and by name), strict=False reports, map_location,
and the fine-tuning start (initial_from)."""

from __future__ import annotations

import io
import logging
import zipfile

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.errors import CheckpointNotFoundError, ConfigError, StateMismatchError
from asyncckpt.restore import select_parts
from asyncckpt.state import to_blob
from helpers_crafting import replace_item
from helpers.checkpoints import same_tensors


pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _net(seed: int, out: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))


def _trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = _net(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _opt_state(opt: torch.optim.Optimizer) -> dict:
    return {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in opt.state_dict()["state"].items()}


# -- selection syntax --------------------------------------------------------------------------

@pytest.mark.parametrize("include, exclude, part, name, wanted", [
    (None, None, "model", "a", True),
    (["model"], None, "optimizer", None, False),
    (["model:a"], None, "model", "a", True),
    (["model:a"], None, "model", "b", False),
    (["model:a", "model"], None, "model", "b", True),
    (None, ["model:b"], "model", "b", False),
    (None, ["model:b"], "model", "a", True),
    (None, ["rng"], "rng", None, False),
    ("model", None, "model", "x", True),            # a single string is one item
    (["optimizer:enc"], None, "optimizer", "enc", True),
])
def test_selection_table(include, exclude, part, name, wanted):
    assert select_parts(include, exclude).wants(part, name) is wanted


@pytest.mark.parametrize("kw", [{"include": ["scheduler:s"]}, {"include": ["model:"]},
                                {"exclude": ["weights"]}, {"include": [3]}])
def test_bad_selections_are_refused(kw):
    with pytest.raises(ConfigError, match="unknown part"):
        select_parts(**kw)


def test_naming_a_model_the_state_lacks_is_refused(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model=_net(0))).result(timeout=120)
        with pytest.raises(ConfigError, match=r"\['model'\]"):
            mgr.restore(TrainState(model=_net(1)), include=["model:encoder"])


# -- part and name selection -------------------------------------------------------------------

def test_model_only_restore_leaves_optimizer_scheduler_and_rng_untouched(tmp_path):
    model, opt, sched = _trained(0)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(7, TrainState(model=model, optimizer=opt, scheduler=sched, extra={"k": 1})).result(timeout=120)
        model2, opt2, sched2 = _trained(1)
        before_opt, before_lr = _opt_state(opt2), sched2.state_dict()
        extra2 = {"k": 5}
        torch.manual_seed(123)
        rng_before = torch.get_rng_state()
        assert mgr.restore(TrainState(model=model2, optimizer=opt2, scheduler=sched2, extra=extra2),
                           include=["model"]) == 7
        assert torch.equal(torch.get_rng_state(), rng_before)
        assert mgr.last_restore_report.loaded == ["model/model"]
    assert same_tensors(model2, model)
    after = _opt_state(opt2)
    assert after.keys() == before_opt.keys()
    for k in after:
        assert all(torch.equal(after[k][n], before_opt[k][n]) if torch.is_tensor(before_opt[k][n])
                   else after[k][n] == before_opt[k][n] for n in after[k])
    assert sched2.state_dict() == before_lr and extra2 == {"k": 5}


def test_one_of_several_models_by_name(tmp_path):
    enc, dec = _net(0), _net(1)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model={"enc": enc, "dec": dec})).result(timeout=120)
        enc2, dec2 = _net(2), _net(3)
        dec2_before = _net(3)
        mgr.restore(TrainState(model={"enc": enc2, "dec": dec2}), include=["model:enc"])
        assert same_tensors(enc2, enc) and same_tensors(dec2, dec2_before)
        enc3, dec3 = _net(4), _net(5)
        mgr.restore(TrainState(model={"enc": enc3, "dec": dec3}), exclude=["model:enc"])
        assert same_tensors(dec3, dec) and same_tensors(enc3, _net(4))


def test_optimizer_by_name(tmp_path):
    a, b = _net(0), _net(1)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for m, o in ((a, oa), (b, ob)):
        m(torch.randn(2, 4)).sum().backward()
        o.step()
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model={"a": a, "b": b}, optimizer={"a": oa, "b": ob})).result(timeout=120)
        a2, b2 = _net(0), _net(1)
        oa2 = torch.optim.SGD(a2.parameters(), lr=0.1, momentum=0.9)
        ob2 = torch.optim.SGD(b2.parameters(), lr=0.1, momentum=0.9)
        mgr.restore(TrainState(model={"a": a2, "b": b2}, optimizer={"a": oa2, "b": ob2}),
                    include=["optimizer:b"])
    assert oa2.state_dict()["state"] == {}
    assert torch.equal(ob2.state_dict()["state"][0]["momentum_buffer"],
                       ob.state_dict()["state"][0]["momentum_buffer"])


# -- strict=False --------------------------------------------------------------------------------

def test_strict_false_reports_missing_and_unexpected(tmp_path, caplog):
    src = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8))          # has 1.*
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(3, TrainState(model=src)).result(timeout=120)
        dst = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # has 2.*, lacks 1.*
        with pytest.raises(StateMismatchError):
            mgr.restore(TrainState(model=dst))
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            assert mgr.restore(TrainState(model=dst), strict=False) == 3
        report = mgr.last_restore_report
    assert torch.equal(dst[0].weight, src[0].weight)
    assert sorted(report.missing) == ["model/model.2.bias", "model/model.2.weight"]
    assert sorted(report.unexpected) == ["model/model.1.bias", "model/model.1.weight"]
    assert not report.complete
    assert "missing keys" in caplog.text


def test_strict_false_leaves_a_mismatched_optimizer_whole(tmp_path):
    src, opt, _ = _trained(0)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model=src, optimizer=opt)).result(timeout=120)
        dst = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))
        opt2 = torch.optim.AdamW(dst.parameters(), lr=0.1)
        mgr.restore(TrainState(model=dst, optimizer=opt2), strict=False)
        assert "optim/optimizer" in mgr.last_restore_report.missing
    assert torch.equal(dst[2].weight, src[2].weight)


def test_shapes_must_match_even_when_not_strict(tmp_path):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model=_net(0, out=2))).result(timeout=120)
        with pytest.raises(StateMismatchError, match="shape"):
            mgr.restore(TrainState(model=_net(1, out=3)), strict=False)


def test_a_missing_object_is_reported(tmp_path):
    model, opt, sched = _trained(0)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model=model, optimizer=opt)).result(timeout=120)
        mgr.restore(TrainState(model=model, optimizer=opt, scheduler=sched))
        assert mgr.last_restore_report.missing == ["scheduler"]


# -- map_location --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["gpu0", 3.5, "cuda:0" if not torch.cuda.is_available() else "xla"])
def test_map_location_is_validated(tmp_path, bad):
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        with pytest.raises(ConfigError, match="map_location"):
            mgr.restore(TrainState(model=_net(0)), map_location=bad)


def _as_if_saved_on_cuda(obj: object) -> io.BytesIO:
    """torch.save's stream with every storage's location rewritten to cuda:0 (a GPU save)."""
    src = to_blob(obj)
    out = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data  # protocol 2 BINUNICODE
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(item.filename, data)
    out.seek(0)
    return out


def test_a_checkpoint_saved_on_a_gpu_restores_on_cpu(tmp_path):
    model = _net(0)
    extra = {"ema": torch.arange(4.0)}
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, TrainState(model=model, extra=extra, rng=False)).result(timeout=120)
        # the extra blob as a GPU run writes it (its tensor's storage located on cuda:0),
        # with another value, to show it is the one restored
        gpu_extra = {"ema": torch.arange(4.0) + 10}
        replace_item(tmp_path / "ckpt" / "step-0000000001", "extra",
                     _as_if_saved_on_cuda(gpu_extra).getvalue())
        blob = _as_if_saved_on_cuda({"t": torch.ones(1)})
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError):  # what plain torch.load does with a GPU checkpoint
                torch.load(blob, weights_only=True)
        extra2: dict = {}
        model2 = _net(1)
        assert mgr.restore(TrainState(model=model2, extra=extra2, rng=False), map_location="cpu") == 1
    assert same_tensors(model2, model)
    assert extra2["ema"].device.type == "cpu" and torch.equal(extra2["ema"], gpu_extra["ema"])


# -- fine-tuning start ------------------------------------------------------------------------

def test_initial_from_loads_model_only_when_the_run_has_no_checkpoint(tmp_path):
    pre, pre_opt, _ = _trained(0)
    with CheckpointManager(tmp_path / "pretrain") as mgr:
        mgr.save(500, TrainState(model=pre, optimizer=pre_opt)).result(timeout=120)

    model, opt, _ = _trained(1)
    opt_before = _opt_state(opt)
    kw = dict(initial_from=str(tmp_path / "pretrain"), initial_include=("model",))
    with CheckpointManager(tmp_path / "finetune", **kw) as mgr:
        assert mgr.restore(TrainState(model=model, optimizer=opt)) == 0
        assert mgr.last_restore_report.step == 500
        assert mgr.last_restore_report.loaded == ["model/model"]
        assert same_tensors(model, pre)
        assert all(torch.equal(_opt_state(opt)[k]["exp_avg"], opt_before[k]["exp_avg"]) for k in opt_before)
        with torch.no_grad():
            model[0].weight.add_(1.0)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        mgr.save(10, TrainState(model=model, optimizer=opt)).result(timeout=120)

    fresh, fresh_opt, _ = _trained(7)
    with CheckpointManager(tmp_path / "finetune", **kw) as mgr:   # a restart: its own checkpoint wins
        assert mgr.restore(TrainState(model=fresh, optimizer=fresh_opt)) == 10
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())


def test_initial_from_a_release_and_from_a_checkpoint_folder(tmp_path):
    pre = _net(0)
    with CheckpointManager(tmp_path / "pretrain") as mgr:
        mgr.save(5, TrainState(model=pre)).result(timeout=120)
        info = mgr.release(5, version="1.0.0")
        step_folder = mgr.list()[0].path
    for source in (info.path, step_folder):
        model = _net(3)
        with CheckpointManager(tmp_path / f"ft-{len(source)}", initial_from=source) as mgr:
            assert mgr.restore(TrainState(model=model)) == 0
        assert same_tensors(model, pre), source


def test_initial_from_nothing_there_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with CheckpointManager(tmp_path / "ft", initial_from=str(tmp_path / "empty")) as mgr:
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore(TrainState(model=_net(0)))


def test_initial_include_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="unknown part"):
        CheckpointManager(tmp_path / "ft", initial_from="x", initial_include=("weights",))
