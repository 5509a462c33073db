"""Restore is all or nothing: when it raises, the live state is exactly as it was.

Each case makes a checkpoint that fails late (an object item a live object refuses, with
checksums that match because the writer computed them; a damaged file read after others),
then checks that model, optimizer, scheduler, RNG and ``extra`` are untouched by the failed
restore, and that ``restore("latest")`` falls back to the older checkpoint instead.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.state import PARTS, to_blob

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:Detected call of .lr_scheduler.step")]


def _state(seed: int, scheduler: str = "step", **kw: Any) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    sched = (torch.optim.lr_scheduler.StepLR(opt, step_size=3) if scheduler == "step"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e))
    sched.step()
    return TrainState(model=model, optimizer=opt, scheduler=sched, extra={"seed": seed}, **kw)


class _BadRng(TrainState):
    """Writes an RNG item that unpickles fine but that no generator accepts."""

    def objects(self, rank: int, parts: Any = PARTS) -> dict[str, Any]:
        out = super().objects(rank, parts)
        if f"rank_{rank}/rng" in out:
            out[f"rank_{rank}/rng"] = to_blob({"python": [3, [1, 2]], "torch": torch.zeros(5, dtype=torch.uint8)})
        return out


def _bad_rng_state(seed: int) -> TrainState:
    good = _state(seed)
    return _BadRng(model=good.models["model"], optimizer=good.optimizers["optimizer"],
                   scheduler=good.schedulers["scheduler"], extra={"seed": seed})


def _snapshot(state: TrainState) -> dict[str, Any]:
    return {"model": {k: v.clone() for k, v in state.models["model"].state_dict().items()},
            "optim": repr(state.optimizers["optimizer"].state_dict()),
            "sched": repr(state.schedulers["scheduler"].state_dict()),
            "extra": dict(state.extra), "torch_rng": torch.get_rng_state().clone(),
            "py_rng": random.getstate(), "np_rng": repr(np.random.get_state())}


def _assert_same(before: dict[str, Any], state: TrainState) -> None:
    after = _snapshot(state)
    assert after["model"].keys() == before["model"].keys()
    for k, v in before["model"].items():
        assert torch.equal(after["model"][k], v), f"model {k} changed"
    for k in ("optim", "sched", "extra", "py_rng", "np_rng"):
        assert after[k] == before[k], f"{k} changed"
    assert torch.equal(after["torch_rng"], before["torch_rng"]), "torch RNG changed"


def _root(tmp_path: Path, last: TrainState, compression: str | None = "zstd") -> Path:
    root = tmp_path / "ckpt"
    with CheckpointManager(root, compression=compression, writer_threads=3) as mgr:
        mgr.save(1, _state(1), blocking=True)
        mgr.save(2, last, blocking=True)
    return root


def _live() -> TrainState:
    state = _state(9)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    return state


def test_an_rng_item_no_generator_accepts_leaves_the_live_state_untouched(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _root(tmp_path, _bad_rng_state(2))
    state = _live()
    before = _snapshot(state)
    with CheckpointManager(root) as mgr:
        with pytest.raises(CorruptCheckpointError) as info:
            mgr.restore(state, 2)
        assert "rank_0/rng" in str(info.value) and "step-0000000002/" in str(info.value)
        _assert_same(before, state)
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            assert mgr.restore(state) == 1  # "latest" falls back past it
    assert any("step=2 is damaged" in r.getMessage() and "rank_0/rng" in r.getMessage()
               for r in caplog.records)
    assert state.extra == {"seed": 1}


def test_a_scheduler_state_the_live_scheduler_refuses_leaves_everything_untouched(tmp_path: Path) -> None:
    root = _root(tmp_path, _state(2))
    state = _state(9, scheduler="lambda")  # a StepLR state does not load into a LambdaLR
    random.seed(5)
    before = _snapshot(state)
    with CheckpointManager(root) as mgr, pytest.raises(CorruptCheckpointError, match="scheduler"):
        mgr.restore(state, 2)
    _assert_same(before, state)


@pytest.mark.parametrize("compression", ["zstd", None], ids=["zstd", "plain"])
def test_a_damaged_file_read_after_others_leaves_the_model_untouched(tmp_path: Path,
                                                                     compression: str | None) -> None:
    root = _root(tmp_path, _state(2), compression)
    shards = sorted((root / "step-0000000002").glob("*.distcp"))
    assert len(shards) >= 2  # so that some file would be read before the damaged one
    for shard in shards:
        original = shard.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x10
        shard.write_bytes(bytes(damaged))
        try:
            state = _live()
            before = _snapshot(state)
            with CheckpointManager(root, lease=False) as mgr, \
                    pytest.raises(CorruptCheckpointError, match=shard.name):
                mgr.restore(state, 2)
            _assert_same(before, state)
        finally:
            shard.write_bytes(original)


def test_a_whole_checkpoint_still_restores_everything(tmp_path: Path) -> None:
    saved = _state(2)
    root = _root(tmp_path, saved)
    state = _live()
    with CheckpointManager(root) as mgr:
        assert mgr.restore(state, 2) == 2
    for k, v in saved.models["model"].state_dict().items():
        assert torch.equal(state.models["model"].state_dict()[k], v)
    assert state.extra == {"seed": 2}
    assert state.schedulers["scheduler"].state_dict() == saved.schedulers["scheduler"].state_dict()
