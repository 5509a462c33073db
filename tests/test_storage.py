"""The Storage contract, one suite run on a local path, file:// and memory://.

Also the pure helpers (``redact``, ``is_transient``, ``Retry``) and what a
failing write leaves behind on a real faulty filesystem.
"""

from __future__ import annotations

import errno
import uuid

import fsspec
import pytest

from asyncckpt.errors import CheckpointExistsError, ConfigError, ForeignFolderError, StorageError
from asyncckpt.storage import (MARKER_NAME, Retry, Storage, claim_folder, is_transient, redact,
                               remove_temporary_files, remove_unfinished, remove_unfinished_saves)


@pytest.fixture(params=["path", "file-url", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path):
    if request.param == "path":
        yield Storage(tmp_path / "root")
    elif request.param == "file-url":
        yield Storage(f"file://{tmp_path}/root")
    else:
        name = f"asyncckpt-test-{uuid.uuid4().hex}"
        yield Storage(f"memory://{name}/root")
        memory = fsspec.filesystem("memory")
        if memory.exists(f"/{name}"):
            memory.rm(f"/{name}", recursive=True)


def _write(storage: Storage, rel: str, data: bytes) -> None:
    storage.makedirs(rel.rsplit("/", 1)[0] if "/" in rel else "")
    with storage.open_write(rel) as f:
        f.write(data)


def test_kind_of_filesystem_is_detected(storage, request):
    assert storage.is_local == (request.node.callspec.params["storage"] != "memory")
    assert not storage.is_object_store


def test_open_write_then_read_back(storage):
    storage.makedirs()
    _write(storage, "a.bin", b"hello " * 1000)
    assert storage.exists("a.bin")
    assert storage.read_bytes("a.bin") == b"hello " * 1000
    with storage.open_read("a.bin") as f:
        assert f.read(5) == b"hello"
    assert storage.list_files() == {"a.bin": 6000}


def test_failing_write_leaves_no_file(storage):
    storage.makedirs()
    with pytest.raises(OSError):
        with storage.open_write("partial.bin") as f:
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "disk full")
    assert not storage.exists("partial.bin")
    assert storage.list_files() == {}


def test_put_atomic_creates_once(storage):
    storage.makedirs("step")
    storage.put_atomic("step/manifest.json", b"first")
    with pytest.raises(CheckpointExistsError, match="manifest.json"):
        storage.put_atomic("step/manifest.json", b"second")
    assert storage.read_bytes("step/manifest.json") == b"first"
    storage.put_atomic("step/manifest.json", b"third", create_only=False)
    assert storage.read_bytes("step/manifest.json") == b"third"
    assert storage.list_files("step") == {"manifest.json": 5}   # no temporary file left


def test_list_dirs_and_files(storage):
    storage.makedirs()
    for rel in ("a/x.bin", "b/y.bin", "b/deeper/z.bin"):
        storage.makedirs(rel.rsplit("/", 1)[0])
        _write(storage, rel, b"12")
    _write(storage, "top.bin", b"123")
    assert sorted(storage.list_dirs()) == ["a", "b"]
    assert storage.list_files() == {"top.bin": 3}
    assert storage.list_dirs("b") == ["deeper"]
    assert storage.list_files("b") == {"y.bin": 2}
    assert storage.list_dirs("missing") == [] and storage.list_files("missing") == {}


def test_child_shares_the_filesystem(storage):
    storage.makedirs("sub")
    child = storage.child("sub")
    _write(child, "f.bin", b"c")
    assert child.url == storage.url_of("sub")
    assert storage.read_bytes("sub/f.bin") == b"c"
    assert storage.list_dirs() == ["sub"]


def test_remove_recursive_and_missing(storage):
    storage.makedirs("d/e")
    _write(storage, "d/e/f.bin", b"1")
    _write(storage, "d/g.bin", b"2")
    storage.remove("d/g.bin")
    assert not storage.exists("d/g.bin") and storage.exists("d/e/f.bin")
    storage.remove("d", recursive=True)
    assert not storage.exists("d") and storage.list_dirs() == []
    storage.remove("never-there")                       # missing_ok by default
    with pytest.raises(StorageError, match="never-there"):
        storage.remove("never-there", missing_ok=False)


def test_move_dir_moves_every_file_and_leaves_no_source(storage):
    for rel, data in (("step-0000000001/a", b"a"), ("step-0000000001/manifest.json", b"{}"),
                      ("step-0000000001/sub/b", b"bb")):
        storage.makedirs(rel.rsplit("/", 1)[0])
        with storage.open_write(rel) as f:
            f.write(data)
    storage.move_dir("step-0000000001", "quarantine/step-0000000001.x")
    assert sorted(storage.walk_files("quarantine/step-0000000001.x")) == ["a", "manifest.json", "sub/b"]
    assert storage.read_bytes("quarantine/step-0000000001.x/sub/b") == b"bb"
    assert storage.walk_files("step-0000000001") == []
    assert "step-0000000001" not in storage.list_dirs()


def test_move_dir_refuses_an_existing_destination(storage):
    for rel in ("src/a", "dst/b"):
        storage.makedirs(rel.rsplit("/", 1)[0])
        with storage.open_write(rel) as f:
            f.write(b"x")
    with pytest.raises(CheckpointExistsError, match="dst"):
        storage.move_dir("src", "dst")
    assert storage.walk_files("src") == ["a"] and storage.walk_files("dst") == ["b"]


def test_paths_are_literal_glob_characters_match_only_themselves(storage):
    """fsspec's rm() expands *, ? and [...]: a folder named "exp[1]" must never reach "exp1"."""
    names = ["exp1/step/f", "exp[1]/step/f", "a*/f", "ab/f", "q?/f", "qx/f", "s[!x]/f", "sy/f"]
    for rel in names:
        storage.makedirs(rel.rsplit("/", 1)[0])
        with storage.open_write(rel) as f:
            f.write(rel.encode())
    storage.remove("exp[1]", recursive=True)
    storage.remove("a*", recursive=True)
    storage.remove("q?/f")
    storage.remove("s[!x]/f")
    assert storage.exists("exp1/step/f") and storage.exists("ab/f") and storage.exists("qx/f")
    assert storage.exists("sy/f") and storage.read_bytes("exp1/step/f") == b"exp1/step/f"
    assert not storage.exists("exp[1]/step/f") and not storage.exists("a*/f")
    assert not storage.exists("q?/f") and not storage.exists("s[!x]/f")
    assert storage.walk_files("exp[1]") == []
    storage.move_dir("exp1", "moved[1]")
    assert storage.walk_files("moved[1]") == ["step/f"]


# -- what asyncckpt made, and nothing else ---------------------------------------------------

def test_claim_folder_marks_first_and_clears_only_its_own_leftovers(storage):
    claim_folder(storage.child("step-0000000001"), commit_file="manifest.json", kind="checkpoint")
    assert storage.walk_files("step-0000000001") == [MARKER_NAME]
    _write(storage, "step-0000000001/__0_0.distcp", b"half")  # a save cut short: marked
    claim_folder(storage.child("step-0000000001"), commit_file="manifest.json", kind="checkpoint")
    assert storage.walk_files("step-0000000001") == [MARKER_NAME]


def test_claim_folder_never_deletes_a_file_or_files_it_did_not_write(storage):
    _write(storage, "step-0000000006", b"a user's file")
    _write(storage, "step-0000000007/notes.txt", b"a user's notes")
    with pytest.raises(ForeignFolderError, match="is a file, not a folder asyncckpt made") as ei:
        claim_folder(storage.child("step-0000000006"), commit_file="manifest.json", kind="checkpoint")
    assert storage.url_of("step-0000000006") in str(ei.value)
    with pytest.raises(ForeignFolderError, match=r"holds files asyncckpt did not write \(notes.txt"):
        claim_folder(storage.child("step-0000000007"), commit_file="manifest.json", kind="checkpoint")
    assert storage.read_bytes("step-0000000006") == b"a user's file"
    assert storage.read_bytes("step-0000000007/notes.txt") == b"a user's notes"
    assert isinstance(ei.value, CheckpointExistsError)


def test_remove_unfinished_takes_marked_folders_and_leaves_the_rest(storage, caplog):
    for rel in ("step-0000000001/manifest.json", "step-0000000001/__0_0.distcp",   # committed
                f"step-0000000002/{MARKER_NAME}", "step-0000000002/__0_0.distcp",  # cut short
                "step-0000000003/notes.txt",                                      # not ours
                f"releases/v1.0.0/{MARKER_NAME}", "releases/v2.0.0/weights.bin"):
        _write(storage, rel, rel.encode())
    with caplog.at_level("WARNING", logger="asyncckpt"):
        assert remove_unfinished_saves(storage) == [2]
        assert remove_unfinished(storage, "releases/v1.0.0", commit_file="card", what="a release")
        assert not remove_unfinished(storage, "releases/v2.0.0", commit_file="card", what="a release")
    assert storage.walk_files("step-0000000002") == [] and storage.walk_files("releases/v1.0.0") == []
    assert sorted(storage.walk_files("step-0000000001")) == ["__0_0.distcp", "manifest.json"]
    assert storage.walk_files("step-0000000003") == ["notes.txt"]
    assert storage.walk_files("releases/v2.0.0") == ["weights.bin"]
    left_alone = [r.getMessage() for r in caplog.records if "leaving" in r.getMessage()]
    assert len(left_alone) == 2 and storage.url_of("step-0000000003") in left_alone[0]


def test_remove_deletes_the_marker_last(storage, monkeypatch):
    for name in (MARKER_NAME, "a", "z", "sub/b", "sub/deeper/c"):
        _write(storage, f"step-0000000001/{name}", b"x")
    order = []
    rm_file = storage.fs.rm_file
    monkeypatch.setattr(storage.fs, "rm_file",  # records, then really deletes
                        lambda path, **kw: (order.append(path.rsplit("/", 1)[-1]), rm_file(path, **kw)))
    storage.remove("step-0000000001", recursive=True)
    assert order[-1] == MARKER_NAME and sorted(order) == sorted([MARKER_NAME, "a", "b", "c", "z"])
    assert not storage.exists("step-0000000001") or storage.is_object_store


def test_only_asyncckpts_own_temporary_files_are_removed_at_the_root(storage):
    ours = [".lease.json.asyncckpt-tmp-0123456789ab", ".lease.json.tmp-0123456789ab",
            ".asyncckpt-probe-0123456789ab"]
    theirs = ["data.tmp-202401011230", "notes.tmp-0123456789ab", "x.asyncckpt-tmp-0123456789ab"]
    for name in ours + theirs:
        _write(storage, name, b"x")
    assert sorted(remove_temporary_files(storage)) == sorted(ours)
    assert sorted(storage.list_files()) == sorted(theirs)


def test_read_of_a_missing_file_names_it(storage):
    storage.makedirs()
    with pytest.raises(StorageError) as ei:
        storage.read_bytes("nope.json")
    assert storage.url_of("nope.json") in str(ei.value)
    assert isinstance(ei.value, OSError) and ei.value.op == "read"


def test_check_writable_leaves_nothing_behind(storage):
    storage.check_writable()
    assert storage.list_files() == {}
    storage.fsync_dir()
    if storage.is_local:                                # a real fsync: a missing folder fails, named
        with pytest.raises(StorageError, match="no-such-folder"):
            storage.fsync_dir("no-such-folder")
    else:                                               # a no-op where folders are not durable things
        storage.fsync_dir("no-such-folder")
    assert storage.list_files() == {}


# -- fsspec wrappers of the local disk ---------------------------------------------------------

@pytest.mark.parametrize("how", ["dir-chain", "dir-url"])
def test_a_dir_prefix_over_the_local_disk_keeps_fsync_and_create_only_publishing(tmp_path, monkeypatch,
                                                                                 how):
    import os

    import torch

    from asyncckpt import CheckpointManager, TrainState

    url, opts = ((f"dir::file://{tmp_path}/r", {}) if how == "dir-chain"
                 else ("dir://sub", {"path": str(tmp_path / "r")}))
    theirs, where = fsspec.core.url_to_fs(url, **opts)   # where fsspec itself puts files
    theirs.makedirs(where, exist_ok=True)
    theirs.pipe_file(f"{where}/theirs.txt", b"written through fsspec")
    calls = {"fsync": 0, "link": 0}
    for name in calls:
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _r=real, _n=name: (calls.__setitem__(_n, calls[_n] + 1),
                                                                    _r(*a))[1])
    storage = Storage(url, opts)
    assert storage.is_local and storage.list_files() == {"theirs.txt": 22}
    model = torch.nn.Linear(3, 2)
    with CheckpointManager(url, storage_options=opts) as mgr:
        mgr.save(1, TrainState(model=model), blocking=True)
    assert calls["fsync"] >= 4 and calls["link"] >= 2   # each file and folder; manifest and lease are linked
    assert theirs.exists(f"{where}/step-0000000001/manifest.json")
    fresh = torch.nn.Linear(3, 2)
    with CheckpointManager(url, storage_options=opts) as mgr:
        assert mgr.restore(TrainState(model=fresh)) == 1
    assert torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize("wrapper", ["simplecache", "filecache", "blockcache"])
def test_a_caching_wrapper_is_refused_before_anything_is_written(tmp_path, wrapper):
    from asyncckpt import CheckpointManager

    url = f"{wrapper}::file://{tmp_path}/r"
    with pytest.raises(ConfigError, match=f"{wrapper}:: wraps the storage.*less durable") as ei:
        CheckpointManager(url)
    assert url in str(ei.value)
    assert not (tmp_path / "r").exists()


def test_empty_root_is_refused():
    with pytest.raises(ConfigError, match="root"):
        Storage("")


def test_unknown_protocol_is_a_storage_error():
    with pytest.raises(StorageError, match="nosuchproto"):
        Storage("nosuchproto://bucket/x")


# -- a real filesystem that fails mid-write ------------------------------------------------

def test_write_that_fails_midway_on_disk_leaves_no_file(tmp_path, faulty_fs):
    storage = Storage(faulty_fs.url(tmp_path / "root"))
    assert storage.is_local
    storage.makedirs()
    faulty_fs.fail_on_write(2)
    with pytest.raises(StorageError, match="injected write failure") as ei:
        with storage.open_write("shard.bin") as f:
            f.write(b"a" * 10)
            f.write(b"b" * 10)
    assert "shard.bin" in str(ei.value)
    assert not (tmp_path / "root" / "shard.bin").exists()
    faulty_fs.disarm()
    _write(storage, "shard.bin", b"ok")
    assert (tmp_path / "root" / "shard.bin").read_bytes() == b"ok"


def test_put_atomic_that_fails_keeps_the_old_file(tmp_path, faulty_fs):
    storage = Storage(faulty_fs.url(tmp_path / "root"))
    storage.makedirs()
    storage.put_atomic("m.json", b"old")
    faulty_fs.fail_on_write(1)
    with pytest.raises(StorageError):
        storage.put_atomic("m.json", b"new", create_only=False)
    assert storage.read_bytes("m.json") == b"old"
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["m.json"]


# -- pure helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("s3://user:secret@bucket/prefix", "s3://bucket/prefix"),
    ("https://AKIA123:abc%2Fdef@host.example/path", "https://host.example/path"),
    ("s3://token@bucket/x", "s3://bucket/x"),
    ("s3://bucket/user:secret@x", "s3://bucket/user:secret@x"),
    ("/local/path", "/local/path"),
    ("memory://root", "memory://root"),
])
def test_redact_removes_credentials(url, expected):
    assert redact(url) == expected


def _chain(e: BaseException | None) -> str:
    """Every message of an exception and the causes a traceback shows with it."""
    out = []
    while e is not None:
        out.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return "\n".join(out)


@pytest.mark.s3
@pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)   # moto takes any key
def test_a_failing_s3_root_never_shows_the_credentials_of_its_options(s3_bucket, caplog) -> None:
    import torch

    from asyncckpt import CheckpointManager, TrainState

    key_id, secret = "AKIAUNKNOWNKEY0001", "Sup3rSecretValue/xyz"      # an unknown key: a real refusal
    opts = {**s3_bucket["options"], "key": key_id, "secret": secret}
    caplog.set_level("DEBUG", logger="asyncckpt")
    with pytest.raises(StorageError) as ei:
        with CheckpointManager(f"s3://{s3_bucket['name']}/run", storage_options=opts) as mgr:
            mgr.save(1, TrainState(model=torch.nn.Linear(2, 2)), blocking=True)
    shown = _chain(ei.value) + caplog.text
    assert "InvalidAccessKeyId" in shown or "access key" in shown.lower(), shown
    assert key_id not in shown and secret not in shown, shown


def test_credentials_in_an_s3_url_are_refused_without_being_shown() -> None:
    with pytest.raises(ConfigError) as ei:
        Storage("s3://AKIAINURL0001:UrlSecretValue@bucket/run")     # s3fs: a bucket of that name
    text = _chain(ei.value)
    assert "s3://bucket/run" in text and "storage_options" in text, text
    assert "AKIAINURL0001" not in text and "UrlSecretValue" not in text, text


def test_credentials_a_url_keeps_in_its_paths_are_scrubbed_from_errors() -> None:
    st = Storage(f"memory://agent:PathSecretValue@{uuid.uuid4().hex}/run")  # memory:// keeps them
    assert "PathSecretValue" not in st.url
    with pytest.raises(StorageError) as ei:
        st.read_bytes("missing.json")
    text = _chain(ei.value)
    assert "missing.json" in text and "PathSecretValue" not in text, text


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError("peer"), True),
    (TimeoutError("slow"), True),
    (OSError("503 Service Unavailable"), True),
    (RuntimeError("SlowDown: reduce your request rate"), True),
    (type("FlexibleChecksumError", (Exception,), {})("Expected checksum AAAAAA== did not match "
                                                     "calculated checksum"), True),
    (FileNotFoundError("x"), False),
    (PermissionError("denied"), False),
    (OSError(errno.EIO, "injected write failure"), False),
    (ValueError("bad"), False),
])
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_retry_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    retry = Retry(attempts=5, base_delay_s=0, max_delay_s=0)
    assert retry.call(flaky, "flaky") == "ok" and len(calls) == 3

    calls.clear()

    def broken():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        retry.call(broken, "broken")
    assert len(calls) == 1


def test_retry_gives_up_after_its_attempts():
    calls = []

    def always():
        calls.append(1)
        raise TimeoutError("timed out")

    with pytest.raises(TimeoutError):
        Retry(attempts=3, base_delay_s=0, max_delay_s=0).call(always, "always")
    assert len(calls) == 3


class _Clock:
    """Monotonic seconds that move only when the retry sleeps."""

    def __init__(self) -> None:
        self.now, self.sleeps = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _always_transient() -> None:
    raise ConnectionResetError("reset by peer")


def _give_up(**options: float) -> _Clock:
    """Retry a call that always fails transiently until Retry(**options) gives up; its clock."""
    clock = _Clock()
    with pytest.raises(ConnectionResetError):
        Retry(clock=clock, sleep=clock.sleep, **options).call(_always_transient, "x")
    return clock


def test_retry_backs_off_exponentially_with_jitter_up_to_its_cap():
    clock = _give_up(attempts=6, base_delay_s=1.0, max_delay_s=5.0, deadline_s=1000)
    caps = [1.0, 2.0, 4.0, 5.0, 5.0]                   # doubling, then the cap; no sleep after the last try
    assert len(clock.sleeps) == len(caps)
    for slept, cap in zip(clock.sleeps, caps):
        assert cap / 2 <= slept <= cap, clock.sleeps   # jittered in [cap/2, cap]


def test_retry_stops_at_its_deadline_and_never_sleeps_past_it():
    clock = _give_up(attempts=100, base_delay_s=4.0, max_delay_s=4.0, deadline_s=10.0)
    assert clock.now - 100.0 <= 10.0 + 1e-9, clock.sleeps   # the last sleep is cut to what is left
    assert 3 <= len(clock.sleeps) <= 5, clock.sleeps          # 2-4 s each: no retry starts past 10 s


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"base_delay_s": -1}, {"deadline_s": "x"},
                                    {"max_delay_s": float("nan")}, {"clock": 5}, {"sleep": None}])
def test_retry_options_are_checked(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        Retry(**kwargs)
