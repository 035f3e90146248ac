"""manifest.json: the commit record of a sharded split (docs/architecture.md, "Contract: a
sharded split"). Its schema is the contract between the writer (pipeline/sharding) and every
reader (pipeline/data, `mfm shard verify`, the registry's data lineage), so it lives beside
pipeline/storage.py, below both."""

from __future__ import annotations

import json

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


def build_manifest(
    split: str,
    results: list,
    classes: list[dict],
    source: dict,
    options: dict,
    rejected: list[dict],
    *,
    earlier: list[dict] = (),
    revisions: list[dict] = (),
    next_shard: int | None = None,
) -> dict:
    """Pure: the manifest dict: `earlier` shard entries (a growing split's older revisions),
    then the new shard results, in shard order."""
    shards = [*earlier] + [
        {"name": r.name, "index": r.index, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256} for r in results
    ]
    unique = {r["file"]: r for r in rejected}
    return {
        "format_version": FORMAT_VERSION,
        "tool": tool_version(),
        "split": split,
        "revision": revisions[-1]["revision"] if revisions else 1,
        "num_samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "classes": classes,
        "source": source,
        "options": options,
        "rejected": sorted(unique.values(), key=lambda r: r["file"]),
        "revisions": list(revisions),
        "next_shard": len(shards) if next_shard is None else next_shard,
    }


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode()


def read_manifest(split_url: str, storage: StorageConfig | None = None) -> dict:
    """The manifest of a complete split; FileNotFoundError names the URL when it is absent."""
    url = st.join(split_url, MANIFEST)
    try:
        raw = st.read_bytes(url, storage)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no manifest: {split_url} is not a complete sharded split") from None
    return parse_manifest(raw, url)


def parse_manifest(raw: bytes, url: str) -> dict:
    try:
        m = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"{url}: not a valid manifest: not JSON: {e}") from None
    return check_manifest(m, url)


def check_manifest(m: object, url: str) -> dict:
    """`m` when it has the manifest's shape, and every shard and index name is a plain file name
    (a manifest on shared storage must not point outside its split); else a ValueError naming the
    manifest and the entry."""

    def bad(what: str):
        return ValueError(f"{url}: not a valid manifest: {what}")

    if not isinstance(m, dict):
        raise bad(f"expected a JSON object, got {type(m).__name__}")
    if m.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version={m.get('format_version')!r}, this tool reads {FORMAT_VERSION}")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad(f"shards: expected a list, got {type(shards).__name__}")
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise bad(f"shards[{i}]: expected an object, got {type(s).__name__}")
        try:
            st.plain_name(s.get("name"), f"shards[{i}].name")
            if s.get("index") is not None:
                st.plain_name(s["index"], f"shards[{i}].index")
        except ValueError as e:
            raise bad(str(e)) from None
        for key, optional in (("samples", False), ("bytes", True)):
            v = s.get(key)
            if not (v is None and optional) and (type(v) is not int or v < 0):
                raise bad(f"shards[{i}].{key}: expected a count, got {v!r}")
        if not isinstance(s.get("sha256", ""), str):
            raise bad(f"shards[{i}].sha256: expected a string, got {s['sha256']!r}")
    for key, kind in (("classes", list), ("rejected", list), ("options", dict), ("source", dict)):
        if key in m and not isinstance(m[key], kind):
            raise bad(f"{key}: expected a {kind.__name__}, got {type(m[key]).__name__}")
    if not all(isinstance(c, dict) for c in m.get("classes", [])):
        raise bad("classes: expected a list of objects")
    if "num_samples" in m and type(m["num_samples"]) is not int:
        raise bad(f"num_samples: expected a count, got {m['num_samples']!r}")
    return m


_WRITTEN = {"split": str, "num_samples": int, "classes": list, "source": dict, "options": dict, "rejected": list}


def check_written(m: dict, url: str) -> dict:
    """`m` (already through check_manifest) when it has every field the sharder writes and
    reads back to resume or grow a split; else a ValueError naming the manifest and the field."""
    for key, kind in _WRITTEN.items():
        if not isinstance(m.get(key), kind):
            raise ValueError(f"{url}: not a manifest written by mfm shard: {key} missing or not a {kind.__name__}")
    if not isinstance(m["source"].get("fingerprint"), str):
        raise ValueError(f"{url}: not a manifest written by mfm shard: source.fingerprint missing")
    return m
