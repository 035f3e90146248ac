"""manifest.json: the commit record of a sharded split (docs/architecture.md, "Contract: a
sharded split"). Its schema is the contract between the writer (pipeline/sharding) and every
reader (pipeline/data, `mfm shard verify`, the registry's data lineage), so it lives beside
pipeline/storage.py, below both."""

from __future__ import annotations

import json
import re

from pipeline import storage as st
from pipeline.config import StorageConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A split's manifest (or a revision's file list) that is not what the sharder writes; the
    message names the file and the entry."""


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
        raise ManifestError(f"{url}: not a valid manifest: not JSON: {e}") from None
    return check_manifest(m, url)


def _count(v: object) -> bool:
    return type(v) is int and v >= 0  # not bool, not float


def check_manifest(m: object, url: str) -> dict:
    """`m` when it has the manifest's shape, every shard and index name is a plain file name (a
    manifest on shared storage must not point outside its split), and the revision fields are
    consistent (`next_shard` decides where the next grow writes and what it deletes); else a
    ManifestError naming the manifest and the entry."""

    def bad(what: str):
        return ManifestError(f"{url}: not a valid manifest: {what}")

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
            if not (v is None and optional) and not _count(v):
                raise bad(f"shards[{i}].{key}: expected a count, got {v!r}")
        if not isinstance(s.get("sha256", ""), str):
            raise bad(f"shards[{i}].sha256: expected a string, got {s['sha256']!r}")
    for key, kind in (("classes", list), ("rejected", list), ("options", dict), ("source", dict)):
        if key in m and not isinstance(m[key], kind):
            raise bad(f"{key}: expected a {kind.__name__}, got {type(m[key]).__name__}")
    for i, c in enumerate(m.get("classes", [])):
        if not isinstance(c, dict) or not _count(c.get("index")) or not isinstance(c.get("wnid"), str):
            raise bad(f"classes[{i}]: expected an object with an index and a wnid, got {c!r:.200}")
    if "num_samples" in m and not _count(m["num_samples"]):
        raise bad(f"num_samples: expected a count, got {m['num_samples']!r}")
    _check_revisions(m, bad)
    return m


_SHARD_NUMBER = re.compile(r".*-(\d{1,18})\.tar", re.DOTALL)  # `<split>-000012.tar` (plan.ShardPlan.name)


def _check_revisions(m: dict, bad) -> None:
    """revision, revisions and next_shard: absent (a manifest from before growing splits) or
    what the sharder writes. next_shard must be past every shard number in use, the listed
    shards' and those of earlier revisions (a rebuild's replaced shards stay for old readers),
    or the next grow would write over them and delete the rest as leftovers."""
    revision = m.get("revision")
    if "revision" in m and (not _count(revision) or revision < 1):
        raise bad(f"revision: expected a revision number (1, 2, ...), got {revision!r}")
    revs = m.get("revisions", [])
    if not isinstance(revs, list):
        raise bad(f"revisions: expected a list, got {type(revs).__name__}")
    taken = last = 0
    for i, r in enumerate(revs):
        where = f"revisions[{i}]"
        if not isinstance(r, dict):
            raise bad(f"{where}: expected an object, got {type(r).__name__}")
        n = r.get("revision")
        if not _count(n) or n <= last:
            raise bad(f"{where}.revision: expected a revision number above {last}, got {n!r}")
        for key in ("first_shard", "shards", "samples"):
            if not _count(r.get(key)):
                raise bad(f"{where}.{key}: expected a count, got {r.get(key)!r}")
        if not isinstance(r.get("rebuild", False), bool):
            raise bad(f"{where}.rebuild: expected true or false, got {r['rebuild']!r}")
        for key in ("files_sha256", "source_fingerprint"):
            if not isinstance(r.get(key, ""), str):
                raise bad(f"{where}.{key}: expected a string, got {r[key]!r}")
        last, taken = n, max(taken, r["first_shard"] + r["shards"])
    if revs and "revision" in m and revision != last:
        raise bad(f"revision: {revision}, but the last of revisions is {last}")
    if "next_shard" not in m:
        return
    for s in m["shards"]:
        found = _SHARD_NUMBER.fullmatch(s["name"])
        if found:
            taken = max(taken, int(found.group(1)) + 1)
    nxt = m["next_shard"]
    if not _count(nxt):
        raise bad(f"next_shard: expected a count, got {nxt!r}")
    if nxt < taken:
        raise bad(
            f"next_shard: {nxt}, but shard numbers up to {taken - 1} are taken (by the shards and "
            "revisions listed); the next grow would write over them"
        )


_WRITTEN = {"split": str, "num_samples": int, "classes": list, "source": dict, "options": dict, "rejected": list}


def check_written(m: dict, url: str) -> dict:
    """`m` (already through check_manifest) when it has every field the sharder writes and
    reads back to resume or grow a split; else a ManifestError naming the manifest and the field."""
    for key, kind in _WRITTEN.items():
        if not isinstance(m.get(key), kind):
            raise ManifestError(f"{url}: not a manifest written by mfm shard: {key} missing or not a {kind.__name__}")
    if not isinstance(m["source"].get("fingerprint"), str):
        raise ManifestError(f"{url}: not a manifest written by mfm shard: source.fingerprint missing")
    for i, r in enumerate(m["rejected"]):
        if not isinstance(r, dict) or not isinstance(r.get("file"), str):
            raise ManifestError(f"{url}: not a manifest written by mfm shard: rejected[{i}] has no file name")
    return m
