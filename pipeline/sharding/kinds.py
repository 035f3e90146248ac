"""What a source entry is, and how its name is shown: listing opens only real folders and regular
files (regular members in archives), and names that are not UTF-8 are reported, not used."""

from __future__ import annotations

import os
import stat
import tarfile

NOT_UTF8 = "name is not valid UTF-8"


def shown(name: str) -> str:
    """A name as it can be written into JSON and logs: undecodable bytes as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def utf8(name: str) -> bool:
    """Whether a name (os.fsdecode'd: surrogate escapes for undecodable bytes) is valid UTF-8."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def entry_kind(d: os.DirEntry) -> str | None:
    """None for a real folder or a regular file, else what it is (never following a link)."""
    if d.is_symlink():
        return "a symbolic link"
    if d.is_file(follow_symlinks=False) or d.is_dir(follow_symlinks=False):  # d_type: no system call
        return None
    try:
        mode = d.stat(follow_symlinks=False).st_mode
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def not_read(kind: str) -> str:
    return f"{kind}; only regular files and folders are read"


def member_kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "a symbolic link"
    if m.islnk():
        return "a hard link"
    if m.isfifo():
        return "a FIFO"
    if m.ischr() or m.isblk():
        return "a device"
    return "not a regular file"
