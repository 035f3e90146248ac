"""Shared fixtures: a real S3 HTTP endpoint on 127.0.0.1 (moto's server), test environment."""

from __future__ import annotations

import os
import socket
import time

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("DS_BUILD_OPS", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Endpoint:
    """moto's S3 server in a thread. stop()/start() restart it on the same port, keeping its
    data, the way a real endpoint comes back after a restart."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self):
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto server did not start")

    def stop(self):
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(autouse=True, scope="session")
def _model_cache(tmp_path_factory):
    """The registry's local cache ($MFM_CACHE) of this session, never the user's ~/.cache/mfm."""
    old = os.environ.get("MFM_CACHE")
    os.environ["MFM_CACHE"] = str(tmp_path_factory.mktemp("mfm-cache"))
    yield
    if old is None:
        os.environ.pop("MFM_CACHE", None)
    else:
        os.environ["MFM_CACHE"] = old


@pytest.fixture(scope="session")
def s3_endpoint():
    """A running S3 endpoint with bucket `mfm-test`; AWS_* environment points at it."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL"]}
    os.environ.update(env)
    server = S3Endpoint()
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = server.url
    import boto3

    boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="mfm-test")
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """A fresh store URL: a local folder and, in a second run, a prefix on the S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_endpoint")
    return f"s3://mfm-test/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"
