"""asyncckpt.manifest: JSON round trips, step folder names, strict parsing, selection."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from asyncckpt.manifest import (
    seal,
    FORMAT_VERSION,
    CheckpointInfo,
    FileEntry,
    Manifest,
    check_step,
    is_plain_name,
    parse_step_dir,
    select,
    step_dir_name,
)

MAX_STEP = 10**10 - 1
SOURCE = "s3://bucket/run/step-0000000007/manifest.json"

# -- round trip -----------------------------------------------------------------------------

steps = st.integers(0, MAX_STEP)
texts = st.text(max_size=12)
file_names = st.text(min_size=1, max_size=12).filter(is_plain_name)
metric_values = st.floats(allow_nan=False)           # infinities survive the round trip too

file_entries = st.builds(
    FileEntry, path=file_names, size=st.integers(0, 2**40),
    checksum=st.none() | st.from_regex(r"crc32:[0-9a-f]{8}", fullmatch=True),
    codec=st.sampled_from([None, "zstd"]), rank=st.none() | st.integers(0, 1024))

manifests = st.builds(
    Manifest, step=steps, epoch=st.none() | st.integers(0, 10**6), time=texts,
    metrics=st.dictionaries(texts, metric_values, max_size=4),
    tags=st.lists(texts, max_size=4).map(tuple), world_size=st.integers(1, 4096),
    files=st.lists(file_entries, max_size=5).map(tuple), param_count=st.integers(0, 10**12),
    codec=st.sampled_from([None, "zstd"]), torch_version=texts,
    git_commit=st.none() | st.from_regex(r"[0-9a-f]{40}", fullmatch=True),
    host=texts, device=texts,
    milestones_reached=st.lists(st.integers(1, 10**13), unique=True, max_size=4).map(
        lambda xs: tuple(sorted(xs))),
    branch=st.none() | st.from_regex(r"[0-9a-f]{1,32}", fullmatch=True),
    parent=st.none() | steps,
).flatmap(lambda m: (st.just((None, None)) | st.tuples(texts.filter(bool), st.sampled_from(["min", "max"])))
          .map(lambda r: dataclasses.replace(m, rank_metric=r[0], rank_mode=r[1])))


@settings(max_examples=200, deadline=None)
@given(m=manifests)
def test_json_round_trip(m):
    text = m.to_json()
    assert Manifest.from_json(text) == m
    assert Manifest.from_json(text.encode()) == m
    assert next(iter(json.loads(text))) == "format_version"


@settings(max_examples=50, deadline=None)
@given(m=manifests)
def test_info_from_manifest_keeps_the_record(m):
    info = CheckpointInfo.from_manifest(m, "mem://x", extra_tags=("best:loss",))
    assert (info.step, info.epoch, info.bytes) == (m.step, m.epoch, sum(f.size for f in m.files))
    assert info.tags[-1] == "best:loss" and set(m.tags) <= set(info.tags)
    json.dumps(info.to_dict(), allow_nan=False)


def test_infinite_metrics_round_trip_as_strings():
    m = Manifest(step=1, metrics={"loss": float("inf"), "gain": float("-inf")})
    assert json.loads(m.to_json())["metrics"] == {"loss": "inf", "gain": "-inf"}
    assert Manifest.from_json(m.to_json()) == m


# -- step folder names ---------------------------------------------------------------------

@pytest.mark.parametrize("step, name", [(0, "step-0000000000"), (500, "step-0000000500"),
                                        (MAX_STEP, "step-9999999999")])
def test_step_dir_name(step, name):
    assert step_dir_name(step) == name
    assert parse_step_dir(name) == step


@given(step=steps)
def test_step_dir_name_round_trips_and_sorts(step):
    name = step_dir_name(step)
    assert parse_step_dir(name) == step
    if step < MAX_STEP:
        assert name < step_dir_name(step + 1)      # names sort as their steps do
    else:
        with pytest.raises(ConfigError):           # and no step sorts past the last name
            step_dir_name(step + 1)


@pytest.mark.parametrize("name, step", [
    ("step-0000000005/", 5), ("runs/a/step-0000000005", 5), ("s3://b/r/step-0000000012/", 12),
])
def test_parse_step_dir_takes_the_last_path_part(name, step):
    assert parse_step_dir(name) == step


@pytest.mark.parametrize("name", [
    "step-000000001",            # 9 digits
    "step-00000000001",          # 11 digits
    "step-00000000010x",
    "xstep-0000000010",
    "step-0000000010.tmp",
    "step_0000000010",
    "step-+000000010",
    "step- 000000010",
    "step-" + "\u0661" * 10,     # Arabic-Indic digits are not a step
    "releases",
    "",
])
def test_parse_step_dir_rejects_other_names(name):
    assert parse_step_dir(name) is None


@pytest.mark.parametrize("bad", [-1, MAX_STEP + 1, 1.0, True, False, "3", None])
def test_bad_steps_are_refused(bad):
    with pytest.raises(ConfigError, match="step"):
        check_step(bad)
    with pytest.raises(ConfigError, match="step"):
        step_dir_name(bad)


# -- strict parsing -----------------------------------------------------------------------

def _raw(**changes) -> str:
    raw = Manifest(step=7, time="2026-01-01T00:00:00.000Z",
                   files=(FileEntry(path="__0_0.distcp", size=10),)).to_dict()
    for k, v in changes.items():
        if v is _DROP:
            raw.pop(k)
        else:
            raw[k] = v
    return json.dumps(seal(raw))  # consistent checksum: the field check under test is what fails


_DROP = object()


@pytest.mark.parametrize("text, detail", [
    ("{not json", "JSON"),
    (b"\xff\xfe", "JSON"),
    ("[1, 2]", "object"),
    ("null", "object"),
    (_raw(step=_DROP), "step"),
    (_raw(files=_DROP), "files"),
    (_raw(format_version="1"), "format_version"),
    (_raw(format_version=0), "format_version"),
    (_raw(format_version=99), "format_version"),
    (_raw(step=-1), "step"),
    (_raw(step="7"), "step"),
    (_raw(step=True), "step"),
    (_raw(epoch=1.5), "1.5"),
    (_raw(epoch=True), "True"),
    (_raw(world_size="many"), "many"),
    (_raw(files=[{"path": "../escape", "size": 1}]), "escape"),
    (_raw(files=[{"path": "a/b", "size": 1}]), "a/b"),
    (_raw(files=[{"path": "/etc/passwd", "size": 1}]), "/etc/passwd"),
    (_raw(files=[{"path": "..", "size": 1}]), "'..'"),
    (_raw(files=[{"path": "a\\b", "size": 1}]), "a\\\\b"),
    (_raw(files=[{"path": "a\x00b", "size": 1}]), "a\\x00b"),
    (_raw(files=[{"path": 7, "size": 1}]), "7"),
    (_raw(files=[{"path": "x", "size": -1}]), "-1"),
    (_raw(files=[{"path": "x", "size": "10"}]), "'10'"),
    (_raw(files=[{"path": "x", "size": 1, "checksum": 5}]), "checksum"),
    pytest.param("[" * 100_000 + "]" * 100_000, "nesting too deep", id="deep-list"),
    pytest.param('{"a":' * 100_000 + "1" + "}" * 100_000, "nesting too deep", id="deep-object"),
    (_raw(files=[{"path": "x"}]), "size"),
    (_raw(files=["x"]), "x"),
    (_raw(files=5), "malformed"),
    (_raw(metrics={"loss": "low"}), "low"),
    (_raw(metrics=[1.0, 2.0]), "malformed"),
    (_raw(tags=5), "malformed"),
    (_raw(milestones_reached=[0]), "milestones_reached"),
    (_raw(milestones_reached="1B"), "milestones_reached"),
    (_raw(branch="Not-Hex"), "branch"),
    (_raw(branch=7), "branch"),
    (_raw(parent=-3), "parent"),
    (_raw(parent=True), "parent"),
])
def test_malformed_manifest_names_its_source(text, detail):
    with pytest.raises(CorruptCheckpointError) as ei:
        Manifest.from_json(text, SOURCE)
    assert SOURCE in str(ei.value)
    assert detail in str(ei.value)
    assert ei.value.path == SOURCE


def test_newer_format_version_says_to_upgrade():
    with pytest.raises(CorruptCheckpointError, match="upgrade"):
        Manifest.from_json(_raw(format_version=FORMAT_VERSION + 1), SOURCE)


def test_unknown_keys_are_ignored():
    raw = json.loads(_raw())
    raw["added_later"] = {"x": 1}  # written (and sealed) by a later writer of the same format
    assert Manifest.from_json(json.dumps(seal(raw))).step == 7


# -- selection --------------------------------------------------------------------------------

def _ms(*step_list: int) -> list[Manifest]:
    return [Manifest(step=s) for s in step_list]


def test_select_latest_is_the_highest_step():
    assert select(_ms(30, 10, 20), "latest", "root").step == 30


def test_select_a_step_by_int_or_digits():
    assert select(_ms(10, 20), 10, "root").step == 10
    assert select(_ms(10, 20), "20", "root").step == 20


def test_select_missing_step_lists_the_others():
    with pytest.raises(CheckpointNotFoundError) as ei:
        select(_ms(20, 10), 15, "s3://bucket/run")
    assert ei.value.available == [10, 20]
    msg = str(ei.value)
    assert "15" in msg and "10, 20" in msg and "s3://bucket/run" in msg


def test_select_latest_with_nothing_committed():
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoints"):
        select([], "latest", "root")


@pytest.mark.parametrize("which", [-1, 2.5, True, "ten"])
def test_select_refuses_bad_steps(which):
    with pytest.raises(ConfigError):
        select(_ms(1), which, "root")


def test_not_found_lists_at_most_twenty_steps():
    err = CheckpointNotFoundError("at step 0", "root", range(1, 31))
    assert "20 (+10 more)" in str(err) and "21" not in str(err)


def test_every_flipped_bit_of_a_manifest_is_detected() -> None:
    """A manifest checks its own content: no single-bit flip parses as a different manifest."""
    m = Manifest(step=7, epoch=1, time="2026-01-01T00:00:00.000Z", metrics={"val_loss": 0.25},
                 tags=("epoch_end",), world_size=2, param_count=1234, codec="zstd",
                 files=(FileEntry(path="__0_0.distcp", size=100, checksum="crc32:0000abcd", rank=0),))
    data = m.to_json().encode()
    undetected = []
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            try:
                parsed = Manifest.from_json(bytes(flipped), "m.json")
            except CorruptCheckpointError:
                continue
            if parsed != m:
                undetected.append((i, bit))
    assert undetected == []


def test_sealed_raw_manifest_round_trips() -> None:
    import json

    from asyncckpt.manifest import seal

    raw = json.loads(Manifest(step=3, time="t").to_json())
    raw["metrics"] = {"acc": 0.5}
    assert Manifest.from_json(json.dumps(seal(raw))).metrics == {"acc": 0.5}
    with pytest.raises(CorruptCheckpointError, match="does not match its checksum"):
        Manifest.from_json(json.dumps(raw))


def test_manifest_without_lineage_reads_with_defaults():
    """Manifests written before lineage (no ``branch``/``parent``) stay readable."""
    m = Manifest.from_json(_raw(branch=_DROP, parent=_DROP), SOURCE)
    assert (m.branch, m.parent, m.format_version) == (None, None, 1)


# -- what retention ranked by -------------------------------------------------------------------

def test_ranking_fields_round_trip_and_are_written_only_when_set():
    ranked = Manifest(step=7, metrics={"val_loss": 0.5}, rank_metric="val_loss", rank_mode="max")
    raw = json.loads(ranked.to_json())
    assert (raw["rank_metric"], raw["rank_mode"]) == ("val_loss", "max")
    assert Manifest.from_json(ranked.to_json()) == ranked
    assert "rank_metric" not in Manifest(step=7).to_json()  # unranked: the same bytes as before


def test_manifest_without_ranking_reads_with_defaults():
    """Manifests written before the ranking fields stay readable; None means none recorded."""
    m = Manifest.from_json(_raw(), SOURCE)
    assert (m.rank_metric, m.rank_mode) == (None, None)


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val_loss", None), (None, "min"), ("val_loss", "lowest"), ("", "min"), (3, "min"),
     (["val_loss"], "max"), ("val_loss", 1)],
)
def test_malformed_ranking_fields_are_corrupt(metric, mode):
    with pytest.raises(CorruptCheckpointError, match="rank_metric must be a metric name"):
        Manifest.from_json(_raw(rank_metric=metric, rank_mode=mode), SOURCE)
