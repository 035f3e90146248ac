"""A verified local cache of registry versions, so a restarted service or ten workers on one host
fetch a version once: `$MFM_CACHE` (default `~/.cache/mfm`).

```
<cache>/<registry key>/REGISTRY                              the registry URL (for `mfm cache list`)
<cache>/<registry key>/<name>/v<N>/<manifest sha256>/        one verified version: its files,
                                                             manifest.json, .fingerprints.json, .used
<cache>/<registry key>/<name>/v<N>.lock                      file lock: one process checks/fills at a time
```
An entry is filled in a temporary folder beside it and renamed into place once every file matched
the manifest, so a partial entry is never visible. At each use every file's size, mtime and inode
are compared with those recorded at fill time (cheap); a file that changed is hashed again, and
refetched with a warning if it no longer matches. `MFM_OFFLINE=1` serves pinned `NAME@vN` from the
cache without touching the store, and refuses aliases (only the store knows where they point).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.registry.refs import (
    MANIFEST,
    SHA256_RE,
    VERSION_RE,
    IntegrityError,
    Ref,
    RegistryError,
    check_manifest,
    parse_json,
    parse_ref,
)
from pipeline.storage import cache_root

log = logging.getLogger(__name__)
FINGERPRINTS, USED, REGISTRY_FILE = ".fingerprints.json", ".used", "REGISTRY"
BLOCK = 8 << 20  # bytes per read of a download


def is_offline() -> bool:
    return os.environ.get("MFM_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def canonical_url(url: str) -> str:
    """A local registry is keyed by its absolute path: `demo-out/registry` differs per working dir."""
    if storage.is_local(url):
        return os.path.abspath(url.removeprefix("file://"))
    return url.rstrip("/")


def registry_key(url: str) -> str:
    """A readable, collision-free folder name for a registry URL."""
    url = canonical_url(url)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", url).strip("-.")[-60:]
    return f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def version_dir(root: Path, url: str, name: str, version: int) -> Path:
    return root / registry_key(url) / name / f"v{version}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _write_fingerprints(entry: Path, files: dict) -> None:
    tmp = entry / f"{FINGERPRINTS}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({f: _fingerprint(entry / f) for f in files}))
    os.replace(tmp, entry / FINGERPRINTS)


def changed_files(entry: Path, manifest: dict) -> list[str]:
    """The files of a cache entry that no longer match the manifest (stat first, sha256 if the stat changed)."""
    try:
        recorded = json.loads((entry / FINGERPRINTS).read_text())
    except (OSError, ValueError):
        recorded = {}
    bad, rehashed = [], False
    for fname, expected in manifest["files"].items():
        path = entry / fname
        try:
            if recorded.get(fname) == _fingerprint(path):
                continue
            ok = path.stat().st_size == expected["size"] and _sha256_file(path) == expected["sha256"]
        except OSError:
            ok = False
        if ok:
            rehashed = True  # touched or copied but intact: remember the new stat
        else:
            bad.append(fname)
    if rehashed and not bad:
        _write_fingerprints(entry, manifest["files"])
    return bad


def _clear_leftovers(vdir: Path) -> None:
    """Temporary folders of fills/prunes killed midway (called with the lock held, so none is live)."""
    for p in vdir.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in vdir.glob(".trash-*"):
        shutil.rmtree(p, ignore_errors=True)


def _remove(entry: Path) -> None:
    trash = entry.with_name(f".trash-{uuid.uuid4().hex[:8]}")
    os.rename(entry, trash)  # out of sight at once, then deleted
    shutil.rmtree(trash, ignore_errors=True)


def fetch_verified(url: str, out: Path, expected: dict, what: str, storage_cfg: StorageConfig | None = None) -> None:
    """Stream `url` to `out` through a temporary name, renamed only once size and sha256 match.
    Reading stops one byte past the declared size: a manifest understating a file cannot fill the disk."""
    fs, path = storage.filesystem(url, storage_cfg)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    limit = expected["size"] + 1

    def fetch():
        digest, size = hashlib.sha256(), 0
        with fs.open(path, "rb", block_size=min(BLOCK, limit)) as src, open(tmp, "wb") as dst:
            while size < limit and (chunk := src.read(min(BLOCK, limit - size))):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        return digest.hexdigest(), size

    try:
        try:
            sha, size = storage.retry(fetch, what=f"download {url}")
        except FileNotFoundError:
            raise IntegrityError(f"{what}: file is missing from the registry ({url})") from None
        if size != expected["size"] or sha != expected["sha256"]:
            got = f"more than {expected['size']} bytes" if size == limit else f"sha256 {sha} size {size}"
            raise IntegrityError(
                f"{what}: checksum mismatch ({url}): expected sha256 {expected['sha256']} "
                f"size {expected['size']}, got {got}; refusing to use it"
            )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _lock(vdir: Path) -> FileLock:
    vdir.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(vdir) + ".lock")


def cached_version(reg, ref: str | Ref, root: Path | None = None) -> tuple[Ref, Path]:
    """(name@vN, local folder of its verified files): from the cache, filled first if needed."""
    with open_version(reg, ref, root) as got:
        return got


@contextlib.contextmanager
def open_version(reg, ref: str | Ref, root: Path | None = None) -> Iterator[tuple[Ref, Path]]:
    """`cached_version` with the entry's lock held until the block ends: read its files there, and
    no other process replaces or prunes them meanwhile."""
    root = root or cache_root()
    if is_offline():
        target = _pinned(ref)
        vdir = version_dir(root, reg.url, target.name, target.version)
        with _lock(vdir):
            yield target, _offline_entry(reg.url, target, vdir, root)
        return
    target, manifest, raw = reg.read_manifest(ref)  # an alias is resolved against the store each time
    vdir = version_dir(root, reg.url, target.name, target.version)
    entry = vdir / hashlib.sha256(raw).hexdigest()
    with _lock(vdir):
        _ensure(reg, target, manifest, raw, entry)
        yield target, entry


def _ensure(reg, target: Ref, manifest: dict, raw: bytes, entry: Path) -> None:
    if entry.is_dir():
        bad = changed_files(entry, manifest)
        if not bad:
            (entry / USED).touch()
            return
        log.warning(
            "%s: cached %s in %s no longer match(es) the manifest; fetching the version again",
            target,
            ", ".join(bad),
            entry,
        )
        _remove(entry)
    _clear_leftovers(entry.parent)
    _fill(reg, target, manifest, raw, entry)


# A file's name in the cache, with the temporary prefix and suffix of a download, must fit the
# 255 bytes file systems allow; a longer one in a manifest is refused before anything is fetched.
MAX_NAME_BYTES = 200


def _fill(reg, target: Ref, manifest: dict, raw: bytes, entry: Path) -> None:
    long = [f for f in manifest["files"] if len(os.fsencode(f)) > MAX_NAME_BYTES]
    if long:
        raise RegistryError(f"{target}: the manifest lists a file name over {MAX_NAME_BYTES} bytes: {long[0][:60]!r}")
    tmp = entry.with_name(f".tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        t0, vurl = time.perf_counter(), reg.version_url(target.name, target.version)
        for fname, expected in sorted(manifest["files"].items()):
            fetch_verified(storage.join(vurl, fname), tmp / fname, expected, f"{target}: {fname}", reg.storage)
        (tmp / MANIFEST).write_bytes(raw)
        _write_fingerprints(tmp, manifest["files"])
        (tmp / USED).touch()
        os.rename(tmp, entry)  # the entry appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    registry_file = entry.parents[2] / REGISTRY_FILE
    if not registry_file.exists():
        registry_file.write_text(canonical_url(reg.url) + "\n")
    size = sum(f["size"] for f in manifest["files"].values())
    log.info("fetched %s into the cache %s (%.1f MB, %.1fs)", target, entry, size / 1e6, time.perf_counter() - t0)


def _pinned(ref: str | Ref) -> Ref:
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if ref.version is None:
        raise RegistryError(
            f"{ref}: MFM_OFFLINE=1 loads pinned versions only; an alias can only be resolved by the "
            f"registry. Use NAME@vN (`mfm cache list` shows the cached ones)"
        )
    return ref


def _offline_entry(url: str, ref: Ref, vdir: Path, root: Path) -> Path:
    """The cached entry of a pinned version, checked, without the store (called with the lock held)."""
    entries = [d for d in vdir.iterdir() if SHA256_RE.fullmatch(d.name)] if vdir.is_dir() else []
    if not entries:
        raise RegistryError(
            f"{ref}: not in the cache {root} for registry {canonical_url(url)}, and MFM_OFFLINE=1 forbids fetching it"
        )
    entry = max(entries, key=lambda d: _mtime(d / USED))
    raw = (entry / MANIFEST).read_bytes()
    if hashlib.sha256(raw).hexdigest() != entry.name:
        raise IntegrityError(f"{entry / MANIFEST}: does not match its cache key; delete {entry}")
    manifest = check_manifest(parse_json(raw, str(entry / MANIFEST)), str(entry / MANIFEST))
    bad = changed_files(entry, manifest)
    if bad:
        raise IntegrityError(
            f"{ref}: cached {', '.join(bad)} in {entry} no longer match(es) the manifest, and "
            f"MFM_OFFLINE=1 forbids fetching it again"
        )
    (entry / USED).touch()
    return entry


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ---------------------------------------------------------------------------- listing and pruning


@dataclasses.dataclass(frozen=True)
class Entry:
    registry: str
    name: str
    version: int
    manifest_sha256: str
    path: Path
    size: int
    last_used: float


def entries(root: Path | None = None) -> Iterator[Entry]:
    root = root or cache_root()
    if not root.is_dir():
        return
    for reg_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            url = (reg_dir / REGISTRY_FILE).read_text().strip()
        except OSError:
            url = reg_dir.name
        for name_dir in sorted(p for p in reg_dir.iterdir() if p.is_dir()):
            for vdir in sorted(p for p in name_dir.iterdir() if p.is_dir() and VERSION_RE.fullmatch(p.name)):
                for entry in sorted(p for p in vdir.iterdir() if SHA256_RE.fullmatch(p.name)):
                    size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                    yield Entry(url, name_dir.name, int(vdir.name[1:]), entry.name, entry, size, _mtime(entry / USED))


def prune(keep: int, root: Path | None = None) -> list[Entry]:
    """Keep the `keep` most recently used versions of each (registry, name); remove the rest."""
    if keep < 0:
        raise RegistryError(f"cache prune: --keep must be >= 0, got {keep}")
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in entries(root):
        groups.setdefault((e.registry, e.name), []).append(e)
    removed = []
    for group in groups.values():
        for e in sorted(group, key=lambda e: e.last_used, reverse=True)[keep:]:
            with _lock(e.path.parent):
                if e.path.is_dir():
                    _remove(e.path)
                    removed.append(e)
    return removed
