"""Tests for asyncckpt.retention: table-driven rules plus hypothesis properties."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt.errors import ConfigError
from asyncckpt.retention import (
    Retention,
    RetentionItem,
    RetentionPlan,
    best_step_for,
    best_tags,
    metric_mode,
    rank_by_metric,
    ranking_for,
)

NAN = float("nan")
INF = float("inf")


@dataclass(frozen=True)
class Item:
    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


def items(n: int, **metric_fns) -> list[Item]:
    """Steps 1..n (times 10); each metric_fns[name](step) gives that metric's value."""
    return [
        Item(step=s * 10, metrics={k: f(s * 10) for k, f in metric_fns.items()})
        for s in range(1, n + 1)
    ]


def test_item_matches_protocol() -> None:
    item: RetentionItem = Item(step=1)
    assert Retention(keep_last=1).plan([item]).keep == (1,)


# --- each rule alone -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "ckpts", "keep"),
    [
        pytest.param(Retention(), items(10), range(10, 101, 10), id="default-keeps-all"),
        pytest.param(Retention(keep_last=3), items(10), (80, 90, 100), id="keep_last=3"),
        pytest.param(Retention(keep_last=1), items(10), (90, 100), id="keep_last=1-keeps-two"),
        pytest.param(Retention(keep_last=2), items(10), (90, 100), id="keep_last=2"),
        pytest.param(Retention(keep_last=50), items(10), range(10, 101, 10), id="keep_last>n"),
        pytest.param(Retention(keep_last=1), [], (), id="empty"),
        pytest.param(Retention(keep_last=1), items(1), (10,), id="single"),
        pytest.param(
            Retention(keep_last=1, keep_best=2, best_metric="loss"),
            items(10, loss=lambda s: s),
            (10, 20, 90, 100),
            id="best-min",
        ),
        pytest.param(
            Retention(keep_last=1, keep_best=1, best_metric="acc", best_mode="max"),
            items(10, acc=lambda s: s % 70),
            (60, 90, 100),
            id="best-max",
        ),
        pytest.param(
            Retention(keep_last=1, keep_every_n_steps=30), items(10), (30, 60, 90, 100), id="every"
        ),
        pytest.param(
            Retention(keep_last=1, keep_epoch_ends=True),
            [Item(10, tags=("epoch_end",)), Item(20), Item(30, tags=("epoch_end",)), Item(40),
             Item(50), Item(60)],
            (10, 30, 50, 60),
            id="epoch_ends",
        ),
        pytest.param(
            Retention(keep_last=1),
            [Item(10, tags=("epoch_end",)), Item(20), Item(30), Item(40)],
            (30, 40),
            id="epoch_end-tag-ignored-by-default",
        ),
        pytest.param(
            Retention(keep_last=1),
            [Item(10, tags=("milestone:1B",)), Item(20, tags=("release:v1",)), Item(30),
             Item(40, tags=("Milestone:2B",)), Item(50), Item(60)],
            (10, 20, 50, 60),
            id="default-tag-patterns",
        ),
        pytest.param(
            Retention(keep_last=1, keep_tags=["user:*", "keep"]),
            [Item(10, tags=("milestone:1B",)), Item(20, tags=("user:alice",)), Item(30),
             Item(40, tags=("keep", "x")), Item(50), Item(60)],
            (20, 40, 50, 60),
            id="user-tag-patterns",
        ),
        pytest.param(
            Retention(keep_last=1, keep_tags=()),
            [Item(10, tags=("milestone:1B",)), Item(20), Item(30)],
            (20, 30),
            id="no-tag-patterns",
        ),
    ],
)
def test_single_rules(policy: Retention, ckpts: list[Item], keep) -> None:
    plan = policy.plan(ckpts)
    all_steps = sorted(i.step for i in ckpts)
    assert plan.keep == tuple(keep)
    assert plan.delete == tuple(s for s in all_steps if s not in set(keep))
    assert set(plan.reasons) == set(plan.keep)
    assert all(plan.reasons[s] for s in plan.keep)


def test_keep_last_3_over_100_saves() -> None:
    plan = Retention(keep_last=3).plan(items(100))
    assert plan.keep == (980, 990, 1000)
    assert len(plan.delete) == 97
    assert plan.delete == tuple(range(10, 971, 10))
    assert plan.reasons[1000] == ("latest", "last-3")
    assert plan.reasons[990] == ("latest-backup", "last-3")
    assert plan.reasons[980] == ("last-3",)


@pytest.mark.parametrize(
    "policy",
    [
        Retention(keep_last=1),
        Retention(keep_last=1, keep_best=1, best_metric="loss"),
        Retention(keep_last=1, keep_best=3, best_metric=["loss", "acc"], best_mode="max"),
        Retention(keep_last=1, keep_every_n_steps=7, keep_epoch_ends=True, keep_tags=()),
    ],
)
def test_newest_two_always_kept(policy: Retention) -> None:
    # The newest two have the worst metrics and no tags; they are still kept.
    ckpts = items(20, loss=lambda s: 1e6 + s, acc=lambda s: -s)
    plan = policy.plan(ckpts)
    assert {190, 200} <= set(plan.keep)
    assert plan.reasons[200][0] == "latest"
    assert plan.reasons[190][0] == "latest-backup"


def test_ties_prefer_newer() -> None:
    ckpts = items(10, loss=lambda s: 1.0)
    plan = Retention(keep_last=1, keep_best=2, best_metric="loss").plan(ckpts)
    assert plan.best == {"loss": (100, 90)}
    policy = Retention(best_metric="acc", best_mode="max")
    ckpts = items(10, acc=lambda s: s % 30)  # 20, 50, 80 tie at 20
    assert rank_by_metric(ckpts, "acc", "max")[:3] == (80, 50, 20)
    assert policy.best_step(ckpts) == 80


def test_several_metrics_each_keep_own_best() -> None:
    policy = Retention(
        keep_last=2, keep_best=2, best_metric=["loss", "acc"], best_mode={"acc": "max"}
    )
    ckpts = items(10, loss=lambda s: abs(s - 30) + s / 1000, acc=lambda s: -abs(s - 70))
    plan = policy.plan(ckpts)
    assert plan.best == {"loss": (30, 20), "acc": (70, 80)}
    assert plan.keep == (20, 30, 70, 80, 90, 100)
    assert plan.reasons[30] == ("best:loss",)
    assert plan.reasons[80] == ("best:acc",)
    assert plan.missing_metric == ()
    assert policy.metrics == ("loss", "acc")
    assert policy.primary_metric == "loss"
    assert policy.best_step(ckpts) == 30
    assert policy.best_step(ckpts, "acc") == 70


def test_missing_metric_reported_not_deleted_for_it() -> None:
    ckpts = [
        Item(10, {"loss": 5.0}),
        Item(20, {}),
        Item(30, {"loss": 1.0, "acc": 0.1}),
        Item(40, {"acc": 0.9}),
        Item(50, {"loss": 3.0, "acc": 0.5}),
        Item(60, {"loss": 9.0, "acc": 0.2}),
    ]
    policy = Retention(
        keep_last=3, keep_best=1, best_metric=("loss", "acc"), best_mode={"acc": "max"}
    )
    plan = policy.plan(reversed(ckpts))
    assert plan.missing_metric == ((10, "acc"), (20, "loss"), (20, "acc"), (40, "loss"))
    assert plan.best == {"loss": (30,), "acc": (40,)}
    # 40 lacks loss but is kept by last-3 and best:acc; 20 lacks both, falls to keep_last.
    assert plan.keep == (30, 40, 50, 60)
    assert plan.reasons[40] == ("last-3", "best:acc")
    assert plan.delete == (10, 20)


def test_missing_metric_only_when_ranking() -> None:
    ckpts = [Item(10), Item(20), Item(30)]
    plan = Retention(keep_last=1, best_metric="loss").plan(ckpts)
    assert plan.missing_metric == ()
    assert plan.best == {}


@pytest.mark.parametrize("bad", [NAN, INF, -INF, None, "1.0", True])
def test_non_finite_metric_treated_as_missing(bad) -> None:
    ckpts = [Item(10, {"loss": bad}), Item(20, {"loss": 2.0}), Item(30, {"loss": 3.0}),
             Item(40, {"loss": 4.0})]
    policy = Retention(keep_last=1, keep_best=1, best_metric="loss")
    plan = policy.plan(ckpts)
    assert plan.best == {"loss": (20,)}
    assert plan.missing_metric == ((10, "loss"),)
    assert plan.delete == (10,)
    assert policy.best_step(ckpts) == 20
    assert Retention(best_metric="loss", best_mode="max").best_step(ckpts) == 40


def test_best_step() -> None:
    ckpts = items(5, loss=lambda s: (s - 20) ** 2, acc=lambda s: s)
    assert Retention(best_metric="loss").best_step(ckpts) == 20
    assert Retention(best_metric="loss", best_mode="max").best_step(ckpts) == 50
    assert Retention(best_metric="loss").best_step(ckpts, metric="acc") == 10
    assert Retention(best_metric="loss", best_mode="max").best_step(ckpts, "acc") == 50
    assert Retention(best_metric="loss").best_step(ckpts, "nope") is None
    assert Retention(best_metric="loss").best_step([]) is None
    with pytest.raises(ConfigError, match="best_metric"):
        Retention().best_step(ckpts)


def test_combined_rules_and_reasons() -> None:
    ckpts = [
        Item(s, {"loss": float(s) if s != 500 else 0.0},
             ("epoch_end",) if s % 300 == 0 else ("milestone:x",) if s == 100 else ())
        for s in range(50, 1001, 50)
    ]
    policy = Retention(
        keep_last=3, keep_best=1, best_metric="loss", keep_every_n_steps=400,
        keep_epoch_ends=True,
    )
    plan = policy.plan(ckpts)
    assert plan.keep == (100, 300, 400, 500, 600, 800, 900, 950, 1000)
    assert plan.reasons == {
        100: ("tag:milestone:x",),
        300: ("epoch_end",),
        400: ("every-400",),
        500: ("best:loss",),
        600: ("epoch_end",),
        800: ("every-400",),
        900: ("last-3", "epoch_end"),
        950: ("latest-backup", "last-3"),
        1000: ("latest", "last-3"),
    }


def test_keep_last_none_keeps_all_even_with_other_rules() -> None:
    policy = Retention(keep_best=1, best_metric="loss", keep_every_n_steps=30)
    plan = policy.plan(items(10, loss=lambda s: s))
    assert plan.delete == ()
    assert plan.keep == tuple(range(10, 101, 10))
    assert plan.reasons[10] == ("all", "best:loss")
    assert plan.reasons[30] == ("all", "every-30")
    assert policy.disabled


@pytest.mark.parametrize(
    ("policy", "disabled"),
    [
        (Retention(), True),
        (Retention(keep_best=2, best_metric="loss"), True),
        (Retention(keep_last=5, keep_every_n_steps=1), True),
        (Retention(keep_last=5), False),
        (Retention(keep_last=5, keep_every_n_steps=2), False),
    ],
)
def test_disabled(policy: Retention, disabled: bool) -> None:
    assert policy.disabled is disabled
    if disabled:
        assert policy.plan(items(20, loss=lambda s: s)).delete == ()


def test_duplicate_steps_rejected() -> None:
    with pytest.raises(ConfigError, match="step 10"):
        Retention(keep_last=1).plan([Item(10), Item(20), Item(10)])


def test_options_normalised_and_hashable() -> None:
    a = Retention(keep_last=2, keep_best=1, best_metric=["a", "b"], best_mode={"b": "max"},
                  keep_tags=["x*"])
    b = Retention(keep_last=2, keep_best=1, best_metric=("a", "b"), best_mode={"b": "max"},
                  keep_tags=("x*",))
    assert a == b and hash(a) == hash(b)
    assert a.best_metric == ("a", "b") and a.keep_tags == ("x*",)
    assert a.mode_for("a") == "min" and a.mode_for("b") == "max"
    assert Retention(best_metric="m").metrics == ("m",)
    assert Retention().metrics == () and Retention().primary_metric is None
    assert isinstance(Retention(keep_last=1).plan([]), RetentionPlan)


@pytest.mark.parametrize(
    ("mode", "metric", "expected"),
    [("min", "x", "min"), ("max", "x", "max"), ({"x": "max"}, "x", "max"),
     ({"x": "max"}, "y", "min")],
)
def test_metric_mode(mode, metric, expected) -> None:
    assert metric_mode(mode, metric) == expected


# --- configuration errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field_name", "value"),
    [
        ({"keep_last": 0}, "keep_last", "0"),
        ({"keep_last": -1}, "keep_last", "-1"),
        ({"keep_last": 2.5}, "keep_last", "2.5"),
        ({"keep_last": "3"}, "keep_last", "'3'"),
        ({"keep_last": True}, "keep_last", "True"),
        ({"keep_best": -1}, "keep_best", "-1"),
        ({"keep_best": 1.0, "best_metric": "m"}, "keep_best", "1.0"),
        ({"keep_best": None}, "keep_best", "None"),
        ({"keep_best": 2}, "best_metric", "None"),
        ({"keep_best": 1, "best_metric": []}, "best_metric", "[]"),
        ({"best_metric": 3}, "best_metric", "3"),
        ({"best_metric": ""}, "best_metric", "''"),
        ({"best_metric": ["a", "a"]}, "best_metric", "['a', 'a']"),
        ({"best_metric": ["a", 1]}, "best_metric", "['a', 1]"),
        ({"best_metric": "m", "best_mode": "minimum"}, "best_mode", "'minimum'"),
        ({"best_metric": "m", "best_mode": "MAX"}, "best_mode", "'MAX'"),
        ({"best_metric": "m", "best_mode": None}, "best_mode", "None"),
        ({"best_metric": "m", "best_mode": {"m": "up"}}, "best_mode", "{'m': 'up'}"),
        ({"best_metric": "m", "best_mode": {"z": "max"}}, "best_mode", "{'z': 'max'}"),
        ({"keep_every_n_steps": 0}, "keep_every_n_steps", "0"),
        ({"keep_every_n_steps": -5}, "keep_every_n_steps", "-5"),
        ({"keep_every_n_steps": 10.0}, "keep_every_n_steps", "10.0"),
        ({"keep_epoch_ends": "yes"}, "keep_epoch_ends", "'yes'"),
        ({"keep_tags": "milestone:*"}, "keep_tags", "'milestone:*'"),
        ({"keep_tags": [1]}, "keep_tags", "[1]"),
        ({"keep_tags": None}, "keep_tags", "None"),
        ({"keep_tags": {"a"}}, "keep_tags", "{'a'}"),
    ],
)
def test_config_errors(kwargs: dict, field_name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Retention(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{field_name}={value} is not valid: expected ")
    assert isinstance(info.value, ValueError)


# --- properties ---------------------------------------------------------------------------

METRICS = ("loss", "acc")
TAGS = ("epoch_end", "milestone:1B", "release:v1", "user:alice", "plain", "Milestone:x")
VALUES = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0, NAN, INF]),
    st.floats(min_value=-5, max_value=5),
    st.integers(-3, 3),
)


@st.composite
def checkpoint_lists(draw) -> list[Item]:
    steps = draw(st.lists(st.integers(0, 2000), unique=True, max_size=25))
    return [
        Item(
            step=s,
            metrics=draw(st.dictionaries(st.sampled_from(METRICS), VALUES, max_size=2)),
            tags=tuple(draw(st.lists(st.sampled_from(TAGS), max_size=3))),
        )
        for s in steps
    ]


@st.composite
def policies(draw) -> Retention:
    metrics = draw(st.sampled_from([None, "loss", "acc", ["loss", "acc"], ("acc", "loss")]))
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics or ())
    modes = [st.sampled_from(["min", "max"])]
    if "acc" in names:
        modes.append(st.just({"acc": "max"}))
    return Retention(
        keep_last=draw(st.one_of(st.none(), st.integers(1, 10))),
        keep_best=draw(st.integers(0, 3)) if names else 0,
        best_metric=metrics,
        best_mode=draw(st.one_of(*modes)),
        keep_every_n_steps=draw(st.one_of(st.none(), st.integers(1, 300))),
        keep_epoch_ends=draw(st.booleans()),
        keep_tags=draw(
            st.sampled_from([("milestone:*", "release:*"), (), ("user:*",), ["*:*", "plain"]])
        ),
    )


def reference_keep(policy: Retention, ckpts: list[Item]) -> set[int]:
    """A plain, independent restatement of the retention rules."""
    steps = sorted(c.step for c in ckpts)
    if policy.keep_last is None:
        return set(steps)
    keep = set(steps[-2:]) | set(steps[max(0, len(steps) - policy.keep_last):])
    names = [] if policy.best_metric is None else (
        [policy.best_metric] if isinstance(policy.best_metric, str) else list(policy.best_metric)
    )
    for name in names if policy.keep_best else []:
        mode = policy.best_mode if isinstance(policy.best_mode, str) else (
            policy.best_mode.get(name, "min"))
        scored = []
        for c in ckpts:
            v = c.metrics.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                scored.append((v if mode == "min" else -v, -c.step))
        scored.sort()
        keep |= {-neg_step for _, neg_step in scored[: policy.keep_best]}
    for c in ckpts:
        if policy.keep_every_n_steps and c.step % policy.keep_every_n_steps == 0:
            keep.add(c.step)
        if policy.keep_epoch_ends and "epoch_end" in c.tags:
            keep.add(c.step)
        if any(fnmatch.fnmatchcase(t, p) for t in c.tags for p in policy.keep_tags):
            keep.add(c.step)
    return keep


@settings(max_examples=200, deadline=None)
@given(policy=policies(), ckpts=checkpoint_lists(), data=st.data())
def test_plan_properties(policy: Retention, ckpts: list[Item], data) -> None:
    plan = policy.plan(ckpts)
    steps = sorted(c.step for c in ckpts)
    keep, delete = set(plan.keep), set(plan.delete)
    # (a) a partition of all steps, each side sorted
    assert keep | delete == set(steps) and not keep & delete
    assert list(plan.keep) == sorted(keep) and list(plan.delete) == sorted(delete)
    # (b) the newest two committed are never deleted
    assert set(steps[-2:]) <= keep
    # (c) matches the reference
    assert keep == reference_keep(policy, ckpts)
    assert set(plan.reasons) == keep and all(plan.reasons.values())
    for metric, ranked in plan.best.items():
        assert len(ranked) <= policy.keep_best
        if ranked:
            assert ranked[0] == policy.best_step(ckpts, metric)
    # (d) deterministic, independent of input order
    shuffled = data.draw(st.permutations(ckpts))
    assert policy.plan(shuffled) == plan
    assert policy.plan(ckpts) == plan


@settings(max_examples=200, deadline=None)
@given(policy=policies(), ckpts=checkpoint_lists())
def test_pruning_after_every_save_keeps_exactly_what_the_policy_says(policy: Retention,
                                                                   ckpts: list[Item]) -> None:
    """Saves commit one by one (in step order) and the manager prunes after each: at every
    point the newest two committed survive and nothing but what that plan drops is deleted;
    at the end the survivors are exactly the policy's keep set over everything ever saved."""
    alive: list[Item] = []
    for item in sorted(ckpts, key=lambda c: c.step):
        alive.append(item)
        plan = policy.plan(alive)
        newest_two = {c.step for c in alive[-2:]}
        assert newest_two <= set(plan.keep) and item.step in plan.keep
        assert set(plan.keep) == reference_keep(policy, alive)
        alive = [c for c in alive if c.step not in set(plan.delete)]
    assert {c.step for c in alive} == reference_keep(policy, ckpts)


@pytest.mark.parametrize("value", [10**400, -10**400, NAN, INF, -INF, "0.1", None, True])
def test_a_metric_value_that_is_not_a_finite_float_never_ranks(value) -> None:
    # a value past float's range once raised OverflowError from inside the plan
    policy = Retention(keep_last=1, keep_best=1, best_metric="loss")
    plan = policy.plan([Item(step=1, metrics={"loss": 0.5}), Item(step=2, metrics={"loss": value}),
                        Item(step=3, metrics={"loss": value}), Item(step=4, metrics={"loss": value})])
    assert plan.best == {"loss": (1,)} and plan.delete == (2,)
    assert plan.missing_metric == ((2, "loss"), (3, "loss"), (4, "loss"))


# -- what "best" ranks by: the policy's, else what the checkpoints recorded ------------------------

@dataclass(frozen=True)
class Ranked:
    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    rank_metric: str | None = None
    rank_mode: str | None = None


OLD = Ranked(step=1, metrics={"loss": 3.0, "acc": 0.2})                       # before the fields
BY_ACC = Ranked(step=2, metrics={"loss": 1.0, "acc": 0.9}, rank_metric="acc", rank_mode="max")
BY_LOSS = Ranked(step=3, metrics={"loss": 2.0, "acc": 0.1}, rank_metric="loss", rank_mode="min")
BY_ACC_MIN = Ranked(step=4, metrics={"loss": 5.0, "acc": 0.05}, rank_metric="acc", rank_mode="min")


@pytest.mark.parametrize(
    ("metric", "policy", "ranked", "expected"),
    [
        (None, None, [OLD], None),                                   # nothing to rank by
        (None, Retention(keep_last=2), [OLD], None),                 # a policy without a metric
        (None, None, [OLD, BY_ACC], ("acc", "max")),                 # recorded
        (None, None, [BY_ACC, BY_LOSS], ("loss", "min")),            # the newest record wins
        (None, None, [BY_LOSS, BY_ACC], ("loss", "min")),            # ... by step, not list order
        ("acc", None, [BY_ACC], ("acc", "max")),                     # best:acc: the recorded mode
        ("acc", None, [BY_ACC, BY_LOSS], ("acc", "max")),            # ... of the newest ranking by it
        ("acc", None, [BY_ACC, BY_ACC_MIN], ("acc", "min")),
        ("f1", None, [BY_ACC], ("f1", "min")),                       # never recorded: min
        ("acc", None, [OLD], ("acc", "min")),
        (None, Retention(best_metric="loss"), [BY_ACC], ("loss", "min")),  # the policy first
        ("acc", Retention(best_metric="loss"), [BY_ACC], ("acc", "max")),  # a metric it does not name
        ("acc", Retention(best_metric="acc", best_mode="min"), [BY_ACC], ("acc", "min")),
        ("f1", Retention(best_metric="loss", best_mode="max"), [BY_ACC], ("f1", "max")),  # as before
        (None, Retention(keep_last=2), [BY_ACC], ("acc", "max")),
    ],
)
def test_ranking_for(metric, policy, ranked, expected):
    assert ranking_for(metric, policy, ranked) == expected


def test_best_step_for_and_best_tags_follow_the_ranking():
    ranked = [OLD, BY_ACC, BY_LOSS]
    assert best_step_for(ranked, None, None) == ("loss", 2)          # loss: 3.0, 1.0, 2.0
    assert best_step_for(ranked, "acc", None) == ("acc", 2)
    assert best_step_for(ranked, "f1", None) == ("f1", None)
    assert best_step_for([OLD], None, None) is None
    assert best_tags(ranked, None) == {2: ("best:loss",)}
    assert best_tags([OLD], None) == {}
    assert best_tags(ranked, None, ["acc", "loss"]) == {2: ("best:acc", "best:loss")}
    assert best_tags([*ranked, BY_ACC_MIN], None, ["acc"]) == {4: ("best:acc",)}  # recorded min now
    policy = Retention(best_metric=["acc", "loss"], best_mode={"acc": "min"})
    assert best_tags(ranked, policy) == {3: ("best:acc",), 2: ("best:loss",)}
    assert best_tags(items(3, loss=lambda s: -s), None) == {}     # plain items record nothing
