"""Every example runs as written, at tiny sizes; run again, it resumes (``slow``).

(``train_ddp.py`` and ``train_fsdp.py`` run under torchrun in ``test_distributed.py``.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers_deps import need
from helpers_s3 import keys
from helpers.procs import asyncckpt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEADLINE_S = 180
SINGLE = [("train_toy.py", [], "torchdata"), ("train_lightning.py", [], "lightning"),
          ("train_accelerate.py", ["--cpu"], "accelerate")]


def _run(tmp_path: Path, script: str, *args: str) -> str:
    cmd = [sys.executable, str(EXAMPLES / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env,
                             timeout=DEADLINE_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script} still running after {DEADLINE_S}s:\n{(e.stdout or '')[-2000:]}")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    return text


@pytest.mark.parametrize("script, extra, needs", SINGLE)
def test_example_runs(tmp_path, script, extra, needs):
    need(needs)
    text = _run(tmp_path, script, "--root", str(tmp_path / "ckpt"), "--steps", "4", "--every", "2", *extra)
    assert "done at step 4" in text and "fresh run" in text
    assert (tmp_path / "ckpt" / "step-0000000004" / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script, extra, needs", SINGLE)
def test_example_resumes_when_run_again(tmp_path, script, extra, needs):
    need(needs)
    root = str(tmp_path / "ckpt")
    _run(tmp_path, script, "--root", root, "--steps", "6", "--every", "3", *extra)
    text = _run(tmp_path, script, "--root", root, "--steps", "9", "--every", "3", *extra)
    assert "done at step 9" in text and "resumed" in text


def test_toy_example_resumed_run_ends_bit_exactly_where_an_uninterrupted_one_does(tmp_path):
    """The quickstart's promise: stop at 6, run again to 9, same weights as 0 -> 9 at once."""
    need("torchdata")
    from safetensors.torch import load_file

    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    _run(tmp_path, "train_toy.py", "--root", resumed, "--steps", "6", "--every", "3")
    assert "resumed" in _run(tmp_path, "train_toy.py", "--root", resumed, "--steps", "9", "--every", "3")
    _run(tmp_path, "train_toy.py", "--root", straight, "--steps", "9", "--every", "3")
    weights = []
    for root in (resumed, straight):
        out = tmp_path / f"{Path(root).name}.safetensors"
        r = asyncckpt("export", root, "--step", "9", out)
        assert r.returncode == 0, r.stderr
        weights.append(load_file(out))
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for key, value in weights[0].items():
        assert torch_equal(value, weights[1][key]), key


def torch_equal(a: Any, b: Any) -> bool:
    return bool(a.dtype == b.dtype and a.shape == b.shape and (a == b).all())


def _s3_args(s3_bucket: dict) -> list[str]:
    return ["--backup", f"s3://{s3_bucket['name']}/toy-backup", "--endpoint-url",
            s3_bucket["endpoint"], "--every", "3"]


@pytest.mark.s3
@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)  # CI time: the slow test below
def test_s3_backup_example_mirrors_to_s3(tmp_path, s3_bucket):  # runs the example on both servers
    need("s3fs")
    text = _run(tmp_path, "train_s3_backup.py", "--root", str(tmp_path / "local"), "--steps", "6",
                *_s3_args(s3_bucket))
    assert "done at step 6" in text and "backup: [3, 6]" in text
    assert "toy-backup/step-0000000006/manifest.json" in keys(s3_bucket, "toy-backup/")


@pytest.mark.s3
@pytest.mark.slow
def test_s3_backup_example_resumes_from_s3_when_the_local_copy_is_lost(tmp_path, s3_bucket):
    need("s3fs")
    root = tmp_path / "local"
    _run(tmp_path, "train_s3_backup.py", "--root", str(root), "--steps", "6", *_s3_args(s3_bucket))
    for f in root.glob("step-*/*"):
        f.unlink()
    text = _run(tmp_path, "train_s3_backup.py", "--root", str(root), "--steps", "9", *_s3_args(s3_bucket))
    assert "starting at step 6 (resumed)" in text and "done at step 9" in text
