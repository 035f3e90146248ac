"""The local shard cache (`data.cache_dir`, `data.cache_limit_gb`): where a shard is cached, and
its size limit: least recently used shards are evicted, a shard in use never.

The cache keeps its shards in a folder of its own, `<data.cache_dir>/mfm-shard-cache/` (created
private, refused when it is a link or another user's), and evicts only files named as it names
them, so `data.cache_dir=~` with a tiny limit never deletes a file of the user's. Downloads go to
an unguessable temporary name beside the shard, created exclusively (tempfile).

A reader holds a shared `flock` on the cached file for as long as it reads it, and touches its
mtime (the LRU clock). Eviction takes an exclusive, non-blocking `flock` on a candidate before
unlinking it: a shard some reader holds (any process, any worker, any rank on this machine) is
skipped. Every loader process evicts for itself after taking a shard, so no daemon is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)
GB = 10**9
FOLDER = "mfm-shard-cache"
_TMP = ".tmp-"  # downloads in progress (shards.cache_shard): counted, never evicted
# `<16 hex of the shard URL's sha256>-<shard name>`, and a download in progress `<that>.tmp-<random>`
_OURS = re.compile(r"[0-9a-f]{16}-[^/]+")
_REPORT_EVERY_S = 60.0
_last_report = [0.0]


class CacheError(RuntimeError):
    """The cache folder cannot be used safely; the message names it."""


def folder(cache_dir: str) -> str:
    """The folder the cache owns inside `cache_dir`: created private (0700), refused when it is
    a link or not a folder of this user's (it could lead eviction to other files)."""
    path = os.path.join(os.path.expanduser(cache_dir), FOLDER)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise CacheError(
            f"{path}: the shard cache's folder is a link, not a folder, or another user's; "
            "remove it or choose another data.cache_dir"
        )
    return path


def path(cache_dir: str, url: str, name: str) -> str:
    """Where the shard at `url` (plain file name `name`) is cached: one file per URL."""
    return os.path.join(folder(cache_dir), f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")


def temp_path(local: str) -> str:
    """A fresh, unguessable download name beside `local`, created exclusively, so nothing planted
    at a predictable name (a link to another file) is written through."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(local) + _TMP, dir=os.path.dirname(local))
    os.close(fd)
    return tmp


def usage(cache_dir: str) -> tuple[int, int]:
    """(bytes, shards) in the cache, downloads in progress included in the bytes."""
    total = count = 0
    for e in _entries(cache_dir):
        total += e[1]
        count += _TMP not in e[2]
    return total, count


def _entries(cache_dir: str) -> list[tuple[float, int, str]]:
    """(mtime, size, path) of every regular file the cache wrote, oldest first."""
    out = []
    with os.scandir(folder(cache_dir)) as it:
        for e in it:
            try:
                if _OURS.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    out.append((st.st_mtime, st.st_size, e.path))
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
    return sorted(out)


def evict(cache_dir: str, limit_bytes: int) -> list[str]:
    """Unlink least recently used shards that nobody holds until the cache fits `limit_bytes`;
    returns what was evicted."""
    entries = _entries(cache_dir)
    total = sum(size for _, size, _ in entries)
    evicted, freed = [], 0
    for _, size, path in entries:
        if total <= limit_bytes:
            break
        if _TMP in os.path.basename(path):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            total -= size
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # in use
            os.close(fd)
            continue
        try:
            os.unlink(path)
            evicted.append(path)
            total -= size
            freed += size
        except FileNotFoundError:
            total -= size
        finally:
            os.close(fd)  # releases the lock
    now = time.monotonic()
    if evicted or now - _last_report[0] > _REPORT_EVERY_S:
        _last_report[0] = now
        shards = sum(1 for *_, p in _entries(cache_dir) if _TMP not in p)
        level = logging.WARNING if total > limit_bytes else logging.INFO
        log.log(
            level,
            "shard cache %s: %.3f of %.3f GB in %d shards%s%s",
            cache_dir,
            total / GB,
            limit_bytes / GB,
            shards,
            f"; evicted {len(evicted)} least recently used ({freed / GB:.3f} GB)" if evicted else "",
            "; over the limit: the rest is in use" if total > limit_bytes else "",
        )
    return evicted


@contextlib.contextmanager
def held(download: Callable[[], str], cache_dir: str, limit_gb: float | None) -> Iterator[str]:
    """The cached shard's path, held against eviction for the block. `download` returns the
    path, fetching the shard when it is not cached; after taking it, the cache is trimmed."""
    for _ in range(5):
        local = download()
        try:
            fd = os.open(local, os.O_RDONLY)
        except FileNotFoundError:  # evicted between the download and the open: fetch again
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.stat(local).st_ino == os.fstat(fd).st_ino:
                break  # held: no evictor can take it now
        except FileNotFoundError:
            pass
        os.close(fd)  # unlinked before the lock: fetch again
    else:
        raise RuntimeError(
            f"{cache_dir}: a shard kept being evicted before it could be read; raise data.cache_limit_gb"
        )
    try:
        os.utime(local)  # the LRU clock
        if limit_gb is not None:
            evict(cache_dir, int(limit_gb * GB))
        yield local
    finally:
        os.close(fd)
