"""Sources on object storage: an ImageFolder tree `s3://bucket/prefix/<split>/<class>/<image>`,
so that a cluster's workers read the images themselves instead of needing a shared volume.

One recursive listing per split, with the same rules as a local tree (sources.py): class
folders are the union over all splits, hidden names and non-image extensions are skipped or
rejected, and a name that could step outside its folder (`..`, `.`, an empty part) is rejected,
never read. The archives (ILSVRC2012 tars) are read from local paths only.

Reading: `read_entries` yields each entry's bytes in order, local or remote; remote objects
are fetched a window at a time, concurrently (one GET each), so latency is paid once per window.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.sharding.sources import (
    CONTROL,
    IMAGE_EXTS,
    Entry,
    Listing,
    SourceError,
    assign_keys,
    available_splits,
    class_table,
    fingerprint,
    list_split,
    plain,
    read_entry,
)

WINDOW = 32  # objects fetched at once by a worker
_MISSING = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def source_splits(source: str, cfg: StorageConfig | None = None) -> list[str]:
    """The splits of a local or remote source."""
    return available_splits(source) if st.is_local(source) else _remote_splits(source, cfg)


def source_listing(source: str, split: str, cfg: StorageConfig | None = None) -> Listing:
    """One split of a local or remote source, listed."""
    return list_split(source, split) if st.is_local(source) else _list_remote(source, split, cfg)


def _children(fs, path: str) -> list[str]:
    """Names of the folders directly under `path` (an object store lists common prefixes)."""
    try:
        found = st.retry(lambda: fs.ls(path, detail=True), what=f"list {path}")
    except FileNotFoundError:
        return []
    names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in found if e.get("type") == "directory"]
    return sorted(n for n in names if n and not n.startswith(".") and n not in ("..",))


def _split_classes(fs, root: str) -> dict[str, list[str]]:
    """split -> its class folders, for the splits that have any."""
    found = {s: _children(fs, f"{root}/{s}") for s in _children(fs, root)}
    return {s: classes for s, classes in found.items() if classes}


def _remote_splits(source: str, cfg) -> list[str]:
    fs, path = st.filesystem(source, cfg)
    return list(_split_classes(fs, path))


def _list_remote(source: str, split: str, cfg) -> Listing:
    fs, root = st.filesystem(source, cfg)
    splits = _split_classes(fs, root)
    if split not in splits:
        raise SourceError(
            f"{st.join(source, split)}: split {split!r} not found (have: {', '.join(splits) or 'none'}); "
            "a source on object storage is an ImageFolder tree <split>/<class>/<image>"
        )
    base = f"{root}/{split}"
    wnids = {c for classes in splits.values() for c in classes}
    found = st.retry(lambda: fs.find(base, detail=True), what=f"list {st.join(source, split)}")
    entries, rejected = [], []
    for path in sorted(found):
        info = found[path]
        rel = path[len(base) + 1 :] if path.startswith(base + "/") else ""
        parts = rel.split("/")
        if not rel or info.get("type") != "file" or len(parts) < 2:
            continue  # folder markers, and files beside the class folders (ignored, as locally)
        if any(p in ("", ".", "..") for p in parts):
            rejected.append({"file": rel, "reason": "a name with an empty, '.' or '..' part; not read"})
            continue
        if any(p.startswith(".") for p in parts):
            continue
        if not plain(rel):
            rejected.append({"file": rel, "reason": CONTROL})
            continue
        ext = os.path.splitext(parts[-1])[1].lower()
        if ext not in IMAGE_EXTS:
            rejected.append({"file": rel, "reason": "not an image file extension"})
            continue
        entries.append(Entry("", rel, parts[0], int(info.get("size") or 0), st.join(source, split, rel)))
    listing = Listing("folder", source, split, assign_keys(entries), class_table(wnids), rejected=rejected)
    listing.fingerprint = fingerprint(listing.entries)
    return listing


def read_entries(entries: Sequence[Entry], cfg: StorageConfig | None = None) -> Iterator[tuple[Entry, bytes | OSError]]:
    """(entry, its bytes or the OSError that kept it from being read), in order."""
    handles: dict = {}
    try:
        for i in range(0, len(entries), WINDOW):
            window = entries[i : i + WINDOW]
            remote = {e.path: e for e in window if "://" in e.path}
            fetched = _fetch(list(remote), cfg) if remote else {}
            for e in window:
                if e.path in fetched:
                    yield e, fetched[e.path]
                    continue
                try:
                    yield e, read_entry(e, handles)
                except OSError as err:
                    yield e, err
    finally:
        for f in handles.values():
            f.close()


def _fetch(urls: list[str], cfg) -> dict[str, bytes | OSError]:
    fs, _ = st.filesystem(urls[0], cfg)
    paths = {st.filesystem(u, cfg)[1]: u for u in urls}
    got = fs.cat(list(paths), on_error="return")
    out: dict[str, bytes | OSError] = {}
    for path, url in paths.items():
        data = got.get(path, FileNotFoundError(url))
        if isinstance(data, Exception) and not isinstance(data, _MISSING):
            try:  # a transient error: this object alone, with the usual retries
                data = st.retry(lambda p=path: fs.cat_file(p), what=f"read {url}")
            except Exception as e:  # noqa: BLE001 - reported with the sample, never the end of the shard
                data = e
        out[url] = data if isinstance(data, bytes | OSError) else OSError(f"{url}: {data}")
    return out
