"""Tests for asyncckpt.schedule: options, decide(), Young-Daly, plans, milestones."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt.errors import ConfigError
from asyncckpt.schedule import (
    DEFAULT_TARGETS,
    Decision,
    Schedule,
    ScheduleState,
    auto_interval_steps,
    choose_target,
    format_params,
    parse_milestones,
    parse_targets,
    plan_checkpoints,
    size_category,
    young_daly_interval_s,
)

# ---------------------------------------------------------------- Schedule options


def test_schedule_defaults_save_nothing() -> None:
    state = ScheduleState()
    for step in range(1, 50):
        assert state.decide(Schedule(), step=step, now=float(step)) == Decision(save=False)


def test_schedule_normalises_at_steps_and_milestones() -> None:
    s = Schedule(at_steps=[30, 10, 10, 20], param_milestones="1B, 100M,500m")
    assert s.at_steps == (10, 20, 30)
    assert s.param_milestones == (100_000_000, 500_000_000, 1_000_000_000)
    assert Schedule(param_milestones=[2_000, 1_000]).param_milestones == (1_000, 2_000)


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"every_n_steps": -5}, "every_n_steps=-5"),
        ({"every_n_steps": 2.5}, "every_n_steps=2.5"),
        ({"every_n_steps": True}, "every_n_steps=True"),
        ({"every_seconds": 0}, "every_seconds=0"),
        ({"every_seconds": -1.0}, "every_seconds=-1.0"),
        ({"every_seconds": math.inf}, "every_seconds=inf"),
        ({"every_seconds": "60"}, "every_seconds='60'"),
        ({"at_steps": [5, 0]}, "at_steps=[5, 0]"),
        ({"at_steps": [5, "7"]}, "'7'"),
        ({"at_steps": "5"}, "at_steps='5'"),
        ({"at_steps": 5}, "at_steps=5"),
        ({"on_epoch_end": 1}, "on_epoch_end=1"),
        ({"auto": "yes"}, "auto='yes'"),
        ({"param_milestones": "100M,abc"}, "'abc'"),
        ({"param_milestones": [0]}, "0"),
        ({"param_milestones": 7}, "param_milestones=7"),
        ({"max_overhead": 0}, "max_overhead=0"),
        ({"max_overhead": 1.0}, "max_overhead=1.0"),
        ({"max_overhead": -0.1}, "max_overhead=-0.1"),
        ({"mtbf_hours": 0}, "mtbf_hours=0"),
        ({"mtbf_hours": -2.0}, "mtbf_hours=-2.0"),
    ],
)
def test_schedule_rejects_bad_values(kwargs: dict, quoted: str) -> None:
    with pytest.raises(ConfigError, match="not valid") as info:
        Schedule(**kwargs)
    assert quoted in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- decide(): one rule at a time


def _saved_steps(schedule: Schedule, steps: range, dt: float = 1.0) -> list[int]:
    """Drive decide/record_save like the manager does; return the steps saved."""
    state, saved = ScheduleState(), []
    for step in steps:
        now = step * dt
        decision = state.decide(schedule, step=step, now=now)
        if decision.save:
            saved.append(step)
            state.record_save(step, now, milestones=decision.milestones)
    return saved


def test_every_n_steps() -> None:
    assert _saved_steps(Schedule(every_n_steps=25), range(0, 101)) == [25, 50, 75, 100]


def test_every_n_steps_reason() -> None:
    d = ScheduleState().decide(Schedule(every_n_steps=5), step=10, now=0.0)
    assert d == Decision(save=True, reasons=("every_n_steps",))


def test_every_seconds_counts_from_first_decide_then_from_last_save() -> None:
    schedule, state = Schedule(every_seconds=60), ScheduleState()
    assert not state.decide(schedule, step=1, now=1000.0).save  # starts the clock
    assert not state.decide(schedule, step=2, now=1059.9).save
    d = state.decide(schedule, step=3, now=1060.0)
    assert d.save and d.reasons == ("every_seconds",)
    assert state.decide(schedule, step=3, now=1060.0).save  # deciding did not book anything
    state.record_save(3, 1065.0)
    assert not state.decide(schedule, step=4, now=1124.0).save
    assert state.decide(schedule, step=5, now=1125.0).save


def test_every_seconds_with_a_steady_clock() -> None:
    saved = _saved_steps(Schedule(every_seconds=10), range(1, 40), dt=3.0)
    assert saved == [5, 9, 13, 17, 21, 25, 29, 33, 37]


def test_at_steps() -> None:
    assert _saved_steps(Schedule(at_steps=[7, 3, 99]), range(1, 50)) == [3, 7]


def test_on_epoch_end_and_epoch_tag() -> None:
    state = ScheduleState()
    d = state.decide(Schedule(on_epoch_end=True), step=100, now=0.0, epoch_end=True)
    assert d == Decision(save=True, reasons=("epoch_end",), tags=("epoch_end",))
    assert not state.decide(Schedule(on_epoch_end=True), step=101, now=0.0).save
    # Without the rule the tag still describes the step (for a forced or other save).
    d = state.decide(Schedule(every_n_steps=100), step=200, now=0.0, epoch_end=True)
    assert d == Decision(save=True, reasons=("every_n_steps",), tags=("epoch_end",))
    d = state.decide(Schedule(), step=300, now=0.0, epoch_end=True)
    assert d == Decision(save=False, tags=("epoch_end",))


def test_several_rules_fire_together_in_order() -> None:
    schedule = Schedule(every_n_steps=10, at_steps=[20], on_epoch_end=True, param_milestones="1K")
    d = ScheduleState().decide(schedule, step=20, now=0.0, epoch_end=True, param_count=1_000)
    assert d.reasons == ("every_n_steps", "at_steps", "epoch_end", "milestone")
    assert d.tags == ("epoch_end", "milestone:1K")


def test_step_already_saved_is_not_saved_again() -> None:
    schedule, state = Schedule(every_n_steps=10, param_milestones="1K"), ScheduleState()
    state.record_save(10, 0.0)
    d = state.decide(schedule, step=10, now=1.0, param_count=5_000)
    assert d == Decision(save=False)
    d = state.decide(schedule, step=11, now=1.0, param_count=5_000)
    assert d.reasons == ("milestone",) and d.milestones == (1_000,)


# ---------------------------------------------------------------- milestones


def test_milestones_with_a_growing_model() -> None:
    schedule = Schedule(param_milestones="100M,500M,1B,1.5B")
    state, saves = ScheduleState(), []
    counts = [50_000_000, 99_999_999, 100_000_000, 200_000_000, 300_000_000, 1_200_000_000, 1_300_000_000]
    for step, count in enumerate(counts, start=1):
        d = state.decide(schedule, step=step, now=float(step), param_count=count)
        if d.save:
            assert d.reasons == ("milestone",)
            saves.append((step, d.tags))
            state.record_save(step, float(step), milestones=d.milestones)
    # 100M once at step 3; 500M and 1B jumped over together at step 6: one save, both tags.
    assert saves == [(3, ("milestone:100M",)), (6, ("milestone:500M", "milestone:1.0B"))]
    assert state.milestones_reached == {100_000_000, 500_000_000, 1_000_000_000}


def test_milestone_repeats_until_a_save_is_recorded() -> None:
    schedule, state = Schedule(param_milestones="1M"), ScheduleState()
    assert state.decide(schedule, step=1, now=0.0, param_count=2_000_000).milestones == (1_000_000,)
    assert state.decide(schedule, step=2, now=0.0, param_count=2_000_000).milestones == (1_000_000,)
    state.record_save(2, 0.0, milestones=(1_000_000,))
    assert not state.decide(schedule, step=3, now=0.0, param_count=2_000_000).save


def test_milestones_after_restart() -> None:
    schedule = Schedule(param_milestones=[100, 200, 300])
    state = ScheduleState()
    state.mark_milestones(m for m in schedule.param_milestones if m <= 250)  # from the restored manifest
    assert not state.decide(schedule, step=1, now=0.0, param_count=250).save
    d = state.decide(schedule, step=2, now=0.0, param_count=300)
    assert d.tags == ("milestone:300",) and d.milestones == (300,)


def test_milestones_need_a_param_count() -> None:
    assert not ScheduleState().decide(Schedule(param_milestones="1K"), step=1, now=0.0).save


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100M,500M,1B", (100_000_000, 500_000_000, 1_000_000_000)),
        ("1,5,10", (1_000_000_000, 5_000_000_000, 10_000_000_000)),
        ("1.5B, 250k, 2t", (250_000, 1_500_000_000, 2_000_000_000_000)),
        (" 1B ,1000M,.5b", (500_000_000, 1_000_000_000)),
        ("3K", (3_000,)),
        ("1.25m", (1_250_000,)),
    ],
)
def test_parse_milestones(text: str, expected: tuple[int, ...]) -> None:
    assert parse_milestones(text) == expected


def test_parse_milestones_sequence() -> None:
    assert parse_milestones([300, 100, 100, "1K"]) == (100, 300, 1_000)
    assert parse_milestones([]) == ()


@pytest.mark.parametrize(
    ("spec", "piece"),
    [
        ("100M,abc", "'abc'"),
        ("100M,,1B", "''"),
        ("", "''"),
        ("1X", "'1X'"),
        ("-1B", "'-1B'"),
        ("0", "'0'"),
        ("1.5", None),  # fine: 1.5 billion
        ("1.5K5", "'1.5K5'"),
        ("1.0000000001K", "'1.0000000001K'"),  # not a whole count
        ([1, -2], "-2"),
        ([True], "True"),
        ([1.5], "1.5"),
    ],
)
def test_parse_milestones_rejects(spec: object, piece: str | None) -> None:
    if piece is None:
        assert parse_milestones(spec) == (1_500_000_000,)  # type: ignore[arg-type]
        return
    with pytest.raises(ConfigError) as info:
        parse_milestones(spec)  # type: ignore[arg-type]
    message = str(info.value)
    assert f"param_milestones={spec!r}" in message and piece in message


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (1_200_000_000, "1.2B"),
        (1_000_000_000, "1.0B"),
        (1_250_000_000, "1.3B"),  # half up
        (7_000_000_000_000, "7.0T"),
        (500_000_000, "500M"),
        (100_000_000, "100M"),
        (1_500_000, "1.5M"),
        (1_000_001, "1.0M"),
        (999_950_000, "1.0B"),  # rounds to 1000.0M -> next unit
        (999_000_000, "999M"),
        (12_000, "12K"),
        (1_500, "1.5K"),
        (999_999, "1.0M"),
        (999, "999"),
        (0, "0"),
    ],
)
def test_format_params(count: int, text: str) -> None:
    assert format_params(count) == text


def test_format_params_rejects_negative() -> None:
    with pytest.raises(ConfigError, match="count=-1"):
        format_params(-1)


# ---------------------------------------------------------------- Young-Daly and auto mode


def test_young_daly_arithmetic() -> None:
    assert young_daly_interval_s(10.0, 24 * 3600.0) == pytest.approx(1314.53, abs=0.01)
    assert young_daly_interval_s(10.0, 86400.0) == pytest.approx(math.sqrt(2 * 10 * 86400))
    assert young_daly_interval_s(0.0, 86400.0) == 0.0


def test_auto_interval_young_daly_in_steps() -> None:
    steps, why = auto_interval_steps(save_cost_s=10.0, step_s=1.0, mtbf_s=86400.0, max_overhead=0.01)
    assert steps == 1315  # 1314.5 s of 1 s steps; overhead 10/1315 < 1%
    assert "Young-Daly" in why and "1314.5" in why


def test_auto_interval_raised_by_overhead_bound() -> None:
    # MTBF 1 h: Young-Daly says sqrt(2*10*3600) = 268 s, but 10 s per 268 s is 3.7% > 1%.
    steps, why = auto_interval_steps(save_cost_s=10.0, step_s=1.0, mtbf_s=3600.0, max_overhead=0.01)
    assert steps == 1000 and "raised to 1000" in why


@pytest.mark.parametrize(
    ("cost", "step_s", "overhead", "expected"),
    [
        (10.0, 1.0, 0.01, 1000),
        (10.0, 0.5, 0.01, 2000),
        (1.0, 1.0, 0.5, 2),
        (0.0, 1.0, 0.01, 1),
        (0.001, 10.0, 0.01, 1),
    ],
)
def test_auto_interval_overhead_only(cost: float, step_s: float, overhead: float, expected: int) -> None:
    steps, why = auto_interval_steps(save_cost_s=cost, step_s=step_s, max_overhead=overhead)
    assert steps == expected and "Young-Daly" not in why


@given(
    cost=st.floats(0.0, 1e4),
    step_s=st.floats(1e-3, 1e3),
    mtbf=st.none() | st.floats(1.0, 1e7),
    overhead=st.floats(1e-4, 0.99),
)
def test_auto_interval_respects_overhead(
    cost: float, step_s: float, mtbf: float | None, overhead: float
) -> None:
    steps, _ = auto_interval_steps(save_cost_s=cost, step_s=step_s, mtbf_s=mtbf, max_overhead=overhead)
    assert steps >= 1
    assert cost / (steps * step_s) <= overhead * (1 + 1e-6)


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"save_cost_s": -1.0, "step_s": 1.0, "max_overhead": 0.01}, "save_cost_s=-1.0"),
        ({"save_cost_s": 1.0, "step_s": 0.0, "max_overhead": 0.01}, "step_s=0.0"),
        ({"save_cost_s": 1.0, "step_s": 1.0, "max_overhead": 2.0}, "max_overhead=2.0"),
        ({"save_cost_s": 1.0, "step_s": 1.0, "max_overhead": 0.1, "mtbf_s": -3.0}, "mtbf_s=-3.0"),
    ],
)
def test_auto_interval_rejects(kwargs: dict, quoted: str) -> None:
    with pytest.raises(ConfigError, match="not valid") as info:
        auto_interval_steps(**kwargs)
    assert quoted in str(info.value)


def test_auto_mode_measures_then_follows_interval() -> None:
    schedule, state = Schedule(auto=True, max_overhead=0.1), ScheduleState()
    assert not state.decide(schedule, step=1, now=0.0).save  # nothing measured yet
    state.record_step(1.0)
    d = state.decide(schedule, step=1, now=1.0)
    assert d.reasons == ("auto",)  # the first save measures the stall
    state.record_save(1, 1.0, stall_s=2.0)
    assert state.auto_interval(schedule)[0] == 20  # 2 s stall <= 10% of 20 steps of 1 s
    saved = [s for s in range(2, 60) if state.decide(schedule, step=s, now=float(s)).save]
    assert saved[0] == 21  # 20 steps after the save at step 1


def test_auto_mode_with_mtbf() -> None:
    schedule = Schedule(auto=True, mtbf_hours=24.0)
    state = ScheduleState(step_s=1.0, stall_s=10.0, last_save_step=100)
    assert state.auto_interval(schedule)[0] == 1315
    assert not state.decide(schedule, step=1414, now=0.0).save
    assert state.decide(schedule, step=1415, now=0.0).reasons == ("auto",)


def test_auto_mode_after_a_restore_measures_again() -> None:
    schedule, state = Schedule(auto=True), ScheduleState()
    state.record_save(5, 0.0)  # a restore: no stall measured, so no interval yet
    assert state.auto_interval(schedule) is None
    assert not state.decide(schedule, step=6, now=0.0).save  # no step time yet either
    state.record_step(1.0)
    assert not state.decide(schedule, step=5, now=0.0).save  # the restored step itself
    assert state.decide(schedule, step=7, now=0.0).reasons == ("auto",)  # save once to measure
    state.record_save(7, 0.0, stall_s=5.0)
    assert state.auto_interval(schedule)[0] == 500  # 5 s <= 1% of 500 steps of 1 s


def test_tick_measures_step_time_without_the_save_stall() -> None:
    state = ScheduleState()
    state.tick(10, now=100.0)
    assert state.step_s is None  # one call measures nothing
    state.tick(12, now=104.0)
    assert state.step_s == 2.0  # 4 s over 2 steps
    state.record_save(12, 104.0, stall_s=3.0)
    state.tick(13, now=109.0)  # 5 s, of which 3 s were the save
    assert state.step_s == pytest.approx(0.7 * 2.0 + 0.3 * 2.0)
    state.tick(13, now=200.0)  # same step again (or a rewind): no measurement
    state.tick(5, now=300.0)
    assert state.step_s == pytest.approx(2.0)


def test_interval_change_reports_new_and_moved_intervals() -> None:
    schedule = Schedule(auto=True, max_overhead=0.1)
    state = ScheduleState()
    assert state.interval_change(schedule) is None  # nothing measured
    state.record_step(1.0)
    state.record_save(1, 0.0, stall_s=2.0)
    assert state.interval_change(schedule)[0] == 20
    assert state.interval_change(schedule) is None  # reported already
    state.step_s = 0.97  # 21 steps: within 10% of 20
    assert state.interval_change(schedule) is None
    state.step_s = 0.5  # 40 steps
    steps, why = state.interval_change(schedule)
    assert steps == 40 and "10.00%" in why


def test_record_step_and_stall_are_moving_averages() -> None:
    state = ScheduleState()
    state.record_step(1.0)
    assert state.step_s == 1.0
    state.record_step(2.0)
    assert 1.0 < state.step_s < 2.0
    state.record_save(1, 0.0, stall_s=4.0)
    state.record_save(2, 0.0, stall_s=0.0)
    assert 0.0 < state.stall_s < 4.0


@pytest.mark.parametrize(
    ("call", "quoted"),
    [
        (lambda s: s.record_step(-1.0), "step_s=-1.0"),
        (lambda s: s.record_step(math.nan), "step_s=nan"),
        (lambda s: s.record_save(-1, 0.0), "step=-1"),
        (lambda s: s.record_save(1, 0.0, stall_s=-2.0), "stall_s=-2.0"),
        (lambda s: s.mark_milestones([5, 0]), "milestone=0"),
        (lambda s: s.decide(Schedule(), step=-3, now=0.0), "step=-3"),
        (
            lambda s: s.decide(Schedule(param_milestones="1K"), step=1, now=0.0, param_count=-1),
            "param_count=-1",
        ),
    ],
)
def test_state_rejects(call, quoted: str) -> None:
    with pytest.raises(ConfigError) as info:
        call(ScheduleState())
    assert quoted in str(info.value)


# ---------------------------------------------------------------- plans


def test_plan_forced_steps_only() -> None:
    assert plan_checkpoints(3000, 1000) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000]
    assert plan_checkpoints(2500, 1000, log_steps_first_epoch=False) == [1000, 2000, 2500]
    assert plan_checkpoints(5, 1000) == [1, 2, 4, 5]


def test_plan_fills_largest_gaps_first() -> None:
    plan = plan_checkpoints(4000, 1000, target=6, log_steps_first_epoch=False)
    assert plan == [500, 1000, 1500, 2000, 3000, 4000]  # ties go to the earliest gap
    plan = plan_checkpoints(4000, 1000, target=9, log_steps_first_epoch=False)
    assert plan == [250, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000]


def test_plan_stops_when_no_gap_has_room() -> None:
    plan = plan_checkpoints(1000, 1000, target=50, log_steps_first_epoch=False, min_interval=100)
    assert plan == [125, 250, 375, 500, 625, 750, 875, 1000]  # halving 125 would give 62 < 100


@pytest.mark.parametrize(
    ("tokens", "category"),
    [
        (0, "small"),
        (9_999_999, "small"),
        (10_000_000, "medium"),
        (24_999_999, "medium"),
        (25_000_000, "large"),
        (50_000_000, "large"),
        (50_000_001, "xlarge"),
        (10**12, "xlarge"),
    ],
)
def test_size_category(tokens: int, category: str) -> None:
    assert size_category(tokens) == category


@pytest.mark.parametrize(
    ("tokens", "category"),
    [(5_000_000, "small"), (20_000_000, "medium"), (40_000_000, "large"), (10**9, "xlarge")],
)
def test_plan_target_from_dataset_size(tokens: int, category: str) -> None:
    plan = plan_checkpoints(1_000_000, 100_000, dataset_tokens=tokens, log_steps_first_epoch=False)
    assert len(plan) == DEFAULT_TARGETS[category]  # 10 forced epoch ends, the rest filled


def test_plan_targets_override() -> None:
    assert len(plan_checkpoints(1_000_000, 100_000, dataset_tokens=1, targets={"small": 35})) == 35
    assert len(plan_checkpoints(1_000_000, 100_000, dataset_tokens=1, targets="small:40")) == 40
    # a partial override keeps the other defaults
    assert len(plan_checkpoints(1_000_000, 100_000, dataset_tokens=10**9, targets={"small": 35})) == 200
    # an explicit target wins over the dataset size
    assert len(plan_checkpoints(1_000_000, 100_000, target=30, dataset_tokens=10**9)) == 30


def test_plan_target_below_forced_keeps_forced() -> None:
    assert plan_checkpoints(3000, 1000, target=1, log_steps_first_epoch=False) == [1000, 2000, 3000]


def test_plan_large_target_is_exact() -> None:
    plan = plan_checkpoints(10_000_000, 100_000, target=10_000, min_interval=100)
    assert len(plan) == 10_000 and plan == sorted(set(plan))


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"total_steps": 0, "steps_per_epoch": 10}, "total_steps=0"),
        ({"total_steps": 10, "steps_per_epoch": 0}, "steps_per_epoch=0"),
        ({"total_steps": 10, "steps_per_epoch": 10, "min_interval": 0}, "min_interval=0"),
        ({"total_steps": 10, "steps_per_epoch": 10, "target": -1}, "target=-1"),
        ({"total_steps": 10, "steps_per_epoch": 10, "dataset_tokens": -5}, "dataset_tokens=-5"),
        ({"total_steps": 10, "steps_per_epoch": 10, "targets": {"huge": 5}}, "targets={'huge': 5}"),
        ({"total_steps": 10, "steps_per_epoch": 10, "targets": {"small": -5}}, "targets={'small': -5}"),
        ({"total_steps": 10, "steps_per_epoch": 10, "targets": "small=5"}, "targets='small=5'"),
    ],
)
def test_plan_rejects(kwargs: dict, quoted: str) -> None:
    with pytest.raises(ConfigError, match="not valid") as info:
        plan_checkpoints(**kwargs)
    assert quoted in str(info.value)


def test_parse_targets() -> None:
    assert parse_targets("small:10,medium:20,large:30,xlarge:40") == {
        "small": 10, "medium": 20, "large": 30, "xlarge": 40,
    }
    assert parse_targets(" Large : 7 ") == {"large": 7}
    assert parse_targets("small:0") == {"small": 0}


@pytest.mark.parametrize(
    ("text", "piece"),
    [
        ("small:10,huge:5", "'huge:5'"),
        ("small:ten", "'small:ten'"),
        ("small:-3", "'small:-3'"),
        ("small:1.5", "'small:1.5'"),
        ("small", "'small'"),
        ("small:1,small:2", "'small:2'"),
        ("", "''"),
        ("small:1,", "''"),
    ],
)
def test_parse_targets_rejects(text: str, piece: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_targets(text)
    assert f"targets={text!r}" in str(info.value) and piece in str(info.value)


def _forced(total: int, per_epoch: int, log_steps: bool) -> set[int]:
    forced = {total, *range(per_epoch, total + 1, per_epoch)}
    if log_steps:
        forced |= {2**k for k in range(64) if 2**k < per_epoch and 2**k <= total}
    return forced


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(1, 200_000),
    per_epoch=st.integers(1, 100_000),
    target=st.none() | st.integers(0, 400),
    log_steps=st.booleans(),
    min_interval=st.integers(1, 5_000),
)
def test_plan_properties(
    total: int, per_epoch: int, target: int | None, log_steps: bool, min_interval: int
) -> None:
    kwargs = dict(target=target, log_steps_first_epoch=log_steps, min_interval=min_interval)
    plan = plan_checkpoints(total, per_epoch, **kwargs)
    forced = _forced(total, per_epoch, log_steps)
    assert plan == sorted(set(plan))
    assert forced <= set(plan) and plan[-1] == total
    for step in set(plan) - forced:
        others = [0, *(s for s in plan if s != step)]
        assert min(abs(step - s) for s in others) >= min_interval
    want = max(target if target is not None else len(forced), len(forced))
    if len(plan) < want:  # stopped early: no gap (from 0 on) could take another step
        bounds = [0, *plan]
        assert all((b - a) // 2 < min_interval for a, b in zip(bounds, bounds[1:]))
    else:
        assert len(plan) == want
    assert plan_checkpoints(total, per_epoch, **kwargs) == plan


# -- bounds: steps fit a checkpoint folder's 10 digits, plans stay at most a million steps ------

@pytest.mark.parametrize(
    ("call", "quoted"),
    [
        (lambda: plan_checkpoints(10**10, 10**10), "total_steps=10000000000 is not valid: expected an int in "
                                                  "[1, 9999999999]"),
        (lambda: plan_checkpoints(10**30, 10), "total_steps=1000000000000000000000000000000"),
        (lambda: plan_checkpoints(10**9, 10), "steps_per_epoch=10 is not valid: expected at least "
                                              "total_steps / 1,000,000 = 1000"),
        (lambda: plan_checkpoints(1000, 1000, target=10**7), "target=10000000 is not valid: expected an int "
                                                             "in [0, 1000000]"),
        (lambda: plan_checkpoints(1000, 1000, dataset_tokens=1, targets={"small": 10**30}),
         "targets={'small': 1000000000000000000000000000000} is not valid"),
        (lambda: plan_checkpoints(1000, 1000, dataset_tokens=1, targets="small:99999999999"),
         "targets='small:99999999999' is not valid"),
        (lambda: Schedule(at_steps=[1, 10**10]), "at_steps=[1, 10000000000] is not valid"),
        (lambda: Schedule(at_steps=range(1, 10**12)), "at_steps has more than 1,000,000 steps"),
        (lambda: Schedule(at_steps=[float("nan")]), "not nan"),
        (lambda: Schedule(auto=True, mtbf_hours=1e7), "mtbf_hours=10000000.0 is not valid: expected at most "
                                                      "1,000,000 hours"),
        (lambda: Schedule(auto=True, mtbf_hours=10**400), "mtbf_hours=1000"),
        (lambda: Schedule(every_seconds=10**400), "every_seconds=1000"),
        (lambda: Schedule(max_overhead=-10**400), "max_overhead=-1000"),
        (lambda: Schedule(at_steps=list(range(1, 20)) + [0]), "at_steps='[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... "
                                                             "(20 items)]' is not valid"),
    ],
)
def test_steps_and_plans_past_the_bounds_are_config_errors(call, quoted) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert quoted in str(info.value)


def test_the_largest_step_and_plan_are_accepted() -> None:
    from asyncckpt.schedule import MAX_PLANNED_STEPS, MAX_STEP

    assert Schedule(at_steps=[MAX_STEP]).at_steps == (MAX_STEP,)
    assert plan_checkpoints(MAX_STEP, MAX_STEP, log_steps_first_epoch=False) == [MAX_STEP]
    assert len(plan_checkpoints(MAX_PLANNED_STEPS, 1, log_steps_first_epoch=False)) == MAX_PLANNED_STEPS


# ---------------------------------------------------------------- target per size category
TABLE = {"small": 3, "medium": 5, "large": 7, "xlarge": 9}


@pytest.mark.parametrize(
    ("target", "tokens", "targets", "expected"),
    [
        (12, None, None, (12, None)),                       # an int wins, whatever the size
        (12, 10**12, {"xlarge": 1}, (12, None)),
        (None, None, None, (None, None)),                   # forced steps only
        (None, 9_999_999, None, (20, "small")),             # DEFAULT_TARGETS
        (TABLE, 0, None, (3, "small")),
        (TABLE, 10_000_000, None, (5, "medium")),
        (TABLE, 50_000_000, None, (7, "large")),
        (TABLE, 50_000_001, None, (9, "xlarge")),
        (TABLE, 30_000_000, {"large": 2}, (2, "large")),    # --targets over the mapping
        (TABLE, 30_000_000, "medium:1", (7, "large")),      # ... only for the categories it names
        ({**TABLE, "large": 0}, 30_000_000, None, (0, "large")),
    ],
)
def test_choose_target(target, tokens, targets, expected) -> None:
    assert choose_target(target, tokens, targets) == expected


@pytest.mark.parametrize(
    ("target", "tokens", "quoted"),
    [
        ({**TABLE, "huge": 1}, 10, "target: unknown size category 'huge' (=1); expected small, medium"),
        ({"small": 1}, 10, "target={'small': 1} is not valid: expected a mapping from each of "
                           "small/medium/large/xlarge to an int in [0, 1000000]; missing medium, large, xlarge"),
        ({**TABLE, "small": 2.5}, 10, "target.small=2.5 is not valid: expected an integer in [0, 1000000]"),
        ({**TABLE, "small": True}, 10, "target.small=True is not valid"),
        ({**TABLE, "large": -1}, 10, "target.large=-1 is not valid"),
        ({**TABLE, "large": 10**7}, 10, "target.large=10000000 is not valid"),
        (TABLE, None, "picks the target by dataset size category: dataset_tokens"),
        ("20", 10, "target='20' is not valid"),
        (-1, None, "target=-1 is not valid"),
    ],
)
def test_choose_target_rejects(target, tokens, quoted) -> None:
    with pytest.raises(ConfigError) as info:
        choose_target(target, tokens)
    assert quoted in str(info.value)


def test_a_target_mapping_plans_like_its_category_count() -> None:
    by_map = plan_checkpoints(10_000, 1000, target=TABLE, dataset_tokens=30_000_000, min_interval=10)
    assert by_map == plan_checkpoints(10_000, 1000, target=7, min_interval=10)
    assert by_map != plan_checkpoints(10_000, 1000, dataset_tokens=30_000_000, min_interval=10)
