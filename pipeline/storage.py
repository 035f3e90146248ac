"""Any fsspec URL as a filesystem: a local folder by default, s3://bucket/prefix in production.

Writes are atomic: a reader never sees half a file. Locally a file is written under a
temporary name and renamed; on S3 a PUT (or a completed multipart upload) is atomic by itself.
Credentials are never passed through here: boto reads the usual AWS environment.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


def filesystem(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL or plain path."""
    storage = storage or StorageConfig()
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options: dict = {}
    if protocol in ("s3", "s3a"):
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options = {
            "anon": storage.anon,
            "use_listings_cache": False,  # other processes write here too: never trust a cached listing
            "client_kwargs": {},
            "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"}},
        }
        if endpoint:
            options["endpoint_url"] = endpoint
            if endpoint.lower().startswith("http://"):
                # no TLS to verify: spares each process (each loader worker too) the CA bundle's
                # load, ~20 ms before its first request
                options["client_kwargs"]["verify"] = False
        if storage.region:
            options["client_kwargs"]["region_name"] = storage.region
        options["session"] = _s3_session()
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


@functools.cache
def _s3_session():
    """One botocore session for the process and the loader workers it forks: a client made from
    it in a fresh worker finds S3's service model already loaded (measured: 0.9-1.4 s less
    before a forked worker's first request on the loaded 2-core machine)."""
    import aiobotocore.session

    return aiobotocore.session.AioSession()


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


TRANSIENT = (ConnectionError, TimeoutError, OSError)
try:  # botocore's connection errors (endpoint down, timeouts) do not derive from OSError
    from botocore.exceptions import ConnectionError as _BotoConnectionError
    from botocore.exceptions import HTTPClientError as _BotoHTTPClientError

    TRANSIENT = (*TRANSIENT, _BotoConnectionError, _BotoHTTPClientError)
except ImportError:  # no S3 support installed: nothing else to retry
    pass


def retry(fn: Callable[[], T], *, attempts: int = 5, what: str = "storage call", base_delay: float = 0.5) -> T:
    """Run fn, retrying transient storage errors with exponential backoff.

    FileNotFoundError and PermissionError are not transient and are raised at once.
    """
    for attempt in range(attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except TRANSIENT as e:
            if attempt == attempts:
                raise
            delay = base_delay * 2**attempt
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e, attempt + 1, attempts, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _local_atomic(path: str, mode: str) -> Iterator:
    """Write under a temporary name, fsync, then rename over `path` (atomic on POSIX)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(url: str, storage: StorageConfig | None = None, mode: str = "wb") -> Iterator:
    """Open for writing; the file appears under `url` only if the block completes."""
    fs, path = filesystem(url, storage)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
        with _local_atomic(path, mode) as f:
            yield f
    else:
        # An S3 object becomes visible only when its upload is committed; on error it is discarded.
        f = fs.open(path, mode, autocommit=False)
        try:
            yield f
        except BaseException:
            f.discard()
            raise
        f.close()
        f.commit()


def write_bytes(url: str, data: bytes, storage: StorageConfig | None = None) -> None:
    def put():
        with atomic_open(url, storage) as f:
            f.write(data)

    retry(put, attempts=(storage or StorageConfig()).retries, what=f"write {url}")


def read_bytes(url: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(url, storage)
    return retry(lambda: fs.cat_file(path), attempts=(storage or StorageConfig()).retries, what=f"read {url}")


def exists(url: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem(url, storage)
    return retry(lambda: fs.exists(path), attempts=(storage or StorageConfig()).retries, what=f"stat {url}")


# --- Conditional writes: the building blocks of race-free registries --------------------------
# Two operations, each atomic against every other writer of the same URL (threads, processes,
# machines): create-if-absent, and compare-and-swap against a token returned by a read.
# S3 does both natively (PutObject with If-None-Match: * / If-Match: <etag>); a local
# filesystem creates with link(2), which fails if the name exists, and swaps under an flock(2)
# held on a side file. Other stores are refused rather than silently racing.


class ConditionalWriteUnsupported(RuntimeError):
    """The store cannot write conditionally, so concurrent writers could overwrite each other."""


def _s3_conflict_code(e: BaseException) -> str | None:
    """The S3 error code behind an exception (s3fs wraps botocore's ClientError)."""
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
    return None


def _s3_put_conditional(fs, path: str, data: bytes, **condition) -> bool:
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except Exception as e:  # noqa: BLE001 - classified below, re-raised if not a lost race
        code = _s3_conflict_code(e)
        if code in ("PreconditionFailed", "412"):
            return False
        if code in ("NoSuchKey", "404") and "IfMatch" in condition:
            return False  # deleted since it was read: the token is stale
        if code in ("ConditionalRequestConflict", "409"):
            # AWS: another conditional write to the key is in flight; the caller's retry decides.
            raise ConnectionError(f"conditional write conflict on {path}; retrying") from e
        raise
    fs.invalidate_cache(path)
    return True


def _local_create(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails with EEXIST if the name exists: the exclusive create
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def create_bytes(url: str, data: bytes, storage: StorageConfig | None = None) -> bool:
    """Write `data` at `url` only if nothing is there; True if this call created it.

    The file appears complete or not at all. Safe against any number of concurrent writers."""
    fs, path = filesystem(url, storage)
    attempts = (storage or StorageConfig()).retries
    if isinstance(fs, LocalFileSystem):
        return retry(lambda: _local_create(path, data), attempts=attempts, what=f"create {url}")
    if _is_s3(fs):
        return retry(
            lambda: _s3_put_conditional(fs, path, data, IfNoneMatch="*"), attempts=attempts, what=f"create {url}"
        )
    raise ConditionalWriteUnsupported(f"{url}: {type(fs).__name__} has no create-if-absent write")


def _is_s3(fs) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def _local_token(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def read_versioned(url: str, storage: StorageConfig | None = None) -> tuple[bytes, str] | None:
    """(content, token) for `url`, or None if absent; pass the token to `replace_bytes_if`."""
    fs, path = filesystem(url, storage)
    attempts = (storage or StorageConfig()).retries
    if isinstance(fs, LocalFileSystem):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _local_token(data)
    if not _is_s3(fs):
        raise ConditionalWriteUnsupported(f"{url}: {type(fs).__name__} has no compare-and-swap write")

    def read():
        # The ETag is taken before the body: if the object changes in between, the content is
        # newer than the token and the later If-Match write fails, so the caller re-reads.
        try:
            etag = fs.info(path)["ETag"]
            return fs.cat_file(path), etag
        except FileNotFoundError:
            return None

    return retry(read, attempts=attempts, what=f"read {url}")


def replace_bytes_if(url: str, data: bytes, token: str | None, storage: StorageConfig | None = None) -> bool:
    """Compare-and-swap: write `data` only if `url` still holds what `read_versioned` returned
    with `token` (None: only if it is still absent). True if written; False if someone else
    changed it first (re-read and decide again)."""
    if token is None:
        return create_bytes(url, data, storage)
    fs, path = filesystem(url, storage)
    attempts = (storage or StorageConfig()).retries
    if isinstance(fs, LocalFileSystem):
        return retry(lambda: _local_swap(path, data, token), attempts=attempts, what=f"swap {url}")
    if _is_s3(fs):
        return retry(lambda: _s3_put_conditional(fs, path, data, IfMatch=token), attempts=attempts, what=f"swap {url}")
    raise ConditionalWriteUnsupported(f"{url}: {type(fs).__name__} has no compare-and-swap write")


def _local_swap(path: str, data: bytes, token: str) -> bool:
    import fcntl

    # The lock lives on a side file because the data file is replaced (a new inode) on each
    # write; flock is released by the kernel if the holder dies, so a crash leaves no stale lock.
    lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                current = f.read()
        except FileNotFoundError:
            return False
        if _local_token(current) != token:
            return False
        with _local_atomic(path, "wb") as f:
            f.write(data)
        return True


# --- Names read from shared storage ------------------------------------------------------------
# A manifest, an index or a listing is written by whoever can write the bucket: a name taken from
# one is joined under its folder only when it cannot leave it.


def cache_root() -> Path:
    """This machine's cache of the project (`$MFM_CACHE`, default ~/.cache/mfm): verified registry
    versions, and the shard cache's default folder."""
    return Path(os.environ.get("MFM_CACHE") or "~/.cache/mfm").expanduser()


def plain_name(name: object, where: str) -> str:
    """`name` when it is a plain file name (no `/`, `\\`, `:`, control characters, not `.` or
    `..`); else a ValueError naming `where` (the file and entry the name came from)."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\:"):
        raise ValueError(f"{where}: {name!r} is not a plain file name")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"{where}: {name!r} is not a plain file name (control characters)")
    return name


# --- Bounded reads of untrusted files ----------------------------------------------------------
# A name another party chose may be a FIFO (a read never returns), a device or a link to one
# (/dev/zero: a read never ends), or a link to a secret of this machine. These read a regular
# file only, and at most `max_bytes`.


class UnsafeFile(OSError):
    """Not read: not a regular file, a link where none may be, or larger than allowed."""


def _read_fd(fd: int, url: str, max_bytes: int) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{url}: not a regular file")
    if st.st_size > max_bytes:
        raise UnsafeFile(f"{url}: {st.st_size} bytes, more than the {max_bytes} allowed")
    chunks, size = [], 0
    while size <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size))):
        chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:  # it grew since the fstat
        raise UnsafeFile(f"{url}: more than the {max_bytes} bytes allowed")
    return b"".join(chunks)


_OPEN = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # O_NONBLOCK: opening a FIFO does not wait


def read_capped(url: str, storage: StorageConfig | None = None, *, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes (links the caller named are followed),
    or UnsafeFile / FileNotFoundError naming it."""
    fs, path = filesystem(url, storage)
    if isinstance(fs, LocalFileSystem):
        fd = os.open(path, _OPEN)
        try:
            return _read_fd(fd, url, max_bytes)
        finally:
            os.close(fd)
    return _read_remote(fs, path, url, storage, max_bytes)


def read_inside(root: str, rel: str, storage: StorageConfig | None = None, *, max_bytes: int) -> bytes:
    """`root/rel` as read_capped reads it, and locally no link is followed below `root` (a
    folder or the file itself linked elsewhere is refused): `rel` is looked up one name at a
    time from an open folder, so nothing can be swapped in between a check and the read."""
    url = join(root, rel)
    fs, base = filesystem(root, storage)
    if not isinstance(fs, LocalFileSystem):
        return _read_remote(fs, filesystem(url, storage)[1], url, storage, max_bytes)
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise UnsafeFile(f"{url}: not a path inside {root}")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts[:-1]:
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a link (O_NOFOLLOW), or a file where a folder belongs
                    raise UnsafeFile(f"{url}: {part} is a link or not a folder") from e
                raise
            os.close(fd)
            fd = inner
        try:
            leaf = os.open(parts[-1], _OPEN | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeFile(f"{url}: a symbolic link") from e
            raise
        try:
            return _read_fd(leaf, url, max_bytes)
        finally:
            os.close(leaf)
    finally:
        os.close(fd)


def _read_remote(fs, path: str, url: str, storage: StorageConfig | None, max_bytes: int) -> bytes:
    attempts = (storage or StorageConfig()).retries
    info = retry(lambda: fs.info(path), attempts=attempts, what=f"stat {url}")
    if info.get("type") != "file":
        raise UnsafeFile(f"{url}: not a file")
    if (info.get("size") or 0) > max_bytes:
        raise UnsafeFile(f"{url}: {info['size']} bytes, more than the {max_bytes} allowed")
    data = retry(lambda: fs.cat_file(path, start=0, end=max_bytes + 1), attempts=attempts, what=f"read {url}")
    if len(data) > max_bytes:
        raise UnsafeFile(f"{url}: more than the {max_bytes} bytes allowed")
    return data
