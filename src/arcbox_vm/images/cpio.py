"""Write a newc ("070701") cpio archive, the format the kernel unpacks as an initramfs.

Written here rather than with cpio(1) so the archive can hold device nodes without root,
every entry is owned by root, and the same inputs give the same bytes (fixed mtimes).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class Entry:
    """One archive member. `path` is relative ("bin/busybox"); data is the file body or link target."""

    path: str
    mode: int  # including the file type bits (stat.S_IFREG | 0o755, ...)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(f: BinaryIO, n: int) -> None:
    if n % 4:
        f.write(b"\0" * (4 - n % 4))


def _header(f: BinaryIO, ino: int, e: Entry, mtime: int) -> None:
    name = e.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(e.mode) else 1
    fields = (ino, e.mode, 0, 0, nlink, mtime, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields)
    f.write(head + name)
    _pad(f, len(head) + len(name))


def write_newc(entries: list[Entry], out: Path, mtime: int = 0) -> int:
    """Write the archive (parents must come before children); returns its size in bytes."""
    seen: set[str] = set()
    with open(out, "wb") as f:
        for ino, e in enumerate(entries, start=1):
            path = e.path.strip("/")
            if not path or path in seen:
                raise ValueError(f"bad or duplicate cpio path: {e.path!r}")
            seen.add(path)
            _header(f, ino, Entry(path, e.mode, e.data, e.rdev), mtime)
            f.write(e.data)
            _pad(f, len(e.data))
        _header(f, 0, Entry("TRAILER!!!", 0), 0)
        size = f.tell()
        if size % 512:  # customary block padding
            f.write(b"\0" * (512 - size % 512))
        return f.tell()


def read_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """Parse a newc archive into (path, mode, data, (rdevmajor, rdevminor)); for tests and checks."""
    out = []
    pos = 0
    while True:
        if data[pos:pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        vals = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = vals[11], vals[6]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += (-pos) % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += (-pos) % 4
        if name == "TRAILER!!!":
            return out
        out.append((name, vals[1], body, (vals[9], vals[10])))
