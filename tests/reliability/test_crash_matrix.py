"""Crash matrix: SIGKILL at a random point of save, prune, mirror and restore, on local disk and
on S3 (moto and SeaweedFS on loopback), then prove nothing was lost.

Each trial runs tests/helpers_crash_child.py in a process forked from a forkserver that has
imported torch once.  The child reports over a pipe and freezes at its chosen point: the
``kill_at``-th event of the phase on the ``announce`` filesystem (local), or the
``kill_at``-th request of the phase, held by a proxy in front of the S3 server (half the time the
request is forwarded first, so it takes effect but the reply is lost).  ``kill_at`` is drawn by
a seeded RNG from 1..N, N counted by a calibration run of the same phase; the seed is fixed, so
every run tries the same points, is printed, and ``ASYNCCKPT_CRASH_SEED=<n>`` tries others.  No sleeps: the kill lands where the child is frozen.

After each kill: every listed checkpoint verifies and restores to exactly what was saved; the
newest never goes backwards; a new manager on the same root finds no leftovers once it has
started, keeps every committed checkpoint, saves the step that was cut short (or the next),
restores it, and (mirror phase) copies it to the backup.  ``ASYNCCKPT_RELIABILITY_LOG=path``
appends one JSON line per trial (the figures of docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from crash_tools import (Trial, build_base, carry_on, check_readable, copy_prefix, run_child,
                         unfinished_uploads)

from asyncckpt import Retention
from asyncckpt.manifest import step_dir_name
from asyncckpt.storage import Storage

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SEED = int(os.environ.get("ASYNCCKPT_CRASH_SEED") or 20261203)
PARALLEL = int(os.environ.get("ASYNCCKPT_CRASH_PARALLEL", "3"))
PHASES = {  # committed before the trial, and the step the child saves
    "save": (range(1, 3), 3),
    "prune": (range(1, 6), 6),
    "mirror": (range(1, 4), 4),
    "restore": (range(1, 4), 4),
}
COUNTS = [pytest.param(10, id="10"), pytest.param(50, id="50", marks=pytest.mark.slow)]
S3_COUNTS = [  # SeaweedFS in CI: few trials (its calibration and base alone cost about as much)
    pytest.param("moto", 10, id="moto-10"),
    pytest.param("moto", 50, id="moto-50", marks=pytest.mark.slow),
    pytest.param("seaweedfs", 3, id="seaweedfs-3"),
    pytest.param("seaweedfs", 50, id="seaweedfs-50", marks=pytest.mark.slow),
]
BACKENDS = {"moto": "s3", "seaweedfs": "s3-seaweedfs"}
"""The backend name of each S3 server in reports and seeds ("s3" is moto, as in earlier runs)."""


class Setup:
    """How to make the roots of one (phase, backend): built once, copied per trial."""

    def __init__(self, phase: str, backend: str, tmp: Path, bucket: dict[str, Any] | None) -> None:
        self.phase, self.backend, self.tmp, self.bucket = phase, backend, tmp, bucket
        self.base, self.step = PHASES[phase]
        self.big = backend.startswith("s3") and phase == "save"  # 5.5 MB: a two-part upload
        self.s3_opts = bucket["options"] if bucket else {}
        if bucket:
            self.client, self.name = bucket["client"], bucket["name"]

    def _local(self, trial: str) -> Path:
        return self.tmp / trial

    def _s3(self, trial: str) -> str:
        return f"s3://{self.name}/{trial}"

    def build(self) -> None:
        if self.phase == "mirror":
            backup = self._s3("base-b") if self.bucket else str(self._local("base-b"))
            build_base(str(self._local("base")), {}, self.base, self.big, backup, self.s3_opts)
        elif self.bucket:
            build_base(self._s3("base"), self.s3_opts, self.base, self.big)
        else:
            build_base(str(self._local("base")), {}, self.base, self.big)

    def trial(self, index: int, kill_at: int, land: bool) -> tuple[Trial, dict[str, Any]]:
        name = f"t{index}"
        spec: dict[str, Any] = {"phase": self.phase, "step": self.step, "big": self.big,
                                "kill_at": kill_at, "s3": bool(self.bucket)}
        if self.big:
            spec.update(compression=None, writers=1)
        t = Trial(self.phase, self.backend, index, kill_at, root="", land=land, big=self.big)
        if self.phase == "mirror":
            shutil.copytree(self._local("base"), self._local(name))
            t.root = spec["root"] = str(self._local(name))
            if self.bucket:
                copy_prefix(self.client, self.name, "base-b", name + "-b")
                t.backup = spec["backup"] = self._s3(name + "-b")
                t.backup_options = self.s3_opts
            else:
                shutil.copytree(self._local("base-b"), self._local(name + "-b"))
                t.backup = str(self._local(name + "-b"))
                spec["backup"] = f"announce://{t.backup}"
        elif self.bucket:
            copy_prefix(self.client, self.name, "base", name)
            t.root, t.options = self._s3(name), self.s3_opts
            spec["root"] = t.root
        else:
            shutil.copytree(self._local("base"), self._local(name))
            t.root = str(self._local(name))
            spec["root"] = f"announce://{t.root}"
        if self.phase == "restore":
            self._leave_leftovers(t, name)
        return t, spec

    def _leave_leftovers(self, t: Trial, name: str) -> None:
        """What an earlier crash left: a half-written step (and an unfinished upload), a probe."""
        half, last = step_dir_name(self.step), step_dir_name(max(self.base))
        store = Storage(t.root, t.options)
        store.makedirs(half)
        for fname in store.child(last).list_files():
            if fname != "manifest.json":
                data = store.child(last).read_bytes(fname)
                with store.open_write(f"{half}/{fname}") as f:
                    f.write(data[: len(data) // 2])
        with store.open_write(".asyncckpt-probe-0123456789ab") as f:
            f.write(b"ok")
        if self.bucket:
            key = f"{name}/{half}/__0_0.distcp"
            up = self.client.create_multipart_upload(Bucket=self.name, Key=key)
            self.client.upload_part(Bucket=self.name, Key=key, UploadId=up["UploadId"], PartNumber=1,
                                    Body=b"x" * 1024)


def check(setup: Setup, t: Trial) -> None:
    """The promises after one kill (see the module docstring)."""
    base, step, phase = set(setup.base), setup.step, setup.phase
    store = Storage(t.root, t.options)
    listed = check_readable(store, t.big, f"after the kill ({t.describe()})")
    before = base | t.committed
    assert listed and max(listed) >= max(before), f"the newest went backwards: {listed}; {t.describe()}"
    assert t.committed <= set(listed), f"a reported commit is missing: {listed}; {t.describe()}"
    if phase == "save":
        assert base <= set(listed) <= base | {step, step + 1}, f"{listed}; {t.describe()}"
        redo = min({step, step + 1, step + 2} - set(listed))  # the save that was cut short
        after, _ = carry_on(t, redo)
        assert redo in after
    elif phase == "prune":
        assert set(listed) <= base | {step}, f"{listed}; {t.describe()}"
        if step in listed:  # retention never deletes the newest two
            assert {step - 1, step} <= set(listed), f"{listed}; {t.describe()}"
        after, _ = carry_on(t, step + 1, retention=Retention(keep_last=2))
        assert after == [max(listed), step + 1], f"{after}; {t.describe()}"
    elif phase == "mirror":
        bstore = Storage(t.backup, t.backup_options)
        backed = check_readable(bstore, t.big, f"backup after the kill ({t.describe()})")
        assert backed and max(backed) >= max(base), f"backup went backwards: {backed}; {t.describe()}"
        if t.said("MIRRORED"):
            assert step in backed, f"{backed}; {t.describe()}"
        _, backup_after = carry_on(t, step + 1, retention=Retention(keep_last=2))
        assert step + 1 in backup_after, f"{backup_after}; {t.describe()}"
    else:
        assert listed == sorted(base), f"a restore changed the checkpoints: {listed}; {t.describe()}"
        for line in t.said("RESTORED"):
            assert line == f"RESTORED {max(base)} ok", f"{line}; {t.describe()}"
        after, _ = carry_on(t, step)
        assert step in after
    if setup.bucket:
        for prefix in (f"t{t.index}", f"t{t.index}-b"):
            assert unfinished_uploads(setup.client, setup.name, prefix) == [], t.describe()


def run_matrix(setup: Setup, trials: int) -> None:
    rng = random.Random(f"{SEED}-{setup.phase}-{setup.backend}")
    print(f"\ncrash matrix {setup.phase}/{setup.backend}: seed {SEED} (ASYNCCKPT_CRASH_SEED={SEED} "
          "replays it)")
    setup.build()
    logs = setup.tmp / "logs"
    logs.mkdir()
    endpoint = setup.bucket["endpoint"] if setup.bucket else None

    def one(index: int, kill_at: int, land: bool) -> tuple[Trial, str | None]:
        t, spec = setup.trial(index, kill_at, land)
        try:
            run_child(t, spec, endpoint, logs / f"t{index}.log")
            check(setup, t)
        except AssertionError as e:
            return t, f"seed {SEED}: {e}"
        return t, None

    calibration, failed = one(0, 0, False)
    assert failed is None, failed
    total = calibration.events
    assert total > 0, f"the calibration run counted no events: {calibration.describe()}"
    plan = [(i, rng.randint(1, total), bool(setup.bucket) and rng.random() < 0.5)
            for i in range(1, trials + 1)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda p: one(*p), plan))
    _report(setup, total, results)
    failures = [msg for _, msg in results if msg]
    assert not failures, f"{len(failures)} of {trials} trials failed:\n" + "\n\n".join(failures)
    landed = sum(1 for t, _ in results if t.killed_at)
    assert landed >= trials * 0.8, f"only {landed} of {trials} kills landed (N={total})"


def _report(setup: Setup, total: int, results: list[tuple[Trial, str | None]]) -> None:
    kinds = Counter((t.killed_at.split()[2] if t.killed_at.startswith("AT ") else
                     t.killed_at.split()[0]) if t.killed_at else "none" for t, _ in results)
    print(f"  {len(results)} trials over {total} events; killed at: {dict(kinds)}; "
          f"failures: {sum(1 for _, m in results if m)}")
    out = os.environ.get("ASYNCCKPT_RELIABILITY_LOG")
    if out:
        with open(out, "a") as f:
            for t, msg in results:
                f.write(json.dumps({"test": "crash", "phase": t.phase, "backend": t.backend,
                                    "seed": SEED, "kill_at": t.kill_at, "of": total, "land": t.land,
                                    "killed_at": t.killed_at, "committed": sorted(t.committed),
                                    "failed": msg}) + "\n")


@pytest.mark.parametrize("trials", COUNTS)
@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_anywhere_local(tmp_path: Path, phase: str, trials: int) -> None:
    run_matrix(Setup(phase, "local", tmp_path, None), trials)


@pytest.mark.s3
@pytest.mark.parametrize("s3_server, trials", S3_COUNTS, indirect=["s3_server"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_anywhere_s3(tmp_path: Path, s3_bucket: dict, phase: str, trials: int) -> None:
    run_matrix(Setup(phase, BACKENDS[s3_bucket["server"]], tmp_path, s3_bucket), trials)
