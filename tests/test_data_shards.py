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

import pipeline.data.shards as shards_mod
from pipeline.data.shards import SampleReader, read_samples, read_split
from pipeline.storage import filesystem, join, write_bytes


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


def _index(tar: bytes) -> bytes:
    """The wds2idx v1.2 index of a tar, from tarfile's own offsets."""
    rows: list[list[str]] = []
    key = None
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t.getmembers():
            k = m.name.partition(".")[0]
            if k != key:
                rows.append([])
                key = k
            rows[-1] += [m.name.partition(".")[2], str(m.offset_data), str(m.size), m.name]
    return (f"v1.2 {len(rows)}\n" + "".join(" ".join(r) + "\n" for r in rows)).encode()


def write_split(
    url: str,
    shard_sizes: list[int],
    *,
    size=32,
    corrupt: set[int] = frozenset(),
    split: str = "train",
    storage=None,
    index: bool = True,
) -> list[str]:
    """Write shards of the given sample counts (with their .idx unless index=False) and the
    manifest (last); sample i has key `s{i:05d}`, class i % 10, and pixels from jpeg(i); ids in
    `corrupt` get garbage bytes. Returns the keys in manifest order."""
    keys, shards, i = [], [], 0
    for n, count in enumerate(shard_sizes):
        members = []
        for _ in range(count):
            key = f"s{i:05d}"
            data = b"\xff\xd8 definitely not a jpeg" if i in corrupt else jpeg(i, size)
            members += [
                (f"{key}.jpg", data),
                (f"{key}.cls", str(i % 10).encode()),
                (f"{key}.json", json.dumps({"file": key, "class": i % 10}).encode()),
            ]
            keys.append(key)
            i += 1
        tar = _tar(members)
        name = f"{split}-{n:06d}.tar"
        write_bytes(join(url, name), tar, storage)
        if index:
            write_bytes(join(url, name.replace(".tar", ".idx")), _index(tar), storage)
        shards.append(
            {"name": name, "index": name.replace(".tar", ".idx"), "samples": count, "bytes": len(tar), "sha256": ""}
        )
    manifest = {
        "format_version": 1,
        "tool": "tests",
        "split": split,
        "num_samples": i,
        "shards": shards,
        "classes": [{"index": c, "wnid": f"n{c:08d}", "name": str(c)} for c in range(10)],
    }
    write_bytes(join(url, "manifest.json"), json.dumps(manifest).encode(), storage)
    return keys


def test_manifest_and_parse(tmp_path):
    url = str(tmp_path / "train")
    keys = write_split(url, [3, 2])
    split = read_split(url)
    assert split.counts == [3, 2] and split.num_samples == 5
    samples = read_samples(split.shards[1], [0, 1])
    assert [samples[i]["__key__"] for i in (0, 1)] == keys[3:]
    assert samples[0]["cls"] == b"3" and samples[0]["jpg"][:2] == b"\xff\xd8"
    assert list(read_samples(split.shards[0], [2])) == [2]  # only what is asked for is kept
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
        read_samples(bad, [0])


def test_reader_streams_any_order_and_caches(tmp_path, store_url):
    keys = write_split(store_url, [4, 4, 4])
    cache = tmp_path / "cache"
    split = read_split(store_url)
    order = [9, 0, 5, 11, 1, 4, 8, 2, 10, 3, 7, 6]
    got = [(gid, s["__key__"]) for gid, s in SampleReader(split, prefetch=0, cache_dir=str(cache)).read(order)]
    assert got == [(g, keys[g]) for g in order]
    if store_url.startswith("/"):
        assert not cache.exists()  # a local split is read in place, never copied
        return
    assert len(os.listdir(cache / "mfm-shard-cache")) == 3
    # the cache is used: the source may disappear
    for s in split.shards:
        fs, path = filesystem(s.url)
        fs.rm(path)
    again = [gid for gid, _ in SampleReader(split, prefetch=1, cache_dir=str(cache)).read(order)]
    assert again == order


class _Flaky:
    """A remote file that fails once with a connection reset after `after` bytes, as a dropped
    connection does mid-body; records where each open starts reading."""

    def __init__(self, f, state):
        self.f, self.state = f, state
        state["seeks"].append([])  # the seeks of this open

    def read(self, n=-1):
        if not self.state["failed"] and self.f.tell() >= self.state["after"]:
            self.state["failed"] = True
            raise ConnectionResetError("connection reset by peer")
        out = self.f.read(n)
        self.state["read"] += len(out)
        return out

    def seek(self, *a):
        self.state["seeks"][-1].append(a[0])
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _remote(monkeypatch, state):
    """shards.filesystem as a store that is not the local filesystem (read as remote), each
    open a _Flaky file."""
    real = shards_mod.filesystem

    def flaky_filesystem(u, storage=None):
        fs, path = real(u, storage)

        class FS:
            def open(self, p, mode="rb", **kw):
                return _Flaky(fs.open(p, mode), state)

            def cat_file(self, p, **kw):
                state["cat"].append(p)
                return fs.cat_file(p, **kw)

        return FS(), path

    monkeypatch.setattr(shards_mod, "filesystem", flaky_filesystem)


def test_transient_error_resumes_at_byte_offset(tmp_path, monkeypatch):
    url = str(tmp_path / "train")
    keys = write_split(url, [6])
    split = read_split(url)
    state = {"failed": False, "after": split.shards[0].nbytes // 2, "seeks": [], "read": 0, "cat": []}
    _remote(monkeypatch, state)
    monkeypatch.setattr(shards_mod, "CHUNK", 1024)
    monkeypatch.setattr(shards_mod, "retry", lambda fn, **kw: _retry_now(fn))
    got = read_samples(split.shards[0], range(6))
    assert state["failed"]
    assert [got[i]["__key__"] for i in range(6)] == keys
    assert len(state["seeks"]) == 2 and state["cat"] == []  # one failure, one reopen; no .idx read
    resumed = state["seeks"][1][0]
    assert 0 < resumed < split.shards[0].nbytes and resumed % 1024 == 0  # where the first read stopped
    assert state["read"] == split.shards[0].nbytes  # every byte read once


def test_part_of_a_shard_is_one_ranged_read_from_the_index(tmp_path, monkeypatch):
    url = str(tmp_path / "train")
    write_split(url, [7])
    plain = str(tmp_path / "plain")
    write_split(plain, [7], index=False)
    wanted = [5, 3]
    scanned = read_samples(read_split(plain).shards[0], wanted)
    assert sorted(scanned) == [3, 5]
    shard = read_split(url).shards[0]
    rows = shards_mod.read_index(shard)
    state = {"failed": True, "after": 0, "seeks": [], "read": 0, "cat": []}
    _remote(monkeypatch, state)
    assert read_samples(shard, wanted) == scanned
    start, end = rows[3][0][1] - 512, rows[6][0][1] - 512
    assert state["cat"] == [shard.index_url.split("://")[-1]] and state["seeks"] == [[start]]
    assert state["read"] == end - start  # samples 3 to 5, nothing else


def test_stale_or_broken_index_falls_back_to_the_scan(tmp_path, monkeypatch, caplog):
    url = str(tmp_path / "train")
    keys = write_split(url, [4, 4])
    split = read_split(url)
    # shard 0's index describes another tar (shard 1's offsets, shifted names); shard 1's is garbage
    idx0, idx1 = (s.url.replace(".tar", ".idx") for s in split.shards)
    with open(idx0, "w") as f:
        f.write(open(idx1).read().replace("s0000", "x0000"))
    with open(idx1, "w") as f:
        f.write("v1.2 4\nnot an index\n")
    state = {"failed": True, "after": 0, "seeks": [], "read": 0, "cat": []}
    _remote(monkeypatch, state)
    with caplog.at_level("WARNING"):
        got = [read_samples(s, range(1, 4)) for s in split.shards]
    assert [g[i]["__key__"] for g in got for i in range(1, 4)] == keys[1:4] + keys[5:8]
    assert "does not match the tar" in caplog.text and "not a v1.2 index of 4 samples" in caplog.text


def _retry_now(fn):
    for _ in range(3):
        try:
            return fn()
        except ConnectionError:
            continue
    raise AssertionError("still failing")


def test_members_not_wanted_are_skipped_without_holding_their_bytes(tmp_path, monkeypatch):
    """The parser seeks over samples it does not want: a download in memory runs on past them
    (no wait on MEMORY_AHEAD for bytes nobody reads) and keeps none of their bytes."""
    url = str(tmp_path / "train")
    keys = write_split(url, [6], size=(160, 160), index=False)
    shard = read_split(url).shards[0]
    _remote(monkeypatch, {"failed": True, "after": 0, "seeks": [], "read": 0, "cat": []})
    monkeypatch.setattr(shards_mod, "CHUNK", 512)
    monkeypatch.setattr(shards_mod, "READ_AHEAD", 512)
    monkeypatch.setattr(shards_mod, "MEMORY_AHEAD", 2048)
    held = []
    write = shards_mod._Sink.write

    def counting(self, data):
        ok = write(self, data)
        held.append(sum(len(c) for _, c in self._chunks))
        return ok

    monkeypatch.setattr(shards_mod._Sink, "write", counting)
    got = read_samples(shard, [0, 5])
    assert [got[i]["__key__"] for i in (0, 5)] == [keys[0], keys[5]]
    assert shard.nbytes > 8 * 2048  # samples 1-4, skipped, far more than the memory bound
    assert max(held) <= 2048 + 2 * 512


def test_a_download_in_memory_refuses_bytes_it_dropped():
    """A hostile tar that seeks back (after the bytes were dropped) fails as a damaged tar,
    never reads other bytes in their place."""
    sink = shards_mod._Sink()
    sink.begin(0)
    for k in range(4):
        sink.write(bytes([k]) * 100)
    sink.finish()
    assert sink.read(250, 10) == bytes([2]) * 10
    with pytest.raises(tarfile.ReadError, match="byte 50"):
        sink.read(50, 10)


@pytest.mark.parametrize("cache", [True, False])
def test_the_rest_of_a_shard_downloads_only_once_needed_through_the_cache(tmp_path, monkeypatch, cache):
    """Through the cache, the reader that began a shard downloads all of it: a reader of its rest
    that started at once would take that download's lock first and hold up the other's head."""
    url = str(tmp_path / "train")
    write_split(url, [6, 6])
    split = read_split(url)
    _remote(monkeypatch, {"failed": True, "after": 0, "seeks": [], "read": 0, "cat": []})
    events = []
    start = shards_mod._Piece.start
    monkeypatch.setattr(shards_mod._Piece, "start", lambda self: (events.append(self.shard.name), start(self)))
    reader = SampleReader(split, cache_dir=str(tmp_path / "cache") if cache else None)
    for gid, _ in reader.read([0, 1, 2, 3, 4, 5, 9, 10, 11]):  # all of shard 0, the rest of shard 1
        events.append(gid)
    rest = events.index(split.shards[1].name)
    assert events[rest - 1 : rest + 2] == [5, split.shards[1].name, 9] if cache else rest == 1


def test_a_reader_starts_the_shards_it_draws_from_and_others_only_once_needed_soon(tmp_path, monkeypatch):
    """The first samples come from 4 interleaved shards: only those download at first (more would
    share the link with bytes not needed yet); a shard needed later starts LOOKAHEAD samples ahead."""
    monkeypatch.setattr(shards_mod, "LOOKAHEAD", 20)
    url = str(tmp_path / "train")
    write_split(url, [15] * 6, size=8)
    split = read_split(url)
    _remote(monkeypatch, {"failed": True, "after": 0, "seeks": [], "read": 0, "cat": []})
    events = []
    start = shards_mod._Piece.start
    monkeypatch.setattr(shards_mod._Piece, "start", lambda self: (events.append(self.shard.name), start(self)))
    first4 = [s * 15 + i for i in range(15) for s in range(4)]  # shards 0-3 interleaved: 60 samples
    order = first4 + list(range(60, 90))  # then shards 4 and 5
    for t, (gid, _) in enumerate(SampleReader(split).read(order)):
        assert gid == order[t]
        events.append(t)
    names = [s.name for s in split.shards]
    assert events[:5] == [*names[:4], 0]  # four downloads, then the first sample
    assert events.index(names[4]) - 4 == 60 - 20  # before output 40: needed at 60, 20 ahead
    assert events.index(names[5]) - 5 == 75 - 20
