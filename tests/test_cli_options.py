"""Every option of the console script, run as a user runs it (``python -m asyncckpt``), with the
exit code and the effect checked: ``prune --keep-every``, ``diff --all``, ``export --model``,
``-v``, and ``-o KEY=VALUE`` (JSON values, ``endpoint_url`` moved into ``client_kwargs``)
against an S3 server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from asyncckpt import CheckpointManager, TrainState
from helpers.procs import asyncckpt

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
STEPS = range(1, 7)


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"enc": nn.Linear(4, 3), "dec": nn.Linear(3, 2)}


def _fill(root: str, storage_options: dict | None = None) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Steps 1-6, epoch ends at 3 and 6; ``enc`` frozen (the same at every step), ``dec`` trained.
    Returns the weights of each step by model."""
    models, saved = _models(), {}
    with CheckpointManager(root, storage_options=storage_options) as mgr:
        for step in STEPS:
            with torch.no_grad():
                models["dec"].weight.add_(0.25)
            mgr.save(step, TrainState(model=models), metrics={"loss": 1.0 / step}, epoch=(step - 1) // 3,
                     tags=["epoch_end"] if step % 3 == 0 else [], blocking=True)
            saved[step] = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    return saved


def _listed(root: object, *options: str) -> list[int]:
    r = asyncckpt("list", root, "--json", *options)
    assert r.returncode == 0, r.stderr
    return [c["step"] for c in json.loads(r.stdout)]


@pytest.fixture
def root(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "ckpt"
    return path, _fill(str(path))


def _would_delete(path: Path, *options: str) -> list[int]:
    r = asyncckpt("prune", path, *options, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    return sorted(json.loads(r.stdout)["deleted"])


def test_prune_keep_every_and_epoch_ends_keep_their_steps_and_the_newest_two(root) -> None:
    path, _ = root
    assert _would_delete(path, "--keep-last", "1") == [1, 2, 3, 4]           # the newest two stay
    assert _would_delete(path, "--keep-last", "1", "--keep-every", "2") == [1, 3]
    assert _would_delete(path, "--keep-last", "1", "--keep-epoch-ends") == [1, 2, 4]
    assert _listed(path) == list(STEPS)                                      # a dry run deletes nothing
    r = asyncckpt("prune", path, "--keep-every", "4", "--keep-last", "1")
    assert r.returncode == 0, r.stderr
    assert _listed(path) == [4, 5, 6]


def _table_keys(out: str) -> dict[str, str]:
    """The rows of diff's table: key -> its last column."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("key ")) + 1
    return {line.split()[0]: line.split()[-1] for line in lines[start:] if line.strip()}


def test_diff_all_lists_the_unchanged_items_too(root) -> None:
    path, _ = root
    changed, every = asyncckpt("diff", path, "1", "2"), asyncckpt("diff", path, "1", "2", "--all")
    assert changed.returncode == 0 and every.returncode == 0, changed.stderr + every.stderr
    assert _table_keys(changed.stdout) == {"model/dec.weight": "0.25"}       # dec trained, enc frozen
    rows = _table_keys(every.stdout)
    assert rows["model/dec.weight"] == "0.25" and rows["model/enc.weight"] == "unchanged"
    assert set(rows) == {"model/dec.weight", *json.loads(asyncckpt("diff", path, "1", "2", "--json")
                                                         .stdout)["unchanged"]}


def test_export_model_writes_only_that_model(root, tmp_path: Path) -> None:
    path, saved = root
    out = tmp_path / "dec.safetensors"
    r = asyncckpt("export", path, out, "--model", "dec", "--step", "4")
    assert r.returncode == 0, r.stderr
    weights = load_file(str(out))
    assert set(weights) == set(saved[4]["dec"])
    assert all(torch.equal(weights[k], v) for k, v in saved[4]["dec"].items())
    missing = asyncckpt("export", path, tmp_path / "x.safetensors", "--model", "nope")
    assert missing.returncode != 0 and "nope" in missing.stderr and "dec" in missing.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_verbose_logs_each_checkpoint_to_stderr_and_quiet_logs_nothing(root, tmp_path: Path) -> None:
    path, _ = root
    quiet, before, after = (asyncckpt(*argv) for argv in (("verify", path), ("-v", "verify", path),
                                                          ("verify", path, "-v")))
    assert quiet.returncode == before.returncode == after.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and before.stdout == after.stdout == quiet.stdout
    assert before.stderr == after.stderr                        # -v before or after the command
    assert [ln for ln in before.stderr.splitlines() if "checked: ok" in ln] == \
        [f"INFO asyncckpt.cli: step={s}: {n} files, {size} bytes checked: ok"
         for s in STEPS for n, size in [_files(path, s)]]
    pruned = asyncckpt("prune", path, "--keep-last", "1", "--keep-every", "3", "-v")
    assert pruned.returncode == 0, pruned.stderr
    assert [ln.split(": ", 1)[1] for ln in pruned.stderr.splitlines() if "deleted" in ln] == \
        [f"step={s}: deleted {path / f'step-{s:010d}'}" for s in (1, 2, 4)]
    exported = asyncckpt("-v", "export", path, tmp_path / "w.pt")
    assert exported.returncode == 0 and "step=6: read 4 tensors" in exported.stderr, exported.stderr


def _files(path: Path, step: int) -> tuple[int, int]:
    """A checkpoint's file count and bytes, from its manifest."""
    files = json.loads((path / f"step-{step:010d}" / "manifest.json").read_text())["files"]
    return len(files), sum(f["size"] for f in files)


@pytest.mark.s3
@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_storage_options_on_the_command_line_reach_s3(s3_bucket, tmp_path: Path) -> None:
    import helpers_s3 as h

    url = f"s3://{s3_bucket['name']}/run"
    saved = _fill(url, h.options(s3_bucket["endpoint"]))
    opts = ["-o", f"endpoint_url={s3_bucket['endpoint']}",                  # moved into client_kwargs
            "-o", f"key={h.KEY}", "-o", f"secret={h.SECRET}",
            "-o", 'config_kwargs={"retries": {"max_attempts": 2}}',       # a JSON value, a dict
            "-o", "use_listings_cache=false"]                              # a JSON value, a bool
    assert _listed(url, *opts) == list(STEPS)
    r = asyncckpt("verify", url, *opts, "--json")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "w.safetensors"
    r = asyncckpt("export", url, out, "--model", "enc", *opts)
    assert r.returncode == 0, r.stderr
    assert all(torch.equal(load_file(str(out))[k], v) for k, v in saved[6]["enc"].items())
    r = asyncckpt("prune", url, "--keep-last", "2", *opts)
    assert r.returncode == 0 and _listed(url, *opts) == [5, 6], r.stderr
    bad = asyncckpt("list", url, "-o", "endpoint_url=http://127.0.0.1:9", "-o", f"key={h.KEY}",
                    "-o", f"secret={h.SECRET}", "-o", 'config_kwargs={"retries": {"max_attempts": 1}}',
                    "-o", "connect_timeout=1")
    assert bad.returncode != 0 and h.SECRET not in bad.stderr + bad.stdout     # the option was used
