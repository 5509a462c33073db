"""``asyncckpt schedule CONFIG.yaml``: plan checkpoints from a training config and write them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asyncckpt.cli import main
from asyncckpt.schedule import plan_checkpoints
from helpers.procs import asyncckpt

CONFIG = """\
# a run of 10 epochs
training:
  epochs: 10
  steps_per_epoch: 1000
  dataset_tokens: 30000000   # large: 100 checkpoints by default
  min_checkpoint_interval: 100
  lr: 3.0e-4
checkpoint:
  root: runs/exp1/ckpt
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(CONFIG)
    return path


def _schedule(path: Path) -> list[int]:
    return yaml.safe_load(path.read_text())["training"]["checkpoint_schedule"]


def test_schedule_in_place(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", str(config), "--targets", "small:10,medium:20,large:30,xlarge:40"]) == 0
    out = capsys.readouterr().out
    expected = plan_checkpoints(10_000, 1000, dataset_tokens=30_000_000, targets={"large": 30})
    assert len(expected) == 30
    assert _schedule(config) == expected
    assert "target: 30 (large dataset)" in out and "plan: 30 checkpoints" in out
    assert f"wrote training.checkpoint_schedule (30 steps) to {config}" in out
    text = config.read_text()
    assert text.startswith(CONFIG.split("checkpoint:")[0])  # comments and the rest kept
    assert text.endswith("checkpoint:\n  root: runs/exp1/ckpt\n")
    # running again replaces the plan instead of adding a second one
    assert main(["schedule", str(config), "--min-interval", "2000", "--no-log-steps"]) == 0
    assert _schedule(config) == plan_checkpoints(10_000, 1000, dataset_tokens=30_000_000,
                                                 min_interval=2000, log_steps_first_epoch=False)
    assert config.read_text().count("checkpoint_schedule") == 1


def test_schedule_with_output_leaves_the_config_alone(config: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "planned.yaml"
    assert main(["schedule", str(config), "--output", str(out_path)]) == 0
    assert config.read_text() == CONFIG
    plan = _schedule(out_path)
    assert plan == plan_checkpoints(10_000, 1000, dataset_tokens=30_000_000)
    assert "short of the target" in capsys.readouterr().out  # 100 wanted, min interval allows fewer
    assert yaml.safe_load(out_path.read_text())["checkpoint"] == {"root": "runs/exp1/ckpt"}


def test_schedule_dry_run_writes_nothing(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", str(config), "--dry-run"]) == 0
    assert config.read_text() == CONFIG
    assert "plan: " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "quoted"),
    [
        (["missing.yaml"], "config file '{tmp}/missing.yaml' not found"),
        (["{cfg}", "--targets", "large=30"], "targets='large=30' is not valid: 'large=30' is not category:count"),
        (["{cfg}", "--targets", "huge:30"], "'huge:30' is not category:count"),
        (["{cfg}", "--min-interval", "0"], "min_interval=0 is not valid"),
        (["{bad}"], "bad.yaml is not valid YAML at line 2"),
        (["{empty}"], "empty.yaml: training.total_steps is missing"),
    ],
)
def test_schedule_errors(args: list[str], quoted: str, config: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text("training: [1,\n")
    (tmp_path / "empty.yaml").write_text("checkpoint: {root: r}\n")
    names = {"cfg": str(config), "bad": str(tmp_path / "bad.yaml"), "empty": str(tmp_path / "empty.yaml"),
             "tmp": str(tmp_path)}
    argv = [a.format(**names) if "{" in a else str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    assert main(["schedule", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asyncckpt schedule: error: ") and quoted.format(**names) in err
    assert config.read_text() == CONFIG  # nothing written


def test_schedule_as_a_subprocess(config: Path) -> None:
    out = asyncckpt("schedule", str(config), "--targets", "large:25")
    assert out.returncode == 0, out.stderr
    assert "plan: 25 checkpoints" in out.stdout
    assert _schedule(config) == plan_checkpoints(10_000, 1000, dataset_tokens=30_000_000, targets={"large": 25})
    bad = asyncckpt("schedule", str(config), "--targets", "x")
    assert bad.returncode == 2 and "targets='x' is not valid" in bad.stderr


BAD_CONFIGS = {
    "latin-1": ("training:\n  total_steps: 1000  # café\n".encode("latin-1"),
                "is not valid: not UTF-8 text (byte b'\\xe9' at offset 36, line 2)"),
    "huge-total": (b"training:\n  total_steps: 100000000000000000000000000000\n",
                   "training.total_steps=100000000000000000000000000000 is not valid"),
    "nan-total": (b"training:\n  total_steps: .nan\n", "training.total_steps=nan is not valid"),
    "million-epochs": (b"training:\n  epochs: 5000000\n  steps_per_epoch: 10\n", "training.epochs=5000000"),
    "too-many-epoch-ends": (b"training:\n  total_steps: 100000000\n  steps_per_epoch: 10\n",
                            "training.steps_per_epoch=10 is not valid"),
    "huge-target": (b"training:\n  total_steps: 1000\n  target_checkpoints: 1e30\n",
                    "training.target_checkpoints='1e30' is not valid"),
    "target-unknown-category": (b"training:\n  total_steps: 1000\n  dataset_tokens: 10\n"
                                b"  target_checkpoints: {small: 2, medium: 3, large: 4, xlarge: 5, tiny: 1}\n",
                                "training.target_checkpoints: unknown size category 'tiny' (=1)"),
    "target-missing-category": (b"training:\n  total_steps: 1000\n  dataset_tokens: 10\n"
                                b"  target_checkpoints: {small: 2, medium: 3}\n",
                                "training.target_checkpoints={'small': 2, 'medium': 3} is not valid: "
                                "expected a mapping from each of small/medium/large/xlarge to an int in "
                                "[0, 1000000]; missing large, xlarge"),
    "target-not-int": (b"training:\n  total_steps: 1000\n  dataset_tokens: 10\n"
                       b"  target_checkpoints: {small: lots, medium: 3, large: 4, xlarge: 5}\n",
                       "training.target_checkpoints.small='lots' is not valid: expected an integer"),
    "target-map-no-tokens": (b"training:\n  total_steps: 1000\n  dataset_path: data/train.bin\n"
                             b"  target_checkpoints: {small: 2, medium: 3, large: 4, xlarge: 5}\n",
                             "training.dataset_tokens (the dataset's size in tokens) is needed "
                             "(training.dataset_path is given"),
    "top-level-list": (b"- 1\n", "is not valid: expected a mapping at the top, found a list"),
    "too-deep": (b"[" * 5000 + b"]" * 5000, "is not valid YAML: nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_exits_2_with_one_line_naming_file_and_key(tmp_path: Path, case: str) -> None:
    data, says = BAD_CONFIGS[case]
    path = tmp_path / "train.yaml"
    path.write_bytes(data)
    out = asyncckpt("schedule", str(path))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"asyncckpt schedule: error: {path}") and says in out.stderr
    assert path.read_bytes() == data                           # nothing was written


def test_a_config_that_is_a_folder_exits_2(tmp_path: Path) -> None:
    out = asyncckpt("schedule", str(tmp_path))
    assert out.returncode == 2 and out.stderr.strip() == \
        f"asyncckpt schedule: error: config file {str(tmp_path)!r} cannot be read: Is a directory"


@pytest.mark.parametrize(
    ("tokens", "category", "count"),
    [(9_999_999, "small", 6), (10_000_000, "medium", 8), (50_000_000, "large", 10), (50_000_001, "xlarge", 12)],
)
def test_schedule_prints_the_category_and_target_a_mapping_gave(tmp_path: Path, tokens: int,
                                                                category: str, count: int) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("training:\n  total_steps: 10000\n  steps_per_epoch: 10000\n"
                    f"  dataset_tokens: {tokens}\n  min_checkpoint_interval: 10\n"
                    "  log_steps_first_epoch: false\n  target_checkpoints: {small: 6, medium: 8, large: 10, xlarge: 12}\n")
    out = asyncckpt("schedule", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[1].startswith(f"target: {count} ({category} dataset, "
                               f"training.target_checkpoints.{category}); ")
    assert lines[2] == f"plan: {count} checkpoints"
    assert _schedule(path) == plan_checkpoints(10_000, 10_000, target=count, min_interval=10,
                                                log_steps_first_epoch=False)
    again = subprocess.run([sys.executable, "-m", "asyncckpt", "schedule", str(path), "--dry-run",
                            "--targets", f"{category}:3"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stderr == ""  # no "takes precedence" note for a mapping
    assert again.stdout.splitlines()[1].startswith(f"target: 3 ({category} dataset); ")
