"""Reading a sharded split: the manifest, samples located through each shard's `.idx` (or, without
one, sequential tar streaming), resuming at a byte offset after transient errors, an optional
local cache, and a reader that streams the samples of an id sequence with prefetch."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.config import StorageConfig
from pipeline.data import cache
from pipeline.split_manifest import check_manifest
from pipeline.storage import filesystem, join, plain_name, retry

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Shard:
    name: str
    url: str
    samples: int
    nbytes: int | None = None
    index_url: str | None = None  # the wds2idx v1.2 file beside the tar


@dataclass(frozen=True)
class Split:
    url: str
    shards: tuple[Shard, ...]
    classes: tuple = ()

    @property
    def counts(self) -> list[int]:
        return [s.samples for s in self.shards]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, index within the shard) of global sample ids; an id past the split's
        size is a repeat draw of id % size (sampling.mixed_epoch_order)."""
        offsets = np.concatenate([[0], np.cumsum(self.counts)])
        ids = np.asarray(ids) % offsets[-1]
        shard = np.searchsorted(offsets, ids, side="right") - 1
        return shard, ids - offsets[shard]


class TransientStorageError(ConnectionError):
    """A storage error worth retrying (connection refused/reset, 5xx, throttling)."""


def _transient(fn):
    """Map botocore's own connection and 5xx errors to a ConnectionError, so that
    pipeline.storage.retry retries them like any other transient error."""

    def call():
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below, re-raised otherwise
            mod = type(e).__module__ or ""
            status = (
                getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
                if hasattr(e, "response")
                else None
            )
            if mod.startswith(("botocore", "aiobotocore", "aiohttp")) and (
                status is None or status >= 500 or status == 429
            ):
                raise TransientStorageError(f"{type(e).__name__}: {e}") from e
            raise

    return call


def read_split(url: str, storage: StorageConfig | None = None) -> Split:
    """The shards a split's manifest lists. Errors name the manifest URL."""
    storage = storage or StorageConfig()
    murl = join(url, MANIFEST)
    fs, path = filesystem(murl, storage)
    try:
        raw = retry(_transient(lambda: fs.cat_file(path)), attempts=storage.retries, what=f"read {murl}")
    except FileNotFoundError:
        raise FileNotFoundError(f"{murl}: no manifest; the split is missing or not complete") from None
    try:
        m = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"{murl}: not a valid manifest: not JSON: {e}") from None
    # the shape, and names that stay inside the split: a manifest is as untrusted as its bucket
    m = check_manifest(m, murl)
    shards = tuple(
        Shard(
            s["name"],
            join(url, s["name"]),
            s["samples"],
            s.get("bytes"),
            join(url, s["index"]) if s.get("index") is not None else None,
        )
        for s in m["shards"]
    )
    if not shards or sum(s.samples for s in shards) == 0:
        raise ValueError(f"{murl}: the split holds no samples")
    return Split(url, shards, tuple(m.get("classes", ())))


def _cache_path(cache_dir: str, shard: Shard) -> str:
    # checked again here: a Shard need not come from read_split, and this path is written to
    return cache.path(cache_dir, shard.url, plain_name(shard.name, f"{shard.url}: shard name"))


READ_BLOCK = 8 << 20  # readahead of a remote shard: few large sequential GETs
BLOCK = 512  # a tar header


def cache_shard(shard: Shard, storage: StorageConfig | None, cache_dir: str) -> str:
    """The shard's path in the local cache, downloading it (sequentially, resuming at the byte
    offset after a transient error) when it is not there yet."""
    storage = storage or StorageConfig()
    local = _cache_path(cache_dir, shard)
    if os.path.exists(local) and (shard.nbytes is None or os.path.getsize(local) == shard.nbytes):
        return local
    fs, path = filesystem(shard.url, storage)
    tmp = cache.temp_path(local)
    try:
        with open(tmp, "wb") as out:

            def attempt():
                with fs.open(path, "rb", block_size=READ_BLOCK) as f:
                    f.seek(out.tell())
                    while chunk := f.read(READ_BLOCK):
                        out.write(chunk)

            retry(_transient(attempt), attempts=storage.retries, what=f"download {shard.url}")
        size = os.path.getsize(tmp)
        if shard.nbytes is not None and size != shard.nbytes:
            raise ValueError(f"{shard.url}: {size} bytes, the manifest says {shard.nbytes}")
        os.replace(tmp, local)  # atomic: another worker reading the cache sees all or nothing
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return local


@dataclass
class _TarCursor:
    """How far a shard has been read: resuming at `offset` (a member header) continues exactly."""

    offset: int = 0
    index: int = -1  # sample index of the current key
    key: str | None = None
    samples: dict = None


def _scan(f, cur: _TarCursor, wanted: set[int]) -> None:
    start = cur.offset
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    base = member.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    prefix = member.name[: len(member.name) - len(base)] + key
                    if prefix != cur.key:
                        cur.index, cur.key = cur.index + 1, prefix
                    if cur.index in wanted:
                        data = tar.extractfile(member).read()
                        if len(data) != member.size:
                            raise TransientStorageError(f"member {member.name} cut short")
                        cur.samples.setdefault(cur.index, {"__key__": prefix})[ext] = data
                cur.offset = start + member.offset_data + -(-member.size // 512) * 512
    except (tarfile.ReadError, EOFError) as e:
        # a body cut off mid-stream reads as a damaged tar: read on from the last whole member
        raise TransientStorageError(f"tar stream ended early at byte {cur.offset}: {e}") from e


def read_index(shard: Shard, storage: StorageConfig | None = None) -> list[list[tuple[str, int, int, str]]] | None:
    """Per sample, its members as (ext, data offset, size, name) from the shard's v1.2 `.idx`;
    None when there is none or it does not describe `shard.samples` samples (then the tar is
    scanned instead)."""
    if not shard.index_url:
        return None
    storage = storage or StorageConfig()
    fs, path = filesystem(shard.index_url, storage)
    try:
        text = retry(_transient(lambda: fs.cat_file(path)), attempts=storage.retries, what=f"read {shard.index_url}")
    except FileNotFoundError:
        log.warning("%s: missing; scanning the tar instead", shard.index_url)
        return None
    lines = text.decode(errors="replace").splitlines()
    head = lines[0].split() if lines else []
    rows = []
    for line in lines[1:]:
        f = line.split()
        try:
            if not f or len(f) % 4:
                raise ValueError(line)
            row = [(f[k], int(f[k + 1]), int(f[k + 2]), f[k + 3]) for k in range(0, len(f), 4)]
        except ValueError:
            rows = None
            break
        # members in file order (across samples too), each after a header block, inside the shard:
        # anything else cannot be a wds2idx index of this tar
        members = rows[-1][-1:] + row if rows else row
        if (
            any(off < BLOCK or size < 0 for _, off, size, _ in row)
            or any(b[1] < a[1] + a[2] + BLOCK for a, b in zip(members, members[1:]))
            or (shard.nbytes is not None and row[-1][1] + row[-1][2] > shard.nbytes)
        ):
            rows = None
            break
        rows.append(row)
    if head != ["v1.2", str(shard.samples)] or rows is None or len(rows) != shard.samples:
        log.warning("%s: not a v1.2 index of %d samples; scanning the tar instead", shard.index_url, shard.samples)
        return None
    return rows


class _IndexMismatch(ValueError):
    pass


def _header(block: bytes) -> tuple[str, int | None]:
    """(name, size) from a ustar header block; size None when the field is not octal."""
    name = block[:100].split(b"\0", 1)[0].decode(errors="replace")
    prefix = block[345:500].split(b"\0", 1)[0].decode(errors="replace") if block[257:262] == b"ustar" else ""
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        size = None
    return (f"{prefix}/{name}" if prefix else name), size


def _read_indexed(f, rows, order: list[int], cur: _TarCursor, url: str) -> None:
    """Samples order[len(cur.samples):] read by offset: one read per sample spanning its members
    (and the headers between them). Every member's tar header must carry the name and size the
    index gives, and the members one key, so a stale or lying index is caught, not read as wrong
    bytes (one sample's image with another's label); a range past the end of the file is a stale
    index too, not a network error."""
    for i in order[len(cur.samples) :]:
        members = rows[i]
        start, end = members[0][1] - BLOCK, members[-1][1] + members[-1][2]
        f.seek(start)
        buf = f.read(end - start)
        if len(buf) != end - start:
            size = getattr(f, "size", None)
            if size is not None and start + len(buf) >= size:
                raise _IndexMismatch(f"{url}: the index points past the end of the file (sample {i}, byte {end})")
            raise TransientStorageError(f"{url}: sample {i} cut short at byte {start + len(buf)}")
        first = members[0][3]
        base = first.rsplit("/", 1)[-1]
        key = first[: len(first) - len(base)] + base.partition(".")[0]
        sample = {"__key__": key}
        for _, off, size, name in members:
            got, got_size = _header(buf[off - start - BLOCK : off - start])
            base = name.rsplit("/", 1)[-1]
            ext = base.partition(".")[2]
            if got != name or got_size != size or name[: len(name) - len(ext) - 1] != key or not ext:
                raise _IndexMismatch(f"{url}: the index does not match the tar at byte {off - BLOCK} ({name})")
            sample[ext] = buf[off - start : off - start + size]
        cur.samples[i] = sample


def read_samples(
    shard: Shard,
    wanted: Iterable[int],
    storage: StorageConfig | None = None,
    cache_dir: str | None = None,
    cache_limit_gb: float | None = None,
) -> dict[int, dict]:
    """The samples `wanted` (indices within the shard) as {index: {"__key__", "jpg", ...}}.

    With the shard's index, each wanted sample is one read at its offset; without one, a single
    sequential pass over the tar keeps only the wanted samples. A transient error reopens the
    shard and goes on from the next unread sample (indexed) or from the byte offset of the last
    whole member (scan), so a retry neither repeats nor loses a sample. A sample is the group of
    consecutive members sharing a key (the name up to its first dot)."""
    storage = storage or StorageConfig()
    if cache_dir:
        # held against eviction while it is read (pipeline/data/cache.py)
        with cache.held(lambda: cache_shard(shard, storage, cache_dir), cache_dir, cache_limit_gb) as local:
            return _read_samples(shard, wanted, storage, *filesystem(local))
    return _read_samples(shard, wanted, storage, *filesystem(shard.url, storage))


def _read_samples(shard: Shard, wanted: Iterable[int], storage: StorageConfig, fs, path: str) -> dict[int, dict]:
    cur = _TarCursor(samples={})
    wanted = set(wanted)
    rows = read_index(shard, storage)
    if rows is not None:
        order = sorted(wanted)

        def indexed():
            with fs.open(path, "rb", block_size=READ_BLOCK) as f:
                _read_indexed(f, rows, order, cur, shard.url)

        try:
            retry(_transient(indexed), attempts=storage.retries, what=f"read {shard.url}")
            return cur.samples
        except _IndexMismatch as e:
            log.warning("%s; scanning the tar instead", e)
            cur = _TarCursor(samples={})

    def attempt():
        with fs.open(path, "rb", block_size=READ_BLOCK) as f:
            f.seek(cur.offset)
            if cur.offset and not f.read(BLOCK).strip(b"\0"):
                return  # cut off just before the end-of-archive blocks: nothing left to read
            f.seek(cur.offset)
            _scan(f, cur, wanted)

    retry(_transient(attempt), attempts=storage.retries, what=f"read {shard.url}")
    if cur.index + 1 != shard.samples:
        raise ValueError(f"{shard.url}: holds {cur.index + 1} samples, the manifest says {shard.samples}")
    return cur.samples


class SampleReader:
    """Streams the samples of a sequence of ids, in that order.

    Shards are streamed in the order the ids first need them, `prefetch` shards ahead on a
    background thread. Only the samples the sequence asks for are kept, and each is dropped once
    handed out: memory holds the wanted samples of the in-flight shards, never a whole shard.
    """

    def __init__(
        self,
        split: Split,
        storage: StorageConfig | None = None,
        *,
        prefetch: int = 2,
        cache_dir: str | None = None,
        cache_limit_gb: float | None = None,
    ):
        self.split, self.storage, self.prefetch, self.cache_dir = split, storage, prefetch, cache_dir
        self.cache_limit_gb = cache_limit_gb

    def read(self, ids: Iterable[int]) -> Iterator[tuple[int, dict]]:
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids) == 0:
            return
        shard_of, index_of = self.split.locate(ids)
        _, first = np.unique(shard_of, return_index=True)
        sequence = [int(shard_of[i]) for i in sorted(first)]
        wanted: dict[int, set[int]] = {}
        uses: dict[tuple[int, int], int] = {}  # a sample drawn twice (an upsampled source) is kept for both
        for s, i in zip(shard_of.tolist(), index_of.tolist()):
            wanted.setdefault(s, set()).add(i)
            uses[(s, i)] = uses.get((s, i), 0) + 1

        pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
        inflight: deque = deque()
        nxt = 0

        def top_up():
            nonlocal nxt
            while nxt < len(sequence) and len(inflight) <= self.prefetch:
                shard = self.split.shards[sequence[nxt]]
                inflight.append(
                    (
                        sequence[nxt],
                        pool.submit(
                            read_samples,
                            shard,
                            wanted[sequence[nxt]],
                            self.storage,
                            self.cache_dir,
                            self.cache_limit_gb,
                        ),
                    )
                )
                nxt += 1

        pending: dict[tuple[int, int], dict] = {}
        loaded: set[int] = set()
        try:
            for gid, s, i in zip(ids.tolist(), shard_of.tolist(), index_of.tolist()):
                while s not in loaded:
                    top_up()
                    si, fut = inflight.popleft()
                    for j, sample in fut.result().items():
                        pending[(si, j)] = sample
                    loaded.add(si)
                top_up()
                uses[(s, i)] -= 1
                yield gid, pending.pop((s, i)) if uses[(s, i)] == 0 else dict(pending[(s, i)])
        finally:
            for _, fut in inflight:
                fut.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
