"""Hostile and broken input (issue 16): names from shared storage stay inside their folder,
only regular files are read, one bad file is skipped and reported, and impossible values are
refused early with an error naming the file or key."""

from __future__ import annotations

import json
import os

import pytest
from test_data_shards import write_split

from pipeline.config import StorageConfig
from pipeline.data.shards import Shard, cache_shard, read_samples, read_split
from pipeline.sharding.cli import cli as shard_cli
from pipeline.sharding.manifest import verify_split
from pipeline.storage import join, read_bytes, write_bytes

# --- 1: manifest names stay inside the split ---------------------------------------------------


def _edit_manifest(url: str, edit) -> None:
    m = json.loads(read_bytes(join(url, "manifest.json")))
    edit(m)
    write_bytes(join(url, "manifest.json"), json.dumps(m).encode())


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "../evil.tar"),
        ("name", "sub/../../evil.tar"),
        ("name", "s3://other-bucket/evil.tar"),
        ("name", "/etc/passwd"),
        ("name", ".."),
        ("name", ""),
        ("index", "../evil.idx"),
        ("index", "/tmp/evil.idx"),
    ],
)
def test_manifest_names_must_be_plain_file_names(store_url, field, value, capsys):
    url = join(store_url, "train")
    write_split(url, [3, 2])
    # the bytes an attacker points at, just outside the split: reading them must never happen
    write_split(join(store_url, "other"), [3])
    write_bytes(join(store_url, "evil.tar"), read_bytes(join(store_url, "other", "train-000000.tar")))

    def edit(m):
        m["shards"][1][field] = value

    _edit_manifest(url, edit)
    with pytest.raises(ValueError, match=rf"manifest\.json.*shards\[1\]\.{field}") as e:
        read_split(url)
    assert repr(value) in str(e.value)
    with pytest.raises(ValueError, match=rf"manifest\.json.*shards\[1\]\.{field}"):
        verify_split(url)
    assert shard_cli(["verify", url]) == 1
    out = capsys.readouterr()
    assert "OK" not in out.out and f"shards[1].{field}" in out.err


def test_cache_path_stays_inside_the_cache(tmp_path, s3_endpoint):
    """Even a Shard built by hand (not from a checked manifest) cannot write outside the cache."""
    url = "s3://mfm-test/hostile-cache/train"
    write_split(url, [2])
    good = read_split(url).shards[0]
    cache = tmp_path / "cache"
    target = tmp_path / "escaped.tar"
    evil = Shard(f"../{target.name}", good.url, good.samples, good.nbytes, None)
    with pytest.raises(ValueError, match=r"not a plain file name"):
        cache_shard(evil, StorageConfig(), str(cache))
    assert not target.exists()
    # the checked path works and lands inside the cache
    local = cache_shard(good, StorageConfig(), str(cache))
    assert os.path.dirname(local) == str(cache) and len(read_samples(good, [0, 1], cache_dir=str(cache))) == 2
