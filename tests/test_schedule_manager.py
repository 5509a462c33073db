"""``CheckpointManager.maybe_save`` driven by a ``Schedule``; ``from_config``.

Tests that need time give the manager their own clock (``clock=``, the option a simulation
uses too): ``FakeTime``, which moves only when the test moves it.  The cost of a save is
made real the same way: a scheduler in the TrainState whose ``state_dict()`` (run inside
``save()``) takes two seconds on that clock.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, Schedule, TrainState, plan_checkpoints
from asyncckpt.errors import ConfigError


class FakeTime:
    """Monotonic seconds that move only when the test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowToSave:
    """A stateful object whose ``state_dict()`` takes ``cost_s`` on the test's clock."""

    def __init__(self, clock: FakeTime, cost_s: float) -> None:
        self.clock, self.cost_s = clock, cost_s

    def state_dict(self) -> dict:
        self.clock.now += self.cost_s
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


def _state(layers: int = 1) -> TrainState:
    torch.manual_seed(0)
    return TrainState(model=nn.Sequential(*(nn.Linear(16, 16) for _ in range(layers))))


def _committed(mgr: CheckpointManager) -> dict[int, tuple[str, ...]]:
    mgr.wait()
    return {info.step: tuple(info.tags) for info in mgr.list()}


def test_maybe_save_follows_every_rule(tmp_path: Path, clock: FakeTime) -> None:
    schedule = Schedule(every_n_steps=10, every_seconds=100.0, at_steps=[3, 7], on_epoch_end=True)
    state = _state()
    with CheckpointManager(tmp_path / "ckpt", schedule=schedule, clock=clock) as mgr:
        saved = []
        for step in range(1, 26):
            clock.now += 1.0 if step != 15 else 200.0  # a slow step 15: every_seconds fires
            if mgr.maybe_save(step, state, epoch=step // 12, epoch_end=step % 12 == 0) is not None:
                saved.append(step)
        assert saved == [3, 7, 10, 12, 15, 20, 24]
        tags = _committed(mgr)
        assert tags[12] == ("epoch_end",) and tags[24] == ("epoch_end",) and tags[10] == ()
        # force saves a step the schedule skips, but never one already saved
        assert mgr.maybe_save(26, state, force=True, tags=["final"]) is not None
        assert mgr.maybe_save(26, state, force=True) is None
        assert _committed(mgr)[26] == ("final",)


def test_milestones_with_a_growing_model(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(16, 16))  # 272 parameters
    state = TrainState(model=model)
    schedule = Schedule(param_milestones="1K,5K,20K")
    grow_to = {3: 4, 6: 80}  # step -> layers: 1088 (1K), then 21760 (5K and 20K at once)
    with CheckpointManager(tmp_path / "ckpt", schedule=schedule) as mgr:
        saved = []
        for step in range(1, 10):
            while len(model) < grow_to.get(step, len(model)):
                model.append(nn.Linear(16, 16))
            if mgr.maybe_save(step, state) is not None:
                saved.append(step)
        assert saved == [3, 6]
        tags = _committed(mgr)
        assert tags == {3: ("milestone:1K",), 6: ("milestone:5K", "milestone:20K")}
        counts = {s: json.loads((tmp_path / "ckpt" / f"step-{s:010d}" / "manifest.json").read_text())["param_count"]
                  for s in (3, 6)}
        assert counts == {3: 1088, 6: 21760}

    # a restart remembers the milestones reached: by the restored count ...
    grown = _state(layers=80)
    with CheckpointManager(tmp_path / "ckpt", schedule=schedule) as mgr:
        assert mgr.restore(grown) == 6
        assert all(mgr.maybe_save(step, grown) is None for step in range(7, 12))
    # ... and by the tags of the restored manifest (here the restored model has
    # frozen layers, so its trainable count is below the milestones it passed)
    small = _state(layers=80)
    for layer in list(small.models["model"])[1:]:
        layer.requires_grad_(False)
    with CheckpointManager(tmp_path / "ckpt", schedule=Schedule(param_milestones="1K,5K,20K,30K")) as mgr:
        assert mgr.restore(small) == 6
        assert small.trainable_param_count() == 272
        assert mgr.maybe_save(7, small) is None
        for layer in small.models["model"]:
            layer.requires_grad_(True)
        assert mgr.maybe_save(8, small) is None  # 21760 trainable: 20K already reached


def test_milestone_passed_before_a_later_plain_save_is_not_saved_again_after_restart(
        tmp_path: Path) -> None:
    """1K fires at step 1; step 5 is a plain save (no milestone tag).  A restart from step 5
    with layers frozen counts fewer trainable parameters than 1K: unfreezing them must not
    fire 1K a second time (the earlier checkpoint's tag says it was reached)."""
    schedule = Schedule(param_milestones="1K")
    state = _state(layers=4)                                   # 1088 trainable
    with CheckpointManager(tmp_path / "ckpt", schedule=schedule) as mgr:
        assert mgr.maybe_save(1, state) is not None
        mgr.save(5, state).result(timeout=120)
        assert _committed(mgr) == {1: ("milestone:1K",), 5: ()}
    frozen = _state(layers=4)
    for layer in list(frozen.models["model"])[1:]:
        layer.requires_grad_(False)
    with CheckpointManager(tmp_path / "ckpt", schedule=schedule) as mgr:
        assert mgr.restore(frozen) == 5 and frozen.trainable_param_count() == 272
        for layer in frozen.models["model"]:
            layer.requires_grad_(True)
        assert mgr.maybe_save(6, frozen) is None
        assert sorted(_committed(mgr)) == [1, 5]
    raw = json.loads((tmp_path / "ckpt" / "step-0000000005" / "manifest.json").read_text())
    assert raw["milestones_reached"] == [1000]                 # step 5 remembers step 1's milestone


def test_auto_mode_saves_at_the_measured_interval(tmp_path: Path, clock: FakeTime,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """1 s steps, 2 s per save, at most 10% overhead: a save every 20 steps."""
    state = TrainState(model=_state().models["model"], scheduler=SlowToSave(clock, 2.0))
    with CheckpointManager(tmp_path / "ckpt", schedule=Schedule(auto=True, max_overhead=0.1),
                           clock=clock) as mgr:
        saved = []
        with caplog.at_level(logging.INFO, logger="asyncckpt.manager"):
            for step in range(1, 70):
                clock.now += 1.0
                if mgr.maybe_save(step, state) is not None:
                    saved.append(step)
        assert saved == [2, 22, 42, 62]  # step 2: the first save measures the cost
        picked = [r.getMessage() for r in caplog.records if "auto checkpoint interval" in r.getMessage()]
        assert len(picked) == 1  # logged once: the interval did not change
        assert "step=2 rank=0: auto checkpoint interval 20 steps" in picked[0]
        assert "10.00% of training (2 s/save, 1 s/step)" in picked[0]


def test_auto_mode_young_daly(tmp_path: Path, clock: FakeTime, caplog: pytest.LogCaptureFixture) -> None:
    """MTBF 15 min, 2 s per save: sqrt(2 * 2 s * 900 s) = 60 s = 60 steps of 1 s."""
    state = TrainState(model=_state().models["model"], scheduler=SlowToSave(clock, 2.0))
    schedule = Schedule(auto=True, max_overhead=0.1, mtbf_hours=0.25)
    with CheckpointManager(tmp_path / "ckpt", schedule=schedule, clock=clock) as mgr:
        with caplog.at_level(logging.INFO, logger="asyncckpt.manager"):
            saved = []
            for step in range(1, 130):
                clock.now += 1.0
                if mgr.maybe_save(step, state) is not None:
                    saved.append(step)
        assert saved == [2, 62, 122]
        assert any("auto checkpoint interval 60 steps: Young-Daly" in r.getMessage() for r in caplog.records)


def test_from_config_builds_a_working_manager(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(f"""\
training:
  epochs: 2
  steps_per_epoch: 100
  target_checkpoints: 12
  min_checkpoint_interval: 10
  auto_generate_checkpoints: true
checkpoint:
  root: {tmp_path / "ckpt"}
  compression: null
  retention: {{keep_last: 2}}
  schedule: {{on_epoch_end: true}}
""")
    plan = plan_checkpoints(200, 100, target=12, min_interval=10)
    state = _state()
    with CheckpointManager.from_config(config) as mgr:
        assert mgr.schedule == Schedule(at_steps=plan, on_epoch_end=True)
        assert mgr.options.compression is None and mgr.retention.keep_last == 2
        saved = [s for s in range(1, 201) if mgr.maybe_save(s, state, epoch_end=s % 100 == 0) is not None]
        assert saved == plan
        assert sorted(_committed(mgr)) == plan[-2:]  # retention kept the newest two
    with CheckpointManager.from_config({"checkpoint": {"root": str(tmp_path / "ckpt")}},
                                       save_on_signal=False) as mgr:
        assert mgr.schedule is None and [i.step for i in mgr.list()] == plan[-2:]


def test_from_config_resolves_a_relative_root_against_the_files_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "exp").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "exp" / "train.yaml").write_text("checkpoint:\n  root: runs/ckpt\n  compression: null\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    for config in (tmp_path / "exp" / "train.yaml", Path("../exp/train.yaml")):  # the file's path either way
        with CheckpointManager.from_config(config) as mgr:
            mgr.save(len(mgr.list()) + 1, _state(), blocking=True)
    assert sorted(p.name for p in (tmp_path / "exp" / "runs" / "ckpt").glob("step-*")) == \
        ["step-0000000001", "step-0000000002"]
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_from_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CheckpointManager.from_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoint:\n  root: x\n  keep_last: 3\n")
    with pytest.raises(ValueError, match="bad.yaml: checkpoint: unknown key 'keep_last'"):
        CheckpointManager.from_config(bad)


@pytest.mark.parametrize("kwargs", [{"epoch_end": "yes"}, {"force": 1}, {"epoch_end": None}])
def test_maybe_save_flags_must_be_booleans(tmp_path: Path, kwargs: dict) -> None:
    (name, value), = kwargs.items()
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        with pytest.raises(ConfigError, match=f"{name}.*{value!r}.*True or False"):
            mgr.maybe_save(1, _state(), **kwargs)
        assert mgr.list() == []


@pytest.mark.parametrize(
    ("data", "quoted"),
    [("checkpoint:\n  root: ckpt  # café\n".encode("latin-1"), "is not valid: not UTF-8 text"),
     (b"checkpoint:\n  root: 5\n", ": checkpoint.root=5 is not valid: expected the checkpoint URL or path"),
     (b"checkpoint:\n  root: ckpt\n  lease_heartbeat_s: 1.0e+30\n", ": checkpoint: lease_heartbeat_s=1e+30"),
     (b"checkpoint:\n  root: ckpt\n  writer_threads: 100000000000000000000\n",
      ": checkpoint: writer_threads=100000000000000000000 is not valid"),
     (b"checkpoint:\n  root: ckpt\n  retention: {keep_last: 2, keep_best: 1, best_metric: [1]}\n",
      ": checkpoint.retention: best_metric=[1] is not valid")],
)
def test_from_config_names_the_file_key_and_value(tmp_path: Path, data: bytes, quoted: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        CheckpointManager.from_config(path)
    assert str(info.value).startswith(str(path)) and quoted in str(info.value)
