"""Reading a sharded split: the manifest, samples located through each shard's `.idx` (or, without
one, sequential tar streaming), resuming at a byte offset after transient errors, an optional
local cache, and a reader that streams the samples of an id sequence with prefetch."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tarfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageConfig
from pipeline.data import cache
from pipeline.split_manifest import check_manifest
from pipeline.storage import TRANSIENT, cache_root, filesystem, join, plain_name, retry

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Shard:
    name: str
    url: str
    samples: int
    nbytes: int | None = None
    index_url: str | None = None  # the wds2idx v1.2 file beside the tar


@dataclass(frozen=True)
class Split:
    url: str
    shards: tuple[Shard, ...]
    classes: tuple = ()

    @property
    def counts(self) -> list[int]:
        return [s.samples for s in self.shards]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, index within the shard) of global sample ids; an id past the split's
        size is a repeat draw of id % size (sampling.mixed_epoch_order)."""
        offsets = np.concatenate([[0], np.cumsum(self.counts)])
        ids = np.asarray(ids) % offsets[-1]
        shard = np.searchsorted(offsets, ids, side="right") - 1
        return shard, ids - offsets[shard]


class TransientStorageError(ConnectionError):
    """A storage error worth retrying (connection refused/reset, 5xx, throttling)."""


def _transient(fn):
    """Map botocore's own connection and 5xx errors to a ConnectionError, so that
    pipeline.storage.retry retries them like any other transient error."""

    def call():
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below, re-raised otherwise
            mod = type(e).__module__ or ""
            status = (
                getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
                if hasattr(e, "response")
                else None
            )
            if mod.startswith(("botocore", "aiobotocore", "aiohttp")) and (
                status is None or status >= 500 or status == 429
            ):
                raise TransientStorageError(f"{type(e).__name__}: {e}") from e
            raise

    return call


def _is_s3(fs) -> bool:
    return "s3" in getattr(fs, "protocol", ()) and hasattr(fs, "_call_s3")


SMALL_FILE = 64 << 20  # a manifest or .idx: ImageNet's are a few MB; a larger one is not ours


def _cat(fs, path: str, url: str) -> bytes:
    """A manifest's or index's bytes in one ranged GET (no HEAD for the size), refused past
    SMALL_FILE: the bucket is untrusted, and an endless object must not fill memory."""
    data = fs.cat_file(path, start=0, end=SMALL_FILE + 1)
    if len(data) > SMALL_FILE:
        raise ValueError(f"{url}: more than {SMALL_FILE} bytes; not a manifest or index of this project")
    return data


def read_split(url: str, storage: StorageConfig | None = None) -> Split:
    """The shards a split's manifest lists. Errors name the manifest URL."""
    storage = storage or StorageConfig()
    murl = join(url, MANIFEST)
    fs, path = filesystem(murl, storage)
    try:
        raw = retry(_transient(lambda: _cat(fs, path, murl)), attempts=storage.retries, what=f"read {murl}")
    except FileNotFoundError:
        raise FileNotFoundError(f"{murl}: no manifest; the split is missing or not complete") from None
    try:
        m = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"{murl}: not a valid manifest: not JSON: {e}") from None
    # the shape, and names that stay inside the split: a manifest is as untrusted as its bucket
    m = check_manifest(m, murl)
    shards = tuple(
        Shard(
            s["name"],
            join(url, s["name"]),
            s["samples"],
            s.get("bytes"),
            join(url, s["index"]) if s.get("index") is not None else None,
        )
        for s in m["shards"]
    )
    if not shards or sum(s.samples for s in shards) == 0:
        raise ValueError(f"{murl}: the split holds no samples")
    return Split(url, shards, tuple(m.get("classes", ())))


def cache_folder(cache_dir: str | None) -> str | None:
    """data.cache_dir as a folder: "auto" is $MFM_CACHE/shards (default ~/.cache/mfm/shards)."""
    if cache_dir == "auto":
        return str(cache_root() / "shards")
    return cache_dir


def _cache_path(cache_dir: str, shard: Shard) -> str:
    # checked again here: a Shard need not come from read_split, and this path is written to
    return cache.path(cache_dir, shard.url, plain_name(shard.name, f"{shard.url}: shard name"))


READ_BLOCK = 8 << 20  # block size of fsspec file reads on stores other than S3
CHUNK = 1 << 20  # one read of a download's body
READ_AHEAD = 256 << 10  # one read of the parser from a download
BLOCK = 512  # a tar header
MEMORY_AHEAD = 64 << 20  # bytes a download without the cache runs ahead of its parser
# samples: a shard first needed that soon is downloading already. A reader's first batch needs its
# 4 interleaved shards (sampling.INTERLEAVE); a shard joining later is first drawn some ~100 draws
# after it enters the shuffle buffer. Starting more at once only shares the link and the store
# with bytes not needed yet (measured: first batch 0.34 vs 0.40 s, 2 workers, 20 ms / 200 MB/s).
LOOKAHEAD = 150


class _Sink:
    """One download's bytes as they arrive, for a parser in another thread: in memory (dropped
    once parsed; the download waits while MEMORY_AHEAD bytes are unparsed) or in a file (the
    cache's download in progress, or a cached shard). Offsets are the shard's."""

    def __init__(self):
        self._cond = threading.Condition()
        self.base = 0  # shard offset of the first byte
        self.first = 0  # sample index at `base`
        self.key: str | None = None  # the key the index gives that sample (None: not checked)
        self.end = 0  # shard offset after the last byte there
        self.done = self.ready = self.cancelled = self.settled = False
        self.error: BaseException | None = None
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._fd: int | None = None
        self._out = None  # file mode, while downloading: the cache's file being written
        self._parsed = 0
        self.stack = contextlib.ExitStack()  # the cache's hold on the file, released by close()

    def begin(self, base: int, first: int = 0, key: str | None = None) -> None:
        with self._cond:
            self.base = self.end = self._parsed = base
            self.first, self.key, self.ready = first, key, True
            self._cond.notify_all()

    def use_file(self, path: str, out=None) -> None:
        """Read `path`: complete, or being written through `out` by this download."""
        fd = os.open(path, os.O_RDONLY)
        done = out is None
        with self._cond:
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._out, self._chunks = fd, out, deque()
            self.base = self.end = self.first = 0
            self.key, self.done, self.ready = None, done, True
            if done:
                self.end = os.fstat(fd).st_size
            self._cond.notify_all()

    def write(self, data: bytes) -> bool:
        """Append the next bytes; False once the parser left (a download into the cache goes on:
        the next epoch reads it)."""
        with self._cond:
            while self._out is None and self.end - self._parsed > MEMORY_AHEAD and not self.cancelled:
                self._cond.wait()
            if self._out is not None:
                self._out.write(data)
            elif self.cancelled:
                return False
            elif self.end + len(data) > self._parsed:  # not bytes the parser skipped
                self._chunks.append((self.end, data))
            self.end += len(data)
            self._cond.notify_all()
            return True

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.done, self.error, self.ready = True, error, True
            self._cond.notify_all()

    def read(self, pos: int, n: int) -> bytes:
        """Up to n bytes at `pos`, waiting for them; b"" at the end of what the download got."""
        with self._cond:
            if self._fd is None and pos > self._parsed:
                # the bytes before pos are parsed or skipped (a member not wanted): dropped, and
                # the download runs on to MEMORY_AHEAD past pos keeping none of them (write)
                self._parsed = pos
                while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= pos:
                    self._chunks.popleft()
                self._cond.notify_all()
            while not (self.ready and (self.end > pos or self.done)):
                self._cond.wait()
            if self.error is not None:
                raise self.error
            stop = min(pos + n, self.end)
            if stop <= pos:
                return b""
            if self._fd is not None:
                fd = self._fd
            else:
                if pos < (self._chunks[0][0] if self._chunks else self.end):
                    raise tarfile.ReadError(f"byte {pos} was read already and is not kept")
                parts = []
                for off, c in self._chunks:
                    if off >= stop:
                        break
                    parts.append(c[max(0, pos - off) : stop - off])
                return b"".join(parts)
        return os.pread(fd, stop - pos, pos)

    def discard_rest(self) -> None:
        """The parser is done (the tar's end-of-archive blocks, its padding): a download in
        memory runs to its end, its size checked, keeping none of those bytes."""
        with self._cond:
            self._parsed = float("inf")
            self._cond.notify_all()

    def settle(self) -> None:
        with self._cond:
            self.settled = True
            self._cond.notify_all()

    def wait_settled(self) -> None:
        """Until the download's thread is done (a shard for the cache: in it, and held)."""
        with self._cond:
            while not self.settled:
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self.cancelled = True
            self._chunks = deque()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._cond.notify_all()
        self.stack.close()


class _SinkFile:
    """A file over a sink from byte `pos`, for tarfile: reads the sink READ_AHEAD bytes at a
    time (tarfile's reads of a header, a byte, a member each cost a lock otherwise), seeks
    forward over members not wanted; a download in memory keeps only what was not read yet."""

    def __init__(self, sink: _Sink, pos: int):
        self.sink, self.pos = sink, pos
        self._buf, self._at = b"", pos  # the sink's bytes from _at, read ahead

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos + (self.pos if whence == 1 else 0)
        return self.pos

    def peek(self, n: int) -> bytes:
        """Up to n bytes at the position, not consumed (fewer where the download has not got them)."""
        off = self.pos - self._at
        if off < 0 or off + n > len(self._buf):
            self._buf, self._at, off = self.sink.read(self.pos, max(n, READ_AHEAD)), self.pos, 0
        return self._buf[off : off + n]

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n:
            off = self.pos - self._at
            if not 0 <= off < len(self._buf):
                self._buf, self._at, off = self.sink.read(self.pos, max(n, READ_AHEAD)), self.pos, 0
                if not self._buf:
                    break
            got = self._buf[off : off + n] if n > 0 else self._buf[off:]
            parts.append(got)
            self.pos += len(got)
            n -= len(got) if n > 0 else 0
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _get(fs, path: str, start: int, end: int | None) -> Iterator[bytes]:
    """Bytes [start, end) of an object (end None: to its end) as they arrive: on S3 one GET,
    without the HEAD an fsspec file makes; elsewhere an fsspec file read sequentially."""
    if _is_s3(fs):
        from fsspec.asyn import sync

        bucket, key, version = fs.split_path(path)
        kw = {"VersionId": version} if version else {}
        if start or end is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        body = sync(fs.loop, fs._call_s3, "get_object", Bucket=bucket, Key=key, **kw)["Body"]
        try:
            while chunk := sync(fs.loop, body.read, CHUNK):
                yield chunk
        finally:
            body.close()
        return
    with fs.open(path, "rb", block_size=READ_BLOCK) as f:
        f.seek(start)
        while (n := CHUNK if end is None else min(CHUNK, end - f.tell())) > 0 and (chunk := f.read(n)):
            yield chunk


def _fetch(shard: Shard, storage: StorageConfig, sink: _Sink, start: int, end: int | None) -> None:
    """sink <- the shard's bytes [start, end), resuming at the byte offset after a transient
    error (a Range GET from where the last attempt stopped)."""
    fs, path = filesystem(shard.url, storage)

    def attempt():
        if end is not None and sink.end >= end:
            return
        for chunk in _get(fs, path, sink.end, end):
            if not sink.write(chunk):
                return  # the reader has what it wanted

    retry(_transient(attempt), attempts=storage.retries, what=f"read {shard.url}")
    if not sink.cancelled and end is not None and sink.end != end:
        raise ValueError(f"{shard.url}: {sink.end} bytes, the manifest says {end}")


@contextlib.contextmanager
def _download_lock(local: str) -> Iterator[None]:
    """One download of a shard into the cache at a time across processes (DALI's workers, ranks)."""
    fd = os.open(f"{local}.tmp-lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _complete(local: str, shard: Shard) -> bool:
    return os.path.isfile(local) and (shard.nbytes is None or os.path.getsize(local) == shard.nbytes)


def cache_shard(shard: Shard, storage: StorageConfig | None, cache_dir: str, sink: _Sink | None = None) -> str:
    """The shard's path in the local cache, downloading it (one GET, resumed at the byte offset
    after a transient error) when it is not there yet. `sink` gets the bytes as they arrive."""
    storage = storage or StorageConfig()
    local = _cache_path(cache_dir, shard)
    sink = sink or _Sink()
    if not _complete(local, shard):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with _download_lock(local):
            if not _complete(local, shard):
                tmp = cache.temp_path(local)
                try:
                    with open(tmp, "wb", buffering=0) as out:
                        sink.use_file(tmp, out)
                        _fetch(shard, storage, sink, 0, shard.nbytes)
                    os.replace(tmp, local)  # atomic: another reader of the cache sees all or nothing
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{local}.tmp-lock")
                    sink.finish()
                    return local
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
    sink.use_file(local)
    return local


@dataclass
class _TarCursor:
    """How far a shard has been read: resuming at `offset` (a member header) continues exactly."""

    offset: int = 0
    index: int = -1  # sample index of the current key
    key: str | None = None
    sample: dict | None = None  # the current key's wanted members so far


def _plain_member(h: bytes, tar: tarfile.TarFile) -> tuple[str, int] | None:
    """(name, size) of a header block that is a plain regular file as this project's sharder
    writes them (ustar or GNU magic, octal size, no prefix, checksum right), parsed at a fraction of
    tarfile's cost per header; None for anything else, which tarfile then reads as it would."""
    if len(h) != BLOCK or h[156:157] not in (b"0", b"\0") or h[257:262] != b"ustar" or tar.pax_headers:
        return None
    size, chksum = _OCTAL.fullmatch(h, 124, 136), _OCTAL.fullmatch(h, 148, 156)
    if size is None or chksum is None or h[345:500].strip(b"\0"):
        return None
    if any(_NUMBER.fullmatch(h, a, b) is None for a, b in _NUMBERS):  # fields tarfile would refuse
        return None
    if int(chksum[1], 8) != 256 + sum(h[:148]) + sum(h[156:]):
        return None
    name = h[:100].split(b"\0", 1)[0]
    if not name or name.endswith(b"/"):
        return None
    return name.decode(tar.encoding, tar.errors), int(size[1], 8)


_OCTAL = re.compile(rb" *([0-7]+)[ \0]*")
_NUMBER = re.compile(rb" *[0-7]*[ \0]*")
_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode ... devminor


def _peek(f, n: int) -> bytes:
    if isinstance(f, _SinkFile):
        return f.peek(n)
    pos = f.tell()
    data = f.read(n)
    f.seek(pos)
    return data


def _scan(f, cur: _TarCursor, wanted) -> Iterator[tuple[int, dict]]:
    """The wanted samples of a tar from `cur` (f positioned there), each as soon as its last
    member is read. A plain regular file's header is parsed here (_plain_member); any other
    header, the end of the archive and a damaged header go to tarfile's random-access mode over
    the same forward-only file, exactly as tarfile alone would read them."""
    try:
        tar = tarfile.TarFile(fileobj=f)  # offsets are f's, the shard's own; reads the first header
        member = tar.next()
        while member is not None:
            tar.members.clear()  # a shard's thousands of headers are not kept
            # a TarInfo from tarfile (read through it: a sparse member too) or (name, size) parsed here
            info = member if isinstance(member, tarfile.TarInfo) else None
            if info is not None:
                name, size, isfile, following = info.name, info.size, info.isfile(), tar.offset
            else:  # its data right after its header, at cur.offset
                (name, size), isfile = member, True
                following = cur.offset + BLOCK + -(-size // BLOCK) * BLOCK
            if isfile:
                base = name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                prefix = name[: len(name) - len(base)] + key
                if prefix != cur.key:
                    if cur.sample is not None:
                        done, cur.sample = cur.sample, None
                        yield cur.index, done
                    cur.index, cur.key = cur.index + 1, prefix
                if cur.index in wanted:
                    if info is not None:
                        data = tar.extractfile(info).read(size)
                    else:
                        f.seek(cur.offset + BLOCK)
                        data = f.read(size)
                    if len(data) != size:
                        raise TransientStorageError(f"member {name} cut short")
                    if cur.sample is None:
                        cur.sample = {"__key__": prefix}
                    cur.sample[ext] = data
            cur.offset = following
            f.seek(following)
            member = _plain_member(_peek(f, BLOCK), tar)
            if member is None:
                tar.offset = following
                member = tar.next()
    except (tarfile.ReadError, EOFError) as e:
        # a body cut off mid-stream reads as a damaged tar: read on from the last whole member
        raise TransientStorageError(f"tar stream ended early at byte {cur.offset}: {e}") from e
    if cur.sample is not None:
        done, cur.sample = cur.sample, None
        yield cur.index, done


def read_index(shard: Shard, storage: StorageConfig | None = None) -> list[list[tuple[str, int, int, str]]] | None:
    """Per sample, its members as (ext, data offset, size, name) from the shard's v1.2 `.idx`;
    None when there is none or it does not describe `shard.samples` samples (then the tar is
    read from its start instead)."""
    if not shard.index_url:
        return None
    storage = storage or StorageConfig()
    fs, path = filesystem(shard.index_url, storage)
    try:
        text = retry(
            _transient(lambda: _cat(fs, path, shard.index_url)),
            attempts=storage.retries,
            what=f"read {shard.index_url}",
        )
    except FileNotFoundError:
        log.warning("%s: missing; scanning the tar instead", shard.index_url)
        return None
    except ValueError as e:  # too large to be the index of this shard
        log.warning("%s; scanning the tar instead", e)
        return None
    lines = text.decode(errors="replace").splitlines()
    head = lines[0].split() if lines else []
    rows = []
    for line in lines[1:]:
        f = line.split()
        try:
            if not f or len(f) % 4:
                raise ValueError(line)
            row = [(f[k], int(f[k + 1]), int(f[k + 2]), f[k + 3]) for k in range(0, len(f), 4)]
        except ValueError:
            rows = None
            break
        # members in file order (across samples too), each after a header block, inside the shard:
        # anything else cannot be a wds2idx index of this tar
        members = rows[-1][-1:] + row if rows else row
        if (
            any(off < BLOCK or size < 0 for _, off, size, _ in row)
            or any(b[1] < a[1] + a[2] + BLOCK for a, b in zip(members, members[1:]))
            or (shard.nbytes is not None and row[-1][1] + row[-1][2] > shard.nbytes)
        ):
            rows = None
            break
        rows.append(row)
    if head != ["v1.2", str(shard.samples)] or rows is None or len(rows) != shard.samples:
        log.warning("%s: not a v1.2 index of %d samples; scanning the tar instead", shard.index_url, shard.samples)
        return None
    return rows


def _key(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(base)] + base.partition(".")[0]


def _byte_range(shard: Shard, lo: int, hi: int, storage: StorageConfig) -> tuple[int, int | None, str | None]:
    """(start, end, key of sample lo) of the bytes holding samples lo..hi: from the shard's index
    when they are not the whole shard, else (0, nbytes, None). The index is as untrusted as the
    bucket: the key at `start` is checked against the tar's own header before anything is used,
    and a range that ends early is read on to the end."""
    whole = (0, shard.nbytes, None)
    if lo == 0 and hi == shard.samples - 1:
        return whole
    rows = read_index(shard, storage)
    if rows is None:
        return whole
    start = rows[lo][0][1] - BLOCK
    end = rows[hi + 1][0][1] - BLOCK if hi + 1 < len(rows) else shard.nbytes
    if end is not None and (start >= end or (shard.nbytes is not None and end > shard.nbytes)):
        log.warning("%s: the index does not match the tar (samples %d-%d); scanning the tar instead", shard.url, lo, hi)
        return whole
    return start, end, _key(rows[lo][0][3])


class _IndexMismatch(ValueError):
    pass


class _Piece:
    """The wanted samples of one shard, read in one sequential pass: a local file directly, a
    remote shard through a download (`fetch`, on a pool thread) that the parser follows as the
    bytes arrive, into the cache or into memory."""

    def __init__(self, shard: Shard, wanted: set[int], storage: StorageConfig, cache_dir, cache_limit_gb):
        self.shard, self.wanted, self.storage = shard, wanted, storage
        self.cache_dir, self.cache_limit_gb = cache_folder(cache_dir), cache_limit_gb
        self.lo, self.hi = min(wanted), max(wanted)
        self.whole = self.lo == 0 and self.hi == shard.samples - 1
        self.fs, self.path = filesystem(shard.url, storage)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.sink = _Sink()
        self.held = False  # a cached shard, held against eviction while read

    def start(self) -> None:
        """The download, on a thread of its own: a download waiting for its parser (memory
        bounded) never holds up another shard's."""
        if not self.local:
            threading.Thread(target=self.fetch, daemon=True, name=f"fetch-{self.shard.name}").start()

    def fetch(self) -> None:
        try:
            self._fetch()
        except BaseException as e:  # noqa: BLE001 - handed to the parser, which raises it
            self.sink.finish(e)
        finally:
            self.sink.settle()

    def _fetch(self) -> None:
        if self.cache_dir:  # the whole shard, once: a reader of another part of it waits for it there
            self.sink.stack.enter_context(
                cache.held(
                    lambda: cache_shard(self.shard, self.storage, self.cache_dir, self.sink),
                    self.cache_dir,
                    self.cache_limit_gb,
                )
            )
            self.held = True
            if self.sink.cancelled:  # the parser left meanwhile: nothing to hold for it
                self.sink.stack.close()
            return
        start, end, key = _byte_range(self.shard, self.lo, self.hi, self.storage)
        self.sink.begin(start, self.lo if key else 0, key)
        _fetch(self.shard, self.storage, self.sink, start, end)
        self.sink.finish()

    def close(self) -> None:
        self.sink.close()
        if self.held and self.cache_limit_gb is not None:
            # released: trim what the shards read at the same time held over the limit
            cache.evict(self.cache_dir, int(self.cache_limit_gb * cache.GB))

    def samples(self) -> Iterator[tuple[int, dict]]:
        """(index, sample) of the wanted samples, in shard order."""
        if self.local:
            yield from self._local()
            return
        cur = None
        while True:
            sink = self.sink  # a new one after a fallback
            if cur is None:
                with sink._cond:
                    while not sink.ready:
                        sink._cond.wait()
                cur = _TarCursor(offset=sink.base, index=sink.first - 1)
                expect = sink.key
            try:
                for i, sample in _scan(_SinkFile(sink, cur.offset), cur, self.wanted):
                    if expect is not None:
                        if (i, sample["__key__"]) != (self.lo, expect):
                            raise _IndexMismatch(f"{self.shard.url}: the index does not match the tar at sample {i}")
                        expect = None
                    yield i, sample
                    if i == self.hi and not self.whole:
                        return
            except TransientStorageError as e:
                if sink.error is not None:
                    raise sink.error from None
                if expect is not None:  # the index's offset is not a header of sample lo
                    self._refetch(0, self.shard.nbytes, f"{self.shard.url}: the index does not match the tar ({e})")
                    cur = None
                    continue
                if sink.end == self.shard.nbytes or self.shard.nbytes is None:
                    raise ValueError(f"{self.shard.url}: not a whole tar: {e}") from None
            except _IndexMismatch as e:
                self._refetch(0, self.shard.nbytes, str(e))
                cur = None
                continue
            if cur.index >= self.hi or sink.end == self.shard.nbytes or self.shard.nbytes is None:
                break
            # the index's range ended before sample hi: read on to the end of the shard
            self._refetch(cur.offset, self.shard.nbytes, f"{self.shard.url}: the index's range ends early")
        if cur.index + 1 != self.shard.samples and sink.base == 0 and self.whole:
            raise ValueError(f"{self.shard.url}: holds {cur.index + 1} samples, the manifest says {self.shard.samples}")
        sink.discard_rest()
        sink.wait_settled()  # the bytes are all here: a download into the cache is being committed

    def _refetch(self, start: int, end: int | None, why: str) -> None:
        log.warning("%s; scanning the tar instead", why)
        self.sink.close()
        self.sink = sink = _Sink()
        sink.begin(start)  # a cursor continues at `start`: its numbering is kept

        def run():
            try:
                _fetch(self.shard, self.storage, sink, start, end)
                sink.finish()
            except BaseException as e:  # noqa: BLE001 - handed to the parser
                sink.finish(e)

        threading.Thread(target=run, daemon=True, name="shard-refetch").start()

    def _local(self) -> Iterator[tuple[int, dict]]:
        cur = _TarCursor()
        for attempt in range(self.storage.retries + 1):
            try:
                with self.fs.open(self.path, "rb") as f:
                    f.seek(cur.offset)
                    if cur.offset and not f.read(BLOCK).strip(b"\0"):
                        break  # cut off just before the end-of-archive blocks: nothing left to read
                    f.seek(cur.offset)
                    yield from _scan(f, cur, self.wanted)
                break
            except (TransientStorageError, *TRANSIENT) as e:
                if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
                    raise
                if attempt == self.storage.retries:
                    raise
                log.warning("read %s failed (%s); retry %d/%d", self.shard.url, e, attempt + 1, self.storage.retries)
                time.sleep(0.5 * 2**attempt)
        if cur.index + 1 != self.shard.samples:
            raise ValueError(f"{self.shard.url}: holds {cur.index + 1} samples, the manifest says {self.shard.samples}")


def read_samples(
    shard: Shard,
    wanted: Iterable[int],
    storage: StorageConfig | None = None,
    cache_dir: str | None = None,
    cache_limit_gb: float | None = None,
) -> dict[int, dict]:
    """The samples `wanted` (indices within the shard) as {index: {"__key__", "jpg", ...}}, read
    in one sequential pass (see SampleReader). A sample is the group of consecutive members
    sharing a key (the name up to its first dot)."""
    storage = storage or StorageConfig()
    piece = _Piece(shard, set(wanted), storage, cache_dir, cache_limit_gb)
    piece.start()
    try:
        return dict(piece.samples())
    finally:
        piece.close()


class SampleReader:
    """Streams the samples of a sequence of ids, in that order.

    Each shard the sequence touches is read once, sequentially, from the first to the last
    sample it wants. With `cache_dir` (pipeline/data/cache.py): one GET of the whole shard into
    the cache (once per machine: a reader of another part of it waits for that download), read
    from there in later epochs. Without: one GET of the whole shard, or for part of a shard a
    GET of its `.idx` and one ranged GET. No HEAD: the manifest gives the sizes. Remote shards
    download, each on its own thread, as soon as the sequence needs them within LOOKAHEAD
    samples, and `prefetch` more, in the order it first needs them, and are parsed as their bytes arrive, so a sample is
    handed over as soon as its shard's stream reaches it. Memory holds the samples parsed but
    not handed out yet (the sequence's shuffle buffer) and, without the cache, at most
    MEMORY_AHEAD unparsed bytes per download. A local split is read in place.
    """

    def __init__(
        self,
        split: Split,
        storage: StorageConfig | None = None,
        *,
        prefetch: int = 0,
        cache_dir: str | None = None,
        cache_limit_gb: float | None = None,
    ):
        self.split, self.storage, self.cache_dir = split, storage or StorageConfig(), cache_dir
        self.prefetch, self.cache_limit_gb = max(0, prefetch), cache_limit_gb

    def read(self, ids: Iterable[int]) -> Iterator[tuple[int, dict]]:
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids) == 0:
            return
        shard_of, index_of = self.split.locate(ids)
        _, first = np.unique(shard_of, return_index=True)
        first = np.sort(first)  # where each shard is first needed, in that order
        sequence = [int(shard_of[i]) for i in first]
        position = {s: k for k, s in enumerate(sequence)}
        wanted: dict[int, set[int]] = {}
        uses: dict[tuple[int, int], int] = {}  # a sample drawn twice (an upsampled source) is kept for both
        left: dict[int, int] = {}  # draws still to hand out, per shard
        for s, i in zip(shard_of.tolist(), index_of.tolist()):
            wanted.setdefault(s, set()).add(i)
            uses[(s, i)] = uses.get((s, i), 0) + 1
            left[s] = left.get(s, 0) + 1
        pieces: dict[int, _Piece] = {}
        streams: dict[int, Iterator] = {}
        started = 0

        # the rest of a shard another reader began: through the cache, that reader downloads it
        # whole and this one would wait on its lock, so it starts only once needed (dealing puts
        # it last, by then cached)
        later = {s for s in sequence if self.cache_dir and min(wanted[s]) > 0}

        def start_until(k: int, needed: int) -> None:
            nonlocal started
            while started < min(k, len(sequence)):
                s = sequence[started]
                if started >= needed and s in later:
                    break
                piece = pieces[s] = _Piece(
                    self.split.shards[s], wanted[s], self.storage, self.cache_dir, self.cache_limit_gb
                )
                piece.start()
                streams[s] = piece.samples()
                started += 1

        pending: dict[tuple[int, int], dict] = {}
        try:
            for t, (gid, s, i) in enumerate(zip(ids.tolist(), shard_of.tolist(), index_of.tolist())):
                # every shard needed within LOOKAHEAD samples, and `prefetch` more, downloading
                soon = int(np.searchsorted(first, t + LOOKAHEAD, side="right"))
                start_until(max(soon, position[s] + 1) + self.prefetch, position[s] + 1)
                while (s, i) not in pending:
                    got = next(streams[s], None)
                    if got is None:
                        raise ValueError(f"{self.split.shards[s].url}: sample {i} not found")
                    pending[(s, got[0])] = got[1]
                uses[(s, i)] -= 1
                left[s] -= 1
                if left[s] == 0:
                    for _ in streams.pop(s):  # the end of its tar: the count check, the cache's commit
                        pass
                    pieces.pop(s).close()
                yield gid, pending.pop((s, i)) if uses[(s, i)] == 0 else dict(pending[(s, i)])
        finally:
            for piece in pieces.values():
                piece.close()
