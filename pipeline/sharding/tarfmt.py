"""A deterministic tar writer that knows its member offsets, and the DALI index it implies.

Members get mtime 0, uid/gid 0, no user names and mode 0644, so the same samples in the same
order give byte-identical tars. Offsets are tracked while writing, so the `.idx` file (the
format of DALI's wds2idx, version v1.2) needs no second pass over the tar.
"""
from __future__ import annotations

import hashlib
import tarfile

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


class TarWriter:
    """Write samples to a binary file object, hashing and counting as it goes."""

    def __init__(self, fileobj):
        self.f = fileobj
        self.pos = 0
        self.sha = hashlib.sha256()
        self.index_rows: list[str] = []

    def _write(self, b: bytes) -> None:
        self.f.write(b)
        self.sha.update(b)
        self.pos += len(b)

    def add_sample(self, key: str, parts: list[tuple[str, bytes]]) -> None:
        row, chunks, pos = [], [], self.pos
        for ext, data in parts:
            name = f"{key}.{ext}"
            header = member_header(name, len(data))
            pos += len(header)
            row.append(f"{ext} {pos} {len(data)} {name}")
            pad = -len(data) % BLOCK
            chunks += (header, data, _ZEROS[:pad])
            pos += len(data) + pad
        self._write(b"".join(chunks))  # one write and one hash update per sample
        self.index_rows.append(" ".join(row))

    def close(self) -> None:
        self._write(b"\0" * (2 * BLOCK))
        if self.pos % RECORD:
            self._write(b"\0" * (RECORD - self.pos % RECORD))

    def index(self) -> bytes:
        return (f"v1.2 {len(self.index_rows)}\n" + "".join(r + "\n" for r in self.index_rows)).encode()
