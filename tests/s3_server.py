"""An S3 endpoint for tests: moto in server mode on 127.0.0.1 (a real S3 protocol over HTTP, not a mock of our code).

Use it with ``from tests.s3_server import moto_server, s3_bucket  # noqa: F401`` in a test module;
``s3_bucket`` yields ``s3://<fresh bucket>`` with ``AWS_ENDPOINT_URL``, fake credentials and
the region set in the environment (botocore and s3fs read them; subprocesses inherit them).
One server per test session; one bucket per test.
"""

from __future__ import annotations

import logging
import socket
import uuid
from typing import Iterator

import pytest

REGION = "us-east-1"
FAKE_KEY = "testing"  # moto accepts any credentials; these just keep botocore from looking for real ones


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 at a free port for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per HTTP request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the session's moto server; yields ``s3://<bucket>``, the environment pointing at it."""
    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance cached before the environment changed would use another endpoint
    bucket = f"sae-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name=REGION).create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
