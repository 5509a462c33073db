"""Soak: many saves with retention and a backup mirror on; resources stay flat, nothing is left.

Measured after every save (once it has committed and been mirrored): resident memory, the
staging pool's bytes (``mgr._stager.host.allocated_bytes``), open file descriptors
(``/proc/self/fd``) and threads.  A leak grows with the number of saves, so the second half
of the run is compared with the first half (after a warm-up of 10 saves): staging bytes must
be equal, descriptors and threads may not rise by more than a pooled connection or two,
memory by more than 32 MiB.  At the end: exactly the kept checkpoints on both sides, no
folder without a manifest, no temporary file, no lease, no unfinished multipart upload.
CI runs 200 saves with a local backup and 40 with an S3 (moto) backup; 200 on S3 is ``slow``.
``ASYNCCKPT_RELIABILITY_LOG=path`` appends the first and last values as JSON.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import helpers_s3 as h
from asyncckpt import CheckpointManager, Retention, TrainState
from asyncckpt.storage import Storage, list_committed, uncommitted_steps

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
WARMUP = 10
SLACK = {"rss_bytes": 32 << 20, "staging_bytes": 0, "fds": 3, "threads": 2}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def sample(mgr: CheckpointManager) -> dict[str, int]:
    return {"rss_bytes": _status("VmRSS") * 1024, "staging_bytes": mgr._stager.host.allocated_bytes,
            "fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "os_threads": _status("Threads")}


def _state() -> TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return TrainState(model=model, optimizer=opt)


def _train_step(state: TrainState) -> float:
    model, opt = state.models["model"], state.optimizers["optimizer"]
    loss = model(torch.randn(16, 256)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach().item()


def _flat(samples: list[dict[str, int]]) -> dict[str, tuple[int, int]]:
    """(max of the first half, max of the second half) after the warm-up, per measure."""
    body = samples[WARMUP:]
    half = len(body) // 2
    return {k: (max(s[k] for s in body[:half]), max(s[k] for s in body[half:])) for k in SLACK}


@pytest.mark.parametrize("saves", [pytest.param(200, id="local-200")])  # about 10 s: in CI
def test_soak_resources_stay_flat_and_nothing_is_left(tmp_path: Path, saves: int) -> None:
    _soak(tmp_path, saves, None)


@pytest.mark.s3
@pytest.mark.parametrize("s3_server, saves", [  # moto only: see the docstring
    pytest.param("moto", 40, id="s3-40"),
    pytest.param("moto", 200, id="s3-200", marks=pytest.mark.slow),
], indirect=["s3_server"])
def test_soak_with_an_s3_backup(tmp_path: Path, s3_bucket: dict[str, Any], saves: int) -> None:
    """The same soak with the backup on S3.  On moto only: the soak measures asyncckpt's own
    resources, which do not depend on the server (the crash matrix and the S3 tests cover
    SeaweedFS's behaviour)."""
    _soak(tmp_path, saves, s3_bucket)


def _soak(tmp_path: Path, saves: int, bucket: dict[str, Any] | None) -> None:
    root = tmp_path / "ckpt"
    backup = "local" if bucket is None else "s3"
    if bucket is not None:
        burl, bopts = f"s3://{bucket['name']}/backup", bucket["options"]
    else:
        burl, bopts = str(tmp_path / "backup"), {}
    state = _state()
    samples: list[dict[str, int]] = []
    with CheckpointManager(root, retention=Retention(keep_last=3), backup=burl,
                           backup_storage_options=bopts, backup_retention=Retention(keep_last=2),
                           upload_part_bytes=5 << 20) as mgr:
        for step in range(1, saves + 1):
            loss = _train_step(state)
            mgr.save(step, state, metrics={"loss": loss})
            mgr.wait()  # committed, pruned and mirrored: measure a quiet manager
            samples.append(sample(mgr))
        primary, mirrored = [i.step for i in mgr.list()], [i.step for i in mgr.list(backup=True)]
    first, last = samples[WARMUP], samples[-1]
    _record(backup, saves, first, last)
    for name, (before, after) in _flat(samples).items():
        assert after <= before + SLACK[name], f"{name} grew: {before} -> {after}; first {first}, last {last}"
    assert primary == list(range(saves - 2, saves + 1)) and mirrored[-1] == saves and len(mirrored) == 2
    for store in (Storage(str(root)), Storage(burl, bopts)):
        assert uncommitted_steps(store) == [], f"a folder without a manifest under {store.url}"
        assert [m.step for m in list_committed(store)] in (primary, mirrored)
    assert sorted(os.listdir(root)) == [f"step-{s:010d}" for s in primary], "stray files in the root"
    if bucket is not None:
        assert h.unfinished_uploads(bucket) == []
    else:
        assert sorted(os.listdir(burl)) == [f"step-{s:010d}" for s in mirrored]


def _record(backup: str, saves: int, first: dict[str, int], last: dict[str, int]) -> None:
    print(f"\nsoak {saves} saves, {backup} backup: after save {WARMUP + 1} {first}; after save {saves} {last}")
    out = os.environ.get("ASYNCCKPT_RELIABILITY_LOG")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"test": "soak", "backup": backup, "saves": saves, "first": first,
                                "last": last}) + "\n")
