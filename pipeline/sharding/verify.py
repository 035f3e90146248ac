"""`mfm shard verify`: re-read every shard of a split against its manifest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.split_manifest import read_manifest


@dataclass(frozen=True)
class Problem:
    shard: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.message}"


def verify_split(split_url: str, storage: StorageConfig | None = None) -> list[Problem]:
    """Re-read every shard: bytes, sha256, sample count, and index against the manifest."""
    m = read_manifest(split_url, storage)
    problems = []
    for s in m["shards"]:
        url = st.join(split_url, s["name"])
        try:
            size, digest, n = st.retry(lambda: scan_shard(url, storage), what=f"read {url}")
        except FileNotFoundError:
            problems.append(Problem(url, "missing"))
            continue
        if size != s.get("bytes"):
            problems.append(Problem(url, f"size {size} != manifest {s.get('bytes')}"))
        if digest != s.get("sha256"):
            problems.append(Problem(url, f"sha256 {digest[:16]}... != manifest {str(s.get('sha256'))[:16]}..."))
        if n != s["samples"]:
            problems.append(Problem(url, f"{n} samples != manifest {s['samples']}" if n >= 0 else "not a readable tar"))
        if s.get("index") is None:
            problems.append(Problem(url, "no index in the manifest"))
            continue
        idx_url = st.join(split_url, s["index"])
        try:
            head = st.read_bytes(idx_url, storage).split(b"\n", 1)[0].split()
            if head[:1] != [b"v1.2"] or len(head) != 2 or head[1] != str(s["samples"]).encode():
                problems.append(
                    Problem(
                        idx_url, f"index header {b' '.join(head).decode(errors='replace')!r} != 'v1.2 {s['samples']}'"
                    )
                )
        except FileNotFoundError:
            problems.append(Problem(idx_url, "missing"))
    if m.get("num_samples") != sum(s["samples"] for s in m["shards"]):
        problems.append(Problem(split_url, f"num_samples {m.get('num_samples')} != the sum over its shards"))
    return problems


class _HashingReader:
    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.sha.update(b)
        self.size += len(b)
        return b


def scan_shard(url: str, storage: StorageConfig | None = None) -> tuple[int, str, int]:
    """(bytes, sha256, distinct sample keys) of a tar, streamed: shards can be larger than memory."""
    import tarfile

    fs, path = st.filesystem(url, storage)
    with fs.open(path, "rb", block_size=8 << 20) as f:
        r = _HashingReader(f)
        keys = set()
        try:
            with tarfile.open(fileobj=r, mode="r|") as tf:
                for member in tf:
                    if member.isfile():
                        keys.add(member.name.split(".", 1)[0])
            n = len(keys)
        except tarfile.TarError:
            n = -1
        while r.read(8 << 20):
            pass
    return r.size, r.sha.hexdigest(), n
