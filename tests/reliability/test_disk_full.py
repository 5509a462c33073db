"""Disk full: a save that runs out of space fails clearly, loses nothing, and the next one succeeds
once space is freed.

Two filesystems, the same test: a real 2 MiB tmpfs (``mount -t tmpfs``; skipped, with the
reason, where mounting is not allowed) and, always, a quota-enforcing fsspec filesystem
registered for the test (local files that raise ``OSError(ENOSPC)`` once the folder would
exceed its quota).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from asyncckpt import CheckpointManager, Retention, TrainState
from asyncckpt.errors import SaveError, StorageError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SIZE = 2 << 20
_ids = itertools.count(1)


def _model(step: int) -> torch.nn.Module:
    """About 400 KB of float32 that zstd cannot shrink: three checkpoints fit in 2 MiB."""
    gen = torch.Generator().manual_seed(step)
    model = torch.nn.Linear(316, 316)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


class _QuotaFile:
    def __init__(self, f: Any, fs: type["QuotaFS"]) -> None:
        self._f, self._fs = f, fs

    def write(self, data: Any) -> int:
        if _du(self._fs.base) + memoryview(data).nbytes > self._fs.quota_bytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self._f.write(data)
        self._f.flush()  # on disk at once: the next write's check sees it
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_QuotaFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


class QuotaFS(LocalFileSystem):
    """Local files under ``base`` whose writes fail with ENOSPC past ``quota_bytes`` in all."""

    protocol = ("quota", "file")
    base = ""
    quota_bytes = 0

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = super()._open(path, mode, **kwargs)
        return _QuotaFile(f, type(self)) if any(c in mode for c in "wax+") else f


class Disk:
    """A small filesystem: ``root`` (URL for the manager), ``fill(leave)``, ``free()``."""

    def __init__(self, root: str, folder: Path, space: Any) -> None:
        self.root, self.folder, self._space = root, folder, space
        self.filler = folder / "filler"

    def fill(self, leave_bytes: int) -> None:
        with open(self.filler, "wb") as f:
            f.write(b"\0" * max(0, self._space() - leave_bytes))

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture(params=["tmpfs", "quota-fs"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if request.param == "quota-fs":
        cls = type(f"QuotaFS{next(_ids)}", (QuotaFS,), {"base": str(mnt), "quota_bytes": SIZE})
        name = f"quota{next(_ids)}"
        cls.protocol = (name, "file")
        fsspec.register_implementation(name, cls, clobber=True)
        yield Disk(f"{name}://{mnt}/ckpt", mnt, lambda: SIZE - _du(str(mnt)))
        return
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: the quota-fs variant covers disk full")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode}): the "
                    "quota-fs variant covers disk full")

    def space() -> int:
        st = os.statvfs(mnt)
        return st.f_bavail * st.f_frsize

    try:
        yield Disk(str(mnt / "ckpt"), mnt, space)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _enospc(err: SaveError) -> StorageError:
    """The StorageError behind a failed save (raised on the writer, kept per rank)."""
    found = [e for e in err.failures.values() if isinstance(e, StorageError)]
    assert found, f"no StorageError in {err.failures!r}"
    return found[0]


def _steps(mgr: CheckpointManager) -> list[int]:
    mgr.wait()  # retention runs after the commit that save(blocking=True) waits for
    return [i.step for i in mgr.list()]


def _restores(mgr: CheckpointManager, step: int) -> bool:
    state = TrainState(model=_model(0))
    mgr.restore(state, step)
    want = _model(step).state_dict()
    return all(torch.equal(v, want[k]) for k, v in state.models["model"].state_dict().items())


def _on_disk(disk: Disk) -> list[str]:
    root = disk.folder / "ckpt"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def test_a_save_that_runs_out_of_space_fails_clearly_and_loses_nothing(disk: Disk) -> None:
    with CheckpointManager(disk.root, retention=Retention(keep_last=2)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, TrainState(model=_model(step)), blocking=True)
        assert _steps(mgr) == [2, 3]
        disk.fill(leave_bytes=64 << 10)
        with pytest.raises(SaveError) as failed:
            mgr.save(4, TrainState(model=_model(4)), blocking=True)
        cause = _enospc(failed.value)
        assert cause.errno == errno.ENOSPC and "No space left on device" in str(failed.value)
        assert "save of step 4 failed" in str(failed.value) and "step-0000000004" in str(cause)
        assert _steps(mgr) == [2, 3], "retention must delete nothing because of a failed save"
        assert _on_disk(disk) == ["step-0000000002", "step-0000000003"], "the failed save left files"
        assert mgr.verify() == {2: [], 3: []} and _restores(mgr, 2) and _restores(mgr, 3)
        disk.free()
        mgr.save(5, TrainState(model=_model(5)), blocking=True)
        assert _steps(mgr) == [3, 5] and _restores(mgr, 5)


def test_with_on_error_warn_training_goes_on_through_a_full_disk(disk: Disk, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="asyncckpt")
    with CheckpointManager(disk.root, retention=Retention(keep_last=2), on_error="warn") as mgr:
        for step in (1, 2):
            mgr.save(step, TrainState(model=_model(step)), blocking=True)
        disk.fill(leave_bytes=64 << 10)
        handles = [mgr.save(step, TrainState(model=_model(step))) for step in (3, 4)]  # no raise
        mgr.wait()  # nor here: with "warn" failures are logged
        assert all(isinstance(h.exception(), SaveError) for h in handles)
        assert sum("No space left on device" in r.getMessage() for r in caplog.records) >= 2
        assert _steps(mgr) == [1, 2] and _on_disk(disk) == ["step-0000000001", "step-0000000002"]
        disk.free()
        mgr.save(5, TrainState(model=_model(5)), blocking=True)
        assert _steps(mgr) == [2, 5] and _restores(mgr, 5) and _restores(mgr, 2)
