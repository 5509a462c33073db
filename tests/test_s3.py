"""Checkpoints on S3, against moto's S3 server and SeaweedFS on 127.0.0.1 (no network beyond
loopback): each test runs on both (conftest's ``s3_server``), unless it says why not.

The Storage contract of ``test_storage.py`` runs here on ``s3://`` too; then
the S3 write path (parallel multipart parts, aborts, conditional manifest
PUT), retries through a fault-injecting proxy, whole saves and resumes, a
training process SIGKILLed in the middle of uploads, and credentials that
never leak.
"""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

import helpers_s3 as h
import test_storage as _contract
from asyncckpt import CheckpointManager, Retention, TrainState
from asyncckpt.errors import CheckpointExistsError, SaveError, StorageError
from asyncckpt.multipart import Upload
from asyncckpt.storage import Retry, Storage, _discard, list_committed, uncommitted_steps

pytestmark = [pytest.mark.s3, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]
MiB = 1 << 20

def _s3_storage(bucket: dict, endpoint: str | None = None, **kw: Any) -> Storage:
    opts = h.options(endpoint or bucket["endpoint"], **kw.pop("extra", {}))
    return Storage(f"s3://{bucket['name']}/root", opts, **kw)


# -- the Storage contract, on s3:// ------------------------------------------------------------

@pytest.fixture
def storage(s3_bucket: dict) -> Storage:
    """The contract suite's fixture, here a root on a fresh bucket of this test's S3 server."""
    return _s3_storage(s3_bucket)


def _on_s3(fn: Any) -> Any:
    """A contract test as a test of this module (its own function: marks stay off test_storage)."""
    def test(storage: Storage) -> None:
        fn(storage)

    test.__doc__ = fn.__doc__
    return test


for _name, _fn in inspect.getmembers(_contract, inspect.isfunction):
    if (_name.startswith("test_") and list(inspect.signature(_fn).parameters) == ["storage"]):
        globals()[f"test_contract_{_name[5:]}"] = _on_s3(_fn)


def test_s3_is_an_object_store_with_multipart_uploads(storage: Storage) -> None:
    assert storage.is_object_store and storage.multipart and not storage.is_local
    assert storage.url.startswith("s3://t-") and storage.url.endswith("/root")


# -- the write path --------------------------------------------------------------------------

def test_large_file_goes_up_in_parallel_parts_with_bounded_concurrency(s3_bucket, s3_proxy) -> None:
    st = _s3_storage(s3_bucket, s3_proxy.url, upload=Upload(part_bytes=5 * MiB, concurrency=2))
    data = os.urandom(16 * MiB + 123)
    with st.open_write("big.bin") as f:
        f.write(data[:MiB])                  # small writes accumulate into a part...
        f.write(memoryview(data)[MiB:])      # ...a big one is cut into parts
    assert st.read_bytes("big.bin") == data
    assert s3_proxy.count(h.is_part_upload) == 4          # 5 + 5 + 5 + 1.x MiB
    assert 1 <= s3_proxy.max_in_flight["part"] <= 2
    assert h.unfinished_uploads(s3_bucket) == []


def test_small_file_is_a_single_put(s3_bucket, s3_proxy) -> None:
    st = _s3_storage(s3_bucket, s3_proxy.url)
    with st.open_write("small.bin") as f:
        f.write(b"x" * 1000)
    assert s3_proxy.count(h.is_part_upload) == 0
    assert s3_proxy.count(lambda m, p: m == "POST") == 0      # no multipart upload started
    assert st.read_bytes("small.bin") == b"x" * 1000


def test_failed_write_aborts_its_multipart_upload(s3_bucket) -> None:
    st = _s3_storage(s3_bucket, upload=Upload(part_bytes=5 * MiB, concurrency=2))
    with pytest.raises(StorageError, match="boom"):
        with st.open_write("step-0000000001/__0_0.distcp") as f:
            f.write(os.urandom(11 * MiB))
            assert h.unfinished_uploads(s3_bucket) == ["root/step-0000000001/__0_0.distcp"]
            raise RuntimeError("boom")
    assert h.unfinished_uploads(s3_bucket) == []
    assert h.keys(s3_bucket) == []


def test_s3fs_file_discard_aborts_its_multipart_upload(s3_bucket) -> None:
    """``_discard`` on s3fs's own S3File (the path other object stores take) really aborts."""
    st = _s3_storage(s3_bucket)
    f = st.fs.open(st.path("plain.bin"), "wb", block_size=5 * MiB)
    f.write(os.urandom(6 * MiB))
    f.flush()                                           # starts the multipart upload, sends a part
    assert h.unfinished_uploads(s3_bucket) == ["root/plain.bin"]
    _discard(f)
    assert f.closed
    del f
    assert h.unfinished_uploads(s3_bucket) == [] and h.keys(s3_bucket) == []


def test_abort_uploads_aborts_only_under_its_root_and_prefix(s3_bucket) -> None:
    c, b = s3_bucket["client"], s3_bucket["name"]
    for key in ("root/step-0000000001/a", "root/step-0000000002/b", "root/releases/x",
                "root2/step-0000000001/a"):
        c.create_multipart_upload(Bucket=b, Key=key)
    st = _s3_storage(s3_bucket)
    assert st.abort_uploads("step-") == 2
    assert h.unfinished_uploads(s3_bucket) == ["root/releases/x", "root2/step-0000000001/a"]
    assert Storage(f"{s3_bucket['name']}-nosuch", {}).abort_uploads() == 0   # local: nothing to do


def test_no_permission_to_list_uploads_is_a_warning_not_a_failure(s3_bucket, s3_proxy, caplog):
    st = _s3_storage(s3_bucket, s3_proxy.url, extra=h.NO_CLIENT_RETRIES)
    s3_proxy.fail_next(1, lambda m, p: m == "GET" and "uploads" in p, status=403, code="AccessDenied")
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert st.abort_uploads("step-") == 0
    assert s3_proxy.faults_served == 1 and "lifecycle rule" in caplog.text


def test_conditional_put_refuses_an_existing_manifest(s3_bucket) -> None:
    st = _s3_storage(s3_bucket)
    st.put_atomic("step-0000000001/manifest.json", b"{}")
    with pytest.raises(CheckpointExistsError):
        st._put_object("step-0000000001/manifest.json", b"other", create_only=True)


def test_conditional_put_whose_reply_was_lost_is_not_a_conflict(s3_bucket, s3_proxy) -> None:
    st = _s3_storage(s3_bucket, s3_proxy.url, extra=h.NO_CLIENT_RETRIES,
                     retry=Retry(base_delay_s=0.01))
    s3_proxy.lose_reply_next(1, h.is_put_of("manifest.json"))
    st.put_atomic("step-0000000001/manifest.json", b'{"step": 1}')
    assert st.read_bytes("step-0000000001/manifest.json") == b'{"step": 1}'
    assert s3_proxy.count(h.is_put_of("manifest.json")) == 2


# -- retries ---------------------------------------------------------------------------------

def test_transient_errors_are_retried_with_backoff(s3_bucket, s3_proxy, caplog) -> None:
    st = _s3_storage(s3_bucket, s3_proxy.url, extra=h.NO_CLIENT_RETRIES,
                     retry=Retry(base_delay_s=0.01), upload=Upload(part_bytes=5 * MiB))
    s3_proxy.fail_next(2, h.is_part_upload, status=503, code="ServiceUnavailable")
    s3_proxy.fail_next(1, lambda m, p: m == "POST" and "uploadId=" in p, status=500,
                       code="InternalError")
    s3_proxy.drop_next(1, h.is_put_of("manifest.json"))
    data = os.urandom(11 * MiB)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        with st.open_write("f.bin") as f:
            f.write(data)
        st.put_atomic("manifest.json", b"{}")
    assert st.read_bytes("f.bin") == data and st.read_bytes("manifest.json") == b"{}"
    assert s3_proxy.faults_served == 4
    assert s3_proxy.count(h.is_part_upload) == 3 + 2
    assert "transient error on upload part" in caplog.text
    assert h.unfinished_uploads(s3_bucket) == []


def test_retries_are_bounded_and_leave_nothing(s3_bucket, s3_proxy) -> None:
    st = _s3_storage(s3_bucket, s3_proxy.url, extra=h.NO_CLIENT_RETRIES,
                     retry=Retry(attempts=3, base_delay_s=0.01), upload=Upload(part_bytes=5 * MiB))
    s3_proxy.fail_next(1000, h.is_part_upload, status=503, code="ServiceUnavailable")
    with pytest.raises(StorageError, match="f.bin"):
        with st.open_write("f.bin") as f:
            f.write(os.urandom(6 * MiB))
    tries = s3_proxy.count(h.is_part_upload)       # 3 per part; the last part may never start
    assert tries in (3, 6), tries
    assert h.unfinished_uploads(s3_bucket) == [] and h.keys(s3_bucket) == []


def test_permanent_errors_are_not_retried(s3_bucket, s3_proxy) -> None:
    st = _s3_storage(s3_bucket, s3_proxy.url, extra=h.NO_CLIENT_RETRIES)
    s3_proxy.fail_next(1000, lambda m, p: m == "PUT", status=403, code="AccessDenied")
    with pytest.raises(StorageError, match="PermissionError"):
        with st.open_write("f.bin") as f:
            f.write(b"abc")
    assert s3_proxy.count(lambda m, p: m == "PUT") == 1


# -- whole saves on S3 -----------------------------------------------------------------------

def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _root(bucket: dict) -> str:
    return f"s3://{bucket['name']}/run"


def test_round_trip_and_bit_exact_resume_on_s3(s3_bucket) -> None:
    model, opt, sched = _model()
    _train(model, opt, sched, 3)
    with CheckpointManager(_root(s3_bucket), storage_options=s3_bucket["options"]) as mgr:
        info = mgr.save(3, TrainState(model=model, optimizer=opt, scheduler=sched)).result(timeout=120)
        assert info.path == f"{_root(s3_bucket)}/step-0000000003"
    sched_saved = sched.state_dict()
    expected_losses = _train(model, opt, sched, 3)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = _model()
    _train(model2, opt2, sched2, 1)                       # a different state, overwritten
    with CheckpointManager(_root(s3_bucket), storage_options=s3_bucket["options"]) as mgr:
        assert [i.step for i in mgr.list()] == [3]
        assert mgr.verify() == {3: []}
        assert mgr.restore(TrainState(model=model2, optimizer=opt2, scheduler=sched2)) == 3
    assert sched2.state_dict() == sched_saved
    assert _train(model2, opt2, sched2, 3) == expected_losses       # RNG, optimizer, LR: exact
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert h.unfinished_uploads(s3_bucket) == []


def test_retention_on_s3_leaves_exactly_the_kept_prefixes(s3_bucket) -> None:
    model, opt, sched = _model()
    state = TrainState(model=model, optimizer=opt, scheduler=sched)
    with CheckpointManager(_root(s3_bucket), storage_options=s3_bucket["options"],
                           retention=Retention(keep_last=2)) as mgr:
        for step in range(1, 6):
            _train(model, opt, sched, 1)
            mgr.save(step, state).result(timeout=120)
        mgr.wait()
        assert [i.step for i in mgr.list()] == [4, 5]
    keys = h.keys(s3_bucket)
    assert {k.split("/")[1] for k in keys} == {"step-0000000004", "step-0000000005"}
    assert all(k.startswith("run/step-") for k in keys), keys      # no probe, no stray object
    for step in (4, 5):
        names = {k.rsplit("/", 1)[1] for k in keys if f"step-000000000{step}" in k}
        assert "manifest.json" in names and ".metadata" in names and len(names) >= 3
    assert h.unfinished_uploads(s3_bucket) == []


def test_a_restart_after_retention_finds_no_save_cut_short(s3_bucket, caplog) -> None:
    """What retention deleted is gone for the next start too: no step folder without a manifest
    is listed, and no "save that never committed" is reported and removed."""
    model, opt, sched = _model()
    state = TrainState(model=model, optimizer=opt, scheduler=sched)
    with CheckpointManager(_root(s3_bucket), storage_options=s3_bucket["options"],
                           retention=Retention(keep_last=2)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state, blocking=True)
        mgr.wait()
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        with CheckpointManager(_root(s3_bucket), storage_options=s3_bucket["options"]) as again:
            assert [i.step for i in again.list()] == [2, 3]
    assert "never committed" not in caplog.text
    assert uncommitted_steps(Storage(_root(s3_bucket), s3_bucket["options"])) == []


def test_transient_failures_during_a_save_are_retried_and_it_commits(s3_bucket, s3_proxy, caplog):
    model, opt, sched = _model()
    s3_proxy.fail_next(2, h.is_put_of("__0_0.distcp"), status=503, code="ServiceUnavailable")
    s3_proxy.drop_next(1, h.is_put_of(".metadata"))
    s3_proxy.fail_next(1, h.is_put_of("manifest.json"), status=500, code="InternalError")
    opts = h.options(s3_proxy.url, **h.NO_CLIENT_RETRIES)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        with CheckpointManager(_root(s3_bucket), storage_options=opts) as mgr:
            mgr.save(1, TrainState(model=model, optimizer=opt, scheduler=sched)).result(timeout=120)
            assert mgr.verify() == {1: []}
    assert s3_proxy.faults_served == 4
    assert "transient error" in caplog.text


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_permanent_failure_leaves_nothing_visible(s3_bucket, s3_proxy, on_error) -> None:
    model, opt, sched = _model()
    state = TrainState(model=model, optimizer=opt, scheduler=sched)
    opts = h.options(s3_proxy.url, **h.NO_CLIENT_RETRIES)
    mgr = CheckpointManager(_root(s3_bucket), storage_options=opts, on_error=on_error)
    s3_proxy.fail_next(1, lambda m, p: m == "PUT" and "step-0000000002/__0_1" in p,
                       status=403, code="AccessDenied")
    handle = mgr.save(2, state)
    with pytest.raises(SaveError) as ei:
        handle.result(timeout=120)
    assert ei.value.step == 2 and "PermissionError" in str(ei.value)
    assert mgr.list() == []
    assert not any("step-0000000002/manifest.json" in k for k in h.keys(s3_bucket))
    assert h.unfinished_uploads(s3_bucket) == []
    if on_error == "raise":
        with pytest.raises(SaveError):
            mgr.wait()
    _train(model, opt, sched, 1)
    mgr.save(3, state)                           # training goes on
    mgr.close()
    with CheckpointManager(_root(s3_bucket), storage_options=opts) as again:  # cleans up at start
        assert [i.step for i in again.list()] == [3]
    assert not any("step-0000000002" in k for k in h.keys(s3_bucket))   # leftovers cleaned


def test_credentials_never_reach_logs_errors_or_manifests(s3_bucket, s3_proxy, caplog) -> None:
    model, opt, sched = _model()
    state = TrainState(model=model, optimizer=opt, scheduler=sched)
    texts: list[str] = []

    def chain(e: BaseException | None) -> None:
        while e is not None:
            texts.extend([str(e), repr(e)])
            e = e.__cause__ or e.__context__

    with caplog.at_level(logging.DEBUG, logger="asyncckpt"):
        with pytest.raises(StorageError) as ei:              # a bucket that does not exist
            CheckpointManager(f"s3://{s3_bucket['name']}-nosuch/run", storage_options=s3_bucket["options"])
        chain(ei.value)
        opts = h.options(s3_proxy.url, **h.NO_CLIENT_RETRIES)
        with CheckpointManager(_root(s3_bucket), storage_options=opts, on_error="warn") as mgr:
            mgr.save(1, state).result(timeout=120)
            s3_proxy.fail_next(1000, lambda m, p: m == "PUT", status=403, code="AccessDenied")
            handle = mgr.save(2, state)
            assert handle.committed(timeout=120), "the failing save never finished"
            chain(handle.exception())
            s3_proxy.fail_next(1000, lambda m, p: True, status=503, code="SlowDown")
            with pytest.raises(StorageError) as ei:
                Storage(_root(s3_bucket), opts, retry=Retry(attempts=2, base_delay_s=0.01)
                        ).read_bytes("step-0000000001/manifest.json")
            chain(ei.value)
            s3_proxy.reset()
            texts += [repr(mgr), mgr.root, *(i.path for i in mgr.list())]
    manifest = s3_bucket["client"].get_object(
        Bucket=s3_bucket["name"], Key="run/step-0000000001/manifest.json")["Body"].read().decode()
    texts += [manifest, caplog.text, *(r.getMessage() for r in caplog.records)]
    assert len(texts) > 6 and any("failed" in t for t in texts)
    for text in texts:
        assert h.SECRET not in text and h.KEY not in text


@pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)  # moto takes any signature
def test_a_wrong_secret_is_a_storage_error_that_never_shows_it(s3_bucket, s3_proxy, caplog) -> None:
    """SeaweedFS checks SigV4: with a wrong secret, starting a manager (its first write) and
    listing fail at once (403 is not retried) with a StorageError that names the URL and the
    refusal, and neither the secret nor the access key shows in errors, tracebacks or logs."""
    wrong = "WrongSecret-4fQz9x"
    opts = {**h.options(s3_proxy.url, **h.NO_CLIENT_RETRIES), "secret": wrong}
    root = _root(s3_bucket)
    errors: list[StorageError] = []
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(StorageError) as started:
            CheckpointManager(root, storage_options=opts)
        errors.append(started.value)
        with pytest.raises(StorageError) as listed:
            Storage(root, opts).list_dirs()
        errors.append(listed.value)
    assert s3_proxy.count(lambda m, p: m == "PUT") == 1          # refused, not retried
    assert not any(wrong in r.getMessage() for r in caplog.records)   # botocore's, s3fs's too
    texts = [r.getMessage() for r in caplog.records if r.name.startswith("asyncckpt")]
    for err in errors:
        assert isinstance(err, OSError) and err.url.startswith(f"s3://{s3_bucket['name']}/run")
        assert "PermissionError" in str(err) and "signature" in str(err).lower(), str(err)
        texts.append("".join(traceback.format_exception(err)))
        e: BaseException | None = err
        while e is not None:
            texts += [str(e), repr(e)]
            e = e.__cause__ or e.__context__
    assert listed.value.op == "list"
    for text in texts:
        assert wrong not in text and h.SECRET not in text and h.KEY not in text
    assert not h.keys(s3_bucket), "nothing was written"


def test_error_messages_are_scrubbed_of_credentials() -> None:
    st = Storage("memory://scrub/root", {"secret": "SuperSecret123", "client_kwargs": {"token": "tok-XYZ1"}})
    err = st.error_for("read", "f", OSError("signature for SuperSecret123 and tok-XYZ1 rejected"))
    assert "SuperSecret123" not in str(err) and "tok-XYZ1" not in str(err) and "***" in str(err)
    assert err.__cause__ is None and "f" in err.url


# -- a training process SIGKILLed in the middle of uploads -------------------------------------

class _Child:
    """The training child (helpers_s3.child_main) on the proxy; its lines are collected."""

    def __init__(self, bucket: dict, proxy: h.FaultProxy, tmp: Path, n: int) -> None:
        self.err_path = tmp / f"child{n}.err"
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, h.__file__, proxy.url, _root(bucket), "12"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(
            iter(self.proc.stdout.readline, "")), daemon=True)
        self.reader.start()

    def run_until(self, held: threading.Event, deadline_s: float = 120) -> dict[str, Any]:
        """Let it train; SIGKILL it once ``held`` is set (a request it sent is held)."""
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + deadline_s
        while not held.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the child ended or hung before its planned kill: {self.lines} "
                            f"{self.err_path.read_text()[-3000:]}")
        self.kill()                              # SIGKILL: no cleanup of any kind runs in it
        out: dict[str, Any] = {"saved": {}, "restored": None}
        for line in self.lines:
            word, *rest = line.split()
            if word == "RESTORED":
                out["restored"] = (int(rest[0]), rest[1])
            elif word == "SAVING":
                out["saved"][int(rest[0])] = rest[1]
        return out

    def kill(self) -> None:
        h.kill_tree(self.proc)
        self.reader.join(10)


def test_sigkill_during_uploads_leaves_only_checkpoints_that_restore(s3_bucket, s3_proxy, tmp_path):
    in_step = lambda step: (lambda m, p: f"/step-{step:010d}/" in p)  # noqa: E731
    plans = [  # where each run is killed: mid multipart upload, before the manifest, mid-complete
        lambda m, p: h.is_part_upload(m, p) and in_step(4)(m, p),
        lambda m, p: h.is_put_of("manifest.json")(m, p) and in_step(6)(m, p),
        lambda m, p: m == "POST" and "uploadId=" in p and in_step(8)(m, p),
    ]
    digests: dict[int, str] = {}
    committed_before = 0
    children = [_Child(s3_bucket, s3_proxy, tmp_path, n) for n in range(len(plans))]  # start together
    try:
        for n, (plan, child) in enumerate(zip(plans, children)):
            run = child.run_until(s3_proxy.hold_next(plan))
            s3_proxy.release()                   # the held request is dropped, never forwarded
            restored, digest = run["restored"]
            assert restored == committed_before
            if restored:
                assert digest == digests[restored], "restored state differs from the state saved"
            digests.update(run["saved"])
            if n == 0:
                assert h.unfinished_uploads(s3_bucket), "the kill should have left an unfinished upload"
            if n == 1:                           # shards of step 6 are there, its manifest is not
                assert any("/step-0000000006/" in k for k in h.keys(s3_bucket))
                assert [m.step for m in list_committed(Storage(_root(s3_bucket),
                                                                s3_bucket["options"]))] == [2, 4]
            committed_before = 2 * (n + 1)
    finally:
        for child in children:
            child.kill()
    model = h.child_model()
    with CheckpointManager(_root(s3_bucket), storage_options=s3_bucket["options"]) as mgr:
        assert [i.step for i in mgr.list()] == [2, 4, 6]
        assert h.unfinished_uploads(s3_bucket) == []                    # aborted on start
        assert {k.split("/")[1] for k in h.keys(s3_bucket, "run/")} - {".lease.json"} == \
            {"step-0000000002", "step-0000000004", "step-0000000006"}
        for step in (2, 4, 6):
            assert mgr.restore(TrainState(model=model), step) == step
            assert h.state_digest(model) == digests[step]


@pytest.mark.parametrize("name", ["exp[1]", "exp?", "exp*"])
def test_a_root_with_glob_characters_never_touches_another_run(s3_bucket, name: str) -> None:
    """Retention and close() in ``runs/exp[1]`` must leave ``runs/exp1`` (its checkpoints
    and its live lease) alone."""
    model, opt, sched = _model()
    state = TrainState(model=model, optimizer=opt, scheduler=sched)
    other = f"s3://{s3_bucket['name']}/runs/exp1"
    odd = f"s3://{s3_bucket['name']}/runs/{name}"
    with CheckpointManager(other, storage_options=s3_bucket["options"]) as neighbour:
        neighbour.save(1, state, blocking=True)
        neighbour.save(2, state, blocking=True)
        before = h.keys(s3_bucket, "runs/exp1/")
        with CheckpointManager(odd, storage_options=s3_bucket["options"],
                               retention=Retention(keep_last=1)) as mgr:
            for step in (1, 2, 3, 4):
                mgr.save(step, state, blocking=True)
            mgr.wait()  # retention of the last commit too
            assert [i.step for i in mgr.list()] == [3, 4]
        assert h.keys(s3_bucket, "runs/exp1/") == before  # lease included
        assert [i.step for i in neighbour.list()] == [1, 2]
        neighbour.save(3, state, blocking=True)  # its lease is still its own
