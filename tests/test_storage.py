import pytest

from pipeline import storage


def test_atomic_write_roundtrip(store_url):
    url = storage.join(store_url, "a", "b.bin")
    assert not storage.exists(url)
    storage.write_bytes(url, b"hello")
    assert storage.read_bytes(url) == b"hello"


def test_failed_write_leaves_nothing(store_url):
    url = storage.join(store_url, "half.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(url) as f:
            f.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert not storage.exists(url)
    fs, path = storage.filesystem(store_url)
    leftovers = fs.find(path) if fs.exists(path) else []
    assert not leftovers


def test_read_survives_endpoint_restart(s3_endpoint):
    import threading

    url = "s3://mfm-test/restart/x.bin"
    storage.write_bytes(url, b"data")
    s3_endpoint.stop()
    threading.Timer(1.0, s3_endpoint.start).start()
    assert storage.read_bytes(url) == b"data"


def test_plain_http_endpoint_loads_no_certificates_https_still_verifies(s3_endpoint, monkeypatch):
    """No TLS on http://: each process (each loader worker) is spared loading the CA bundle before
    its first request; an https:// endpoint keeps verifying certificates."""
    import ssl

    from fsspec.asyn import sync

    from pipeline.config import StorageConfig

    loads = []
    real = ssl.SSLContext.load_verify_locations
    monkeypatch.setattr(
        ssl.SSLContext, "load_verify_locations", lambda self, *a, **k: loads.append(a) or real(self, *a, **k)
    )
    storage.write_bytes("s3://mfm-test/tls/x.bin", b"data")
    fs, path = storage.filesystem("s3://mfm-test/tls/x.bin", StorageConfig(endpoint_url=s3_endpoint.url))
    assert fs.cat_file(path) == b"data"
    assert loads == []

    fs, _ = storage.filesystem("s3://mfm-test/tls/x.bin", StorageConfig(endpoint_url="https://127.0.0.1:9"))
    sync(fs.loop, fs.set_session)
    assert fs.s3._endpoint.http_session._verify
