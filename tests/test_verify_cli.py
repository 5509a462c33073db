"""``asyncckpt verify ROOT [STEP]`` and ``mgr.verify``: exit status and every damaged file named.

Exit status: 0 when every checked file matches its manifest, 1 when any file
is missing, resized or fails its checksum (or a manifest cannot be read), 2 on
bad input (no such root or step).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, TrainState, cli
from asyncckpt.manifest import MANIFEST_NAME
from helpers.checkpoints import flip_byte
from helpers.procs import asyncckpt

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Linear(8, 8)
    return TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      extra={"seed": seed})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify") / "ckpt"
    with CheckpointManager(root, writer_threads=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step), blocking=True)
    return root


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def _files(root: Path, step: int) -> list[str]:
    manifest = json.loads((root / f"step-{step:010d}" / MANIFEST_NAME).read_text())
    return [f["path"] for f in manifest["files"]]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli.main(["verify", *argv])
    return rc, capsys.readouterr().out


def test_whole_checkpoints_pass(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _run(capsys, str(root))
    assert rc == 0
    assert out.splitlines() == ["step 1: ok", "step 2: ok", "step 3: ok"]
    with CheckpointManager(root) as mgr:
        assert mgr.verify() == {1: [], 2: [], 3: []}


def test_each_damaged_file_is_named_and_exit_is_one(root: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    shard, meta = [f for f in _files(root, 2) if f.endswith(".distcp")][0], ".metadata"
    flip_byte(root / "step-0000000002" / shard, -1, 0x40)
    (root / "step-0000000003" / meta).unlink()
    rc, out = _run(capsys, str(root))
    assert rc == 1
    lines = out.splitlines()
    assert lines[0] == "step 1: ok" and "step 2: DAMAGED" in lines and "step 3: DAMAGED" in lines
    assert any(f"step-0000000002/{shard}: expected crc32:" in ln for ln in lines)
    assert any(ln.endswith(f"step-0000000003/{meta}: missing") for ln in lines)
    with CheckpointManager(root) as mgr:
        report = mgr.verify()
    assert report[1] == [] and len(report[2]) == 1 and len(report[3]) == 1


def test_json_report(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = root / "step-0000000001" / _files(root, 1)[-1]
    path.write_bytes(path.read_bytes()[:-1])
    rc, out = _run(capsys, "--json", str(root))
    report = json.loads(out)
    assert rc == 1 and report["ok"] is False and report["checked"] == [1, 2, 3]
    (problem,) = report["problems"]["1"]
    assert path.name in problem and "bytes" in problem
    assert set(report["problems"]) == {"1"}


def test_one_step_checks_only_that_step(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip_byte(root / "step-0000000001" / ".metadata", 0, 0x40)
    assert _run(capsys, str(root), "2")[0] == 0
    rc, out = _run(capsys, str(root), "1")
    assert rc == 1 and out.startswith("step 1: DAMAGED")


def test_unreadable_manifest_is_reported_not_skipped(root: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """list() skips a checkpoint whose manifest cannot be read; verify must not."""
    (root / "step-0000000002" / MANIFEST_NAME).write_text('{"format_version": 1, "ste')
    rc, out = _run(capsys, str(root))
    assert rc == 1 and "step 2: DAMAGED" in out and MANIFEST_NAME in out
    assert _run(capsys, str(root), "2")[0] == 1
    with CheckpointManager(root) as mgr:  # the root's writer sets it aside when it opens
        assert [i.step for i in mgr.list()] == [1, 3]
        assert sorted(mgr.verify()) == [1, 3]
    rc, out = _run(capsys, str(root))
    assert rc == 0 and "step 2: quarantined" in out and MANIFEST_NAME in out


def test_unknown_step_is_bad_input(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["verify", str(root), "7"]) == 2  # the words inspect, diff and export use
    err = capsys.readouterr().err
    assert f"no checkpoint at step 7 under {root} (committed steps: 1, 2, 3)" in err, err
    with CheckpointManager(root) as mgr, pytest.raises(LookupError, match="7"):
        mgr.verify(7)


def test_empty_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "none").mkdir()
    rc, out = _run(capsys, str(tmp_path / "none"))
    assert rc == 0 and "no committed checkpoints" in out


def test_command_line_exit_status(root: Path) -> None:
    """The real ``python -m asyncckpt`` process: exit 1 and the file named on stdout."""
    shard = [f for f in _files(root, 3) if f.endswith(".distcp")][-1]
    flip_byte(root / "step-0000000003" / shard, 10, 0x40)
    proc = asyncckpt("verify", root)
    assert proc.returncode == 1, proc.stderr
    assert f"step-0000000003/{shard}" in proc.stdout and "step 1: ok" in proc.stdout
