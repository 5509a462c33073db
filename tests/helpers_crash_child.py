"""The child of the crash matrix (tests/reliability/test_crash_matrix.py): one phase, then SIGKILL.

The parent starts ``run_trial(conn, spec)`` through a multiprocessing
*forkserver* that imported this module (and so torch and asyncckpt) once:
a trial then starts in milliseconds instead of the second or two an
``import torch`` costs.  The child talks to the parent over ``conn``, a pipe:

1. it opens what the phase needs, sends ``READY`` and waits for ``GO``
   (the parent arms its S3 proxy in between);
2. it runs the phase, counting *events*: every operation of the phase's
   kinds on the ``announce`` filesystem (local files, registered here:
   open, each ``write``, close, mkdir, each single deletion, reads);
3. at event number ``spec["kill_at"]`` it sends ``AT n kind path`` and blocks
   until it is killed; every other thread reaching an event blocks too, so
   nothing moves on after the chosen point (the lease heartbeat's events are
   not counted, so that N is the same from run to run, but they freeze too).  On S3 the parent's proxy holds
   the chosen request instead (this fs is then not used);
4. it sends ``COMMITTED step`` when a save it waited for has committed, and
   ``DONE events=n`` if it reaches the end (a calibration run: ``kill_at=0``).

Phases: ``save`` (two saves), ``prune`` (a save whose retention deletes four
checkpoints), ``mirror`` (a save copied to the backup, whose retention
prunes it) and ``restore`` (a new manager cleans up leftovers, then
restores).  Checkpoint contents are ``weights_at(step)``: the parent knows
what every step must restore to.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

import torch
from torch import nn

import asyncckpt.manager  # noqa: F401 - the forkserver imports it once for every trial
import torch._dynamo  # noqa: F401 - DCP's state_dict imports it lazily: 1 s in every child otherwise
import torch.distributed.checkpoint.state_dict  # noqa: F401
from asyncckpt import CheckpointManager, Retention, TrainState
from helpers.announcing_fs import announcing_fs
from helpers.checkpoints import same_tensors

PROTOCOL = "announce"
MUTATING = ("mkdir", "open-w", "write", "close", "rm")
KINDS = {"save": MUTATING, "prune": ("rm",), "mirror": MUTATING,
         "restore": MUTATING + ("open-r", "ls")}
"""Which local events count in each phase."""
BIG = 1344
"""Width of the big model's first layer: 1024 x 1344 floats, 5.5 MB, two 5 MiB parts on S3."""


def weights_at(step: int, big: bool = False) -> nn.Module:
    """The model saved at ``step``: its values are a function of the step alone."""
    gen = torch.Generator().manual_seed(step)
    model = nn.Sequential(nn.Linear(1024 if big else 48, BIG if big else 64), nn.Tanh(),
                          nn.Linear(BIG if big else 64, 32), nn.Linear(32, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


class _Events:
    """The event counter of one trial (class level: fsspec caches filesystem instances)."""

    conn: Any = None
    kinds: tuple[str, ...] = ()
    kill_at = 0
    count = 0
    armed = False
    lock = threading.Lock()
    frozen = threading.Event()

    @classmethod
    def hit(cls, kind: str, path: str) -> None:
        if not cls.armed or kind not in cls.kinds:
            return
        if threading.current_thread().name == "asyncckpt-lease":
            # heartbeats come when they come: not counted (N stays the same from run to run),
            # but frozen like every other thread once the chosen point is reached
            if cls.kill_at and cls.count >= cls.kill_at:
                cls.frozen.wait()
            return
        with cls.lock:
            cls.count += 1
            n = cls.count
            first = cls.kill_at > 0 and n == cls.kill_at
            if first:
                cls.conn.send(f"AT {n} {kind} {path}")
        if first or (cls.kill_at > 0 and n > cls.kill_at):
            cls.frozen.wait()  # never set: the parent SIGKILLs this process


announcing_fs(PROTOCOL, _Events.hit)


def _manager(spec: dict[str, Any], **extra: Any) -> CheckpointManager:
    opts = dict(storage_options=spec.get("options") or {}, lease_heartbeat_s=0.5, lease_timeout_s=30.0,
                compression=spec.get("compression", "zstd"), writer_threads=spec.get("writers", 2),
                upload_part_bytes=5 << 20, upload_concurrency=2)
    if spec.get("backup"):
        opts.update(backup=spec["backup"], backup_storage_options=spec.get("backup_options") or {})
    return CheckpointManager(spec["root"], **{**opts, **extra})


def _save(mgr: CheckpointManager, conn: Any, step: int, big: bool) -> None:
    mgr.save(step, TrainState(model=weights_at(step, big)), blocking=True)
    conn.send(f"COMMITTED {step}")


def _phase(spec: dict[str, Any], conn: Any, go: Any) -> None:
    phase, step, big = spec["phase"], spec["step"], bool(spec.get("big"))
    if phase == "restore":
        go()
        mgr = _manager(spec)
        state = TrainState(model=weights_at(0, big))
        got = mgr.restore(state)
        same = same_tensors(state.models["model"], weights_at(got, big))
        conn.send(f"RESTORED {got} {'ok' if same else 'MISMATCH'}")
    elif phase == "prune":
        mgr = _manager(spec, retention=Retention(keep_last=2))
        go()
        _save(mgr, conn, step, big)
    elif phase == "mirror":
        mgr = _manager(spec, retention=Retention(keep_last=2))
        go()
        _save(mgr, conn, step, big)
        mgr.wait()
        conn.send(f"MIRRORED {step}")
    else:
        mgr = _manager(spec)
        go()
        _save(mgr, conn, step, big)
        _save(mgr, conn, step + 1, big)
    mgr.close()


def run_trial(conn: Any, spec: dict[str, Any]) -> None:
    """The forkserver's target: one trial of one phase (see the module docstring)."""
    fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True,
                        format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    _Events.conn, _Events.kinds = conn, KINDS[spec["phase"]]
    _Events.kill_at = 0 if spec.get("s3") else int(spec["kill_at"])

    def go() -> None:
        conn.send("READY")
        if conn.recv() != "GO":
            os._exit(3)
        _Events.armed = True

    _phase(spec, conn, go)
    conn.send(f"DONE events={_Events.count}")


# -- other children, for tests/reliability/test_lease.py ------------------------------------------

def _error(e: BaseException) -> str:
    return f"ERROR {type(e).__name__} {e}"


def open_manager(conn: Any, spec: dict[str, Any]) -> None:
    """Open a manager on ``spec["root"]`` (``spec["kwargs"]``) and say ``OPEN`` or ``ERROR type
    message``; then obey ``save N``, ``list`` and ``close`` lines until closed."""
    logging.basicConfig(level=logging.WARNING, force=True)
    try:
        mgr = CheckpointManager(spec["root"], **spec.get("kwargs", {}))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        conn.send(_error(e))
        return
    conn.send("OPEN")
    while True:
        cmd = conn.recv()
        try:
            if cmd.startswith("save "):
                step = int(cmd.split()[1])
                mgr.save(step, TrainState(model=weights_at(step)), blocking=True)
                conn.send(f"COMMITTED {step}")
            elif cmd == "list":
                conn.send("LIST " + " ".join(str(i.step) for i in mgr.list()))
            elif cmd == "close":
                mgr.close()
                conn.send("CLOSED")
                return
        except Exception as e:  # noqa: BLE001 - reported to the parent
            conn.send(_error(e))


def race_lease(conn: Any, spec: dict[str, Any]) -> None:
    """Say ``READY``; on ``GO`` try to take the lease of ``spec["root"]``: ``WON owner`` or
    ``ERROR ...``; hold it until ``release``."""
    from asyncckpt.lease import Lease
    from asyncckpt.storage import Storage

    logging.basicConfig(level=logging.WARNING, force=True)
    lease = Lease(Storage(spec["root"], spec.get("options") or {}), heartbeat_s=spec["heartbeat_s"],
                  timeout_s=spec["timeout_s"])
    conn.send("READY")
    conn.recv()
    try:
        holder = lease.acquire()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        conn.send(_error(e))
        return
    conn.send(f"WON {holder.owner}")
    conn.recv()
    lease.release()
