"""The loaders' requests and bytes against a real S3 endpoint, counted by a proxy in front of it
(pipeline.benchmarks.s3proxy): one epoch reads each shard once, in one GET, without HEADs or
`.idx` reads, on both backends, with and without the shard cache; a second epoch through the
cache reads nothing."""

from __future__ import annotations

import json
import time

import pytest
from test_data_loader import make_cfg
from test_data_shards import write_split

from pipeline.benchmarks.s3proxy import CountingProxy
from pipeline.data import build_train_loader
from pipeline.storage import join, read_bytes

SIZES = [7, 6, 8, 5, 7, 6, 9, 6]  # 54 samples in 8 shards


@pytest.fixture
def proxy(s3_endpoint):
    with CountingProxy(s3_endpoint.url) as p:
        yield p


def _split(name: str) -> tuple[str, int, int]:
    """A split written straight to the endpoint: (url, bytes of its shards, of its manifest)."""
    url = f"s3://mfm-test/stream-{name}-{time.time_ns()}/train"
    write_split(url, SIZES, size=(40, 30))
    manifest = read_bytes(join(url, "manifest.json"))
    return url, sum(s["bytes"] for s in json.loads(manifest)["shards"]), len(manifest)


def _epoch(cfg, backend: str, world_size: int, keep: list) -> list[int]:
    """One epoch of every rank, the loaders kept in `keep` (as a run keeps them: DALI's workers
    read the next epoch's first batches ahead, and a worker stopped mid-download is a read lost)."""
    seen = []
    for rank in range(world_size):
        loader = build_train_loader(cfg, rank=rank, world_size=world_size, micro_batch=3, device="cpu", backend=backend)
        seen += [i for _ in loader for i in loader.last_ids]
        keep.append(loader)
    return seen


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_an_epoch_reads_each_shard_once(proxy, tmp_path, backend, cache):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    url, shard_bytes, manifest_bytes = _split(f"{backend}-{cache}")
    cfg = make_cfg(
        url,
        f"storage.endpoint_url={proxy.url}",
        "data.workers=2",
        "data.shuffle_buffer=10",
        f"data.cache_dir={tmp_path / 'cache'}" if cache else "data.cache_dir=null",
    )
    proxy.reset()
    world = 2
    loaders = []
    seen = _epoch(cfg, backend, world, loaders)
    assert len(seen) == len(set(seen)) == sum(SIZES) // 6 * 6
    c = proxy.counts()
    readers = world * 2
    # the manifest (each rank) and one GET per shard. Without the cache, part of a shard (where a
    # cut between two readers' runs falls, at most readers - 1, and the epoch's dropped tail) is
    # its .idx and one ranged GET: a cut shard is 4 GETs, the tail's 2. Plus one: in some runs the
    # proxy counted one GET more than the endpoint logged (where every shard was fetched once)
    cuts = 0 if cache else readers - 1
    assert c["HEAD"] == 0 and c["list"] == 0, c
    assert c["GET"] <= world + len(SIZES) + 3 * cuts + (0 if cache else 1) + 1, c
    # the shards' bytes once; the manifest per rank and a few .idx files besides (~400 bytes each)
    assert c["bytes"] <= 1.02 * shard_bytes + world * manifest_bytes + cuts * 600, (c, shard_bytes)
    if cache:
        proxy.reset()
        assert len(_epoch(cfg, backend, world, loaders)) == len(seen)
        again = proxy.counts()
        # no shard byte read again: the manifests only (and the one uncounted request, as above)
        assert again["HEAD"] == 0 and again["GET"] <= world + 1, again
        assert again["bytes"] <= world * manifest_bytes + 2048, again
