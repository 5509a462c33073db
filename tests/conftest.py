"""Shared fixtures: a real fsspec filesystem that fails or pauses on chosen writes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers_faulty_fs import FaultyFS, new_faulty_fs


SLOW_TIMEOUT_S = 3600
"""The per-test deadline of tests marked ``slow`` (others get pyproject's ``timeout``)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture
def faulty_fs() -> Iterator[type[FaultyFS]]:
    """A local filesystem under its own ``faultyN://`` protocol; see helpers_faulty_fs."""
    fs_cls = new_faulty_fs()
    yield fs_cls
    fs_cls.disarm()
    fs_cls.release()


@pytest.fixture
def asyncckpt_log(caplog: pytest.LogCaptureFixture):
    """Capture asyncckpt's own log at WARNING and above; calling it returns the messages so far.
    Other libraries' records are left out: torch 2.11's DCP event logger hands DEBUG records
    to every handler whatever its level."""
    import logging

    caplog.set_level(logging.WARNING, logger="asyncckpt")

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "asyncckpt" or r.name.startswith("asyncckpt.")]
    return messages


# -- S3 on loopback (moto's server and SeaweedFS), for tests marked `s3`; see helpers_s3 -------

import uuid as _uuid  # noqa: E402

import helpers_s3 as _s3  # noqa: E402

S3_SERVERS = ["moto", "seaweedfs"]
"""Every test that takes ``s3_server`` (or ``s3_bucket``, ``s3_proxy``) runs on each of these;
a test pins one with ``@pytest.mark.parametrize("s3_server", [...], indirect=True)``."""
_LOG_FROM = pytest.StashKey[int]()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_s3.S3Server]:
    """moto's S3 server on 127.0.0.1 and a free port, started once; fails loudly if it cannot.
    It accepts any signature and creates nothing by itself."""
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    proc, url = _s3.start_moto(str(log_path))
    server = _s3.S3Server("moto", url, proc, log_path)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_s3.S3Server]:
    """SeaweedFS (``weed mini``) on 127.0.0.1, free ports and a temporary data folder, started
    once; fails loudly if it cannot.  It checks SigV4 signatures against a real key pair."""
    server = _s3.start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session", params=S3_SERVERS)
def s3_server(request: pytest.FixtureRequest) -> _s3.S3Server:
    """The S3 server of this test's variant (started on first use, shared by the session)."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def s3_bucket(s3_server: _s3.S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """A fresh bucket for one test: ``name``, ``endpoint``, ``options`` (storage_options),
    ``client`` (boto3), ``server`` ("moto" or "seaweedfs").

    Fake AWS credentials are set in the environment for this test only, so
    nothing can fall back to real ones.
    """
    import boto3

    for var, value in (("AWS_ACCESS_KEY_ID", _s3.KEY), ("AWS_SECRET_ACCESS_KEY", _s3.SECRET),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, value)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    url = s3_server.endpoint
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id=_s3.KEY,
                          aws_secret_access_key=_s3.SECRET, region_name="us-east-1")
    name = f"t-{_uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    yield {"name": name, "endpoint": url, "options": _s3.options(url), "client": client,
           "server": s3_server.name}


@pytest.fixture
def s3_proxy(s3_server: _s3.S3Server) -> Iterator[_s3.FaultProxy]:
    """A fault-injecting HTTP proxy on 127.0.0.1 in front of this test's S3 server
    (see helpers_s3.FaultProxy)."""
    proxy = _s3.FaultProxy(s3_server.endpoint)
    yield proxy
    proxy.close()


@pytest.fixture(autouse=True)
def _s3_log_start(request: pytest.FixtureRequest) -> None:
    """Where the S3 server's log stood when this test started (shown if it fails)."""
    if "s3_server" in request.fixturenames:
        request.node.stash[_LOG_FROM] = request.getfixturevalue("s3_server").log_size()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed S3 test's report carries what its server logged meanwhile."""
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("s3_server")
    if report.failed and isinstance(server, _s3.S3Server):
        text = server.log_since(item.stash.get(_LOG_FROM, 0))
        report.sections.append((f"{server.name} log ({server.log_path})", text or "(nothing)"))
