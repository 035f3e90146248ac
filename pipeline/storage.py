"""Any fsspec URL as a filesystem: a local folder by default, s3://bucket/prefix in production.

Writes are atomic: a reader never sees half a file. Locally a file is written under a
temporary name and renamed; on S3 a PUT (or a completed multipart upload) is atomic by itself.
Credentials are never passed through here: boto reads the usual AWS environment.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from typing import Callable, Iterator, TypeVar

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
        if storage.region:
            options["client_kwargs"]["region_name"] = storage.region
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


TRANSIENT = (ConnectionError, TimeoutError, OSError)


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
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e, attempt + 1, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def atomic_open(url: str, storage: StorageConfig | None = None, mode: str = "wb") -> Iterator:
    """Open for writing; the file appears under `url` only if the block completes."""
    fs, path = filesystem(url, storage)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
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
