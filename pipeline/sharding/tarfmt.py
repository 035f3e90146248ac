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
        row = []
        for ext, data in parts:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
            self._write(header)
            row.append(f"{ext} {self.pos} {len(data)} {name}")
            self._write(data)
            if len(data) % BLOCK:
                self._write(b"\0" * (BLOCK - len(data) % BLOCK))
        self.index_rows.append(" ".join(row))

    def close(self) -> None:
        self._write(b"\0" * (2 * BLOCK))
        if self.pos % RECORD:
            self._write(b"\0" * (RECORD - self.pos % RECORD))

    def index(self) -> bytes:
        return (f"v1.2 {len(self.index_rows)}\n" + "".join(r + "\n" for r in self.index_rows)).encode()
