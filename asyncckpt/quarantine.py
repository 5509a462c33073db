"""Damaged checkpoints, set aside: out of listing, restore and retention, kept for inspection.

A checkpoint found damaged (a manifest that does not parse, a file missing, of the wrong
size or checksum, metadata or an object item that does not decode) is moved from
``<root>/step-NNNNNNNNNN/`` to ``<root>/quarantine/step-NNNNNNNNNN.<UTC time>/``, with a
``quarantine.json`` saying when and why.  Listing, restore and retention read step folders
only, so the move takes the checkpoint out of all three at once, and a run that fell back
past it saves that step again normally.  Retention removes a quarantined checkpoint once
it is as old as the checkpoints ``keep_last`` lets go (``Retention.expired_quarantine``).

``checked_plan`` is retention's plan over whole checkpoints only: each one that would hold
a slot (``latest``, ``last-N``, ``best``) is checked first (sizes, or with ``deep`` every
checksum), so a damaged checkpoint never counts as the newest or as a kept one while a
whole one is deleted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from .errors import CorruptCheckpointError, StorageError
from .manifest import MAX_JSON_BYTES, Manifest, parse_json, parse_step_dir, step_dir_name
from .retention import Retention, RetentionPlan
from .storage import Storage, manifest_steps, read_manifest, verify_files

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
"""The folder under the root that holds quarantined checkpoints."""
REASON_NAME = "quarantine.json"
_NAME = re.compile(r"(step-\d{10})\.(\d{8}T\d{6}\.\d{6}Z)(?:-(\d+))?")


@dataclass(frozen=True)
class Quarantined:
    """One quarantined checkpoint: its step, folder name under ``quarantine/``, URL, why and when."""

    step: int
    name: str
    url: str
    reason: str
    time: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _stamp(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def utc_time(now: datetime) -> str:
    """``now`` as the notes write it: ISO 8601, seconds, ``Z``."""
    return now.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def is_aside_name(name: str) -> bool:
    """Whether ``name`` is a folder name ``aside_name`` makes (``step-N.<time>[-n]``)."""
    return _NAME.fullmatch(name) is not None


def aside_name(storage: Storage, area: str, step: int, now: datetime) -> str:
    """A free folder name under ``area`` for ``step`` set aside at ``now``:
    ``step-NNNNNNNNNN.<UTC time>`` (``-<n>`` added if taken)."""
    base = f"{step_dir_name(step)}.{_stamp(now)}"
    taken = set(storage.list_dirs(area))
    return base if base not in taken else next(f"{base}-{i}" for i in range(1, len(taken) + 2)
                                               if f"{base}-{i}" not in taken)


def move_aside(storage: Storage, step: int, area: str, name: str, note_name: str,
               note: dict[str, object]) -> str:
    """Move ``step``'s folder to ``<area>/<name>/`` and write ``note`` there as ``note_name``
    (after the move: a move cut short leaves no note, and the folder is still set aside);
    returns the new folder's path under the root."""
    rel = f"{area}/{name}"
    storage.move_dir(step_dir_name(step), rel)
    storage.put_atomic(f"{rel}/{note_name}", json.dumps(note, indent=1).encode(), create_only=False)
    return rel


def list_aside(storage: Storage, area: str, note_name: str) -> list[tuple[int, str, dict[str, object]]]:
    """``(step, folder name, note)`` for each folder set aside under ``area``, oldest step
    first; the note is ``{}`` where it cannot be read (a move cut short before it)."""
    out = []
    for name in storage.list_dirs(area):
        match = _NAME.fullmatch(name)
        step = parse_step_dir(match.group(1)) if match else None
        if step is None:
            continue
        rel = f"{area}/{name}/{note_name}"
        try:
            note = parse_json(storage.read_bytes(rel, max_bytes=MAX_JSON_BYTES), storage.url_of(rel))
        except (StorageError, CorruptCheckpointError):
            note = None
        out.append((step, name, note if isinstance(note, dict) else {}))
    return sorted(out, key=lambda t: (t[0], t[1]))


def quarantine(storage: Storage, step: int, reason: str, *, now: datetime | None = None) -> Quarantined:
    """Move ``step``'s folder aside under ``quarantine/`` with a note of ``reason``.

    Only the root's writer (the lease holder) may call this.
    """
    now = now or datetime.now(timezone.utc)
    name = aside_name(storage, QUARANTINE_DIR, step, now)
    when = utc_time(now)
    note = {"format": 1, "step": step, "reason": reason, "time": when}
    rel = move_aside(storage, step, QUARANTINE_DIR, name, REASON_NAME, note)
    log.warning("step=%d: damaged, moved aside to %s: %s", step, storage.url_of(rel), reason)
    return Quarantined(step=step, name=name, url=storage.url_of(rel), reason=reason, time=when)


def list_quarantined(storage: Storage) -> list[Quarantined]:
    """The quarantined checkpoints under the root, oldest step first."""
    out = []
    for step, name, note in list_aside(storage, QUARANTINE_DIR, REASON_NAME):
        reason, when = "unknown (no readable quarantine.json)", ""
        try:
            reason, when = str(note["reason"]), str(note["time"])
        except KeyError:
            pass  # a move cut short before its note was written: still quarantined
        out.append(Quarantined(step=step, name=name, url=storage.url_of(f"{QUARANTINE_DIR}/{name}"),
                               reason=reason, time=when))
    return out


def remove_quarantined(storage: Storage, q: Quarantined) -> None:
    storage.remove(f"{QUARANTINE_DIR}/{q.name}", recursive=True)
    log.info("step=%d: quarantined copy %s deleted by retention", q.step, q.url)


def quarantine_unreadable(storage: Storage) -> list[Quarantined]:
    """Quarantine every step folder whose manifest exists but does not parse (or names
    another step).  A manifest that cannot be read for a storage error is left alone."""
    out = []
    for step in manifest_steps(storage):
        try:
            read_manifest(storage, step)
        except CorruptCheckpointError as e:
            out.append(quarantine(storage, step, str(e)))
    return out


def damage(storage: Storage, m: Manifest, *, deep: bool) -> list[str]:
    """Problems with checkpoint ``m``'s files (sizes; with ``deep`` also checksums)."""
    return verify_files(storage.child(step_dir_name(m.step)), m, deep=deep)


def checked_plan(storage: Storage, policy: Retention, manifests: Sequence[Manifest], *, deep: bool,
                 check: Callable[[Manifest], list[str]] | None = None
                 ) -> tuple[RetentionPlan, dict[int, list[str]]]:
    """Retention's plan over whole checkpoints: returns it and ``{step: problems}`` for the
    damaged ones found (left out of the plan; the caller quarantines them).

    Only checkpoints that hold a slot are checked, and only when the plan deletes something:
    a damaged one kept forever by its own rules pushes nothing out.
    """
    check = check or (lambda m: damage(storage, m, deep=deep))
    by_step = {m.step: m for m in manifests}
    damaged: dict[int, list[str]] = {}
    whole: set[int] = set()
    while True:
        plan = policy.plan([m for s, m in by_step.items() if s not in damaged])
        todo = [s for s in plan.slot_holders if s not in whole] if plan.delete else []
        if not todo:
            return plan, damaged
        for s in todo:
            problems = check(by_step[s])
            if problems:
                damaged[s] = problems
            else:
                whole.add(s)


def retire_expired(storage: Storage, policy: Retention, committed: Sequence[int]) -> list[Quarantined]:
    """Delete the quarantined checkpoints ``policy`` lets go; returns them."""
    held = list_quarantined(storage)
    expired = policy.expired_quarantine([q.step for q in held], committed)
    gone = [q for q in held if q.step in expired]
    for q in gone:
        remove_quarantined(storage, q)
    return gone


__all__ = ["QUARANTINE_DIR", "Quarantined", "aside_name", "checked_plan", "damage", "is_aside_name",
           "list_aside", "list_quarantined", "move_aside", "quarantine", "quarantine_unreadable", "remove_quarantined",
           "retire_expired", "utc_time"]
