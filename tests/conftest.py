"""Shared fixtures: a real fsspec filesystem that fails or pauses on chosen writes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers_faulty_fs import FaultyFS, new_faulty_fs


@pytest.fixture
def faulty_fs() -> Iterator[type[FaultyFS]]:
    """A local filesystem under its own ``faultyN://`` protocol; see helpers_faulty_fs."""
    fs_cls = new_faulty_fs()
    yield fs_cls
    fs_cls.disarm()
    fs_cls.release()


# -- S3 on loopback (moto's server), for tests marked `s3`; see helpers_s3 -----------------

import uuid as _uuid  # noqa: E402

import helpers_s3 as _s3  # noqa: E402


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 and a free port, started once; fails loudly if it cannot."""
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    proc, url = _s3.start_moto(str(log_path))
    yield url
    _s3.stop(proc)


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """A fresh bucket for one test: ``name``, ``endpoint``, ``options`` (storage_options), ``client``.

    Fake AWS credentials are set in the environment for this test only, so
    nothing can fall back to real ones.
    """
    import boto3

    for var, value in (("AWS_ACCESS_KEY_ID", _s3.KEY), ("AWS_SECRET_ACCESS_KEY", _s3.SECRET),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, value)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    client = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id=_s3.KEY,
                          aws_secret_access_key=_s3.SECRET, region_name="us-east-1")
    name = f"t-{_uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    yield {"name": name, "endpoint": moto_endpoint, "options": _s3.options(moto_endpoint),
           "client": client}


@pytest.fixture
def s3_proxy(moto_endpoint: str) -> Iterator[_s3.FaultProxy]:
    """A fault-injecting HTTP proxy on 127.0.0.1 in front of moto (see helpers_s3.FaultProxy)."""
    proxy = _s3.FaultProxy(moto_endpoint)
    yield proxy
    proxy.close()
