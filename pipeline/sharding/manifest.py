"""manifest.json: the commit record of a sharded split (docs/architecture.md), and `verify`."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline import storage as st
from pipeline.config import StorageConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return f"mfm-pipeline {version('mfm-pipeline')}"
    except Exception:  # running from a checkout that was never installed
        return "mfm-pipeline 0.1.0"


def build_manifest(split: str, results: list, classes: list[dict], source: dict, options: dict, rejected: list[dict]) -> dict:
    """Pure: the manifest dict from the shard results, in shard order."""
    shards = [{"name": r.name, "index": r.index, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256} for r in results]
    return {
        "format_version": FORMAT_VERSION,
        "tool": tool_version(),
        "split": split,
        "num_samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "classes": classes,
        "source": source,
        "options": options,
        "rejected": sorted(rejected, key=lambda r: r["file"]),
    }


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode()


def read_manifest(split_url: str, storage: StorageConfig | None = None) -> dict:
    """The manifest of a complete split; FileNotFoundError names the URL when it is absent."""
    url = st.join(split_url, MANIFEST)
    try:
        m = json.loads(st.read_bytes(url, storage))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no manifest: {split_url} is not a complete sharded split") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{url}: format_version={m.get('format_version')!r}, this tool reads {FORMAT_VERSION}")
    return m


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
    total = 0
    for s in m["shards"]:
        url = st.join(split_url, s["name"])
        try:
            data = st.read_bytes(url, storage)
        except FileNotFoundError:
            problems.append(Problem(url, "missing"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != s["bytes"]:
            problems.append(Problem(url, f"size {len(data)} != manifest {s['bytes']}"))
        if digest != s["sha256"]:
            problems.append(Problem(url, f"sha256 {digest[:16]}... != manifest {s['sha256'][:16]}..."))
        n = count_samples(data)
        total += n
        if n != s["samples"]:
            problems.append(Problem(url, f"{n} samples != manifest {s['samples']}"))
        idx_url = st.join(split_url, s["index"])
        try:
            head = st.read_bytes(idx_url, storage).split(b"\n", 1)[0].split()
            if head[:1] != [b"v1.2"] or int(head[1]) != s["samples"]:
                problems.append(Problem(idx_url, f"index header {b' '.join(head).decode()!r} != v1.2 {s['samples']}"))
        except FileNotFoundError:
            problems.append(Problem(idx_url, "missing"))
    if total != m["num_samples"] and not problems:
        problems.append(Problem(split_url, f"{total} samples != manifest num_samples {m['num_samples']}"))
    return problems


def count_samples(tar_bytes: bytes) -> int:
    """Distinct sample keys in a tar (a key is the member name up to its first dot)."""
    import io
    import tarfile

    keys = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    keys.add(m.name.split(".", 1)[0])
    except tarfile.TarError:
        return -1
    return len(keys)
