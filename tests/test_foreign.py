"""Foreign DCP checkpoints (asyncckpt/foreign.py): the pure key mapping, table-tested, and
end-to-end restores of the layouts plain ``dcp.save``, DCP's state_dict API and torchtitan
write, each compared bit-exactly against the original run's next optimizer steps."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, strategies as st
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.errors import StateMismatchError
from asyncckpt.foreign import map_keys, weight_keys
from helpers.checkpoints import same_tensors

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# -- the pure mapping ------------------------------------------------------------------------

LIVE = ["model/model.w", "model/model.b", "optim/optimizer.state.w.exp_avg",
        "optim/optimizer.state.w.step", "optim/optimizer.state.b.exp_avg",
        "optim/optimizer.state.b.step", "optim/optimizer.param_groups.0.lr",
        "optim/optimizer.param_groups.0.params"]
GROUPS = {"optimizer": [["w", "b"]]}
OPT_FQN = {"state.w.exp_avg", "state.w.step", "state.b.exp_avg", "state.b.step", "param_groups.0.lr"}


def _opt(keys: set[str]) -> dict[str, str]:
    """Expected optimizer part of a mapping: live key -> checkpoint key ``optimizer.<k>``."""
    live = {"state.w.exp_avg": "state.w.exp_avg", "state.w.step": "state.w.step",
            "state.b.exp_avg": "state.b.exp_avg", "state.b.step": "state.b.step",
            "param_groups.0.lr": "param_groups.0.lr"}
    return {f"optim/optimizer.{k}": f"optimizer.{keys_map}" for k, keys_map in live.items()
            if f"{keys_map}" in keys}


@pytest.mark.parametrize("name,saved,layout,keys,unmapped", [
    ("get_state_dict", {"model.w", "model.b", *(f"optimizer.{k}" for k in OPT_FQN),
                        "optimizer.param_groups.0.params", "lr_scheduler.last_epoch"},
     "state_dict", {"model/model.w": "model.w", "model/model.b": "model.b", **_opt(OPT_FQN)}, []),
    ("optimizer.state_dict()", {"model.w", "model.b", "optimizer.state.0.exp_avg",
                                "optimizer.state.0.step", "optimizer.state.1.exp_avg",
                                "optimizer.state.1.step", "optimizer.param_groups.0.lr",
                                "optimizer.param_groups.0.params"},
     "state_dict", {"model/model.w": "model.w", "model/model.b": "model.b",
                    "optim/optimizer.state.w.exp_avg": "optimizer.state.0.exp_avg",
                    "optim/optimizer.state.w.step": "optimizer.state.0.step",
                    "optim/optimizer.state.b.exp_avg": "optimizer.state.1.exp_avg",
                    "optim/optimizer.state.b.step": "optimizer.state.1.step",
                    "optim/optimizer.param_groups.0.lr": "optimizer.param_groups.0.lr"}, []),
    ("torchtitan", {"w", "b", "optimizer.state.w.exp_avg", "optimizer.state.w.step",
                    "optimizer.state.b.exp_avg", "optimizer.state.b.step",
                    "optimizer.param_groups.w.lr", "optimizer.param_groups.b.lr",
                    "lr_scheduler.last_epoch", "dataloader.dp_rank_0", "dataloader.world_size",
                    "train_state.step", "train_state.ntokens_seen"},
     "flat", {"model/model.w": "w", "model/model.b": "b",
              "optim/optimizer.state.w.exp_avg": "optimizer.state.w.exp_avg",
              "optim/optimizer.state.w.step": "optimizer.state.w.step",
              "optim/optimizer.state.b.exp_avg": "optimizer.state.b.exp_avg",
              "optim/optimizer.state.b.step": "optimizer.state.b.step",
              "optim/optimizer.param_groups.0.lr": "optimizer.param_groups.w.lr"},
     ["dataloader.dp_rank_0", "dataloader.world_size", "optimizer.param_groups.b.lr",
      "train_state.ntokens_seen"]),
    ("model only, flat", {"w", "b"}, "flat", {"model/model.w": "w", "model/model.b": "b"}, []),
    ("unrelated", {"foo", "bar.baz"}, "flat", {}, ["bar.baz", "foo"]),
])
def test_map_keys(name, saved, layout, keys, unmapped):
    mapping = map_keys(saved, LIVE, GROUPS)
    assert mapping.layout == layout, name
    assert mapping.keys == keys, name
    assert mapping.unmapped == unmapped, name
    assert mapping.missing == sorted(k for k in LIVE if k not in keys and not k.endswith(".params"))


_FQN = st.lists(st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,3}){0,2}", fullmatch=True)
                .filter(lambda f: f.split(".", 1)[0] not in ("model", "optimizer", "lr_scheduler",
                                                              "scheduler", "dataloader",
                                                              "train_state")),
                min_size=1, max_size=6, unique=True)


@given(fqns=_FQN, layout=st.sampled_from(["state_dict", "index", "torchtitan"]))
def test_map_keys_maps_every_live_key_of_a_checkpoint_in_a_known_layout(fqns, layout):
    live = [f"model/model.{f}" for f in fqns]
    live += [f"optim/optimizer.state.{f}.{k}" for f in fqns for k in ("exp_avg", "step")]
    live += ["optim/optimizer.param_groups.0.lr", "optim/optimizer.param_groups.0.params"]
    model = {f"model.{f}" for f in fqns} if layout != "torchtitan" else set(fqns)
    if layout == "index":
        state = {f"optimizer.state.{i}.{k}" for i in range(len(fqns)) for k in ("exp_avg", "step")}
    else:
        state = {f"optimizer.state.{f}.{k}" for f in fqns for k in ("exp_avg", "step")}
    group = {"optimizer.param_groups.0.lr"} if layout != "torchtitan" else \
        {f"optimizer.param_groups.{f}.lr" for f in fqns}
    mapping = map_keys(model | state | group, live, {"optimizer": [fqns]})
    assert mapping.missing == []
    assert len(set(mapping.keys.values())) == len(mapping.keys) == len(live) - 1
    assert set(mapping.keys.values()) <= model | state | group


@pytest.mark.parametrize("saved,scheduler", [
    ({"w", "lr_scheduler.last_epoch"}, "lr_scheduler"),
    ({"model.w", "scheduler.base_lrs", "scheduler.last_epoch"}, "scheduler"),
    ({"model.w"}, None),
])
def test_map_keys_finds_the_scheduler_entry(saved, scheduler):
    assert map_keys(saved, LIVE, GROUPS).scheduler == scheduler


def test_map_keys_maps_onto_one_model_only():
    with pytest.raises(StateMismatchError, match="one model"):
        map_keys({"model.w"}, ["model/a.w", "model/b.w"])


@pytest.mark.parametrize("saved,layout,keys", [
    ({"model.w", "optimizer.state.w.step"}, "state_dict", {"w": "model.w"}),
    ({"w", "layers.0.x", "optimizer.state.w.step", "train_state.step", "lr_scheduler.last_epoch",
      "dataloader.dp_rank_0"}, "flat", {"w": "w", "layers.0.x": "layers.0.x"}),
])
def test_weight_keys(saved, layout, keys):
    assert weight_keys(saved) == (layout, keys)


# -- end to end: a small Llama-like model named like torchtitan's ------------------------------

class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = nn.Module()
        for n in ("wq", "wk", "wv", "wo"):
            setattr(self.attention, n, nn.Linear(dim, dim, bias=False))
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(dim, 2 * dim, bias=False)
        self.feed_forward.w2 = nn.Linear(2 * dim, dim, bias=False)
        self.attention_norm = nn.LayerNorm(dim)
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention
        h = self.attention_norm(x)
        x = x + a.wo(a.wv(h) * torch.sigmoid(a.wq(h) * a.wk(h)))
        return x + self.feed_forward.w2(torch.relu(self.feed_forward.w1(self.ffn_norm(x))))


class Tiny(nn.Module):
    def __init__(self, seed: int, vocab: int = 16, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleDict({"0": Block(dim), "1": Block(dim)})
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 4)


def _run(seed: int) -> tuple[Tiny, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = Tiny(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, _warmup)


def _step(model: Tiny, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
          i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    tokens = torch.randint(0, 16, (2, 5), generator=g)
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(1, 1).flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _flat_optim(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
    """torchtitan's OptimizersContainer.state_dict(): ``state.{fqn}.{k}`` and
    ``param_groups.{fqn}.{k}`` (its get_flat_optim_state_dict)."""
    sd = get_optimizer_state_dict(model, opt)
    flat: dict[str, object] = {}
    for fqn, per_param in sd["state"].items():
        for k, v in per_param.items():
            flat[f"state.{fqn}.{k}"] = v
    for group in sd["param_groups"]:
        for fqn in group["params"]:
            for k, v in group.items():
                if k != "params":
                    flat[f"param_groups.{fqn}.{k}"] = v
    return flat


def save_plain(model, opt, sched, folder, step):
    dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
              "lr_scheduler": sched.state_dict()}, checkpoint_id=str(folder))
    return folder


def save_state_dict_api(model, opt, sched, folder, step):
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd, "lr_scheduler": sched.state_dict()},
             checkpoint_id=str(folder))
    return folder


def save_torchtitan(model, opt, sched, folder, step):
    """torchtitan's CheckpointManager layout: ``<folder>/step-<n>``, the model's FQNs at the top
    (ModelWrapper, flattened), ``optimizer`` FQN-keyed and flat, ``lr_scheduler``
    ``{"last_epoch"}``, ``dataloader`` ``{"dp_rank_0": pickle bytes, "world_size"}``,
    ``train_state`` ``{"step", "ntokens_seen"}``."""
    sd = {**model.state_dict(), "optimizer": _flat_optim(model, opt),
          "lr_scheduler": {"last_epoch": sched.last_epoch},
          "dataloader": {"dp_rank_0": pickle.dumps({"position": 7}), "world_size": 1},
          "train_state": {"step": step, "ntokens_seen": 10 * step}}
    dcp.save(sd, checkpoint_id=str(folder / f"step-{step}"))
    return folder


LAYOUTS = [save_plain, save_state_dict_api, save_torchtitan]


def _original(tmp_path, save, steps: int = 3):
    """A run trained ``steps`` steps and saved in a foreign layout, then two more steps;
    returns (source path, weights at the save, weights after the two more)."""
    model, opt, sched = _run(0)
    for i in range(steps):
        _step(model, opt, sched, i)
    source = save(model, opt, sched, tmp_path / "foreign", steps)
    at_save = _weights(model)
    for i in range(steps, steps + 2):
        _step(model, opt, sched, i)
    return source, at_save, _weights(model)


@pytest.mark.parametrize("save", LAYOUTS, ids=lambda f: f.__name__)
def test_restore_a_foreign_checkpoint_continues_bit_exactly(tmp_path, save):
    source, at_save, after = _original(tmp_path, save)
    model, opt, sched = _run(1)
    assert not same_tensors(_weights(model), at_save)
    with CheckpointManager(tmp_path / "run") as mgr:
        step = mgr.restore(TrainState(model=model, optimizer=opt, scheduler=sched), source)
        report = mgr.last_restore_report
    assert step == (3 if save is save_torchtitan else 0)
    assert report.loaded == ["model/model", "optim/optimizer", "scheduler"]
    assert same_tensors(_weights(model), at_save)
    for i in range(3, 5):
        _step(model, opt, sched, i)
    assert same_tensors(_weights(model), after)


def test_torchtitan_entries_not_restored_are_reported(tmp_path):
    source, _, _ = _original(tmp_path, save_torchtitan)
    model, opt, sched = _run(1)
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(TrainState(model=model, optimizer=opt, scheduler=sched), source)
        report = mgr.last_restore_report
    assert any(r.startswith("dataloader (a plain pickle") for r in report.refused)
    assert any(r.startswith("train_state (") for r in report.refused)
    assert "train_state.ntokens_seen" in report.unexpected
    assert "rank_0/rng" in report.missing


def _continues_as_the_original(model, opt, sched, at_save, after) -> None:
    """The restored state is the original's at its save, and steps 3 and 4 from it give the
    original's weights after them: the moments, step counts and LR came back too."""
    assert same_tensors(_weights(model), at_save)
    for i in range(3, 5):
        _step(model, opt, sched, i)
    assert same_tensors(_weights(model), after)


@pytest.mark.parametrize("save", LAYOUTS, ids=lambda f: f.__name__)
def test_a_run_can_start_from_a_foreign_checkpoint(tmp_path, save):
    source, at_save, after = _original(tmp_path, save)
    model, opt, sched = _run(1)
    kw = dict(initial_from=str(source), initial_include=("model", "optimizer", "scheduler"))
    with CheckpointManager(tmp_path / "run", **kw) as mgr:
        assert mgr.restore(TrainState(model=model, optimizer=opt, scheduler=sched)) == 0
        assert mgr.last_restore_report.loaded == ["model/model", "optim/optimizer", "scheduler"]
    _continues_as_the_original(model, opt, sched, at_save, after)


def test_torchtitan_root_restores_its_newest_step(tmp_path):
    model, opt, sched = _run(0)
    _step(model, opt, sched, 0)
    save_torchtitan(model, opt, sched, tmp_path / "tt", 1)
    _step(model, opt, sched, 1)
    save_torchtitan(model, opt, sched, tmp_path / "tt", 2)
    (tmp_path / "tt" / "step-9").mkdir()  # no .metadata: not a checkpoint
    fresh, fopt, fsched = _run(1)
    with CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(TrainState(model=fresh, optimizer=fopt, scheduler=fsched),
                           tmp_path / "tt") == 2
    assert same_tensors(_weights(fresh), _weights(model))
    assert fsched.last_epoch == sched.last_epoch == 2
    assert fsched.state_dict() == sched.state_dict()  # _step_count and the last lr too


@pytest.mark.parametrize("strict", [True, False])
def test_a_checkpoint_that_maps_onto_nothing_is_an_error(tmp_path, strict):
    dcp.save({"encoder": {"proj.weight": torch.ones(2, 2)}, "step": 5},
             checkpoint_id=str(tmp_path / "other"))
    model, opt, _ = _run(1)
    before = _weights(model)
    with CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(StateMismatchError, match=r"'encoder'.*tok_embeddings") as e:
            mgr.restore(TrainState(model=model, optimizer=opt), tmp_path / "other", strict=strict)
    assert "no layout asyncckpt can map" in str(e.value)
    assert same_tensors(_weights(model), before)


def test_a_shape_mismatch_names_the_key(tmp_path):
    source, _, _ = _original(tmp_path, save_state_dict_api)
    model = Tiny(1)
    model.output = nn.Linear(8, 3, bias=False)
    with CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(StateMismatchError, match=r"model/model\.output\.weight"):
            mgr.restore(TrainState(model=model), source)


def test_strict_refuses_missing_keys_and_non_strict_loads_what_matches(tmp_path):
    model, opt, sched = _run(0)
    _step(model, opt, sched, 0)
    dcp.save({"model": {k: v for k, v in model.state_dict().items() if k != "output.weight"}},
             checkpoint_id=str(tmp_path / "partial"))
    fresh, fopt, _ = _run(1)
    with CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(StateMismatchError, match="output.weight"):
            mgr.restore(TrainState(model=fresh, optimizer=fopt), tmp_path / "partial")
        mgr.restore(TrainState(model=fresh, optimizer=fopt), tmp_path / "partial", strict=False)
        report = mgr.last_restore_report
    assert "model/model.output.weight" in report.missing and "optim/optimizer" in report.missing
    assert report.loaded == ["model/model"]
    got, want = _weights(fresh), _weights(model)
    assert torch.equal(got["tok_embeddings.weight"], want["tok_embeddings.weight"])
    assert not torch.equal(got["output.weight"], want["output.weight"])


def test_own_layout_plain_dcp_folder_still_reads_as_before(tmp_path):
    model, opt, sched = _run(0)
    _step(model, opt, sched, 0)
    state = TrainState(model=model, optimizer=opt)
    dcp.save(state.tensors(), checkpoint_id=str(tmp_path / "own"))
    fresh, fopt, _ = _run(1)
    with CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(TrainState(model=fresh, optimizer=fopt), tmp_path / "own") == 0
        assert mgr.last_restore_report.refused == []
    assert same_tensors(_weights(fresh), _weights(model))


def _save_with_torchtitan(root, steps: int = 3):
    """Real torchtitan output (where torchtitan installs): its CheckpointManager saving its
    ModelWrapper, OptimizersContainer (AdamW) and LRSchedulersContainer, plus a train_state;
    returns (weights at the save, weights after two more steps in this process)."""
    pytest.importorskip("torchtitan")
    from torchtitan.components.checkpoint import CheckpointManager as TitanManager
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

    class Progress:
        step, ntokens_seen = 0, 0

        def state_dict(self):
            return {"step": self.step, "ntokens_seen": self.ntokens_seen}

        def load_state_dict(self, sd):
            self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]

    model, progress = Tiny(0), Progress()
    groups = [ParamGroupConfig(pattern=".*", optimizer_name="AdamW",
                               optimizer_kwargs=dict(lr=0.01, weight_decay=0.1))]
    opts = OptimizersContainer(OptimizersContainer.Config(param_groups=groups,
                                                          implementation="for-loop"),
                               model_parts=[model])
    scheds = LRSchedulersContainer(opts, _warmup)
    titan = TitanManager(TitanManager.Config(enable=True, folder="checkpoint", interval=1,
                                             last_save_model_only=False, keep_latest_k=0),
                         dataloader=None, model_parts=[model], optimizers=opts,
                         lr_schedulers=scheds, states={"train_state": progress}, sd_adapter=None,
                         base_folder=str(root))
    for i in range(steps):
        _step(model, opts, scheds, i)
        progress.step += 1
    titan.save(steps)
    at_save = _weights(model)
    for i in range(steps, steps + 2):
        _step(model, opts, scheds, i)
    titan.close()
    return at_save, _weights(model)


def test_real_torchtitan_output_restores_and_continues_bit_exactly(tmp_path):
    at_save, after = _save_with_torchtitan(tmp_path / "titan")
    model, opt, sched = _run(1)
    with CheckpointManager(tmp_path / "run") as mgr:
        step = mgr.restore(TrainState(model=model, optimizer=opt, scheduler=sched),
                           tmp_path / "titan" / "checkpoint")
        assert mgr.last_restore_report.loaded == ["model/model", "optim/optimizer", "scheduler"]
    assert step == 3
    _continues_as_the_original(model, opt, sched, at_save, after)


def test_an_asyncckpt_root_is_never_read_as_a_torchtitan_root(tmp_path):
    from asyncckpt.foreign import find_foreign
    from asyncckpt.storage import Storage

    model, opt, sched = _run(0)
    with CheckpointManager(tmp_path / "run", compression=None) as mgr:
        mgr.save(5, TrainState(model=model)).result(timeout=120)
    (tmp_path / "run" / "step-0000000005" / "manifest.json").unlink()  # as if uncommitted
    assert find_foreign(Storage(str(tmp_path / "run"))) is None
    save_torchtitan(model, opt, sched, tmp_path / "tt", 0)
    assert find_foreign(Storage(str(tmp_path / "tt"))).url.endswith("/step-0")
