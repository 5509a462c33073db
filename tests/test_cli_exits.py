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
from helpers.procs import DEADLINE_S, asyncckpt, child_env

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


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
                           env=child_env())
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == ""  # as a command killed by SIGPIPE


def test_head_sees_the_first_line(root):
    r = subprocess.run(f"{sys.executable} -m asyncckpt list {root} | head -1", shell=True,
                       capture_output=True, text=True, timeout=DEADLINE_S,
                       env=child_env())
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


def _weights(step: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(step)
    return {k: v.detach() for k, v in nn.Linear(3, 2).state_dict().items()}


def test_a_compressed_checkpoint_tells_plain_dcp_users_what_to_run(root, tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = root / "step-0000000002"
    note = (folder / "README.txt").read_text()
    assert "zstd" in note and "asyncckpt export --format dcp ROOT --step N OUT" in note
    target = {k: torch.empty_like(v) for k, v in _weights(2).items()}
    with pytest.raises(BaseException):  # what the note is for: plain DCP cannot read it
        dcp.load({f"model/{k}": v for k, v in target.items()}, checkpoint_id=str(folder),
                 no_dist=True)
    line = next(ln for ln in note.splitlines() if "--format dcp" in ln)
    argv = line.split("(")[0].split()[1:]  # the note's command, as written
    assert argv == ["export", "--format", "dcp", "ROOT", "--step", "N", "OUT"]
    assert line.split()[0] == "asyncckpt"
    out = tmp_path / "plain"
    r = asyncckpt(*[{"ROOT": root, "N": 2, "OUT": out}.get(a, a) for a in argv])
    assert r.returncode == 0 and "(dcp)" in r.stdout, r.stderr
    dcp.load(target, checkpoint_id=str(out), no_dist=True)
    for k, v in _weights(2).items():
        assert torch.equal(target[k], v), k
    assert asyncckpt("verify", root, 2).returncode == 0  # the note is checked like the shards
    (folder / "README.txt").write_text(note + "x")
    try:
        r = asyncckpt("verify", root, 2)
        assert r.returncode == 1 and "README.txt" in r.stdout
    finally:
        (folder / "README.txt").write_text(note)


@pytest.mark.parametrize("out, fmt", [("w.safetensors", "safetensors"), ("w.pt", "torch"),
                                      ("w.pth", "torch"), ("w", "dcp"), ("w.d/", "dcp")])
def test_export_format_follows_the_name(root, tmp_path, out, fmt):
    r = asyncckpt("export", root, "--step", 1, out, cwd=tmp_path)
    assert r.returncode == 0 and f"({fmt})" in r.stdout, r.stderr
    path = tmp_path / out
    if fmt == "torch":
        loaded = torch.load(path, weights_only=True)
    elif fmt == "safetensors":
        from safetensors.torch import load_file
        loaded = load_file(path)
    else:
        import torch.distributed.checkpoint as dcp
        loaded = {k: torch.empty_like(v) for k, v in _weights(1).items()}
        dcp.load(loaded, checkpoint_id=str(path), no_dist=True)
    assert loaded.keys() == _weights(1).keys()
    assert all(torch.equal(loaded[k], v) for k, v in _weights(1).items())


@pytest.mark.parametrize("out, argv, words", [
    ("model.pt", ["--format", "safetensors"], "--format safetensors does not match OUT model.pt: "
                                              ".pt means torch"),
    ("w.safetensors", ["--format", "dcp"], ".safetensors means safetensors"),
    ("folder/", ["--format", "torch"], "a folder means dcp"),
    ("w.bin", [], "cannot tell the format of w.bin from its extension '.bin'"),
])
def test_export_refuses_a_name_that_says_another_format(root, tmp_path, out, argv, words):
    r = asyncckpt("export", root, out, *argv, cwd=tmp_path)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_dcp_replaces_only_a_dcp_folder(root, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = asyncckpt("export", root, mine, "--force")
    assert r.returncode == 2 and "replaces only a folder of DCP files" in r.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "plain"
    assert asyncckpt("export", root, "--step", 1, out).returncode == 0
    r = asyncckpt("export", root, out)
    assert r.returncode == 2 and "pass --force" in r.stderr
    assert asyncckpt("export", root, out, "--force").returncode == 0


def test_release_command(tmp_path):
    import json

    root = _save(tmp_path / "ckpt", {1: {"loss": 2.0}, 2: {"loss": 1.0}, 3: {"loss": 3.0}})
    (tmp_path / "card.json").write_text('{"license": "mit"}')
    r = asyncckpt("release", root, "--step", "best:loss", "--version", "1.0.0", "--card",
                  tmp_path / "card.json")
    assert r.returncode == 0 and r.stdout.startswith("released step 2 as 1.0.0"), r.stderr
    card = json.loads((root / "releases" / "v1.0.0" / "model_card.json").read_text())
    assert card["step"] == 2 and card["card"] == {"license": "mit"} and card["metrics"] == {"loss": 1.0}
    from safetensors.torch import load_file
    weights = load_file(root / "releases" / "v1.0.0" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in _weights(2).items())
    r = asyncckpt("release", root, "--version", "1.0.0")
    assert r.returncode == 2 and "release 1.0.0 already exists" in r.stderr
    r = asyncckpt("release", root, "--version", "v2")
    assert r.returncode == 2 and "version='v2' is not valid" in r.stderr
    r = asyncckpt("releases", root)
    assert r.returncode == 0 and "1.0.0" in r.stdout


@pytest.fixture
def titan(tmp_path):
    """A root as torchtitan writes it: step-100/ and step-200/, plain DCP folders."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path / "outputs" / "checkpoint"
    for step in (100, 200):
        dcp.save({"model": {"w": torch.full((4, 3), float(step))}, "optim": {"lr": 0.1}},
                 checkpoint_id=str(root / f"step-{step}"), no_dist=True)
    return root


NOTE = "plain DCP checkpoint, no manifest: sizes only, no checksums"


def test_list_verify_inspect_a_root_of_plain_dcp_folders(titan):
    r = asyncckpt("list", titan)
    assert r.returncode == 0 and "plain DCP checkpoints, no manifests: sizes only, no checksums" \
        in r.stdout and "no committed checkpoints" not in r.stdout
    assert [ln.split()[0] for ln in r.stdout.splitlines()[2:]] == ["100", "200"]
    r = asyncckpt("verify", titan)
    assert r.returncode == 0 and r.stdout.splitlines() == [f"step {s}: ok ({NOTE})" for s in (100, 200)]
    r = asyncckpt("inspect", titan, 100)
    assert r.returncode == 0 and r.stdout.startswith(f"step 100  {titan / 'step-100'}\n  {NOTE}\n")
    assert "model.w" in r.stdout and "4x3" in r.stdout and "optim.lr" in r.stdout
    r = asyncckpt("inspect", titan, 150)
    assert r.returncode == 2 and "no checkpoint at step 150" in r.stderr and "100, 200" in r.stderr
    r = asyncckpt("inspect", titan, "best")
    assert r.returncode == 2 and "name a step" in r.stderr
    shard = next((titan / "step-200").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated: its items reach past its end
    r = asyncckpt("verify", titan)
    assert r.returncode == 1 and f"step 200: DAMAGED ({NOTE})" in r.stdout and shard.name in r.stdout


def test_a_plain_dcp_folder_itself(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "ckpt"
    dcp.save({"w": torch.arange(6.0)}, checkpoint_id=str(folder), no_dist=True)
    for command in ("list", "verify", "inspect"):
        r = asyncckpt(command, folder)
        assert r.returncode == 0 and NOTE in r.stdout, (command, r)
    r = asyncckpt("export", folder, tmp_path / "w.pt")
    assert r.returncode == 0 and "exported the plain DCP checkpoint: 1 tensors" in r.stdout, r.stderr
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["w"], torch.arange(6.0))


def test_export_from_a_plain_dcp_root(titan, tmp_path):
    r = asyncckpt("export", titan, "--step", 100, tmp_path / "w.safetensors")
    assert r.returncode == 0 and r.stdout.startswith("exported step 100: 1 tensors"), r.stderr
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "w.safetensors")["model.w"], torch.full((4, 3), 100.0))
