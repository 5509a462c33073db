"""Rollbacks: a run that restores an older checkpoint and saves on starts a new branch.

Every manifest records its lineage: ``branch`` (a short hex id) and ``parent`` (the step
the run restored).  A run that restored nothing, or the root's newest checkpoint, goes on
with the newest checkpoint's branch; a restore of an older checkpoint followed by a save
is a *rollback*: the run starts a new branch, and the checkpoints newer than the restored
one (the abandoned branch) leave the step folders, so "latest", retention and listing
see only the current branch and the new branch saves those step numbers again normally.

Nothing moves at restore time (a restore may be for evaluation only).  At the first save
after the restore, rank 0's writer, before the new step folder is written, calls
``abandon``, which, by the manager's ``on_rollback``:

- ``"keep"``: moves each abandoned checkpoint to ``<root>/abandoned/step-N.<UTC time>/``
  with an ``abandoned.json`` note (as quarantine does); retention removes them later, as it
  removes expired quarantined checkpoints (``retire_abandoned``);
- ``"delete"``: deletes them, manifest first;
- ``"refuse"``: never gets here: the manager's ``save`` raises ``RollbackRefusedError``.

Crash-safe: a record ``<root>/abandoned/rollback-<UTC time>.json`` naming every step and the
CRC-32 of its manifest is written before anything moves; a restart (``finish_interrupted``)
completes a record still marked ``"moving"``, touching only the listed steps whose manifest
is unchanged.  The records stay as the history of the root's rollbacks.
"""

from __future__ import annotations

import json
import logging
import secrets
import zlib
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from .errors import CorruptCheckpointError, StorageError
from .manifest import MAX_JSON_BYTES, MANIFEST_NAME, Manifest, parse_json, step_dir_name
from .quarantine import aside_name, is_aside_name, list_aside, move_aside, utc_time
from .retention import Retention
from .storage import Storage, delete_checkpoint, is_committed

log = logging.getLogger(__name__)

ABANDONED_DIR = "abandoned"
"""The folder under the root that holds abandoned branches' checkpoints and rollback records."""
NOTE_NAME = "abandoned.json"
RECORD_PREFIX = "rollback-"


def new_branch_id() -> str:
    """A fresh branch id: 8 random lowercase hex digits."""
    return secrets.token_hex(4)


@dataclass(frozen=True)
class Rollback:
    """A restore of an older checkpoint, and what the first save after it abandons."""

    restored: int
    """The step restored: the new branch's parent."""
    branch: str
    """The new branch's id."""
    abandoned_branch: str | None
    """The branch of the newest abandoned checkpoint (None: written before lineage)."""
    steps: tuple[int, ...]
    """The committed steps newer than ``restored`` when it was restored."""

    def describe(self) -> str:
        return f"steps {list(self.steps)} (branch {self.abandoned_branch or 'unnamed'})"


@dataclass(frozen=True)
class Lineage:
    """What the run's next manifests record, and the rollback still to carry out."""

    branch: str
    parent: int | None = None
    rollback: Rollback | None = None


def _go_on(m: Manifest | None, abandoned: Collection[str]) -> str:
    """``m``'s branch to go on with, or a new one: none recorded, or one a rollback abandoned
    (the checkpoints left of it are the trunk a new line grows from)."""
    branch = m.branch if m is not None else None
    return branch if branch is not None and branch not in abandoned else new_branch_id()


def start(committed: Sequence[Manifest], abandoned: Collection[str] = ()) -> Lineage:
    """The lineage of a run that restored nothing: the newest checkpoint's branch, or a new one."""
    return Lineage(branch=_go_on(max(committed, key=lambda m: m.step) if committed else None, abandoned))


def after_restore(restored: Manifest, committed: Sequence[Manifest],
                  abandoned: Collection[str] = ()) -> Lineage:
    """The lineage after restoring ``restored`` out of the root's ``committed`` checkpoints;
    ``abandoned``: the branches rollbacks abandoned (``abandoned_branches``)."""
    newer = sorted((m for m in committed if m.step > restored.step), key=lambda m: m.step)
    if not newer:
        return Lineage(branch=_go_on(restored, abandoned), parent=restored.step)
    branch = new_branch_id()
    return Lineage(branch=branch, parent=restored.step,
                   rollback=Rollback(restored=restored.step, branch=branch,
                                     abandoned_branch=newer[-1].branch,
                                     steps=tuple(m.step for m in newer)))


def refusal(rollback: Rollback, root: str) -> str:
    """The message of ``on_rollback="refuse"``: what would be abandoned, and how to go on."""
    return (f"saving after restoring step {rollback.restored} of {root} would abandon the newer "
            f"checkpoints {rollback.describe()} (on_rollback='refuse'); restore the newest "
            f"checkpoint (step {rollback.steps[-1]}) to go on from it, or pass "
            "on_rollback='keep' (set them aside under abandoned/) or 'delete'")


def manifest_crc(raw: bytes) -> str:
    return f"crc32:{zlib.crc32(raw):08x}"


def _current_crc(storage: Storage, step: int) -> str | None:
    try:
        return manifest_crc(storage.read_bytes(f"{step_dir_name(step)}/{MANIFEST_NAME}"))
    except StorageError:
        if is_committed(storage, step):
            raise
        return None  # deleted meanwhile (retention): nothing to abandon


# -- carrying a rollback out (rank 0's writer) ------------------------------------------
def abandon(storage: Storage, rollback: Rollback, policy: str, *,
            now: datetime | None = None) -> dict[str, Any]:
    """Set the abandoned branch aside (``"keep"``) or delete it (``"delete"``); returns the
    record.  Writes the record first, then moves, then marks the record done."""
    now = now or datetime.now(timezone.utc)
    moves = []
    for step in rollback.steps:
        crc = _current_crc(storage, step)
        if crc is not None:
            name = aside_name(storage, ABANDONED_DIR, step, now) if policy == "keep" else None
            moves.append({"step": step, "manifest_crc": crc, "name": name})
    record = {"format": 1, "state": "moving", "policy": policy, "time": utc_time(now),
              "from_step": rollback.restored, "branch": rollback.branch,
              "abandoned_branch": rollback.abandoned_branch, "moves": moves,
              "reason": f"rollback: the run restored step {rollback.restored} and saved on"}
    rel = f"{ABANDONED_DIR}/{RECORD_PREFIX}{utc_time(now).replace(':', '')}-{rollback.branch}.json"
    storage.makedirs(ABANDONED_DIR)
    storage.put_atomic(rel, json.dumps(record, indent=1).encode(), create_only=True)
    _carry_out(storage, rel, record)
    return record


def _carry_out(storage: Storage, rel: str, record: dict[str, Any]) -> None:
    where = []
    for move in record["moves"]:
        step, name = int(move["step"]), move["name"]
        dest = f"{ABANDONED_DIR}/{name}"
        note = {**{k: record[k] for k in ("format", "time", "reason", "from_step", "branch",
                                          "abandoned_branch")}, "step": step}
        if _current_crc(storage, step) != move["manifest_crc"]:
            # moved already (its note may be missing: a kill right after the move), deleted,
            # or a new checkpoint of that step: not ours to move
            if name is not None and storage.exists(f"{dest}/{MANIFEST_NAME}") and \
                    not storage.exists(f"{dest}/{NOTE_NAME}"):
                storage.put_atomic(f"{dest}/{NOTE_NAME}", json.dumps(note, indent=1).encode(),
                                   create_only=False)
            continue
        if name is None:
            delete_checkpoint(storage, step)
            where.append(f"{step} deleted")
            continue
        if storage.exists(dest):  # a copying move (object stores) cut short: redo it
            storage.remove(dest, recursive=True)
        move_aside(storage, step, ABANDONED_DIR, str(name), NOTE_NAME, note)
        where.append(f"{step} -> {storage.url_of(dest)}")
    storage.put_atomic(rel, json.dumps({**record, "state": "done"}, indent=1).encode(),
                       create_only=False)
    if where:
        log.warning("step=%d rank=0: rollback: the run restored step %d and saved on; branch %s "
                    "abandoned (on_rollback=%r), new branch %s: %s", record["from_step"],
                    record["from_step"], record["abandoned_branch"] or "unnamed", record["policy"],
                    record["branch"], "; ".join(where))


def records(storage: Storage) -> list[tuple[str, dict[str, Any]]]:
    """``(path, record)`` of every readable rollback record, oldest first."""
    out = []
    for name in sorted(storage.list_files(ABANDONED_DIR)):
        if not (name.startswith(RECORD_PREFIX) and name.endswith(".json")):
            continue
        rel = f"{ABANDONED_DIR}/{name}"
        try:
            rec = parse_json(storage.read_bytes(rel, max_bytes=MAX_JSON_BYTES), storage.url_of(rel))
        except (StorageError, CorruptCheckpointError) as e:
            log.warning("skipping rollback record %s: %s", storage.url_of(rel), e)
            continue
        if _is_record(rec):
            out.append((rel, rec))
        else:
            log.warning("skipping rollback record %s: not a record asyncckpt wrote (its moves "
                        "must name steps, manifest checksums and folder names under %s/)",
                        storage.url_of(rel), ABANDONED_DIR)
    return out


def _is_record(rec: Any) -> bool:
    """A rollback record: every move a step, a manifest CRC and None or an aside folder name
    (never a path: ``_carry_out`` deletes and moves what a record names)."""
    return (isinstance(rec, dict) and isinstance(rec.get("moves"), list)
            and isinstance(rec.get("from_step"), int) and all(
                isinstance(m, dict) and isinstance(m.get("step"), int) and not isinstance(m["step"], bool)
                and 0 <= m["step"] < 10**10 and isinstance(m.get("manifest_crc"), str)
                and (m.get("name") is None or (isinstance(m["name"], str) and is_aside_name(m["name"])))
                for m in rec["moves"]))


def finish_interrupted(storage: Storage) -> int:
    """Complete the rollbacks a crash cut short (records still ``"moving"``); returns how many."""
    todo = [(rel, rec) for rel, rec in records(storage) if rec.get("state") == "moving"]
    for rel, rec in todo:
        log.warning("finishing the rollback recorded in %s, cut short", storage.url_of(rel))
        _carry_out(storage, rel, rec)
    return len(todo)


def abandoned_branches(storage: Storage) -> set[str]:
    """The branch ids rollbacks under the root abandoned."""
    return {str(rec["abandoned_branch"]) for _, rec in records(storage) if rec.get("abandoned_branch")}


def abandoned_crcs(storage: Storage) -> set[tuple[int, str]]:
    """``(step, manifest CRC)`` of every checkpoint a rollback abandoned (on a backup, copies
    with the same manifest are the abandoned branch's too)."""
    return {(int(m["step"]), str(m["manifest_crc"])) for _, rec in records(storage)
            for m in rec["moves"]}


def drop_abandoned_copies(primary: Storage, backup: Storage) -> list[int]:
    """Delete from ``backup`` its copies of checkpoints the primary abandoned; returns the steps."""
    gone = []
    for step, crc in sorted(abandoned_crcs(primary)):
        if _current_crc(backup, step) == crc:
            delete_checkpoint(backup, step)
            gone.append(step)
    if gone:
        log.warning("the backup %s dropped its copies of the abandoned steps %s (rolled back on the "
                    "primary)", backup.url, gone)
    return gone


def without_abandoned(primary: Storage, backup: Storage, manifests: Sequence[Manifest]) -> list[Manifest]:
    """``manifests`` (the backup's) less the copies of checkpoints the primary abandoned that
    the mirror has not dropped yet: a rolled-back branch never wins a restore from the backup."""
    crcs = abandoned_crcs(primary)
    steps = {s for s, _ in crcs}
    try:
        return [m for m in manifests
                if m.step not in steps or (m.step, _current_crc(backup, m.step)) not in crcs]
    except StorageError:
        return list(manifests)


# -- listing and retention --------------------------------------------------------------
@dataclass(frozen=True)
class Abandoned:
    """One checkpoint of an abandoned branch, kept aside under ``abandoned/``."""

    step: int
    name: str
    url: str
    branch: str | None = None
    """The abandoned branch's id."""
    from_step: int | None = None
    """The step the rollback restored."""
    new_branch: str | None = None
    time: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def list_abandoned(storage: Storage) -> list[Abandoned]:
    """The abandoned checkpoints kept under the root, oldest step first."""
    return [Abandoned(step=step, name=name, url=storage.url_of(f"{ABANDONED_DIR}/{name}"),
                      branch=note.get("abandoned_branch"), from_step=note.get("from_step"),
                      new_branch=note.get("branch"), time=str(note.get("time", "")),
                      reason=str(note.get("reason", "unknown (no readable abandoned.json)")))
            for step, name, note in list_aside(storage, ABANDONED_DIR, NOTE_NAME)]


def retire_abandoned(storage: Storage, policy: Retention, committed: Sequence[int]) -> list[Abandoned]:
    """Delete the abandoned checkpoints ``policy`` lets go (as expired quarantine); returns them."""
    held = list_abandoned(storage)
    expired = policy.expired_quarantine([a.step for a in held], committed)
    gone = [a for a in held if a.step in expired]
    for a in gone:
        storage.remove(f"{ABANDONED_DIR}/{a.name}", recursive=True)
        log.info("step=%d: abandoned copy %s deleted by retention", a.step, a.url)
    return gone


__all__ = ["ABANDONED_DIR", "Abandoned", "Lineage", "Rollback", "abandon", "abandoned_branches",
           "abandoned_crcs", "after_restore", "drop_abandoned_copies", "finish_interrupted",
           "list_abandoned", "new_branch_id", "records", "refusal", "retire_abandoned", "start",
           "without_abandoned"]
