"""Manager options: one validated dataclass, built from keywords or YAML.

Pure: no torch, no I/O (callers read the file and pass its text or its
parsed dict).  ``ManagerOptions.__post_init__`` raises ``ConfigError`` naming
the field, the value, and what was expected.

The YAML file has two sections this module reads; other top-level keys are
the user's and are ignored::

    training:                      # shared with the trainer: unknown keys are
      total_steps: 10000           # ignored, near-misses ("total_step") are errors
      steps_per_epoch: 1000        # or: epochs + steps_per_epoch
      dataset_tokens: 30000000     # picks the target by size category (schedule.size_category)
      target_checkpoints: 40       # an explicit target, or one per size category:
                                   # {small: 20, medium: 50, large: 100, xlarge: 200}
      log_steps_first_epoch: true
      min_checkpoint_interval: 100
      auto_generate_checkpoints: true
      checkpoint_schedule: [1, 2, 4, ...]   # written by `asyncckpt schedule`
    checkpoint:                    # strict: an unknown key is an error
      root: runs/exp1/ckpt         # relative: to the YAML file's folder; then any ManagerOptions field:
      retention: {keep_last: 3, keep_best: 1, best_metric: val_loss}
      schedule: {every_n_steps: 500}
      compression: zstd
"""

from __future__ import annotations

import difflib
import os
import re
import time
from os import PathLike
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .errors import ConfigError
from .retention import Retention
from .schedule import (MAX_PLANNED_STEPS, MAX_STEP, Schedule, check_target_table, choose_target,
                       plan_checkpoints)

COMPRESSIONS = ("zstd", None)
STAGINGS = ("auto", "pinned", "device")
ON_ERROR = ("raise", "warn")
ON_ROLLBACK = ("keep", "delete", "refuse")
MAX_THREADS = 1024
"""The most ``writer_threads`` and ``upload_concurrency`` (threads are started for them)."""
MAX_WAIT_S = 30 * 24 * 3600
"""The longest ``lease_heartbeat_s``, ``lease_timeout_s`` and ``signal_grace_s`` (30 days):
longer waits are not a sane setting, and past about 292 years Python's waits overflow."""


def _seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_WAIT_S:
        raise ConfigError.field(name, value, f"a number of seconds > 0 and <= {MAX_WAIT_S} (30 days)")


def _int_at_least(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low \
            or (high is not None and value > high):
        raise ConfigError.field(name, value, f"an integer >= {low}" if high is None
                                else f"an integer in [{low}, {high}]")


@dataclass(frozen=True, kw_only=True)
class ManagerOptions:
    """Everything ``CheckpointManager`` takes besides its root."""

    retention: Retention | None = None
    """Which committed checkpoints to keep; None keeps all."""
    schedule: Schedule | None = None
    """When ``maybe_save`` saves; None means only when forced."""
    compression: str | None = "zstd"
    """``"zstd"`` (byte-grouped floats, zstd frames) or None for plain DCP files."""
    zstd_level: int = 1
    """zstd compression level (1 is fast and already gains most of the ratio)."""
    staging: str = "auto"
    """``"pinned"``, ``"device"`` or ``"auto"``; CPU training always stages with a plain copy."""
    overlap: bool = True
    """Let copies of parameters and optimizer state run during the next forward/backward;
    ``optimizer.step`` (hooked) and ``with mgr.guard():`` wait for them.  CUDA only."""
    pinned_memory_budget: int | None = None
    """Bytes of host staging buffers (pinned ones counted as torch allocates them, each
    rounded up to a power of two); None: one copy of the state (two for CPU training).
    A state larger than this is not staged: ``save()`` writes it from the live tensors and
    returns once it has committed (the stall grows, memory does not)."""
    on_error: str = "raise"
    """``"raise"``: a background failure is raised by the next call; ``"warn"``: logged only."""
    max_pending: int = 2
    """Saves staged but not yet committed before ``save()`` waits for the writer."""
    writer_threads: int = 2
    """Files written (and compressed) in parallel per rank (at most ``MAX_THREADS``, 1024)."""
    verify_on_restore: bool = True
    """Check every file's checksum while restoring."""
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    """Passed to fsspec for the root (endpoint, credentials, ...)."""
    backup: str | None = None
    """Optional second storage URL that committed checkpoints are mirrored to."""
    backup_storage_options: Mapping[str, Any] = field(default_factory=dict)
    """fsspec options for the backup URL."""
    backup_retention: Retention | None = None
    """Retention on the backup; None uses ``retention``."""
    upload_part_bytes: int = 16 << 20
    """Object stores (S3): size of each part of a multipart upload, 5 MiB to 5 GiB; a file is at
    most 10,000 parts, and each file being written holds about
    ``(upload_concurrency + 1) * upload_part_bytes`` of memory."""
    upload_concurrency: int = 4
    """Object stores (S3): parts of one file uploading at once (at most 1024)."""
    save_on_signal: bool = False
    """Install SIGTERM/SIGINT handlers (main thread only): after a signal the next
    ``maybe_save`` saves at once, waits for the commit and sets ``should_stop``; a
    second signal exits at once with status 128 + signum (see ``signals.py``)."""
    signal_grace_s: float = 30.0
    """With ``save_on_signal``: the longest ``maybe_save`` waits for the final save to commit
    (at most ``MAX_WAIT_S``, 30 days, as for the lease's times)."""
    initial_from: str | None = None
    """Fine-tuning start: a checkpoint folder, another run's root (its newest checkpoint), a
    plain DCP folder or a release folder that ``restore()`` loads (``initial_include`` only)
    while this root has no checkpoint; once the run has its own, they win."""
    initial_include: Sequence[str] = ("model",)
    """What ``initial_from`` loads: parts as restore's ``include`` names them."""
    on_commit: Callable[[Any], None] | None = None
    """Called with the ``CheckpointInfo`` of each committed save, on the writer thread of rank 0
    after retention; an exception it raises is logged, never raised."""
    on_failure: Callable[[int, BaseException], None] | None = None
    """Called with ``(step, error)`` when a background save fails, on the writer thread of
    rank 0 before the error is kept for the next call; an exception it raises is logged."""
    lease: bool = True
    """Hold ``<root>/.lease.json`` (rank 0) while open, so a second job writing the same root
    fails at once with ``LeaseError`` naming the first.  False: take no lease (a reader; if
    another writer holds the root, this manager only lists and restores)."""
    lease_heartbeat_s: float = 10.0
    """Seconds between refreshes of the lease (at most ``MAX_WAIT_S``, 30 days)."""
    lease_timeout_s: float = 60.0
    """A lease not refreshed for this long is stale: another manager may take it over (more than
    ``lease_heartbeat_s``, at most ``MAX_WAIT_S``, 30 days)."""
    on_rollback: str = "keep"
    """What the first save after restoring an older checkpoint than the root's newest does with
    the newer ones (the abandoned branch; see docs/rollback.md): ``"keep"`` moves them to
    ``<root>/abandoned/`` (out of ``latest``, listed by ``list --all``, removed by retention
    later), ``"delete"`` deletes them, ``"refuse"`` makes the save raise
    ``RollbackRefusedError``.  A WARNING says which steps went where."""

    retry: Any = None
    """How storage calls retry transient failures (5xx, throttling, resets): a
    ``storage.Retry`` (attempts, backoff, deadline), for the backup too; None: ``Retry()``."""
    clock: Callable[[], float] = time.monotonic
    """Monotonic seconds: what ``every_seconds`` and the ``auto`` plan's measured save cost
    read.  A simulation or a test passes its own."""

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ConfigError.field("compression", self.compression, '"zstd" or None')
        if isinstance(self.zstd_level, bool) or not isinstance(self.zstd_level, int) \
                or not -5 <= self.zstd_level <= 22 or self.zstd_level == 0:
            raise ConfigError.field("zstd_level", self.zstd_level, "an integer in [-5, -1] or [1, 22]")
        if self.staging not in STAGINGS:
            raise ConfigError.field("staging", self.staging, " | ".join(map(repr, STAGINGS)))
        if self.on_error not in ON_ERROR:
            raise ConfigError.field("on_error", self.on_error, '"raise" or "warn"')
        if self.pinned_memory_budget is not None:
            _int_at_least("pinned_memory_budget", self.pinned_memory_budget, 1)
        _int_at_least("max_pending", self.max_pending, 1)
        _int_at_least("writer_threads", self.writer_threads, 1, MAX_THREADS)
        _int_at_least("upload_part_bytes", self.upload_part_bytes, 5 << 20, 5 << 30)  # S3's limits
        _int_at_least("upload_concurrency", self.upload_concurrency, 1, MAX_THREADS)
        if self.retention is not None and not isinstance(self.retention, Retention):
            raise ConfigError.field("retention", self.retention, "a Retention or None")
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ConfigError.field("schedule", self.schedule, "a Schedule or None")
        for name in ("storage_options", "backup_storage_options"):
            if not isinstance(getattr(self, name), Mapping):
                raise ConfigError.field(name, getattr(self, name), "a dict")
        if self.backup is not None and (not isinstance(self.backup, str) or not self.backup):
            raise ConfigError.field("backup", self.backup, "a storage URL or None")
        if not isinstance(self.save_on_signal, bool):
            raise ConfigError.field("save_on_signal", self.save_on_signal, "True or False")
        _seconds("signal_grace_s", self.signal_grace_s)
        if self.initial_from is not None and (not isinstance(self.initial_from, (str, PathLike))
                                              or not str(self.initial_from)):
            raise ConfigError.field("initial_from", self.initial_from, "a storage URL or path, or None")
        if isinstance(self.initial_include, str) or not isinstance(self.initial_include, Sequence) \
                or not self.initial_include or not all(isinstance(p, str) and p for p in self.initial_include):
            raise ConfigError.field("initial_include", self.initial_include,
                                    'a non-empty list of parts, e.g. ["model"]')
        if not isinstance(self.lease, bool):
            raise ConfigError.field("lease", self.lease, "True or False")
        for name in ("lease_heartbeat_s", "lease_timeout_s"):
            _seconds(name, getattr(self, name))
        if self.lease_timeout_s <= self.lease_heartbeat_s:
            raise ConfigError.field("lease_timeout_s", self.lease_timeout_s,
                                    f"more than lease_heartbeat_s={self.lease_heartbeat_s!r}")
        if self.on_rollback not in ON_ROLLBACK:
            raise ConfigError.field("on_rollback", self.on_rollback, " | ".join(map(repr, ON_ROLLBACK)))
        for name in ("on_commit", "on_failure"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise ConfigError.field(name, getattr(self, name), "a callable or None")
        if self.retry is not None and not (callable(getattr(self.retry, "call", None))
                                           and hasattr(self.retry, "attempts")):
            raise ConfigError.field("retry", self.retry, "an asyncckpt.storage.Retry or None")
        if not callable(self.clock):
            raise ConfigError.field("clock", self.clock, "a callable returning monotonic seconds")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "ManagerOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        return cls(**{k: (dict(v) if k.endswith("storage_options") and v is None else v)
                      for k, v in kwargs.items() if not (k.endswith("storage_options") and v is None)})


# ---------------------------------------------------------------- YAML
TRAINING_KEYS = ("total_steps", "epochs", "steps_per_epoch", "dataset_tokens", "target_checkpoints",
                 "log_steps_first_epoch", "min_checkpoint_interval", "auto_generate_checkpoints",
                 "checkpoint_schedule")
"""The keys of ``training:`` read here (the section may hold the trainer's own keys too)."""
_NESTED = {"retention": Retention, "backup_retention": Retention, "schedule": Schedule}


def decode_yaml(data: bytes, source: str) -> str:
    """The text of a YAML file's bytes (UTF-8, a BOM allowed); ``source`` names it in errors."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{source} is not valid: not UTF-8 text (byte {data[e.start:e.start + 1]!r} "
                          f"at offset {e.start}, line {line}); save it as UTF-8") from e


def load_yaml_text(text: str, source: str) -> dict[str, Any]:
    """The mapping in YAML ``text`` (``yaml.safe_load``); ``source`` names it in errors."""
    try:
        data = yaml.safe_load(text)
    except RecursionError as e:
        raise ConfigError(f"{source} is not valid YAML: nested too deeply") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not valid: expected a mapping at the top, found a "
                          f"{type(data).__name__}")
    return data


def _section(config: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {name}={value!r} is not valid: expected a mapping")
    return dict(value)


def _check_keys(where: str, given: Mapping[str, Any], known: Sequence[str], *, strict: bool) -> None:
    for key in given:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.8)
        if key in known or (not strict and not close):
            continue
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: unknown key {key!r}; {hint}known keys: {', '.join(known)}")


def _whole(where: str, value: Any, low: int, high: int | None = None) -> int:
    given = value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low \
            or (high is not None and value > high):
        raise ConfigError.field(where, given, f"an integer >= {low}" if high is None
                                else f"an integer in [{low}, {high}]")
    return value


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError.field(where, value, "true or false")
    return value


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """The inputs of ``plan_checkpoints`` as a ``training:`` section gives them."""

    total_steps: int
    """Steps in the whole run (``total_steps``, or ``epochs * steps_per_epoch``)."""
    steps_per_epoch: int
    """Steps per epoch; the whole run when the section names no epochs."""
    target: int | Mapping[str, int] | None = None
    """``target_checkpoints``: an explicit number of checkpoints, or one per size category
    (all of small/medium/large/xlarge), picked by ``dataset_tokens``."""
    dataset_tokens: int | None = None
    """Dataset size in tokens; picks the target by size category unless ``target`` is an int."""
    log_steps_first_epoch: bool = True
    """Also save at the powers of two in the first epoch."""
    min_interval: int = 100
    """``min_checkpoint_interval``: the closest a gap-filling step comes to any other."""

    def target_for(self, targets: Mapping[str, int] | None = None) -> tuple[int | None, str]:
        """The target ``plan`` aims at (None: the forced steps only) and where it comes from."""
        goal, category = choose_target(self.target, self.dataset_tokens, targets)
        if category is None:
            return goal, ("training.target_checkpoints" if goal is not None
                          else "no target_checkpoints or dataset_tokens: forced steps only")
        if isinstance(self.target, Mapping) and category not in (targets or {}):
            return goal, f"{category} dataset, training.target_checkpoints.{category}"
        return goal, f"{category} dataset"

    def plan(self, targets: Mapping[str, int] | None = None) -> list[int]:
        return plan_checkpoints(self.total_steps, self.steps_per_epoch, target=self.target,
                                dataset_tokens=self.dataset_tokens, targets=targets,
                                log_steps_first_epoch=self.log_steps_first_epoch,
                                min_interval=self.min_interval)


def plan_request(config: Mapping[str, Any], source: str = "config") -> PlanRequest:
    """Read the ``training:`` section of a parsed config; ``ConfigError`` names what is wrong."""
    training = _section(config, "training", source)
    _check_keys(f"{source}: training", training, TRAINING_KEYS, strict=False)
    where = f"{source}: training."
    get = {k: training[k] for k in TRAINING_KEYS if training.get(k) is not None}
    total = _whole(where + "total_steps", get["total_steps"], 1, MAX_STEP) if "total_steps" in get else None
    epochs = _whole(where + "epochs", get["epochs"], 1, MAX_PLANNED_STEPS) if "epochs" in get else None
    per_epoch = _whole(where + "steps_per_epoch", get["steps_per_epoch"], 1, MAX_STEP) \
        if "steps_per_epoch" in get else None
    if total is None and (epochs is None or per_epoch is None):
        raise ConfigError(f"{where}total_steps is missing (or give both training.epochs and "
                          "training.steps_per_epoch)")
    if total is None:
        total = _whole(f"{where}total_steps (epochs x steps_per_epoch)", epochs * per_epoch, 1, MAX_STEP)
    elif per_epoch is None:
        per_epoch = max(1, total // epochs) if epochs else total
    elif epochs is not None and epochs * per_epoch != total:
        raise ConfigError(f"{where}total_steps={total} disagrees with epochs={epochs} x "
                          f"steps_per_epoch={per_epoch}")
    if total // per_epoch > MAX_PLANNED_STEPS:  # every epoch end is a planned step
        raise ConfigError.field(where + "steps_per_epoch", per_epoch, f"at least total_steps / "
                                f"{MAX_PLANNED_STEPS:,} (every epoch end is saved; at most "
                                f"{MAX_PLANNED_STEPS:,} planned steps)")
    tokens = _whole(where + "dataset_tokens", get["dataset_tokens"], 0) if "dataset_tokens" in get else None
    return PlanRequest(
        total_steps=total, steps_per_epoch=per_epoch,
        target=_target(training, where, get["target_checkpoints"], tokens)
        if "target_checkpoints" in get else None,
        dataset_tokens=tokens,
        log_steps_first_epoch=_flag(where + "log_steps_first_epoch", get.get("log_steps_first_epoch", True)),
        min_interval=_whole(where + "min_checkpoint_interval", get.get("min_checkpoint_interval", 100), 1))


def _target(training: Mapping[str, Any], where: str, value: Any,
            tokens: int | None) -> int | dict[str, int]:
    """``training.target_checkpoints``: an int, or a mapping by size category (which then
    needs ``dataset_tokens``: a dataset path says nothing reliable about its size in tokens)."""
    if not isinstance(value, Mapping):
        return _whole(where + "target_checkpoints", value, 0, MAX_PLANNED_STEPS)
    whole = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in value.items()}
    table = check_target_table(where + "target_checkpoints", whole)
    if tokens is None:
        paths = [k for k in training if isinstance(k, str) and "data" in k and k not in TRAINING_KEYS]
        given = f" (training.{paths[0]} is given, but its size in tokens depends on the file format " \
                "and the tokenizer: asyncckpt does not guess it)" if paths else ""
        raise ConfigError(f"{where}target_checkpoints={dict(value)!r} picks the target by dataset "
                          "size category: training.dataset_tokens (the dataset's size in tokens) is "
                          f"needed{given}")
    return table


def resolve_root(root: str, base_dir: str | None) -> str:
    """``root`` as a config file gives it: a relative local path is relative to ``base_dir``
    (the file's folder); URLs (``scheme://``), absolute and ``~`` paths, and any root when
    ``base_dir`` is None, are as given.  Path arithmetic only: nothing is looked at."""
    if base_dir is None or "://" in root or os.path.isabs(root) or root.startswith("~"):
        return root
    return os.path.join(base_dir, root)


def options_from_dict(config: Mapping[str, Any], source: str = "config",
                      overrides: Mapping[str, Any] | None = None,
                      base_dir: str | None = None) -> tuple[str, ManagerOptions]:
    """The root and ``ManagerOptions`` from a parsed config (see the module docstring).

    ``overrides`` replace keys of the ``checkpoint:`` section (same names, values
    may be objects: ``Retention``, ``Schedule``).  A relative ``checkpoint.root``
    of the config (not of ``overrides``) is taken relative to ``base_dir`` (the YAML
    file's folder; None: the working directory).  When the schedule has no
    ``at_steps``, they come from ``training.checkpoint_schedule``, or else, with
    ``training.auto_generate_checkpoints: true``, from ``plan_request(...).plan()``.
    """
    section = {**_section(config, "checkpoint", source), **(overrides or {})}
    known = ["root", *(f.name for f in fields(ManagerOptions))]
    _check_keys(f"{source}: checkpoint", section, known, strict=True)
    root = section.pop("root", None)
    if root is None or root == "":
        raise ConfigError(f"{source}: checkpoint.root is missing: expected the checkpoint URL or path")
    if not isinstance(root, str):
        raise ConfigError.field(f"{source}: checkpoint.root", root, "the checkpoint URL or path (text)")
    if "root" not in (overrides or {}):
        root = resolve_root(root, base_dir)
    for name, cls in _NESTED.items():
        if isinstance(section.get(name), Mapping):
            section[name] = _build(cls, section[name], f"{source}: checkpoint.{name}")
    section["schedule"] = _with_planned_steps(config, section.get("schedule"), source)
    try:
        return root, ManagerOptions.from_kwargs(section)
    except ConfigError as e:
        raise ConfigError(f"{source}: checkpoint: {e}") from e


def _build(cls: type, given: Mapping[str, Any], where: str) -> Any:
    _check_keys(where, given, [f.name for f in fields(cls)], strict=True)
    try:
        return cls(**given)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def _with_planned_steps(config: Mapping[str, Any], schedule: Any, source: str) -> Any:
    if schedule is not None and (not isinstance(schedule, Schedule) or schedule.at_steps is not None):
        return schedule
    training = _section(config, "training", source)
    steps = training.get("checkpoint_schedule")
    if steps is None and _flag(f"{source}: training.auto_generate_checkpoints",
                               training.get("auto_generate_checkpoints", False)):
        steps = plan_request(config, source).plan()
    if steps is None:
        return schedule
    where = f"{source}: training.checkpoint_schedule"
    if schedule is None:
        return _build(Schedule, {"at_steps": steps}, where)
    return _build(Schedule, {**{f.name: getattr(schedule, f.name) for f in fields(Schedule)},
                             "at_steps": steps}, where)


def with_checkpoint_schedule(text: str, plan: Sequence[int], source: str = "config") -> tuple[str, bool]:
    """``text`` with ``training.checkpoint_schedule`` set to ``plan``, and whether
    the layout was kept.

    Edits the text (comments and layout survive) when ``training:`` is a block
    mapping at column 0; otherwise re-dumps the whole document (comments are
    lost; the flag is False).  The edited text is parsed back and checked.
    """
    original = load_yaml_text(text, source)
    expected = {**original, "training": {**_section(original, "training", source),
                                         "checkpoint_schedule": list(plan)}}
    edited = _edit_block(text, list(plan))
    if edited is not None and load_yaml_text(edited, source) == expected:
        return edited, True
    return yaml.safe_dump(expected, sort_keys=False, default_flow_style=None, width=100), False


def _edit_block(text: str, plan: list[int]) -> str | None:
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if re.fullmatch(r"training\s*:\s*(#.*)?\n?", ln)), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if _indent(lines[i]) == 0), len(lines))
    body = [i for i in range(start + 1, end) if _indent(lines[i]) is not None]
    indent = min((_indent(lines[i]) or 0 for i in body), default=2)
    key = next((i for i in body if _indent(lines[i]) == indent
                and re.match(r"\s*checkpoint_schedule\s*:", lines[i])), None)
    if key is None:
        at = (body[-1] + 1) if body else start + 1
        stop = at
    else:
        at, stop = key, key + 1
        while stop < end and (_indent(lines[stop]) is None or _indent(lines[stop]) > indent
                              or lines[stop].lstrip().startswith("- ")):
            stop += 1
        while stop > key + 1 and _indent(lines[stop - 1]) is None:  # keep the comments after it
            stop -= 1
    if at > 0 and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    return "".join(lines[:at] + _flow_list(" " * indent, plan) + lines[stop:])


def _indent(line: str) -> int | None:
    """Leading spaces of a line with content; None for blank and comment-only lines."""
    stripped = line.lstrip(" ")
    return None if not stripped.strip() or stripped.startswith("#") else len(line) - len(stripped)


def _flow_list(pad: str, plan: list[int], width: int = 100) -> list[str]:
    out, line = [], f"{pad}checkpoint_schedule: ["
    for i, step in enumerate(plan):
        item = f"{step}{', ' if i < len(plan) - 1 else ''}"
        if len(line) + len(item) > width and not line.endswith("["):
            out.append(line.rstrip() + "\n")
            line = pad + "  "
        line += item
    return [*out, line + "]\n"]
