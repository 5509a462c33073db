"""The command line for retention and releases: list (tags), prune, export, releases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file
from fsspec.implementations.local import LocalFileSystem

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.cli import main
from asyncckpt.manifest import MANIFEST_NAME
from asyncckpt.storage import MARKER_NAME
from helpers.checkpoints import step_folders
from helpers.training import small_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def root(tmp_path):
    """Steps 1-5 (loss 5, 1, 4, 2, 3), step 2 tagged epoch_end and step 3 a milestone;
    a release 1.0.0 of step 4."""
    path = tmp_path / "ckpt"
    with CheckpointManager(path) as mgr:
        for step, loss in zip(range(1, 6), (5.0, 1.0, 4.0, 2.0, 3.0)):
            tags = {2: ["epoch_end"], 3: ["milestone:1.0B"]}.get(step, [])
            mgr.save(step, TrainState(model=small_model(step)), metrics={"loss": loss}, tags=tags,
                     blocking=True)
        mgr.release(4, version="1.0.0")
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_manifest_release_and_best_tags(root, capsys):
    code, out, _ = _run(capsys, "list", root, "--json")
    tags = {i["step"]: i["tags"] for i in json.loads(out)}
    assert code == 0 and tags == {1: [], 2: ["epoch_end"], 3: ["milestone:1.0B"],
                                  4: ["release:1.0.0"], 5: []}
    code, out, _ = _run(capsys, "list", root, "--metric", "loss", "--json")
    assert "best:loss" in {i["step"]: i["tags"] for i in json.loads(out)}[2]
    code, out, _ = _run(capsys, "list", root, "--metric", "loss", "--mode", "max")
    line = next(x for x in out.splitlines() if x.startswith("1 "))
    assert "best:loss" in line


def test_list_table_and_json_show_step_epoch_time_size_tags_metrics(tmp_path, capsys):
    path = tmp_path / "ckpt"
    with CheckpointManager(path) as mgr:
        mgr.save(7, TrainState(model=small_model(7)), metrics={"loss": 0.125, "acc": 0.5}, epoch=2,
                 tags=["user:x"], blocking=True)
        (info,) = mgr.list()
    code, out, _ = _run(capsys, "list", path, "--json")
    (doc,) = json.loads(out)
    assert code == 0 and doc["step"] == 7 and doc["epoch"] == 2 and doc["tags"] == ["user:x"]
    assert doc["metrics"] == {"loss": 0.125, "acc": 0.5} and doc["time"] == info.time
    shards = [p for p in (path / "step-0000000007").iterdir() if p.name not in (MANIFEST_NAME, MARKER_NAME)]
    assert doc["bytes"] == info.bytes == sum(p.stat().st_size for p in shards)
    code, out, _ = _run(capsys, "list", path)
    header, row = out.splitlines()
    assert header.split() == ["step", "epoch", "time", "size", "branch", "tags", "metrics"]
    assert row.split()[:3] == ["7", "2", info.time]
    assert row.split()[-3:] == ["user:x", "acc=0.5", "loss=0.125"] and " KB" in row
    (tmp_path / "empty").mkdir()
    assert _run(capsys, "list", tmp_path / "empty")[1].startswith("no committed checkpoints under")


def test_prune_dry_run_then_prune_follows_the_policy(root, capsys):
    code, out, _ = _run(capsys, "prune", root, "--keep-last", "1", "--dry-run", "--json")
    report = json.loads(out)
    assert code == 0 and report["deleted"] == [1, 2] and step_folders(root) == [1, 2, 3, 4, 5]
    assert report["reasons"]["3"] == ["tag:milestone:1.0B"]
    assert report["reasons"]["4"] == ["latest-backup", "tag:release:1.0.0"]
    code, out, _ = _run(capsys, "prune", root, "--keep-last", "1", "--keep-best", "1",
                        "--metric", "loss", "--keep-epoch-ends")
    assert code == 0 and "deleted 1 checkpoint(s): [1]" in out
    assert step_folders(root) == [2, 3, 4, 5]  # 2 best and epoch end, 3 milestone, 4 released


def test_prune_warns_about_a_missing_metric(root, capsys):
    code, _, err = _run(capsys, "prune", root, "--keep-last", "2", "--keep-best", "1",
                        "--metric", "acc", "--dry-run")
    assert code == 0 and "5 checkpoint(s) have no value of --metric 'acc'" in err


@pytest.mark.parametrize("argv, words", [
    (["--keep-last", "-1"], "--keep-last -1 is not valid: expected an integer >= 1"),
    (["--keep-last", "2", "--keep-best", "-3", "--metric", "loss"], "--keep-best -3 is not valid"),
    (["--keep-last", "2", "--keep-best", "1"], "expected --metric NAME too"),
    (["--keep-last", "2", "--keep-every", "0"], "--keep-every 0 is not valid"),
])
def test_prune_bad_values_exit_2_naming_them(root, capsys, argv, words):
    code, _, err = _run(capsys, "prune", root, *argv)
    assert code == 2 and words in err and step_folders(root) == [1, 2, 3, 4, 5]


def test_prune_unknown_mode_is_refused(root, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", str(root), "--keep-last", "1", "--mode", "median"])
    assert e.value.code == 2 and "invalid choice: 'median'" in capsys.readouterr().err


class RecordingFS(LocalFileSystem):
    """Local files; records every deletion, in order."""

    protocol = ("recordingrm", "file")
    removed: list[str] = []

    def rm_file(self, path):
        type(self).removed.append(self._strip_protocol(path))
        super().rm_file(path)

    def rmdir(self, path):
        type(self).removed.append(self._strip_protocol(path) + "/")
        super().rmdir(path)


def test_prune_deletes_the_manifest_first(root, capsys):
    fsspec.register_implementation("recordingrm", RecordingFS, clobber=True)
    RecordingFS.removed = []
    assert _run(capsys, "prune", f"recordingrm://{root}", "--keep-last", "1")[0] == 0
    removed = [p.removeprefix(f"{root}/") for p in RecordingFS.removed]
    assert removed[0] == "step-0000000001/" + MANIFEST_NAME  # manifest first: never listed half-deleted
    first = removed[:removed.index("step-0000000001/") + 1]
    assert removed[len(first)] == "step-0000000002/" + MANIFEST_NAME and removed[-1] == "step-0000000002/"
    assert all(p.startswith("step-0000000001/") for p in first)
    assert all(p.startswith("step-0000000002/") for p in removed[len(first):])
    assert len(set(removed)) == len(removed)
    assert not (Path(root) / "step-0000000001").exists() and (Path(root) / "step-0000000003").exists()


@pytest.mark.parametrize("fmt, dtype", [("safetensors", None), ("safetensors", "bf16"),
                                        ("torch", None), ("torch", "fp16")])
def test_export_writes_the_weights_of_one_step(root, tmp_path, capsys, fmt, dtype):
    out = tmp_path / "export" / "weights.bin"
    argv = ["export", root, "--step", "3", "--format", fmt, out] + (["--dtype", dtype] if dtype else [])
    code, text, err = _run(capsys, *argv)
    assert code == 0, err
    assert "exported step 3: 4 tensors" in text
    loaded = load_file(str(out)) if fmt == "safetensors" else torch.load(out, weights_only=True)
    cast = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for k, v in small_model(3).state_dict().items():
        expected = v if cast is None else v.to(cast)
        assert torch.equal(loaded[k], expected), k


def test_export_latest_by_default_and_refuses_to_overwrite(root, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert _run(capsys, "export", root, out)[1].startswith("exported step 5")
    code, _, err = _run(capsys, "export", root, "--step", "2", out)
    assert code == 2 and "already exists; pass --force" in err
    assert _run(capsys, "export", root, "--step", "2", "--force", out)[0] == 0
    assert torch.equal(load_file(str(out))["0.weight"], small_model(2)[0].weight.detach())


@pytest.mark.parametrize("argv, words", [
    (["--step", "9"], "no checkpoint at step 9"),
    (["--dtype", "int4"], "dtype='int4' is not valid"),
])
def test_export_errors_exit_2(root, tmp_path, capsys, argv, words):
    code, _, err = _run(capsys, "export", root, *argv, tmp_path / "w.safetensors")
    assert code == 2 and words in err
    assert not (tmp_path / "w.safetensors").exists()


def test_releases_command(root, capsys):
    code, out, _ = _run(capsys, "releases", root, "--json")
    assert code == 0 and [(r["version"], r["step"]) for r in json.loads(out)] == [("1.0.0", 4)]
    assert "1.0.0" in _run(capsys, "releases", root)[1]


def test_listing_commands_do_not_import_torch():
    code = ("import sys, asyncckpt.cli, asyncckpt.release\n"
            "print(sum(m == 'torch' or m.startswith('torch.') for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stderr
