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
