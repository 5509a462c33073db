"""Fuzzing a real committed checkpoint: hypothesis flips, cuts and inserts bytes in each of its
files, and rewrites values of its manifest (resealed or not).  Whatever the damage:

- ``restore(state, 2)`` either returns 2 with the state exactly as saved, or raises one of
  asyncckpt's errors and leaves the live state as it was;
- ``restore(state)`` ("latest") never raises: it restores step 2 or falls back to step 1;
- ``verify()`` and ``list()`` raise nothing but asyncckpt's errors.

With ``ASYNCCKPT_FUZZ_LOG`` set, each example's outcome is appended there as a JSON line
(docs/RELIABILITY.md quotes the counts of the last long run; ``-m slow`` runs 600 examples).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.errors import AsyncCkptError
from asyncckpt.manifest import MANIFEST_NAME, seal
from helpers.training import adam_state

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEP2 = "step-0000000002"
FAST, SLOW = 40, 600


def _state(seed: int) -> TrainState:
    return adam_state(seed, extra={"seed": seed, "hist": [float(seed)] * 5})


def _snapshot(state: TrainState) -> dict[str, Any]:
    model, opt = state.models["model"], state.optimizers["optimizer"]
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": [{k: v.clone() for k, v in s.items()} for s in opt.state.values()],
            "sched": dict(state.schedulers["scheduler"].state_dict()) if state.schedulers else None,
            "extra": json.dumps(state.extra, sort_keys=True)}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["model"].keys() == b["model"].keys()
            and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            and len(a["opt"]) == len(b["opt"])
            and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                    for x, y in zip(a["opt"], b["opt"]))
            and a["extra"] == b["extra"])


@pytest.fixture(scope="module", params=["zstd", None], ids=["zstd", "plain"])
def pristine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}") / "ckpt"
    with CheckpointManager(root, compression=request.param) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step), blocking=True)
    return root


MUTATIONS = st.sampled_from(["flip", "truncate", "insert", "json value", "json value resealed"])
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def _mutate(folder: Path, data: st.DataObject) -> str:
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    name = data.draw(st.sampled_from(names), label="file")
    how = data.draw(MUTATIONS, label="mutation")
    path = folder / name
    raw = bytearray(path.read_bytes())
    if how.startswith("json") and name == MANIFEST_NAME:
        doc = json.loads(raw)
        key = data.draw(st.sampled_from(sorted(doc)), label="key")
        if key == "files" and doc["files"] and data.draw(st.booleans(), label="inside a file"):
            entry = data.draw(st.sampled_from(doc["files"]), label="entry")
            entry[data.draw(st.sampled_from(sorted(entry)), label="field")] = data.draw(JSON_VALUES)
        else:
            doc[key] = data.draw(JSON_VALUES, label="value")
        path.write_text(json.dumps(seal(doc) if how.endswith("resealed") else doc))
        return f"{name}: {how}"
    if not raw:
        return f"{name}: empty, left"
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    if how == "truncate":
        del raw[pos:]
    elif how == "insert":
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
    else:
        raw[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path.write_bytes(bytes(raw))
    return f"{name}: {how if how in ('flip', 'truncate', 'insert') else 'flip'}"


def _log(record: dict[str, Any]) -> None:
    target = os.environ.get("ASYNCCKPT_FUZZ_LOG")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps(record) + "\n")


def _one_example(pristine: Path, data: st.DataObject) -> None:
    saved = _snapshot(_state(2))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(pristine, Path(tmp) / "ckpt"))
        what = _mutate(root / STEP2, data)
        outcome = "restored"
        with CheckpointManager(root) as mgr:
            state = _state(9)
            before = _snapshot(state)
            try:
                assert mgr.restore(state, 2) == 2
                assert _same(_snapshot(state), saved), f"{what}: restored different values"
            except AsyncCkptError as e:
                outcome = type(e).__name__
                assert _same(_snapshot(state), before), f"{what}: {outcome} after changing the state"
            latest = _state(9)
            step = mgr.restore(latest)
            assert step in (1, 2), what
            assert _same(_snapshot(latest), _snapshot(_state(step)) if step == 1 else saved), what
            for call in (mgr.verify, mgr.list):
                try:
                    call()
                except AsyncCkptError:
                    pass
        _log({"mutation": what, "outcome": outcome, "latest": step})


@settings(max_examples=FAST, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_any_damage_restores_exactly_or_raises_ours_leaving_the_state(pristine: Path,
                                                                      data: st.DataObject) -> None:
    _one_example(pristine, data)


@pytest.mark.slow
@settings(max_examples=SLOW, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_any_damage_long_run(pristine: Path, data: st.DataObject) -> None:
    _one_example(pristine, data)
