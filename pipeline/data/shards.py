"""Reading a sharded split: the manifest, whole-shard fetches with retry and an optional local
cache, tar parsing, and a reader that streams the samples of an id sequence with prefetch."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from pipeline.config import StorageConfig
from pipeline.storage import filesystem, join, retry

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Shard:
    name: str
    url: str
    samples: int
    nbytes: int | None = None


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
        """(shard index, index within the shard) of global sample ids."""
        offsets = np.concatenate([[0], np.cumsum(self.counts)])
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
            status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") if hasattr(e, "response") else None
            if mod.startswith(("botocore", "aiobotocore", "aiohttp")) and (status is None or status >= 500 or status == 429):
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
        if m.get("format_version") != 1:
            raise ValueError(f"format_version {m.get('format_version')!r} is not 1")
        shards = tuple(Shard(s["name"], join(url, s["name"]), int(s["samples"]), s.get("bytes")) for s in m["shards"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{murl}: not a valid manifest: {e}") from e
    if not shards or sum(s.samples for s in shards) == 0:
        raise ValueError(f"{murl}: the split holds no samples")
    return Split(url, shards, tuple(m.get("classes", ())))


def _cache_path(cache_dir: str, shard: Shard) -> str:
    tag = hashlib.sha256(shard.url.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(cache_dir), f"{tag}-{shard.name}")


def fetch_shard(shard: Shard, storage: StorageConfig | None = None, cache_dir: str | None = None) -> bytes:
    """A shard's bytes, read sequentially in one go. A transient error re-fetches the whole
    shard (with backoff), so a retried shard never yields a sample twice or loses one."""
    storage = storage or StorageConfig()
    if cache_dir:
        local = _cache_path(cache_dir, shard)
        if os.path.exists(local) and (shard.nbytes is None or os.path.getsize(local) == shard.nbytes):
            with open(local, "rb") as f:
                return f.read()
    fs, path = filesystem(shard.url, storage)

    def get():
        data = fs.cat_file(path)
        if shard.nbytes is not None and len(data) != shard.nbytes:
            # a cut-off body looks like success to some clients: fetch again
            raise TransientStorageError(f"{shard.url}: got {len(data)} bytes, manifest says {shard.nbytes}")
        return data

    data = retry(_transient(get), attempts=storage.retries, what=f"read {shard.url}")
    if cache_dir:
        os.makedirs(os.path.expanduser(cache_dir), exist_ok=True)
        tmp = f"{local}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)  # atomic: another worker reading the cache sees all or nothing
    return data


def parse_shard(data: bytes, shard: Shard) -> list[dict]:
    """The samples of a tar in order: {"__key__": key, "jpg": bytes, "cls": bytes, ...}.
    A sample is the group of consecutive members sharing a key (the name up to its first dot)."""
    samples: list[dict] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                prefix = member.name[: len(member.name) - len(base)] + key
                if not samples or samples[-1]["__key__"] != prefix:
                    samples.append({"__key__": prefix})
                samples[-1][ext] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise ValueError(f"{shard.url}: not a readable tar: {e}") from e
    if len(samples) != shard.samples:
        raise ValueError(f"{shard.url}: holds {len(samples)} samples, the manifest says {shard.samples}")
    return samples


class SampleReader:
    """Streams the samples of a sequence of ids, in that order.

    Shards are fetched in the order the ids first need them, `prefetch` shards ahead on a
    background thread. Only the samples the sequence asks for are kept, and each is dropped once
    handed out, so memory holds at most the in-flight shards plus the samples a shuffle window
    spreads over them.
    """

    def __init__(self, split: Split, storage: StorageConfig | None = None, *, prefetch: int = 2,
                 cache_dir: str | None = None):
        self.split, self.storage, self.prefetch, self.cache_dir = split, storage, prefetch, cache_dir

    def read(self, ids: Iterable[int]) -> Iterator[tuple[int, dict]]:
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids) == 0:
            return
        shard_of, index_of = self.split.locate(ids)
        _, first = np.unique(shard_of, return_index=True)
        sequence = [int(shard_of[i]) for i in sorted(first)]
        wanted: dict[int, set[int]] = {}
        for s, i in zip(shard_of.tolist(), index_of.tolist()):
            wanted.setdefault(s, set()).add(i)

        pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
        inflight: deque = deque()
        nxt = 0

        def top_up():
            nonlocal nxt
            while nxt < len(sequence) and len(inflight) <= self.prefetch:
                shard = self.split.shards[sequence[nxt]]
                inflight.append((sequence[nxt], pool.submit(fetch_shard, shard, self.storage, self.cache_dir)))
                nxt += 1

        pending: dict[tuple[int, int], dict] = {}
        loaded: set[int] = set()
        try:
            for gid, s, i in zip(ids.tolist(), shard_of.tolist(), index_of.tolist()):
                while s not in loaded:
                    top_up()
                    si, fut = inflight.popleft()
                    samples = parse_shard(fut.result(), self.split.shards[si])
                    for j in wanted[si]:
                        pending[(si, j)] = samples[j]
                    loaded.add(si)
                    del samples
                top_up()
                yield gid, pending.pop((s, i))
        finally:
            for _, fut in inflight:
                fut.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
