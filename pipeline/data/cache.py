"""The local shard cache's size limit (`data.cache_dir`, `data.cache_limit_gb`): least recently
used shards are evicted, a shard in use never.

A reader holds a shared `flock` on the cached file for as long as it reads it, and touches its
mtime (the LRU clock). Eviction takes an exclusive, non-blocking `flock` on a candidate before
unlinking it: a shard some reader holds (any process, any worker, any rank on this machine) is
skipped. Every loader process evicts for itself after taking a shard, so no daemon is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)
GB = 10**9
_TMP = ".tmp-"  # downloads in progress (shards.cache_shard): counted, never evicted
_REPORT_EVERY_S = 60.0
_last_report = [0.0]


def usage(cache_dir: str) -> tuple[int, int]:
    """(bytes, shards) in the cache, downloads in progress included in the bytes."""
    total = count = 0
    for e in _entries(cache_dir):
        total += e[1]
        count += _TMP not in e[2]
    return total, count


def _entries(cache_dir: str) -> list[tuple[float, int, str]]:
    """(mtime, size, path) of every regular file, oldest first."""
    out = []
    try:
        it = os.scandir(os.path.expanduser(cache_dir))
    except FileNotFoundError:
        return out
    with it:
        for e in it:
            try:
                if e.is_file(follow_symlinks=False):
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
