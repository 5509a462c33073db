"""Roots on filesystems that cannot hold checkpoints are refused at once, clearly.

A root must be the local disk (plain path, ``file://``, or a registered subclass of
fsspec's ``LocalFileSystem`` such as the tests' fault-injecting ``faultyN://``), memory, or
an object store.  Read-only filesystems (``http``, ``zip``, ``github``) and those without
durable atomic writes (``ftp``) get a ``StorageError`` naming the URL and what is supported,
before anything connects; so do unknown protocols.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path

import pytest
import torch

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.errors import StorageError
from asyncckpt.storage import SUPPORTED_ROOTS, Storage
from helpers.procs import asyncckpt


def _zip(tmp_path: Path) -> str:
    path = tmp_path / "ckpt.zip"
    zipfile.ZipFile(path, "w").close()
    return str(path)


BAD_ROOTS = {
    "zip-chain": (lambda tmp: f"zip://ckpt::{_zip(tmp)}", "zip://"),
    "zip": (lambda tmp: f"zip://{_zip(tmp)}", "zip://"),
    "http": (lambda tmp: "http://127.0.0.1:1/ckpt", "http://"),
    "https": (lambda tmp: "https://example.invalid/ckpt", "http://"),
    "ftp-unreachable": (lambda tmp: "ftp://127.0.0.1:1/ckpt", "ftp://"),
    "github": (lambda tmp: "github://someone:somerepo@main/ckpt", "github://"),
    "unknown": (lambda tmp: "nosuchproto://bucket/ckpt", "Protocol not known: nosuchproto"),
    "dir-over-http": (lambda tmp: "dir::http://127.0.0.1:1/ckpt", "http://"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROOTS))
def test_a_root_that_cannot_hold_checkpoints_is_refused_at_construction(tmp_path, case):
    make, says = BAD_ROOTS[case]
    url = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(StorageError) as ei:
        CheckpointManager(url)
    text = str(ei.value)
    assert says in text and SUPPORTED_ROOTS in text
    assert url.split("://", 1)[1].split("@")[-1] in text        # the URL (user info redacted)
    assert "someone:somerepo" not in text
    assert sorted(os.listdir(tmp_path)) == before               # nothing was written anywhere
    with pytest.raises(StorageError, match="cannot hold checkpoints|Protocol not known"):
        Storage(url)                                            # the CLI's read commands too


@pytest.mark.parametrize("command", [["list"], ["verify"], ["inspect"], ["releases"]])
def test_the_cli_refuses_a_read_only_root_with_exit_2_and_one_line(tmp_path, command):
    url = f"zip://ckpt::{_zip(tmp_path)}"
    out = asyncckpt(*command, url)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith(f"asyncckpt {command[0]}: error: open {url} failed: zip://")


def _good_roots(tmp_path: Path, faulty_fs) -> dict[str, str]:
    return {"path": str(tmp_path / "a"), "file-url": f"file://{tmp_path}/b",
            "memory": f"memory://asyncckpt-test-{uuid.uuid4().hex}/c",
            "faulty": faulty_fs.url(tmp_path / "d"), "dir-chain": f"dir::file://{tmp_path}/e"}


@pytest.mark.parametrize("case", ["path", "file-url", "memory", "faulty", "dir-chain"])
def test_local_memory_and_registered_local_subclasses_still_hold_checkpoints(tmp_path, faulty_fs, case):
    url = _good_roots(tmp_path, faulty_fs)[case]
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(url) as mgr:
        mgr.save(1, TrainState(model=model), blocking=True)
    fresh = torch.nn.Linear(2, 2)
    with CheckpointManager(url) as mgr:
        assert mgr.restore(TrainState(model=fresh)) == 1
    assert torch.equal(fresh.weight, model.weight)


def test_an_unreachable_object_store_is_a_storage_error_naming_the_url_not_the_keys():
    secret = "not-a-real-secret-value"
    opts = {"key": "AKIANOTAREALKEY", "secret": secret,
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"},
            "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(StorageError) as ei:
        CheckpointManager("s3://bucket/run", storage_options=opts)
    text = str(ei.value)
    assert "s3://bucket/run" in text and "127.0.0.1:1" in text     # the URL and the cause
    assert secret not in text and "AKIANOTAREALKEY" not in text
