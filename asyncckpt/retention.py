"""Which committed checkpoints to keep: a pure retention policy.

``Retention`` holds the options; ``Retention.plan(items)`` looks at the
committed checkpoints (anything shaped like ``RetentionItem``) and returns a
``RetentionPlan``: the steps to keep, the steps to delete, and why each kept
step is kept.  Nothing here touches storage, torch or the clock; the pipeline
deletes what the plan says, and only after a newer checkpoint has committed.

A checkpoint is kept when ANY rule keeps it:

- ``latest`` / ``latest-backup``: the newest committed checkpoint and the one
  before it, always, whatever the options (a torn newest copy must still have
  a fallback);
- ``last-N``: the newest ``keep_last`` checkpoints; with ``keep_last=None``
  every checkpoint is kept (reason ``all``) and the policy deletes nothing;
- ``best:<metric>``: the best ``keep_best`` checkpoints for each metric of
  ``best_metric``.  A missing or non-finite value (nan, inf) never ranks; such
  checkpoints are reported in ``missing_metric`` and simply follow the other
  rules.  Ties go to the newer step;
- ``every-N``: steps divisible by ``keep_every_n_steps``;
- ``epoch_end``: checkpoints tagged ``"epoch_end"`` when ``keep_epoch_ends``;
- ``tag:<tag>``: checkpoints with a tag matching one of ``keep_tags``
  (``fnmatch`` patterns, case-sensitive).
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from asyncckpt.errors import ConfigError

MODES = ("min", "max")
"""The allowed values of a metric's mode: lower is better, or higher is better."""

DEFAULT_MODE = "min"
"""Mode of a metric that a per-metric ``best_mode`` mapping does not name."""

EPOCH_END_TAG = "epoch_end"
"""The tag that ``keep_epoch_ends`` keeps."""


class RetentionItem(Protocol):
    """A committed checkpoint as the policy sees it (e.g. ``CheckpointInfo``).

    Only these three read-only attributes are used; steps are unique.
    """

    @property
    def step(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, float]: ...

    @property
    def tags(self) -> Sequence[str]: ...


@dataclass(frozen=True, kw_only=True)
class RetentionPlan:
    """What to do with a set of committed checkpoints; the output of ``Retention.plan``."""

    keep: tuple[int, ...]
    """Steps to keep, ascending."""
    delete: tuple[int, ...]
    """Steps to delete, ascending; never the newest two."""
    reasons: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    """For each kept step, why it is kept (``"latest"``, ``"last-3"``, ``"best:loss"``...)."""
    best: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Per metric (only when ``keep_best > 0``), its best steps, best first."""
    missing_metric: tuple[tuple[int, str], ...] = ()
    """``(step, metric)`` for each checkpoint lacking a finite value of a ranked metric."""

    @property
    def slot_holders(self) -> tuple[int, ...]:
        """Kept steps that hold a slot another checkpoint would otherwise get (``latest``,
        ``latest-backup``, ``last-N``, ``best:<metric>``), as opposed to those kept forever by
        their own step or tags: a damaged one of these must not push a whole one out."""
        return tuple(s for s in self.keep if any(r.startswith(_SLOT_REASONS) for r in self.reasons[s]))


_SLOT_REASONS = ("latest", "last-", "best:")


def metric_value(item: RetentionItem, metric: str) -> float | None:
    """The finite value of ``metric`` on ``item``, or None when absent, non-numeric or nan/inf."""
    value = item.metrics.get(metric) if item.metrics is not None else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int past float's range: not a value to rank by
        return None
    return value if math.isfinite(value) else None


def metric_mode(best_mode: str | Mapping[str, str], metric: str) -> str:
    """The mode (``"min"``/``"max"``) of ``metric`` under a ``best_mode`` option.

    A string applies to every metric; a mapping gives per-metric modes, and a
    metric it does not name uses ``DEFAULT_MODE``.
    """
    if isinstance(best_mode, str):
        return best_mode
    return best_mode.get(metric, DEFAULT_MODE)


def rank_by_metric(items: Iterable[RetentionItem], metric: str, mode: str) -> tuple[int, ...]:
    """Steps of the items that have a finite ``metric``, best first; ties prefer the newer step."""
    if mode not in MODES:
        raise ConfigError.field("best_mode", mode, "'min' or 'max'")
    sign = 1.0 if mode == "min" else -1.0
    scored = []
    for item in items:
        value = metric_value(item, metric)
        if value is not None:
            scored.append((sign * value, -item.step, item.step))
    scored.sort()
    return tuple(step for _, _, step in scored)


def ranking_for(metric: str | None, policy: "Retention | None",
                items: Iterable[RetentionItem]) -> tuple[str, str] | None:
    """The ``(metric, mode)`` that ``"best"`` (``metric`` None) or ``"best:<metric>"`` ranks by.

    The policy's own first: its primary metric, and its mode for a metric it names.  Without
    one (an evaluation script's manager), what the checkpoints recorded: the ``rank_metric``
    of the newest item that has one, and for a metric, the ``rank_mode`` the newest item
    ranking by it recorded (items without these attributes record nothing).  A metric that
    neither names ranks by the policy's ``best_mode`` (a single one), else ``DEFAULT_MODE``.
    None: ``"best"`` with no metric anywhere to rank by.
    """
    recorded: dict[str, str] = {}
    newest = None
    for item in sorted(items, key=lambda i: i.step):
        name = getattr(item, "rank_metric", None)
        if name:
            newest, recorded[name] = name, getattr(item, "rank_mode", None) or DEFAULT_MODE
    own = policy.metrics if policy is not None else ()
    if metric is None:
        metric = own[0] if own else newest
        if metric is None:
            return None
    if metric in own or (policy is not None and metric not in recorded):
        return metric, policy.mode_for(metric)  # type: ignore[union-attr]
    return metric, recorded.get(metric, DEFAULT_MODE)


def best_step_for(items: Iterable[RetentionItem], metric: str | None,
                  policy: "Retention | None") -> tuple[str, int | None] | None:
    """The metric ``ranking_for`` chose and the best step by it (None when no item has a finite
    value); None when there is no metric to rank by.  Ties prefer the newer step."""
    items = list(items)
    rule = ranking_for(metric, policy, items)
    if rule is None:
        return None
    ranked = rank_by_metric(items, *rule)
    return rule[0], (ranked[0] if ranked else None)


def best_tags(items: Iterable[RetentionItem], policy: "Retention | None",
              metrics: Sequence[str] | None = None) -> dict[int, tuple[str, ...]]:
    """``{step: ("best:<metric>", ...)}`` for the best step of each of ``metrics`` (default:
    the policy's metrics, or else the one the newest checkpoints recorded), as ``list`` shows."""
    items = list(items)
    if metrics is None:
        metrics = policy.metrics if policy is not None and policy.metrics else ()
        rule = ranking_for(None, policy, items) if not metrics else None
        metrics = (rule[0],) if rule is not None else metrics
    out: dict[int, tuple[str, ...]] = {}
    for metric in metrics:
        found = best_step_for(items, metric, policy)
        if found is not None and found[1] is not None:
            out[found[1]] = (*out.get(found[1], ()), f"best:{metric}")
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_seq(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and all(isinstance(v, str) for v in value)
    )


@dataclass(frozen=True, kw_only=True)
class Retention:
    """Which committed checkpoints to keep; pure, see the module docstring for the rules."""

    keep_last: int | None = None
    """Keep the newest N committed checkpoints (N >= 1).  None keeps every
    checkpoint: nothing is ever deleted, whatever the other options."""

    keep_best: int = 0
    """Keep the best k checkpoints for each metric of ``best_metric`` (0: none)."""

    best_metric: str | Sequence[str] | None = None
    """The metric to rank by, or several; each keeps its own best ``keep_best``.
    The first is the primary metric, used by ``best_step`` (``restore("best")``)."""

    best_mode: str | Mapping[str, str] = "min"
    """``"min"`` (lower is better) or ``"max"``, for every metric; or a mapping
    from metric name to mode, where unnamed metrics are ``"min"``."""

    keep_every_n_steps: int | None = None
    """Keep forever every checkpoint whose step is a multiple of this (>= 1)."""

    keep_epoch_ends: bool = False
    """Keep forever every checkpoint tagged ``"epoch_end"``."""

    keep_tags: Sequence[str] = ("milestone:*", "release:*")
    """``fnmatch`` patterns (case-sensitive); checkpoints with a matching tag are kept forever."""

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_metrics()
        self._check_mode()
        self._check_rules()

    def _check_counts(self) -> None:
        if self.keep_last is not None and not (_is_int(self.keep_last) and self.keep_last >= 1):
            raise ConfigError.field("keep_last", self.keep_last, "an int >= 1, or None to keep all")
        if not (_is_int(self.keep_best) and self.keep_best >= 0):
            raise ConfigError.field("keep_best", self.keep_best, "an int >= 0")

    def _check_metrics(self) -> None:
        metric = self.best_metric
        if isinstance(metric, str):
            names: Sequence[str] = (metric,)
        elif metric is None:
            names = ()
        elif _is_str_seq(metric):
            names = tuple(metric)
            object.__setattr__(self, "best_metric", names)
        else:
            raise ConfigError.field("best_metric", metric, "a metric name or a list of names")
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError.field("best_metric", metric, "distinct, non-empty metric names")
        if self.keep_best > 0 and not names:
            raise ConfigError.field(
                "best_metric", metric, f"a metric name to rank by, since keep_best={self.keep_best}"
            )

    def _check_mode(self) -> None:
        mode = self.best_mode
        expected = "'min' or 'max', or a mapping from metric name to 'min'/'max'"
        if isinstance(mode, str):
            if mode not in MODES:
                raise ConfigError.field("best_mode", mode, expected)
            return
        if not isinstance(mode, Mapping) or not all(
            isinstance(k, str) and v in MODES for k, v in mode.items()
        ):
            raise ConfigError.field("best_mode", mode, expected)
        unknown = sorted(set(mode) - set(self.metrics)) if self.metrics else []
        if unknown:
            raise ConfigError.field(
                "best_mode", mode, f"modes only for metrics of best_metric {self.metrics!r}"
            )
        object.__setattr__(self, "best_mode", dict(mode))

    def _check_rules(self) -> None:
        n = self.keep_every_n_steps
        if n is not None and not (_is_int(n) and n >= 1):
            raise ConfigError.field("keep_every_n_steps", n, "an int >= 1, or None")
        if not isinstance(self.keep_epoch_ends, bool):
            raise ConfigError.field("keep_epoch_ends", self.keep_epoch_ends, "True or False")
        if not _is_str_seq(self.keep_tags):
            raise ConfigError.field(
                "keep_tags", self.keep_tags, "a list or tuple of fnmatch patterns (strings)"
            )
        object.__setattr__(self, "keep_tags", tuple(self.keep_tags))

    def __hash__(self) -> int:
        mode = self.best_mode
        mode_key = mode if isinstance(mode, str) else tuple(sorted(mode.items()))
        return hash(
            (
                self.keep_last,
                self.keep_best,
                self.best_metric,
                mode_key,
                self.keep_every_n_steps,
                self.keep_epoch_ends,
                self.keep_tags,
            )
        )

    @property
    def metrics(self) -> tuple[str, ...]:
        """``best_metric`` as a tuple (empty when None); the first is the primary."""
        if self.best_metric is None:
            return ()
        if isinstance(self.best_metric, str):
            return (self.best_metric,)
        return tuple(self.best_metric)

    @property
    def primary_metric(self) -> str | None:
        """The first metric of ``best_metric``, or None."""
        return self.metrics[0] if self.metrics else None

    def mode_for(self, metric: str) -> str:
        """The mode (``"min"``/``"max"``) this policy uses for ``metric``."""
        return metric_mode(self.best_mode, metric)

    @property
    def disabled(self) -> bool:
        """True when this policy can never delete anything."""
        return self.keep_last is None or self.keep_every_n_steps == 1

    def plan(self, items: Iterable[RetentionItem]) -> RetentionPlan:
        """Decide, for committed checkpoints given in any order, which to keep and delete."""
        ordered = _sorted_unique(items)
        steps = [item.step for item in ordered]
        reasons: dict[int, list[str]] = {step: [] for step in steps}
        for step, why in zip(reversed(steps), ("latest", "latest-backup")):
            reasons[step].append(why)
        if self.keep_last is None:
            for step in steps:
                reasons[step].append("all")
        else:
            for step in steps[-self.keep_last :]:
                reasons[step].append(f"last-{self.keep_last}")
        best = self._best(ordered)
        for metric, ranked in best.items():
            for step in ranked:
                reasons[step].append(f"best:{metric}")
        for item in ordered:
            reasons[item.step].extend(self._permanent_reasons(item))
        keep = tuple(s for s in steps if reasons[s])
        return RetentionPlan(
            keep=keep,
            delete=tuple(s for s in steps if not reasons[s]),
            reasons=MappingProxyType({s: tuple(reasons[s]) for s in keep}),
            best=MappingProxyType(best),
            missing_metric=self._missing(ordered),
        )

    def expired_quarantine(self, quarantined: Iterable[int], committed: Iterable[int]) -> frozenset[int]:
        """Which quarantined (damaged, set aside) steps retention removes now: those older than
        ``keep_last`` committed checkpoints (at least two, like ``latest``/``latest-backup``),
        as an old checkpoint falls out of ``last-N``.  A policy that deletes nothing removes none."""
        if self.disabled:
            return frozenset()
        assert self.keep_last is not None
        newer = sorted(set(committed))
        need = max(self.keep_last, 2)
        return frozenset(q for q in set(quarantined) if sum(1 for s in newer if s > q) >= need)

    def best_step(self, items: Iterable[RetentionItem], metric: str | None = None) -> int | None:
        """The best step by ``metric`` (default: the primary metric), or None if no item has it.

        Works whatever ``keep_best`` is; ties prefer the newer step.
        """
        if metric is None:
            metric = self.primary_metric
            if metric is None:
                raise ConfigError.field(
                    "best_metric", None, "a metric name to pick the best checkpoint by"
                )
        ranked = rank_by_metric(items, metric, self.mode_for(metric))
        return ranked[0] if ranked else None

    def _best(self, ordered: Sequence[RetentionItem]) -> dict[str, tuple[int, ...]]:
        if self.keep_best == 0:
            return {}
        return {
            m: rank_by_metric(ordered, m, self.mode_for(m))[: self.keep_best] for m in self.metrics
        }

    def _missing(self, ordered: Sequence[RetentionItem]) -> tuple[tuple[int, str], ...]:
        if self.keep_best == 0:
            return ()
        return tuple(
            (item.step, m)
            for item in ordered
            for m in self.metrics
            if metric_value(item, m) is None
        )

    def _permanent_reasons(self, item: RetentionItem) -> list[str]:
        out = []
        n = self.keep_every_n_steps
        if n is not None and item.step % n == 0:
            out.append(f"every-{n}")
        tags = list(dict.fromkeys(item.tags or ()))
        if self.keep_epoch_ends and EPOCH_END_TAG in tags:
            out.append(EPOCH_END_TAG)
        for tag in tags:
            if any(fnmatch.fnmatchcase(tag, pattern) for pattern in self.keep_tags):
                out.append(f"tag:{tag}")
        return out


def _sorted_unique(items: Iterable[RetentionItem]) -> list[RetentionItem]:
    ordered = sorted(items, key=lambda item: item.step)
    for before, after in zip(ordered, ordered[1:]):
        if before.step == after.step:
            raise ConfigError(f"step {after.step} appears more than once: steps must be unique")
    return ordered
