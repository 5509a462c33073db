"""S3 outage: the endpoint goes away in the middle of a save and comes back.

``OutageProxy`` is the fault proxy of helpers_s3 in front of the S3 server (moto, SeaweedFS),
that can *stop*: at the first request a rule matches (here: the upload of part 2 of a shard) it
closes its listening socket and resets every open connection, so the client gets "connection
refused" until ``come_back()`` listens on the same port again.  When it comes back is driven by events, not
by the clock: after the client has logged its N-th retry.  Retries are made small for the
test (``Storage.retry``; botocore does not retry on its own), so a short outage
(the endpoint comes back after the 4th retry, 1-3 s later) commits, and a long one (it never comes
back) fails inside its retry budget with nothing visible.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import helpers_s3 as h
import pytest
import torch

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.errors import SaveError
from asyncckpt.storage import Retry, Storage, list_committed

pytestmark = [pytest.mark.s3, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]
DEADLINE_S = 120.0


class OutageProxy(h.FaultProxy):
    """The fault proxy, plus an outage: ``fail_from(match)`` arms it, ``come_back()`` ends it."""

    def __init__(self, target: str) -> None:
        self.trigger: h.Match | None = None
        self.down = threading.Event()
        self.refused_while_down = 0
        self._conns: set[socket.socket] = set()
        super().__init__(target)
        self.port = self._server.server_address[1]
        self._server.handle_error = lambda *args: None

    def fail_from(self, match: h.Match) -> None:
        """The endpoint goes away at the first request ``match`` accepts (that one included)."""
        with self._lock:
            self.trigger = match

    def come_back(self) -> None:
        """Listen again on the same port."""
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._server.handle_error = lambda *args: None
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.down.clear()

    def _go_down(self) -> None:
        with self._lock:
            if self.down.is_set():
                return
            self.down.set()
            conns = list(self._conns)
        self._server.shutdown()
        self._server.server_close()  # new connections are refused from now on
        for conn in conns:  # and open keep-alive connections are reset
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _handler(self) -> type:
        base, proxy = super()._handler(), self

        class Handler(base):  # type: ignore[misc, valid-type]
            disable_nagle_algorithm = True

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._conns.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._conns.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def _serve(self) -> None:
                with proxy._lock:
                    hit = proxy.trigger is not None and proxy.trigger(self.command, self.path)
                    if hit:
                        proxy.trigger = None
                if hit or proxy.down.is_set():
                    proxy.refused_while_down += 1
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    threading.Thread(target=proxy._go_down, daemon=True).start()
                    return
                base._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler


class Retries(logging.Handler):
    """Counts asyncckpt's "transient error on WHAT (attempt i/n) ...; retrying" warnings, one
    per retry, keeping ``(what, i, n)`` of each; ``reached`` after ``n`` of them."""

    def __init__(self, n: int) -> None:
        super().__init__(logging.WARNING)
        self.n, self.count, self.reached = n, 0, threading.Event()
        self.seen: list[tuple[str, int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"transient error on (.+) \(attempt (\d+)/(\d+)\)", record.getMessage())
        if m:
            self.seen.append((m.group(1), int(m.group(2)), int(m.group(3))))
            self.count += 1
            if self.count >= self.n:
                self.reached.set()


class Sleeps:
    """A Retry's ``sleep``: really sleeps, and keeps each delay."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        time.sleep(seconds)


@pytest.fixture
def outage(s3_server: h.S3Server) -> Iterator[OutageProxy]:
    proxy = OutageProxy(s3_server.endpoint)
    yield proxy
    if proxy.down.is_set():
        proxy.come_back()
    proxy.close()


@pytest.fixture
def retries() -> Iterator[Retries]:
    counter = Retries(4)
    logger = logging.getLogger("asyncckpt.storage")
    logger.addHandler(counter)
    yield counter
    logger.removeHandler(counter)


def _model(step: int) -> torch.nn.Module:
    """5.5 MB: one shard of two 5 MiB parts, so the outage hits a multipart upload halfway."""
    gen = torch.Generator().manual_seed(step)
    model = torch.nn.Linear(1024, 1344, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=gen))
    return model


def _manager(bucket: dict, proxy: OutageProxy, retry: Retry) -> CheckpointManager:
    opts = h.options(proxy.url, **h.NO_CLIENT_RETRIES)  # botocore does not retry
    return CheckpointManager(f"s3://{bucket['name']}/run", storage_options=opts, compression=None,
                             writer_threads=1, upload_part_bytes=5 << 20, upload_concurrency=1,
                             lease_heartbeat_s=60, lease_timeout_s=600, retry=retry)


def _part_2_of(step: int) -> h.Match:
    return lambda m, p: h.is_part_upload(m, p) and "partNumber=2" in p and f"/step-{step:010d}/" in p


def _restores(mgr: CheckpointManager, step: int) -> bool:
    state = TrainState(model=_model(0))
    mgr.restore(state, step)
    return torch.equal(state.models["model"].weight, _model(step).weight)


def test_a_save_through_a_short_outage_commits_after_retries(s3_bucket, outage, retries) -> None:
    retry = Retry(attempts=10, base_delay_s=0.25, max_delay_s=1.0, deadline_s=60.0)
    with _manager(s3_bucket, outage, retry) as mgr:
        mgr.save(1, TrainState(model=_model(1)), blocking=True)
        outage.fail_from(_part_2_of(2))
        handle = mgr.save(2, TrainState(model=_model(2)))
        assert retries.reached.wait(DEADLINE_S), "the client never retried"
        assert outage.down.is_set() and not handle.done()
        outage.come_back()  # after the 4th retry: the endpoint was gone 1-3 s
        info = handle.result(timeout=DEADLINE_S)
        assert info.step == 2 and [i.step for i in mgr.list()] == [1, 2]
        assert mgr.verify(2) == {2: []} and _restores(mgr, 2)
        assert h.unfinished_uploads(s3_bucket) == []
    assert outage.refused_while_down >= 1 and retries.count >= 4


def test_a_long_outage_fails_inside_its_retry_budget_and_leaves_nothing_visible(
        s3_bucket, outage, retries) -> None:
    sleeps = Sleeps()
    retry = Retry(attempts=4, base_delay_s=0.1, max_delay_s=0.4, deadline_s=10.0, sleep=sleeps)
    mgr = _manager(s3_bucket, outage, retry)
    mgr.save(1, TrainState(model=_model(1)), blocking=True)
    outage.fail_from(_part_2_of(2))
    with pytest.raises(SaveError) as failed:
        mgr.save(2, TrainState(model=_model(2)), blocking=True)  # never comes back meanwhile
    # the budget: at most 4 tries of each call (3 retries), each delay within its cap, the
    # delays of one call far inside its deadline
    assert retries.seen and all(n == 4 and 1 <= i <= 3 for _, i, n in retries.seen), retries.seen
    assert len(sleeps.delays) == len(retries.seen) and all(0.05 <= d <= 0.4 for d in sleeps.delays)
    per_call = [sum(sleeps.delays[j] for j, (w, _, _) in enumerate(retries.seen) if w == what)
                for what in {w for w, _, _ in retries.seen}]
    assert max(per_call) <= 0.1 + 0.2 + 0.4, sleeps.delays
    text = str(failed.value)
    assert "save of step 2 failed" in text and "step-0000000002" in text, text
    assert h.KEY not in text and h.SECRET not in text
    outage.come_back()
    assert [m.step for m in list_committed(mgr.storage)] == [1], "a failed save must not be listed"
    mgr.save(3, TrainState(model=_model(3)), blocking=True)  # the writer carries on
    mgr.close()
    with CheckpointManager(f"s3://{s3_bucket['name']}/run", storage_options=s3_bucket["options"]) as again:
        assert [i.step for i in again.list()] == [1, 3] and _restores(again, 3)
        assert h.unfinished_uploads(s3_bucket) == [], "a new start aborts what the failed save left"
        assert {k.split("/")[1] for k in h.keys(s3_bucket, "run/")} - {".lease.json"} == \
            {"step-0000000001", "step-0000000003"}


def test_storage_retry_gives_up_on_a_dead_endpoint(s3_bucket, outage, retries) -> None:
    """The budget bounds attempts: a dead endpoint fails after ``attempts`` tries, not forever."""
    sleeps = Sleeps()
    store = Storage(f"s3://{s3_bucket['name']}/x", h.options(outage.url, **h.NO_CLIENT_RETRIES),
                    retry=Retry(attempts=3, base_delay_s=0.01, max_delay_s=0.02, deadline_s=5.0,
                                sleep=sleeps))
    store.list_dirs()  # connected
    outage.fail_from(lambda m, p: True)
    with pytest.raises(OSError) as failed:
        store.read_bytes("missing")
    assert "read s3://" in str(failed.value) and outage.down.is_set()
    assert [(i, n) for _, i, n in retries.seen] == [(1, 3), (2, 3)]   # 3 tries: 2 retries, no more
    assert len(sleeps.delays) == 2 and all(d <= 0.02 for d in sleeps.delays)
