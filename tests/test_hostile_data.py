"""What a config or a shared folder can throw at the data layer: mixing weights at the edge of
float range, and a shard cache pointed at a folder that holds other files."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from test_data_shards import write_split

from pipeline.config import ConfigError, load_config
from pipeline.data.sampling import Mix, mixed_epoch_order
from pipeline.data.shards import _cache_path, read_index, read_samples, read_split


@pytest.fixture
def remote(request, s3_endpoint):
    """A split on the S3 endpoint: only remote shards go through the cache (a local one is read
    in place)."""
    return f"s3://mfm-test/{request.node.name}-{time.time_ns()}/train"


# --- mixing weights (issue 26, item 8) -------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, epoch_samples, want",
    [((1e308, 1e308), None, [10, 10]), ((1e308,) * 3, 20, [7, 7, 6]), ((1.7e308, 1e-300), None, [20, 0])],
)
def test_huge_weights_mix_in_proportion(weights, epoch_samples, want):
    mix = Mix((1,) * len(weights), weights, epoch_samples)
    counts = [10] * len(weights)
    assert mix.shares(counts).tolist() == want
    order = mixed_epoch_order(counts, mix, seed=0, epoch=0, shuffle_buffer=4)
    assert len(order) == sum(want) and np.all(order >= 0)


@pytest.mark.parametrize("weights", [(float("inf"), 1.0), (float("nan"), 1.0), (0.0, 1.0), (-1.0, 2.0), ()])
def test_a_mix_refuses_weights_it_cannot_normalise(weights):
    with pytest.raises(ValueError, match="weights"):
        Mix((1,) * len(weights), weights).shares([10] * len(weights))


def test_config_takes_huge_weights_and_bounds_epoch_samples():
    """Weights are relative: 1e308 each is a fair mix. epoch_samples past int64-exact ranges
    would overflow the shares, so the config refuses it, naming the key."""
    cfg = load_config(None, ["data.train=[{url: a, weight: 1e308}, {url: b, weight: 1e308}]"])
    assert [t.weight for t in cfg.data.train] == [1e308, 1e308]
    with pytest.raises(ConfigError, match=r"data.train.0.weight"):
        load_config(None, ["data.train=[{url: a, weight: .inf}, {url: b, weight: 1}]"])
    with pytest.raises(ConfigError, match=r"data.epoch_samples"):
        load_config(None, [f"data.epoch_samples={10**30}"])


# --- the shard cache in a folder that holds other files (issue 26, item 6) -------------------------


def test_a_cache_in_the_home_folder_never_evicts_the_users_files(tmp_path, remote):
    """data.cache_dir=~ with a limit smaller than one shard: the user's files stay, an old one
    and one named like a cached shard included; only the cache's own shards are evicted."""
    url = remote
    write_split(url, [4] * 3, size=(40, 30))
    split = read_split(url)
    home = tmp_path / "home"
    home.mkdir()
    mine = {"thesis.tex": b"x" * 50_000, f"{'0' * 16}-train-000000.tar": b"my tar"}
    for name, data in mine.items():
        (home / name).write_bytes(data)
        os.utime(home / name, (1, 1))  # older than any shard: first in line for an LRU
    for shard in split.shards:
        assert len(read_samples(shard, [0], None, str(home), 1e-9)) == 1
    assert {n: (home / n).read_bytes() for n in mine} == mine


def test_a_download_never_writes_through_a_planted_link(tmp_path, remote):
    """The old temporary name (`<shard>.tmp-<pid>-<thread>`) could be predicted and planted as a
    link to another file, which the download then overwrote."""
    url = remote
    write_split(url, [4], size=(40, 30))
    shard = read_split(url).shards[0]
    cache_dir, victim = str(tmp_path / "cache"), tmp_path / "victim"
    victim.write_bytes(b"precious")
    local = _cache_path(cache_dir, shard)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    os.symlink(victim, f"{local}.tmp-{os.getpid()}-{threading.get_ident()}")
    assert len(read_samples(shard, [0, 1], None, cache_dir)) == 2
    assert victim.read_bytes() == b"precious"


def test_a_cache_folder_that_is_a_link_is_refused(tmp_path, remote):
    from pipeline.data import cache

    url = remote
    write_split(url, [4], size=(40, 30))
    (tmp_path / "cache").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "cache" / cache.FOLDER)
    with pytest.raises(cache.CacheError, match=f"{cache.FOLDER}: the shard cache's folder is a link"):
        read_samples(read_split(url).shards[0], [0], None, str(tmp_path / "cache"), 1e-9)
    assert os.listdir(tmp_path / "elsewhere") == []


# --- an index that repeats one sample's rows (found by tests/test_fuzz_data.py) ---------------------


def test_an_index_repeating_one_samples_rows_is_not_read_as_the_others(tmp_path, caplog):
    """Each row alone matches the tar's headers, but samples 1..4 would read sample 0's bytes."""
    url = str(tmp_path / "train")
    write_split(url, [5], size=8)
    shard = read_split(url).shards[0]
    truth = read_samples(shard, range(5))
    head, first = open(shard.index_url).read().splitlines()[:2]
    open(shard.index_url, "w").write("\n".join([head] + [first] * 5) + "\n")
    assert read_index(shard) is None
    assert "not a v1.2 index of 5 samples; scanning the tar instead" in caplog.text
    assert read_samples(shard, range(1, 5)) == {i: truth[i] for i in range(1, 5)}


# --- a manifest or index too large to be one (an endless object must not fill memory) ---------------


def test_an_oversized_manifest_or_index_is_refused_without_reading_it_whole(store_url, monkeypatch, caplog):
    from pipeline.data import shards

    url = f"{store_url}/train"
    write_split(url, [4], size=8)
    shard = read_split(url).shards[0]
    monkeypatch.setattr(shards, "SMALL_FILE", 64)
    with pytest.raises(ValueError, match=r"train/manifest.json: more than 64 bytes"):
        read_split(url)
    assert read_index(shard) is None
    assert "train-000000.idx: more than 64 bytes; not a manifest or index of this project; scanning" in caplog.text
