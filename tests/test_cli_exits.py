"""The console script as a user runs it: exit codes and the words of its messages for typos,
missing steps, files given as roots, closed pipes, step names (latest, best, best:<metric>)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, TrainState, __version__

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
REPO = str(Path(__file__).resolve().parents[1])
DEADLINE_S = 120


def asyncckpt(*argv: object, **kw: object) -> subprocess.CompletedProcess[str]:
    """``python -m asyncckpt ARGV`` with this checkout on the path."""
    return subprocess.run([sys.executable, "-m", "asyncckpt", *map(str, argv)], capture_output=True,
                          text=True, timeout=DEADLINE_S, env={**os.environ, "PYTHONPATH": REPO},
                          **kw)  # type: ignore[call-overload]


def _save(root: Path, metrics: dict[int, dict[str, float]]) -> Path:
    with CheckpointManager(root) as mgr:
        for step, values in metrics.items():
            torch.manual_seed(step)
            mgr.save(step, TrainState(model=nn.Linear(3, 2)), metrics=values, blocking=True)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 1, 2, 3 with loss 3, 1, 2: the best by loss is step 2, the latest step 3."""
    return _save(tmp_path_factory.mktemp("exits") / "ckpt",
                 {1: {"loss": 3.0}, 2: {"loss": 1.0}, 3: {"loss": 2.0}})


@pytest.mark.parametrize("argv", [["list"], ["verify"], ["prune", "--keep-last", "1"],
                                  ["inspect"], ["export", "OUT.safetensors"], ["releases"]])
def test_a_root_that_does_not_exist_exits_2_naming_it(tmp_path, argv):
    missing = tmp_path / "ckpt-typo"
    r = asyncckpt(argv[0], missing, *argv[1:], cwd=tmp_path)
    assert r.returncode == 2, r
    assert f"asyncckpt {argv[0]}: error: {missing} does not exist" in r.stderr
    assert "to restore" not in r.stderr and r.stdout == ""


def test_a_file_given_as_root_is_named_a_file(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("hello\n")
    r = asyncckpt("list", readme)
    assert r.returncode == 2 and f"{readme} is a file, not a checkpoint root" in r.stderr
    assert "releases" not in r.stderr


def test_an_empty_root_says_what_it_wanted_to_do(tmp_path):
    for command in ("inspect", "export"):
        r = asyncckpt(command, tmp_path, *(["w.safetensors"] if command == "export" else []),
                      cwd=tmp_path)
        assert r.returncode == 2
        assert f"no checkpoint to {command} under {tmp_path} (no committed checkpoints)" in r.stderr


def test_a_missing_step_reads_the_same_in_every_command(root, tmp_path):
    words = f"no checkpoint at step 999 under {root} (committed steps: 1, 2, 3)"
    for argv in (["verify", root, 999], ["inspect", root, 999], ["diff", root, 1, 999],
                 ["export", root, "--step", 999, tmp_path / "w.safetensors"]):
        r = asyncckpt(*argv)
        assert r.returncode == 2 and words in r.stderr, (argv, r.stderr)
        assert "FileNotFoundError" not in r.stderr


def test_a_closed_pipe_ends_quietly(root):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: `| head -0`
    try:
        r = subprocess.run([sys.executable, "-m", "asyncckpt", "list", str(root)], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=DEADLINE_S,
                           env={**os.environ, "PYTHONPATH": REPO})
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == ""  # as a command killed by SIGPIPE


def test_head_sees_the_first_line(root):
    r = subprocess.run(f"{sys.executable} -m asyncckpt list {root} | head -1", shell=True,
                       capture_output=True, text=True, timeout=DEADLINE_S,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0 and r.stdout.split() == ["step", "epoch", "time", "size", "branch",
                                                      "tags", "metrics"] and r.stderr == ""


def test_verbose_after_the_command_and_version(root):
    quiet = asyncckpt("verify", root)
    loud = asyncckpt("verify", root, "-v")
    assert quiet.returncode == loud.returncode == 0 and loud.stdout == quiet.stdout
    before = asyncckpt("-v", "verify", root)
    assert before.returncode == 0
    r = asyncckpt("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"asyncckpt {__version__}"


@pytest.mark.parametrize("which, step", [("latest", 3), ("best", 2), ("best:loss", 2), ("1", 1)])
def test_steps_by_name(root, tmp_path, which, step):
    r = asyncckpt("inspect", root, which)
    assert r.returncode == 0 and r.stdout.startswith(f"step {step}  "), r.stderr
    r = asyncckpt("verify", root, which)
    assert r.returncode == 0 and r.stdout == f"step {step}: ok\n"
    r = asyncckpt("export", root, "--step", which, tmp_path / "w.safetensors")
    assert r.returncode == 0 and r.stdout.startswith(f"exported step {step}:"), r.stderr
    r = asyncckpt("diff", root, which, 3)
    assert r.returncode == 0 and r.stdout.startswith(f"step {step} -> step 3"), r.stderr


def test_best_needs_one_metric(tmp_path):
    two = _save(tmp_path / "two", {1: {"loss": 2.0, "acc": 0.1}, 2: {"loss": 1.0, "acc": 0.2}})
    r = asyncckpt("inspect", two, "best")
    assert r.returncode == 2 and "best needs a metric" in r.stderr and "acc, loss" in r.stderr
    assert asyncckpt("inspect", two, "best:acc").stdout.startswith("step 1  ")  # lowest is best
    r = asyncckpt("inspect", two, "best:bleu")
    assert r.returncode == 2 and "no checkpoint with metric 'bleu'" in r.stderr
    r = asyncckpt("inspect", two, "newest")
    assert r.returncode == 2 and "'newest' is not a step" in r.stderr
