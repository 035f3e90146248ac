"""A deterministic tar writer that knows its member offsets, and the DALI index it implies.

Members get mtime 0, uid/gid 0, no user names and mode 0644, so the same samples in the same
order give byte-identical tars. Offsets are tracked while writing, so the `.idx` file (the
format of DALI's wds2idx, version v1.2) needs no second pass over the tar.
"""

from __future__ import annotations

import hashlib
import queue
import tarfile
import threading

BLOCK = 512
RECORD = 20 * BLOCK  # tar pads the archive to whole records, as GNU tar does


_PRE = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_MTIME = b"\0" + b"00000000000\0"  # ends the size field, then mtime 0
_TAIL = b"0" + b"\0" * 100 + b"ustar  \0" + b"\0" * (64 + 16 + 167)  # type, link, magic, names, dev, prefix
_NULS = bytes(100)
# The checksum counts every header byte, its own 8-byte field as spaces: all but name and size are fixed.
_CHKSUM_FIXED = sum(_PRE) + sum(_MTIME) + 8 * 32 + sum(_TAIL)
_ZEROS = bytes(BLOCK)


def member_header(name: str, size: int) -> bytes:
    """The GNU tar header tarfile writes for a regular file with our fixed metadata, built
    directly: tarfile's generic TarInfo.tobuf costs more than the rest of a sample."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    octal = b"%011o" % size
    chksum = _CHKSUM_FIXED + sum(raw) + sum(octal)
    return b"".join((raw, _NULS[len(raw) :], _PRE, octal, _MTIME, b"%06o\0 " % chksum, _TAIL))


# The three members of an image sample, in one bytes format: header (name, padding, size,
# checksum), then data and padding, for .cls, .jpg and .json in turn. One format per image
# instead of three headers and a join: per-image Python is most of the sharder's time.
_SAMPLE = b"".join(
    b"%b." + ext + b"%b" + _PRE + b"%b" + _MTIME + b"%06o\0 " + _TAIL + b"%b%b" for ext in (b"cls", b"jpg", b"json")
)
assert b"%" not in _PRE + _MTIME + _TAIL  # they are spliced into format strings


def _small_sizes(ext: bytes) -> list[tuple[bytes, int, bytes]]:
    """size -> (octal size field, checksum of everything but the key, padding) for the small
    .cls and .json members: a lookup instead of three steps per image."""
    fixed = _CHKSUM_FIXED + sum(b"." + ext)
    return [(b"%011o" % n, fixed + sum(b"%011o" % n), _ZEROS[: -n % BLOCK]) for n in range(_SMALL)]


_SMALL = 2 * BLOCK
_CLS_SIZE, _JSON_SIZE = _small_sizes(b"cls"), _small_sizes(b"json")
_JPG_FIXED = _CHKSUM_FIXED + sum(b".jpg")
CHUNK = 4 << 20  # buffered bytes per write and hash update: few calls, bounded memory


def _writeback_starter():
    """sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE) where libc has it (Linux): starts
    writing a range to disk and returns at once; elsewhere a no-op."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        fn.restype = ctypes.c_int
    except (OSError, AttributeError, TypeError):  # no such call (macOS), or no CDLL(None) (Windows)
        return lambda fd, offset, n: None
    return lambda fd, offset, n: fn(fd, offset, n, 2)


start_writeback = _writeback_starter()


class TarWriter:
    """Write samples to a binary file object, hashing and counting as it goes.

    Members are built in a buffer that goes out CHUNK bytes at a time to a writer thread, which
    writes and hashes it: both release the GIL, so they run beside the per-image Python of the
    next chunk (a 2000-image shard: 129 -> 112 ms, measured from a flushed page cache).
    sync: fileobj is a file that will be fsynced; each chunk starts going to disk as it is
    written, so that fsync waits only for the tail. Use as a context manager, or call close():
    an error of the writer thread is raised in the caller at the next flush or at close."""

    def __init__(self, fileobj, chunk: int = CHUNK, sync: bool = False):
        self.f = fileobj
        self.sha = hashlib.sha256()
        self.index_rows: list[str] = []
        self.buf = bytearray()
        self.flushed = 0
        self.chunk = chunk
        self.sync = sync
        self._chunks: queue.Queue = queue.Queue(maxsize=2)  # bounds the memory ahead of the disk
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="tar-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop()

    @property
    def pos(self) -> int:
        return self.flushed + len(self.buf)

    def _drain(self) -> None:
        written = 0
        while (buf := self._chunks.get()) is not None:
            if self._error is not None:
                continue  # keep taking chunks so that the caller never blocks; it raises the error
            try:
                self.f.write(buf)
                self.sha.update(buf)
                if self.sync:
                    self.f.flush()
                    start_writeback(self.f.fileno(), written, len(buf))
                written += len(buf)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e

    def _flush(self) -> None:
        if self._error is not None:
            self._stop()
            raise self._error
        self._chunks.put(self.buf)
        self.flushed += len(self.buf)
        self.buf = bytearray()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()

    def add_sample(self, key: str, parts: list[tuple[str, bytes]]) -> None:
        row, pos, buf = [], self.pos, self.buf
        for ext, data in parts:
            name = f"{key}.{ext}"
            header = member_header(name, len(data))
            pos += len(header)
            row.append(f"{ext} {pos} {len(data)} {name}")
            pad = -len(data) % BLOCK
            buf += header
            buf += data
            buf += _ZEROS[:pad]
            pos += len(data) + pad
        self.index_rows.append(" ".join(row))
        if len(buf) >= self.chunk:
            self._flush()

    def add_image(self, key: str, cls: bytes, jpeg: bytes, meta: bytes) -> None:
        """add_sample(key, [("cls", cls), ("jpg", jpeg), ("json", meta)]), byte for byte."""
        kb = key.encode()
        k = len(kb)
        nc, nj, nm = len(cls), len(jpeg), len(meta)
        if k > 95 or nj >= 8**11 or nc >= _SMALL or nm >= _SMALL:  # long names, big files: the general path
            return self.add_sample(key, [("cls", cls), ("jpg", jpeg), ("json", meta)])
        ks = sum(kb)
        oc, sc, zc = _CLS_SIZE[nc]
        om, sm, zm = _JSON_SIZE[nm]
        oj = b"%011o" % nj
        pj = -nj % BLOCK
        buf = self.buf
        pos = self.flushed + len(buf)
        jpos = pos + 2 * BLOCK + nc + len(zc)  # data offsets, as the index records them
        mpos = jpos + nj + pj + BLOCK
        buf += _SAMPLE % (
            kb,
            _NULS[k + 4 :],
            oc,
            ks + sc,
            cls,
            zc,
            kb,
            _NULS[k + 4 :],
            oj,
            ks + _JPG_FIXED + sum(oj),
            jpeg,
            _ZEROS[:pj],
            kb,
            _NULS[k + 5 :],
            om,
            ks + sm,
            meta,
            zm,
        )
        self.index_rows.append(
            f"cls {pos + BLOCK} {nc} {key}.cls jpg {jpos} {nj} {key}.jpg json {mpos} {nm} {key}.json"
        )
        if len(buf) >= self.chunk:
            self._flush()

    def close(self) -> None:
        end = self.pos + 2 * BLOCK  # two zero blocks end the archive, then pad to a whole record
        self.buf += bytes(end - self.pos + (-end % RECORD))
        self._flush()
        self._stop()
        if self._error is not None:
            raise self._error

    def index(self) -> bytes:
        return (f"v1.2 {len(self.index_rows)}\n" + "".join(r + "\n" for r in self.index_rows)).encode()
