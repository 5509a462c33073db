"""When to save: the ``Schedule`` options and the ``ScheduleState`` that decides.

Pure: no torch, no I/O; the clock comes in as ``now`` (float seconds).

The manager keeps one ``ScheduleState`` per run and calls, in this order::

    state.tick(s, now=t)                             # each call: measures the step time
    d = state.decide(schedule, step=s, now=t, epoch_end=..., param_count=...)
    if d.save or force:
        ... save step s with d.tags ...
        state.record_save(s, now=t, stall_s=stall, milestones=d.milestones)

``decide`` changes nothing but the start of the ``every_seconds`` clock (set on
its first call); ``record_save`` does all bookkeeping, so a save that the
manager skips or that never happens is simply decided again at the next step.

Also here: ``plan_checkpoints`` (a fixed plan of steps for a run of known
length), Young-Daly intervals, and parameter-count milestones ("100M,1B").
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from types import MappingProxyType
from typing import TypeGuard

from asyncckpt.errors import ConfigError

SIZE_CATEGORIES: tuple[str, ...] = ("small", "medium", "large", "xlarge")
DEFAULT_TARGETS: Mapping[str, int] = MappingProxyType(
    {"small": 20, "medium": 50, "large": 100, "xlarge": 200}
)
MAX_STEP = 10**10 - 1
"""The largest step a checkpoint can have: its folder name holds 10 digits (as in manifest.py)."""
MAX_PLANNED_STEPS = 1_000_000
"""The most steps ``at_steps`` may list or a plan may hold (each one is a whole checkpoint)."""
MAX_MTBF_HOURS = 1_000_000
"""The largest ``mtbf_hours`` (about 114 years; past float range its seconds would overflow)."""
_EMA_ALPHA = 0.3  # weight of the newest measurement in the moving averages
_SCALE = {"": 10**9, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_PIECE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmbt]?)", re.IGNORECASE | re.ASCII)
# (size, suffix, always one decimal), largest first.
_UNITS = ((10**12, "T", True), (10**9, "B", True), (10**6, "M", False), (10**3, "K", False))


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError.field(name, value, f"an int {bound}")


def _check_seconds(name: str, value: object, *, allow_zero: bool = False) -> None:
    if not _is_number(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError.field(name, value, f"a finite number {'>=' if allow_zero else '>'} 0")


def _check_overhead(value: object) -> None:
    if not _is_number(value) or not 0 < value < 1:
        raise ConfigError.field("max_overhead", value, "a fraction with 0 < max_overhead < 1")


def parse_milestones(spec: str | Iterable[int | str]) -> tuple[int, ...]:
    """Parameter counts from ``"100M,500M,1B"`` or a sequence, sorted and unique.

    Suffixes K, M, B, T (any case) scale by 1e3, 1e6, 1e9, 1e12 and decimals are
    allowed ("1.5B"); a bare number in text means billions ("1,5" is 1e9, 5e9).
    In a sequence, an int is a plain count and a string is parsed as above.
    """
    if not isinstance(spec, (str, Iterable)) or isinstance(spec, bytes):
        raise ConfigError.field("param_milestones", spec, "text like '100M,1B' or a sequence of counts")
    pieces: list[int | str] = spec.split(",") if isinstance(spec, str) else list(spec)
    return tuple(sorted({_milestone(piece, spec if isinstance(spec, str) else pieces) for piece in pieces}))


def _milestone(piece: object, whole: object) -> int:
    if _is_int(piece) and piece > 0:
        return piece
    if isinstance(piece, str):
        match = _PIECE.fullmatch(piece.strip())
        if match:
            count = Decimal(match[1]) * _SCALE[match[2].lower()]
            if count > 0 and count == count.to_integral_value():
                return int(count)
    raise ConfigError(
        f"param_milestones={whole!r} is not valid: {piece!r} is not a positive whole parameter "
        "count; expected e.g. '100M,500M,1B' (suffix K, M, B or T; a bare number means billions)"
    )


def format_params(count: int) -> str:
    """A short label for a parameter count: ``"1.2B"``, ``"500M"``, ``"1.5M"``, ``"12K"``.

    B and T always carry one decimal ("1.0B"); M and K are whole when the count
    is a whole number of that unit, else one decimal (rounded half up); counts
    below 1000 are plain. A count that rounds to 1000 of a unit takes the next
    unit (999_950_000 is "1.0B").
    """
    _check_int("count", count, 0)
    index = next((i for i, unit in enumerate(_UNITS) if count >= unit[0]), None)
    if index is None:
        return str(count)
    while True:
        size, suffix, one_decimal = _UNITS[index]
        if not one_decimal and count % size == 0:
            value = Decimal(count // size)
        else:
            value = (Decimal(count) / size).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
        if value < 1000 or index == 0:
            return f"{value}{suffix}"
        index -= 1


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """When to save: a step is saved when any enabled rule fires (none enabled: only forced saves)."""

    every_n_steps: int | None = None
    """Save every step with ``step % every_n_steps == 0`` (step 0 excluded)."""
    every_seconds: float | None = None
    """Save once this many seconds passed since the last save (or the first ``decide`` call)."""
    at_steps: Sequence[int] | None = None
    """Save at exactly these steps (ints from 1 to ``MAX_STEP``, at most ``MAX_PLANNED_STEPS`` of
    them); stored as a sorted tuple of unique steps."""
    on_epoch_end: bool = False
    """Save when the caller says the step ends an epoch."""
    param_milestones: str | Sequence[int | str] | None = None
    """Save once when the parameter count first reaches each of these: ``"100M,500M,1B"``
    or a sequence; stored as a sorted tuple of ints (see ``parse_milestones``)."""
    auto: bool = False
    """Interval from measured costs: Young-Daly with ``mtbf_hours``, within ``max_overhead``."""
    max_overhead: float = 0.01
    """Auto mode: the largest fraction of training time the save stalls may take."""
    mtbf_hours: float | None = None
    """Auto mode: mean time between failures of the job, in hours (at most ``MAX_MTBF_HOURS``,
    a million: about 114 years)."""

    def __post_init__(self) -> None:
        if self.every_n_steps is not None:
            _check_int("every_n_steps", self.every_n_steps, 1)
        if self.every_seconds is not None:
            _check_seconds("every_seconds", self.every_seconds)
        if self.at_steps is not None:
            object.__setattr__(self, "at_steps", _sorted_steps(self.at_steps))
        for name in ("on_epoch_end", "auto"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError.field(name, getattr(self, name), "True or False")
        if self.param_milestones is not None:
            object.__setattr__(self, "param_milestones", parse_milestones(self.param_milestones))
        _check_overhead(self.max_overhead)
        if self.mtbf_hours is not None:
            _check_seconds("mtbf_hours", self.mtbf_hours)
            if self.mtbf_hours > MAX_MTBF_HOURS:
                raise ConfigError.field("mtbf_hours", self.mtbf_hours, f"at most {MAX_MTBF_HOURS:,} hours")


def _sorted_steps(steps: object) -> tuple[int, ...]:
    expected = f"a sequence of at most {MAX_PLANNED_STEPS:,} ints in [1, {MAX_STEP}]"
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise ConfigError.field("at_steps", steps, expected)
    items = list(itertools.islice(steps, MAX_PLANNED_STEPS + 1))  # a huge range is never built
    if len(items) > MAX_PLANNED_STEPS:
        raise ConfigError(f"at_steps has more than {MAX_PLANNED_STEPS:,} steps: expected {expected}")
    for item in items:
        if not _is_int(item) or not 1 <= item <= MAX_STEP:
            raise ConfigError.field("at_steps", _short(steps), f"{expected}, not {item!r}")
    return tuple(sorted(set(items)))


def _short(steps: object) -> object:
    """``steps`` for a message: a long list shows its first items only."""
    if isinstance(steps, Sequence) and len(steps) > 10:
        return f"[{', '.join(map(repr, steps[:10]))}, ... ({len(steps)} items)]"
    return steps


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What ``ScheduleState.decide`` says about one step."""

    save: bool
    """Whether any rule wants this step saved."""
    reasons: tuple[str, ...] = ()
    """The rules that fired, in this order: "every_n_steps", "every_seconds",
    "at_steps", "epoch_end", "milestone", "auto"."""
    tags: tuple[str, ...] = ()
    """Labels for the manifest if the step is saved (by a rule or by force):
    "epoch_end" when the step ends an epoch, "milestone:1.0B" per milestone reached."""
    milestones: tuple[int, ...] = ()
    """Milestones first reached at this step; pass them to ``record_save``."""


@dataclass(kw_only=True)
class ScheduleState:
    """What a ``Schedule`` remembers across steps of one run (mutable).

    Auto mode: the interval comes from the moving averages of the step time
    (``tick`` or ``record_step``) and of the save stall (``record_save(stall_s=...)``).
    Before any stall is measured (in this process: a restore records none)
    there is no interval, and auto saves once, as soon as a step time is known,
    to measure the cost.  A stall of 0 s gives an interval of 1 step.
    """

    last_save_step: int | None = None
    """Step of the last recorded save; None when nothing was saved in this process."""
    last_save_time: float | None = None
    """``now`` of the last recorded save, in seconds."""
    start_time: float | None = None
    """``now`` of the first ``decide`` call: where ``every_seconds`` counts from before a save."""
    milestones_reached: set[int] = field(default_factory=set)
    """Parameter-count milestones already reported (and saved, or restored)."""
    step_s: float | None = None
    """Moving average of the training step time in seconds; None until measured."""
    stall_s: float | None = None
    """Moving average of how long a save stalled training, in seconds; None until measured."""
    last_tick: tuple[int, float] | None = None
    """``(step, now)`` of the last ``tick``."""
    paused_s: float = 0.0
    """Seconds of save stall recorded since the last ``tick`` (not training time)."""
    reported_interval: int | None = None
    """The auto interval last returned by ``interval_change``."""

    def decide(
        self, schedule: Schedule, *, step: int, now: float, epoch_end: bool = False,
        param_count: int | None = None,
    ) -> Decision:
        """Whether to save ``step``.  Mutates nothing but ``start_time`` (first call).

        A step equal to ``last_save_step`` is already saved: no rule fires for it.
        """
        _check_int("step", step, 0)
        if self.start_time is None:
            self.start_time = now
        done = step == self.last_save_step
        new = () if done else self._new_milestones(schedule, param_count)
        reasons = () if done else self._reasons(schedule, step, now, epoch_end, bool(new))
        tags = ("epoch_end",) if epoch_end else ()
        tags += tuple(f"milestone:{format_params(m)}" for m in new)
        return Decision(save=bool(reasons), reasons=reasons, tags=tags, milestones=new)

    def record_save(
        self, step: int, now: float, stall_s: float | None = None, *, milestones: Iterable[int] = ()
    ) -> None:
        """Book a save that happened: its step, time, stall and the milestones it covers."""
        _check_int("step", step, 0)
        if stall_s is not None:
            _check_seconds("stall_s", stall_s, allow_zero=True)
            self.stall_s = _ema(self.stall_s, stall_s)
            self.paused_s += stall_s
        self.mark_milestones(milestones)
        self.last_save_step = step
        self.last_save_time = now

    def record_step(self, step_s: float) -> None:
        """Feed one measured training step time (seconds) into the moving average."""
        _check_seconds("step_s", step_s, allow_zero=True)
        self.step_s = _ema(self.step_s, step_s)

    def tick(self, step: int, now: float) -> None:
        """Note a ``maybe_save`` call: the time since the previous one, less the save
        stall recorded in between, divided by the steps in between, is a step time."""
        _check_int("step", step, 0)
        if self.last_tick is not None and step > self.last_tick[0]:
            elapsed = now - self.last_tick[1] - self.paused_s
            if math.isfinite(elapsed) and elapsed >= 0:
                self.record_step(elapsed / (step - self.last_tick[0]))
        self.last_tick, self.paused_s = (step, now), 0.0

    def interval_change(self, schedule: Schedule) -> tuple[int, str] | None:
        """The auto interval and why, when it is new or moved by 10% or more since
        the last one this returned; else None."""
        current = self.auto_interval(schedule)
        last = self.reported_interval
        if current is None or (last is not None and abs(current[0] - last) < 0.1 * last):
            return None
        self.reported_interval = current[0]
        return current

    def mark_milestones(self, milestones: Iterable[int]) -> None:
        """Mark milestones as reached, e.g. after a restart from the manifests' counts."""
        items = list(milestones)
        for m in items:
            _check_int("milestone", m, 1)
        self.milestones_reached.update(items)

    def auto_interval(self, schedule: Schedule) -> tuple[int, str] | None:
        """The current auto interval in steps and why; None until costs are measured."""
        if self.stall_s is None or not self.step_s:
            return None
        mtbf_s = None if schedule.mtbf_hours is None else schedule.mtbf_hours * 3600.0
        return auto_interval_steps(
            save_cost_s=self.stall_s, step_s=self.step_s, mtbf_s=mtbf_s, max_overhead=schedule.max_overhead
        )

    def _new_milestones(self, schedule: Schedule, param_count: int | None) -> tuple[int, ...]:
        milestones = schedule.param_milestones  # a sorted tuple once __post_init__ ran
        if param_count is None or not isinstance(milestones, tuple):
            return ()
        _check_int("param_count", param_count, 0)
        reached = self.milestones_reached
        return tuple(m for m in milestones if m <= param_count and m not in reached)

    def _reasons(
        self, schedule: Schedule, step: int, now: float, epoch_end: bool, milestone: bool
    ) -> tuple[str, ...]:
        every, seconds, at = schedule.every_n_steps, schedule.every_seconds, schedule.at_steps
        since = self.last_save_time if self.last_save_time is not None else self.start_time
        fired = {
            "every_n_steps": every is not None and step > 0 and step % every == 0,
            "every_seconds": seconds is not None and since is not None and now - since >= seconds,
            "at_steps": isinstance(at, tuple) and _contains(at, step),
            "epoch_end": schedule.on_epoch_end and epoch_end,
            "milestone": milestone,
            "auto": schedule.auto and self._auto_due(schedule, step),
        }
        return tuple(name for name, hit in fired.items() if hit)

    def _auto_due(self, schedule: Schedule, step: int) -> bool:
        interval = self.auto_interval(schedule)
        if interval is None:  # no cost measured yet: save once to measure it
            return self.stall_s is None and self.step_s is not None
        return step - (self.last_save_step or 0) >= interval[0]


def _contains(sorted_steps: Sequence[int], step: int) -> bool:
    i = bisect_left(sorted_steps, step)
    return i < len(sorted_steps) and sorted_steps[i] == step


def _ema(old: float | None, new: float) -> float:
    return float(new) if old is None else (1 - _EMA_ALPHA) * old + _EMA_ALPHA * new


def young_daly_interval_s(save_cost_s: float, mtbf_s: float) -> float:
    """Young-Daly optimal seconds between saves: ``sqrt(2 * save_cost_s * mtbf_s)``."""
    _check_seconds("save_cost_s", save_cost_s, allow_zero=True)
    _check_seconds("mtbf_s", mtbf_s)
    return math.sqrt(2.0 * save_cost_s * mtbf_s)


def auto_interval_steps(
    *, save_cost_s: float, step_s: float, mtbf_s: float | None = None, max_overhead: float
) -> tuple[int, str]:
    """Steps between saves, and a sentence saying why.

    With ``mtbf_s``: the Young-Daly interval rounded to whole steps, raised when
    needed so ``save_cost_s / (interval * step_s) <= max_overhead``.  Without it:
    the smallest interval within that overhead bound.  Always at least 1.
    """
    _check_seconds("save_cost_s", save_cost_s, allow_zero=True)
    _check_seconds("step_s", step_s)
    _check_overhead(max_overhead)
    # round() first so float noise (100.00000000001) does not add a step
    bound = max(1, math.ceil(round(save_cost_s / (max_overhead * step_s), 9)))
    budget = f"saving takes <= {max_overhead:.2%} of training ({save_cost_s:.3g} s/save, {step_s:.3g} s/step)"
    if mtbf_s is None:
        return bound, f"every {bound} steps so {budget}"
    yd_s = young_daly_interval_s(save_cost_s, mtbf_s)
    yd_steps = max(1, round(yd_s / step_s))
    text = f"Young-Daly sqrt(2 * {save_cost_s:.3g} s * {mtbf_s:.6g} s) = {yd_s:.1f} s = {yd_steps} steps"
    if yd_steps >= bound:
        return yd_steps, text
    return bound, f"{text}, raised to {bound} steps so {budget}"


def size_category(dataset_tokens: int) -> str:
    """"small" below 10M tokens, "medium" below 25M, "large" up to 50M inclusive, else "xlarge".

    The bounds are the original requirements' (and what ``plan_checkpoints`` has always used):
    changing them would silently change the plan of every config that gives ``dataset_tokens``."""
    _check_int("dataset_tokens", dataset_tokens, 0)
    if dataset_tokens < 10_000_000:
        return "small"
    if dataset_tokens < 25_000_000:
        return "medium"
    return "large" if dataset_tokens <= 50_000_000 else "xlarge"


def parse_targets(text: str) -> dict[str, int]:
    """``"small:10,large:30"`` -> ``{"small": 10, "large": 30}`` (partial is fine)."""
    out: dict[str, int] = {}
    for piece in str(text).split(","):
        name, sep, count = (part.strip() for part in piece.partition(":"))
        name = name.lower()
        if not sep or name not in SIZE_CATEGORIES or name in out or not re.fullmatch(r"\d+", count, re.ASCII):
            raise ConfigError(
                f"targets={text!r} is not valid: {piece.strip()!r} is not category:count; expected "
                f"comma-separated pairs, each of {'/'.join(SIZE_CATEGORIES)} once, count an int >= 0"
            )
        out[name] = int(count)
    return out


def _merged_targets(targets: Mapping[str, int] | str | None,
                    base: Mapping[str, int] = DEFAULT_TARGETS) -> dict[str, int]:
    given = parse_targets(targets) if isinstance(targets, str) else dict(targets or {})
    for name, count in given.items():
        if name not in SIZE_CATEGORIES or not _is_int(count) or not 0 <= count <= MAX_PLANNED_STEPS:
            expected = f"a mapping from {'/'.join(SIZE_CATEGORIES)} to ints in [0, {MAX_PLANNED_STEPS}]"
            raise ConfigError.field("targets", targets, expected)
    return {**base, **given}


def check_target_table(name: str, table: object) -> dict[str, int]:
    """``table`` as a dict when it maps each of ``SIZE_CATEGORIES`` (all of them, nothing else)
    to an int in [0, ``MAX_PLANNED_STEPS``]; else ``ConfigError`` naming ``name`` and the value."""
    expected = f"a mapping from each of {'/'.join(SIZE_CATEGORIES)} to an int in [0, {MAX_PLANNED_STEPS}]"
    if not isinstance(table, Mapping):
        raise ConfigError.field(name, table, expected)
    for key, count in table.items():
        if key not in SIZE_CATEGORIES:
            raise ConfigError(f"{name}: unknown size category {key!r} (={count!r}); expected "
                              f"{', '.join(SIZE_CATEGORIES)}")
        if not _is_int(count) or not 0 <= count <= MAX_PLANNED_STEPS:
            raise ConfigError.field(f"{name}.{key}", count, f"an integer in [0, {MAX_PLANNED_STEPS}]")
    missing = [c for c in SIZE_CATEGORIES if c not in table]
    if missing:
        raise ConfigError.field(name, dict(table), f"{expected}; missing {', '.join(missing)}")
    return dict(table)


def choose_target(
    target: int | Mapping[str, int] | None,
    dataset_tokens: int | None,
    targets: Mapping[str, int] | str | None = None,
) -> tuple[int | None, str | None]:
    """The number of checkpoints a plan aims at and the size category that chose it.

    An int ``target`` is the answer (category None).  Otherwise the category of
    ``dataset_tokens`` picks from ``DEFAULT_TARGETS``, overridden by a ``target``
    mapping (every category, see ``check_target_table``), overridden in turn by the
    partial ``targets`` (``--targets``).  Neither ``target`` nor ``dataset_tokens``:
    ``(None, None)``, the forced steps only.  A mapping without ``dataset_tokens``
    is a ``ConfigError``: nothing says which category applies.
    """
    if target is not None and not isinstance(target, Mapping):
        _merged_targets(targets)  # still checked: a bad --targets is an error either way
        _check_int("target", target, 0, MAX_PLANNED_STEPS)
        return target, None
    table = check_target_table("target", target) if target is not None else DEFAULT_TARGETS
    merged = _merged_targets(targets, table)
    if dataset_tokens is None:
        if target is not None:
            raise ConfigError(f"target={dict(table)!r} picks the target by dataset size category: "
                              "dataset_tokens (the dataset's size in tokens) is needed")
        return None, None
    category = size_category(dataset_tokens)
    return merged[category], category


def plan_checkpoints(
    total_steps: int,
    steps_per_epoch: int,
    *,
    target: int | Mapping[str, int] | None = None,
    dataset_tokens: int | None = None,
    targets: Mapping[str, int] | str | None = None,
    log_steps_first_epoch: bool = True,
    min_interval: int = 100,
) -> list[int]:
    """The steps to save in a run of ``total_steps``: sorted, unique, deterministic.

    Forced: the powers of two below ``steps_per_epoch`` (if
    ``log_steps_first_epoch``), every epoch boundary, and ``total_steps``.
    Then steps are added until there are ``target`` in all: each at the
    midpoint of the largest gap (ties: the earliest), where step 0 (the start)
    bounds the first gap.  A filled step is at least ``min_interval`` from every
    other step and from 0; once the largest gap is too small for that, no gap
    can take one and the plan stops short of ``target``.

    The target is ``choose_target(target, dataset_tokens, targets)``: an int
    ``target``; else, with ``dataset_tokens``, the count for its
    ``size_category`` in ``targets`` over a ``target`` mapping (all four
    categories) over ``DEFAULT_TARGETS``; else the number of forced steps.
    """
    _check_int("total_steps", total_steps, 1, MAX_STEP)
    _check_int("steps_per_epoch", steps_per_epoch, 1)
    if total_steps // steps_per_epoch > MAX_PLANNED_STEPS:  # each epoch end is saved
        raise ConfigError.field("steps_per_epoch", steps_per_epoch, f"at least total_steps / "
                                f"{MAX_PLANNED_STEPS:,} = {-(-total_steps // MAX_PLANNED_STEPS)} (every "
                                f"epoch end is a planned step, at most {MAX_PLANNED_STEPS:,} of them)")
    _check_int("min_interval", min_interval, 1)
    chosen = _forced_steps(total_steps, steps_per_epoch, log_steps_first_epoch)
    goal, _ = choose_target(target, dataset_tokens, targets)
    if goal is None:
        goal = len(chosen)
    return sorted(chosen + _fill_gaps(chosen, goal - len(chosen), min_interval))


def _forced_steps(total_steps: int, steps_per_epoch: int, log_steps: bool) -> list[int]:
    steps = set(range(steps_per_epoch, total_steps + 1, steps_per_epoch))
    steps.add(total_steps)
    power = 1
    while log_steps and power < steps_per_epoch and power <= total_steps:
        steps.add(power)
        power *= 2
    return sorted(steps)


def _fill_gaps(chosen: list[int], count: int, min_interval: int) -> list[int]:
    bounds = [0, *chosen]
    heap = [(a - b, a, b) for a, b in zip(bounds, bounds[1:])]  # largest gap first, then earliest
    heapq.heapify(heap)
    added: list[int] = []
    while len(added) < count and heap:
        _, a, b = heapq.heappop(heap)
        mid = (a + b) // 2  # mid - a <= b - mid, so only the left side can be too short
        if mid - a < min_interval:
            break
        added.append(mid)
        heapq.heappush(heap, (a - mid, a, mid))
        heapq.heappush(heap, (mid - b, mid, b))
    return added
