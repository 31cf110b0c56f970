"""A snapshot's guest memory as a sealed memfd that every clone maps copy-on-write.

Clones restored from one checkpoint should share its unchanged pages. QEMU (before 8.2)
opens a `memory-backend-file` read-write even when it maps it private (`share=off`), so
handing every clone the snapshot's file would need every clone's uid to be able to write
it — and one escaped QEMU could then rewrite the memory all the others read. A memfd with
`F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` removes that choice: any
process holding it may open it read-write (`/proc/self/fd/N`) and map it MAP_PRIVATE, but
the kernel refuses `write()`, a shared writable mapping, a hole punched into it and any
change of size — for everyone, root included. Its pages are one copy in the page cache
however many clones map it.

The memfd is filled once per snapshot memory image (holes left holes) and kept while at
least one QEMU that was handed it runs (`SealedMemories.acquire` / `Lease.release`); a
later clone of the same image then maps the same pages. A clone adopted by a new daemon
keeps its own descriptor; clones restored after such a restart share a fresh memfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from arcbox_vm.errors import VmmError

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_CHUNK = 8 << 20

Key = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns of the image


def _key(path: Path) -> Key:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _extents(fd: int, size: int):  # noqa: ANN202 - generator of (offset, length)
    """The data extents of a (sparse) file; the whole file where SEEK_DATA is unsupported."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            if exc.errno == errno.EINVAL:  # no SEEK_DATA here
                yield pos, size - pos
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        pos = end


def sealed_copy(path: Path, name: str = "arcbox-snapshot-memory") -> int:
    """A sealed memfd holding `path`'s bytes (its holes stay holes: unbacked zero pages).
    Blocking; the caller owns the returned descriptor (close-on-exec)."""
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    mfd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size = os.fstat(src).st_size
        os.ftruncate(mfd, size)
        for start, length in _extents(src, size):
            off = start
            while off < start + length:
                n = min(_CHUNK, start + length - off)
                data = os.pread(src, n, off)
                if not data:
                    raise VmmError(f"the snapshot memory {path} ended early at byte {off}")
                os.pwrite(mfd, data, off)
                off += len(data)
        fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(mfd)
        raise
    finally:
        os.close(src)
    return mfd


@dataclass
class _Entry:
    fd: int
    users: int = 0


@dataclass
class Lease:
    """One QEMU's use of a sealed memory; `release` once that QEMU is gone (idempotent)."""

    fd: int
    _owner: SealedMemories | None
    _key: Key

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self._key)


@dataclass
class SealedMemories:
    """The sealed memfds of the snapshot images running clones use, one per image."""

    _entries: dict[Key, _Entry] = field(default_factory=dict)
    _filling: dict[Key, asyncio.Future[int]] = field(default_factory=dict)

    async def acquire(self, path: Path) -> Lease:
        """The sealed memfd of the image at `path` (filled on first use), held for one QEMU."""
        key = await asyncio.to_thread(_key, path)
        while key not in self._entries:
            pending = self._filling.get(key)
            if pending is not None:  # another restore of this image is filling it: wait for that one
                with contextlib.suppress(Exception):
                    await asyncio.shield(pending)
                continue
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._filling[key] = fut
            try:
                fd = await asyncio.to_thread(sealed_copy, path)
            except BaseException as exc:
                fut.set_exception(exc if isinstance(exc, Exception) else VmmError("cancelled"))
                fut.exception()  # retrieved: waiters retry on their own
                raise
            finally:
                self._filling.pop(key, None)
            self._entries[key] = _Entry(fd)
            fut.set_result(fd)
        entry = self._entries[key]
        entry.users += 1
        return Lease(entry.fd, self, key)

    def _release(self, key: Key) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.users -= 1
        if entry.users <= 0:
            del self._entries[key]
            os.close(entry.fd)

    def held(self) -> int:
        """How many sealed images are held (for tests and metrics)."""
        return len(self._entries)
