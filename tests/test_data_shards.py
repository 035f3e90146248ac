"""Shard reading (manifest, tar parsing, fetch with cache), and the contract writer the other
data tests use: the docs/architecture.md shard layout written directly, so that a test can
put a corrupt sample inside a shard (the real sharder rejects those) and choose shard sizes."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import SampleReader, fetch_shard, parse_shard, read_split
from pipeline.storage import join, write_bytes


def jpeg(i: int, size: int | tuple[int, int] = 32) -> bytes:
    """A small JPEG whose content encodes i (so tests can tell samples apart by pixels)."""
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_split(url: str, shard_sizes: list[int], *, size=32, corrupt: set[int] = frozenset(), split: str = "train",
                storage=None) -> list[str]:
    """Write shards of the given sample counts and the manifest (last); sample i has key
    `s{i:05d}`, class i % 10, and pixels from jpeg(i); ids in `corrupt` get garbage bytes.
    Returns the keys in manifest order."""
    keys, shards, i = [], [], 0
    for n, count in enumerate(shard_sizes):
        members = []
        for _ in range(count):
            key = f"s{i:05d}"
            data = b"\xff\xd8 definitely not a jpeg" if i in corrupt else jpeg(i, size)
            members += [(f"{key}.jpg", data), (f"{key}.cls", str(i % 10).encode()),
                        (f"{key}.json", json.dumps({"file": key, "class": i % 10}).encode())]
            keys.append(key)
            i += 1
        tar = _tar(members)
        name = f"{split}-{n:06d}.tar"
        write_bytes(join(url, name), tar, storage)
        shards.append({"name": name, "index": name.replace(".tar", ".idx"), "samples": count, "bytes": len(tar),
                       "sha256": ""})
    manifest = {"format_version": 1, "tool": "tests", "split": split, "num_samples": i, "shards": shards,
                "classes": [{"index": c, "wnid": f"n{c:08d}", "name": str(c)} for c in range(10)]}
    write_bytes(join(url, "manifest.json"), json.dumps(manifest).encode(), storage)
    return keys


def test_manifest_and_parse(tmp_path):
    url = str(tmp_path / "train")
    keys = write_split(url, [3, 2])
    split = read_split(url)
    assert split.counts == [3, 2] and split.num_samples == 5
    samples = parse_shard(fetch_shard(split.shards[1]), split.shards[1])
    assert [s["__key__"] for s in samples] == keys[3:]
    assert samples[0]["cls"] == b"3" and samples[0]["jpg"][:2] == b"\xff\xd8"
    shard, idx = split.locate(np.array([0, 2, 3, 4]))
    assert shard.tolist() == [0, 0, 1, 1] and idx.tolist() == [0, 2, 0, 1]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_split(str(tmp_path / "nothing"))
    url = str(tmp_path / "train")
    write_split(url, [3])
    split = read_split(url)
    bad = split.shards[0].__class__(split.shards[0].name, split.shards[0].url, 4, None)
    with pytest.raises(ValueError, match="train-000000.tar: holds 3 samples, the manifest says 4"):
        parse_shard(fetch_shard(bad), bad)


def test_reader_streams_any_order_and_caches(tmp_path):
    url = str(tmp_path / "train")
    keys = write_split(url, [4, 4, 4])
    cache = tmp_path / "cache"
    split = read_split(url)
    order = [9, 0, 5, 11, 1, 4, 8, 2, 10, 3, 7, 6]
    got = [(gid, s["__key__"]) for gid, s in SampleReader(split, prefetch=1, cache_dir=str(cache)).read(order)]
    assert got == [(g, keys[g]) for g in order]
    assert len(os.listdir(cache)) == 3
    # the cache is used: the source may disappear
    for s in split.shards:
        os.remove(s.url)
    again = [gid for gid, _ in SampleReader(split, prefetch=0, cache_dir=str(cache)).read(order)]
    assert again == order
