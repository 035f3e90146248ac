"""The shard cache's size limit: least recently used shards go first, a shard being read is
never evicted (whatever process holds it), usage is logged; reading through it is unchanged."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from test_data_shards import write_split

from pipeline.data import cache
from pipeline.data.shards import SampleReader, _cache_path, read_samples, read_split


def _cached(cache_dir: str) -> set[str]:
    return {n.split("-", 1)[1] for n in os.listdir(cache.folder(cache_dir)) if ".tmp-" not in n}


def _remote(name: str) -> str:
    """The cache holds remote shards (a local split is read in place)."""
    return f"s3://mfm-test/cache-{name}-{time.time_ns()}/train"


def test_lru_eviction_keeps_the_cache_under_its_limit(tmp_path, s3_endpoint, caplog):
    url = _remote("lru")
    write_split(url, [4] * 5, size=(40, 30))
    split = read_split(url)
    cache_dir = str(tmp_path / "cache")
    one = max(s.nbytes for s in split.shards)
    limit_gb = 2.5 * one / cache.GB  # room for two shards
    caplog.set_level(logging.INFO, logger="pipeline.data.cache")
    for i in (0, 1):
        read_samples(split.shards[i], range(4), None, cache_dir, limit_gb)
        time.sleep(0.01)  # distinct mtimes: the LRU clock
    read_samples(split.shards[0], [1], None, cache_dir, limit_gb)  # 0 is now the more recent (read from the cache)
    time.sleep(0.01)
    read_samples(split.shards[2], range(4), None, cache_dir, limit_gb)
    assert _cached(cache_dir) == {"train-000000.tar", "train-000002.tar"}  # 1 was least recently used
    assert cache.usage(cache_dir)[0] <= limit_gb * cache.GB
    assert any("evicted 1 least recently used" in r.getMessage() for r in caplog.records)

    # Reading everything through the limited cache gives what reading without a cache gives.
    ids = list(range(split.num_samples))
    plain = dict(SampleReader(split).read(ids))
    cached = dict(SampleReader(split, cache_dir=cache_dir, cache_limit_gb=limit_gb).read(ids))
    assert {i: s["jpg"] for i, s in cached.items()} == {i: s["jpg"] for i, s in plain.items()}
    assert cache.usage(cache_dir)[0] <= limit_gb * cache.GB and len(_cached(cache_dir)) == 2


def test_a_shard_in_use_is_never_evicted(tmp_path, s3_endpoint, caplog):
    url = _remote("in-use")
    write_split(url, [4] * 4, size=(40, 30))
    split = read_split(url)
    cache_dir = str(tmp_path / "cache")
    limit_gb = 1.5 * max(s.nbytes for s in split.shards) / cache.GB  # room for one shard
    read_samples(split.shards[0], range(4), None, cache_dir, limit_gb)
    held = _cache_path(cache_dir, split.shards[0])
    # Another process reads shard 0 (holds it) while this one goes through the others.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_SH); "
            "print('held', flush=True); time.sleep(60)",
            held,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        caplog.set_level(logging.INFO, logger="pipeline.data.cache")
        for i in (1, 2, 3):
            read_samples(split.shards[i], range(4), None, cache_dir, limit_gb)
            assert os.path.exists(held), f"shard 0 evicted while in use (after reading shard {i})"
        # over the limit only while in use: a shard read is trimmed once released, the held one stays
        assert _cached(cache_dir) == {"train-000000.tar"}
    finally:
        holder.kill()
        holder.wait()
    read_samples(split.shards[1], range(4), None, cache_dir, limit_gb)  # released: now the LRU one goes
    assert _cached(cache_dir) == {"train-000001.tar"}
