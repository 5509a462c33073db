"""Damage to a committed checkpoint is caught every time: by verify, by restore, and by fallback.

One module-scoped pair of checkpoints (steps 1 and 2) per codec; each case
damages step 2 in place and puts the original bytes back afterwards.  A flipped
byte is tried at positions spread over every file of step 2 (``.metadata`` and
every shard; item headers, tensor data, object blobs, the last byte), and each
time ``mgr.verify``, ``asyncckpt verify``, ``restore(state, 2)`` and
``restore(state)`` (falling back to step 1) must all notice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata

from asyncckpt import CheckpointManager, TrainState, cli
from asyncckpt.dcp_io import METADATA_NAME, README_NAME, README_TEXT, load_metadata
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.manifest import MANIFEST_NAME
from helpers.checkpoints import flip_byte

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEP2 = "step-0000000002"
MASKS = (0xFF, 0x01, 0x80, 0x10)


def _state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 16)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    return TrainState(model=model, optimizer=opt, scheduler=sched, extra={"seed": seed})


def _weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.models["model"].state_dict().items()}


def _scramble(state: TrainState) -> None:
    with torch.no_grad():
        for p in state.models["model"].parameters():
            p.fill_(7.0)


@dataclass
class Ckpt:
    root: Path
    mgr: CheckpointManager
    codec: str | None
    step1: dict[str, torch.Tensor]

    @property
    def folder(self) -> Path:
        return self.root / STEP2

    def files(self) -> list[str]:
        manifest = json.loads((self.folder / MANIFEST_NAME).read_text())
        return [f["path"] for f in manifest["files"]]


@pytest.fixture(scope="module", params=["zstd", None], ids=["zstd", "plain"])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ckpt]:
    root = tmp_path_factory.mktemp(f"integrity-{request.param}") / "ckpt"
    mgr = CheckpointManager(root, compression=request.param)
    first = _state(1)
    mgr.save(1, first, blocking=True)
    mgr.save(2, _state(2), blocking=True)
    yield Ckpt(root, mgr, request.param, _weights(first))
    mgr.close()


def _positions(folder: Path) -> list[tuple[str, int, str]]:
    """(file, offset, what is there): spread over .metadata and every item of every shard."""
    meta = (folder / METADATA_NAME).read_bytes()
    md = load_metadata(meta, METADATA_NAME)
    out = [(METADATA_NAME, 0, "pickle header"), (METADATA_NAME, len(meta) - 1, "last byte")]
    out += [(METADATA_NAME, len(meta) * i // 12, "pickle body") for i in range(1, 12)]
    items: dict[str, list[tuple[int, int, str]]] = {}
    for index, info in md.storage_data.items():
        kind = "tensor" if isinstance(md.state_dict_metadata[index.fqn],
                                      dcp_metadata.TensorStorageMetadata) else "object"
        items.setdefault(info.relative_path, []).append((info.offset, info.length, kind))
    for name, spans in sorted(items.items()):
        size = (folder / name).stat().st_size
        for i, (offset, length, kind) in enumerate(sorted(spans)):
            # alternate over each item: its first byte (a header), its middle, near its end
            where = [(offset, "header"), (offset + length // 2, "data"),
                     (offset + max(0, length - 3), "data end")][i % 3]
            out.append((name, where[0], f"{kind} {where[1]}"))
        if len(spans) < 10:  # few, large items: more positions inside them
            out += [(name, size * i // 10, "spread") for i in range(1, 10)]
        out.append((name, size - 1, "last byte"))
    if (folder / README_NAME).exists():  # compressed: the note for plain DCP users
        size = (folder / README_NAME).stat().st_size
        out += [(README_NAME, 0, "readme"), (README_NAME, size - 1, "readme last byte")]
    return sorted(set(out))


def _unquarantine(root: Path, step_dir: str) -> bool:
    """Move a checkpoint that restore quarantined back in place (the module's fixture keeps
    using it); True when it had been quarantined."""
    aside = sorted((root / "quarantine").glob(f"{step_dir}.*")) if (root / "quarantine").exists() else []
    for folder in aside:
        (folder / "quarantine.json").unlink()
        folder.rename(root / step_dir)
    if aside and not any((root / "quarantine").iterdir()):
        (root / "quarantine").rmdir()
    return len(aside) == 1


def _cli_verify(root: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict]:
    rc = cli.main(["verify", "--json", str(root), *extra])
    return rc, json.loads(capsys.readouterr().out)


def _all_checks_notice(ck: Ckpt, state: TrainState, name: str, capsys: pytest.CaptureFixture[str],
                       caplog: pytest.LogCaptureFixture) -> list[str]:
    """What failed to notice the damage to file ``name`` of step 2 (empty: everything did)."""
    missed = []
    problems = ck.mgr.verify(2)[2]
    if len(problems) != 1 or name not in problems[0]:
        missed.append(f"mgr.verify: {problems}")
    rc, report = _cli_verify(ck.root, capsys, "2")
    if rc != 1 or not any(name in p for p in report["problems"].get("2", [])):
        missed.append(f"asyncckpt verify: rc={rc} {report}")
    try:
        ck.mgr.restore(state, 2)
        missed.append("restore(2) succeeded")
    except CorruptCheckpointError as e:
        if STEP2 not in str(e) or name not in str(e):
            missed.append(f"restore(2) error does not name step and file: {e}")
    _scramble(state)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        got = ck.mgr.restore(state)
    warned = [r.getMessage() for r in caplog.records if "step=2" in r.getMessage()]
    if got != 1 or not any(name in w for w in warned):
        missed.append(f"restore() returned {got}, warnings {warned}")
    if not _unquarantine(ck.root, STEP2):
        missed.append("restore() fell back but did not quarantine step 2")
    live = state.models["model"].state_dict()
    if not all(torch.equal(live[k], v) for k, v in ck.step1.items()):
        missed.append("restore() fell back but the model is not step 1's")
    return missed


def test_flipped_byte_anywhere_is_detected_by_verify_and_restore(
        ckpt: Ckpt, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    positions = _positions(ckpt.folder)
    assert len(positions) >= 50
    assert {name for name, _, _ in positions} == set(ckpt.files())  # every file of the checkpoint
    state = _state(9)
    failures = []
    for i, (name, offset, what) in enumerate(positions):
        path = ckpt.folder / name
        original = flip_byte(path, offset, MASKS[i % len(MASKS)])
        try:
            missed = _all_checks_notice(ckpt, state, name, capsys, caplog)
        finally:
            path.write_bytes(original)
        failures += [f"{name}@{offset} ({what}): {m}" for m in missed]
    assert not failures, "\n".join(failures)
    assert ckpt.mgr.verify() == {1: [], 2: []}


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty", "one byte appended"])
def test_missing_or_resized_file_is_detected(ckpt: Ckpt, damage: str,
                                             capsys: pytest.CaptureFixture[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    state = _state(9)
    failures = []
    for name in ckpt.files():
        path = ckpt.folder / name
        original = path.read_bytes()
        if damage == "missing":
            path.unlink()
        else:
            path.write_bytes({"truncated": original[:-1], "empty": b"",
                              "one byte appended": original + b"\0"}[damage])
        try:
            missed = _all_checks_notice(ckpt, state, name, capsys, caplog)
        finally:
            path.write_bytes(original)
        failures += [f"{name}: {m}" for m in missed]
    assert not failures, "\n".join(failures)


def test_missing_file_is_reported_as_missing(ckpt: Ckpt) -> None:
    path = ckpt.folder / ckpt.files()[-1]
    original = path.read_bytes()
    path.unlink()
    try:
        (problem,) = ckpt.mgr.verify(2)[2]
    finally:
        path.write_bytes(original)
    assert problem.endswith(f"{ckpt.files()[-1]}: missing")


def test_every_damaged_file_is_named(ckpt: Ckpt, capsys: pytest.CaptureFixture[str]) -> None:
    names = ckpt.files()
    originals = {n: flip_byte(ckpt.folder / n, 0, 0xFF) for n in names}
    try:
        problems = ckpt.mgr.verify(2)[2]
        rc, report = _cli_verify(ckpt.root, capsys)
    finally:
        for n, data in originals.items():
            (ckpt.folder / n).write_bytes(data)
    for n in names:
        assert sum(n in p for p in problems) == 1, (n, problems)
        assert sum(n in p for p in report["problems"]["2"]) == 1
    assert rc == 1 and report["checked"] == [1, 2] and "1" not in report["problems"]


def test_latest_with_every_checkpoint_damaged_raises_naming_each(ckpt: Ckpt) -> None:
    shard = next(n for n in ckpt.files() if n != METADATA_NAME)
    paths = [ckpt.root / d / shard for d in ("step-0000000001", STEP2)]
    originals = [flip_byte(p, 3, 0xFF) for p in paths]
    try:
        with pytest.raises(CorruptCheckpointError) as info:
            ckpt.mgr.restore(_state(9))
    finally:
        for d in ("step-0000000001", STEP2):
            assert _unquarantine(ckpt.root, d)
        for p, data in zip(paths, originals):
            p.write_bytes(data)
    assert "step-0000000001" in str(info.value) and STEP2 in str(info.value)


@pytest.mark.parametrize("ckpt", ["zstd"], indirect=True)  # plain DCP items have no CRCs
def test_compressed_items_carry_their_own_crcs_with_verify_off(ckpt: Ckpt) -> None:
    """verify=False skips the file checksums; with compression every item is still checked.

    A flip anywhere in a shard of a compressed checkpoint raises
    CorruptCheckpointError.  (``.metadata`` has no CRC of its own: with
    verify=False its damage is caught only when it breaks the pickle, an item's
    location or a shape.)
    """
    assert ckpt.codec == "zstd"
    state = _state(9)
    failures = []
    # README.txt is a note for people, not data: only the file checksums (verify=True) cover it
    positions = [p for p in _positions(ckpt.folder) if p[0] not in (METADATA_NAME, README_NAME)]
    assert len(positions) >= 30
    for i, (name, offset, what) in enumerate(positions):
        path = ckpt.folder / name
        original = flip_byte(path, offset, MASKS[i % len(MASKS)])
        try:
            ckpt.mgr.restore(state, 2, verify=False)
            failures.append(f"{name}@{offset} ({what}): restored without an error")
        except CorruptCheckpointError as e:
            if name not in str(e):
                failures.append(f"{name}@{offset} ({what}): error does not name the file: {e}")
        finally:
            path.write_bytes(original)
    assert not failures, "\n".join(failures)


def test_undamaged_checkpoint_restores_with_verify_on_and_off(ckpt: Ckpt) -> None:
    for verify in (True, False):
        state = _state(9)
        assert ckpt.mgr.restore(state, 1, verify=verify) == 1
        live = state.models["model"].state_dict()
        assert all(torch.equal(live[k], v) for k, v in ckpt.step1.items())
        assert state.extra == {"seed": 1}


# -- formats: zstd by default, plain DCP with None, the codec of each file in the manifest ------

class _Mixed(nn.Module):
    """Every dtype and layout the writer meets: grouped by 1, 2, 4 and 8 bytes, and odd shapes."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fp32 = nn.Linear(40, 24)
        self.bf16 = nn.Linear(24, 8).to(torch.bfloat16)
        self.fp16 = nn.Parameter(torch.randn(3, 5, dtype=torch.float16))
        self.fp64 = nn.Parameter(torch.randn(7, dtype=torch.float64))
        self.register_buffer("c64", torch.randn(4, dtype=torch.complex64))
        self.register_buffer("i64", torch.randint(-9, 9, (6,)))
        self.register_buffer("u8", torch.randint(0, 255, (9,), dtype=torch.uint8))
        self.register_buffer("flags", torch.rand(5) > 0.5)
        self.register_buffer("empty", torch.empty(0, 3))
        self.register_buffer("transposed", torch.randn(5, 3).t())  # not contiguous
        self.register_buffer("scalar", torch.tensor(seed * 1.5))


def _mixed_state(seed: int) -> TrainState:
    model = _Mixed(seed)
    opt = torch.optim.Adam(model.fp32.parameters())
    model.fp32(torch.randn(2, 40)).sum().backward()
    opt.step()
    return TrainState(model=model, optimizer=opt,
                      extra={"seed": seed, "t": torch.arange(seed, seed + 4, dtype=torch.int16)})


@pytest.mark.parametrize("compression", ["zstd", None])
def test_codec_of_each_file_is_recorded_and_either_format_reads_back(tmp_path: Path,
                                                                    compression: str | None) -> None:
    root = tmp_path / "ckpt"
    saved = _mixed_state(1)
    kwargs = {} if compression == "zstd" else {"compression": None}  # zstd is the default
    with CheckpointManager(root, **kwargs) as mgr:
        assert mgr.options.compression == compression
        mgr.save(1, saved, blocking=True)
    manifest = json.loads((root / "step-0000000001" / MANIFEST_NAME).read_text())
    assert manifest["codec"] == compression
    codecs = {f["path"]: f["codec"] for f in manifest["files"]}
    assert codecs.pop(METADATA_NAME) is None
    if compression:  # a note to plain DCP users, verified like the shards
        assert codecs.pop(README_NAME) is None
        assert (root / "step-0000000001" / README_NAME).read_text() == README_TEXT
    else:  # plain DCP already: dcp.load reads it
        assert README_NAME not in codecs and not (root / "step-0000000001" / README_NAME).exists()
    assert codecs and set(codecs.values()) == {compression}
    loaded = _mixed_state(2)
    other = {"compression": None} if compression else {}  # the reader follows the manifest
    with CheckpointManager(root, **other) as mgr:
        assert mgr.restore(loaded, 1) == 1
    want, got = saved.models["model"].state_dict(), loaded.models["model"].state_dict()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    want_opt = saved.optimizers["optimizer"].state_dict()["state"]
    got_opt = loaded.optimizers["optimizer"].state_dict()["state"]
    for i, st in want_opt.items():
        for k, v in st.items():
            assert torch.equal(got_opt[i][k], v), (i, k)
    assert loaded.extra["seed"] == 1 and torch.equal(loaded.extra["t"], saved.extra["t"])
