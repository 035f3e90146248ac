"""The streaming benchmark's parts: the counting S3 proxy (real moto endpoint, real s3fs client)."""

from __future__ import annotations

import os
import time

import pytest

from pipeline.benchmarks.s3proxy import CountingProxy

BUCKET = "mfm-test"


def _s3fs(endpoint_url: str):
    import s3fs

    return s3fs.S3FileSystem(anon=False, endpoint_url=endpoint_url, skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture
def objects(s3_endpoint):
    """Three known objects under a fresh prefix, written straight to the endpoint (not counted)."""
    prefix = f"{BUCKET}/proxy-{time.time_ns()}"
    blobs = {f"{prefix}/obj{i}.bin": os.urandom(300_000 + i) for i in range(3)}
    fs = _s3fs(s3_endpoint.url)
    for path, data in blobs.items():
        fs.pipe_file(path, data)
    return prefix, blobs


def test_proxy_forwards_and_counts_gets_heads_listings_and_bytes(s3_endpoint, objects):
    prefix, blobs = objects
    path, data = next(iter(blobs.items()))
    with CountingProxy(s3_endpoint.url) as proxy:
        fs = _s3fs(proxy.url)
        assert fs.info(path)["size"] == len(data)  # HEAD
        assert fs.cat_file(path, start=1000, end=5000) == data[1000:5000]  # ranged GET
        assert fs.cat_file(path, start=0, end=len(data)) == data  # (a plain cat_file would HEAD first)
        assert sorted(fs.ls(prefix, detail=False)) == sorted(blobs)  # a listing GET
        counts = proxy.counts()
        assert counts["HEAD"] == 1
        assert counts["GET"] == 3
        assert counts["list"] == 1
        assert counts["requests"] == 4
        listing_bytes = counts["bytes"] - 4000 - len(data)
        assert 0 < listing_bytes < 10_000  # the listing's XML, nothing more

        proxy.reset()
        assert proxy.counts()["requests"] == 0 and proxy.counts()["bytes"] == 0


def test_proxy_serves_concurrent_keepalive_connections(s3_endpoint, objects):
    _, blobs = objects
    with CountingProxy(s3_endpoint.url) as proxy:
        fs = _s3fs(proxy.url)
        for _ in range(2):  # the second round reuses the kept-alive connections
            assert fs.cat(list(blobs)) == blobs  # s3fs sends these GETs concurrently
        counts = proxy.counts()
        assert counts["GET"] == 2 * len(blobs)
        assert counts["bytes"] == 2 * sum(map(len, blobs.values()))


def test_proxy_adds_latency_and_caps_bandwidth(s3_endpoint, objects):
    _, blobs = objects
    path, data = next(iter(blobs.items()))
    # Lower bounds only: a loaded machine makes reads slower, never faster than the shaping allows.
    with CountingProxy(s3_endpoint.url, latency_s=0.3) as proxy:
        fs = _s3fs(proxy.url)
        fs.info(path)  # the client's setup, outside the measured part
        t0 = time.monotonic()
        fs.cat_file(path, start=0, end=10)
        assert time.monotonic() - t0 >= 0.3
    with CountingProxy(s3_endpoint.url, bandwidth_bps=1_000_000) as proxy:
        fs = _s3fs(proxy.url)
        fs.info(path)
        t0 = time.monotonic()
        assert fs.cat_file(path, start=0, end=len(data)) == data
        assert time.monotonic() - t0 >= 0.9 * len(data) / 1_000_000
    with pytest.raises(ValueError, match="bandwidth_bps"):
        CountingProxy(s3_endpoint.url, bandwidth_bps=0)


@pytest.mark.slow
def test_bench_stream_harness_checks_every_loader_and_counts_requests(s3_endpoint, tmp_path):
    pytest.importorskip("streaming", reason="the harness imports mosaicml-streaming (the bench extra)")
    """`mfm bench stream` at a tiny size, one round: each loader saw every sample of its epoch once and the
    proxy counted its requests and bytes. Figures are not asserted: they are the benchmark's to report."""
    from pipeline.benchmarks import stream

    args = stream.parser().parse_args(
        ["--images", "48", "--size", "64x48", "--shards", "3", "--batch", "8", "--workers", "2"]
        # not mds: through a keep-alive endpoint it stalls and fails some epochs (README, "Streaming from ...")
        + ["--loaders", "project,webdataset,litdata", "--workloads", "io", "--rounds", "1", "--no-resume"]
        + ["--endpoint", s3_endpoint.url, "--work-dir", str(tmp_path)]
    )
    summary = stream.run(args)
    rows = {r["loader"]: r for r in summary["rows"]}
    assert set(rows) == {"project", "webdataset", "litdata"}
    for name, row in rows.items():
        assert row["errors"] == [], name
        assert row["exactly_once"], (name, row["exactly_once_detail"])
        assert row["get"] >= 2 and row["mb_read"] > 0, (name, row)
    assert rows["webdataset"]["head"] == 0  # one listing, one GET per tar: what curl does
    assert "| this project (torch backend) | 2 |" in stream.markdown(summary)
    assert list(tmp_path.iterdir()) == []  # local copies and caches removed
