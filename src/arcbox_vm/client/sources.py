"""What `files.write` accepts, turned into 1 MiB chunks without holding a file in memory.

Accepted: bytes-like, str (UTF-8 text), a local path (`os.PathLike`, e.g. pathlib.Path —
a plain str is content, not a path), a binary file object (anything with `.read(n)`),
or an iterable / async iterable of bytes. Blocking reads run in a worker thread so a
slow disk or pipe does not stall the event loop (and with it every other stream).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import IO, Union

from arcbox_vm.errors import InvalidArgument

__all__ = ["CHUNK_SIZE", "WriteSource", "check_source", "iter_chunks", "source_size"]

CHUNK_SIZE = 1024 * 1024

WriteSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", IO[bytes], Iterable[bytes],
                    AsyncIterable[bytes]]


def source_size(source: WriteSource) -> int | None:
    """The number of bytes the source will yield, when knowable up front (the daemon then
    checks it arrived complete); None for streams."""
    if isinstance(source, (bytes, bytearray)):
        return len(source)
    if isinstance(source, memoryview):
        return source.nbytes
    if isinstance(source, str):
        return len(source.encode())
    if isinstance(source, os.PathLike):
        try:
            return os.stat(source).st_size
        except OSError:
            return None
    if hasattr(source, "read"):
        try:
            fd = source.fileno()  # type: ignore[union-attr]
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                return st.st_size - source.tell()  # type: ignore[union-attr]
        except (OSError, AttributeError, ValueError):
            return None
    return None


def _split(data: bytes | bytearray | memoryview) -> Iterable[bytes]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"files.write: the source yielded a {type(data).__name__}; it must yield bytes")
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CHUNK_SIZE):
        yield bytes(view[start:start + CHUNK_SIZE])


async def _from_file(f: IO[bytes]) -> AsyncIterator[bytes]:
    while True:
        data = await asyncio.to_thread(f.read, CHUNK_SIZE)
        if not data:
            return
        if isinstance(data, str):
            raise InvalidArgument("files.write: the file object is in text mode; open it with 'rb'")
        for piece in _split(data):
            yield piece


_END = object()


def check_source(source: WriteSource) -> None:
    """Refuse what `iter_chunks` cannot read, before any RPC starts."""
    if isinstance(source, (bytes, bytearray, memoryview, str, os.PathLike)) or hasattr(source, "read"):
        if isinstance(getattr(source, "mode", "b"), str) and "b" not in getattr(source, "mode", "b"):
            raise InvalidArgument("files.write: the file object is in text mode; open it with 'rb'")
        return
    if not isinstance(source, (AsyncIterable, Iterable)):
        raise InvalidArgument(f"files.write: cannot write a {type(source).__name__}; give bytes, str, a Path, "
                              "a binary file object or an iterable of bytes")


async def iter_chunks(source: WriteSource) -> AsyncIterator[bytes]:
    """Yield the source's bytes in chunks of at most CHUNK_SIZE."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        for piece in _split(source):
            yield piece
    elif isinstance(source, str):
        for piece in _split(source.encode()):
            yield piece
    elif isinstance(source, os.PathLike):
        f = await asyncio.to_thread(open, source, "rb")
        try:
            async for piece in _from_file(f):
                yield piece
        finally:
            f.close()
    elif hasattr(source, "read"):
        async for piece in _from_file(source):  # type: ignore[arg-type]
            yield piece
    elif isinstance(source, AsyncIterable):
        async for data in source:
            for piece in _split(data):
                yield piece
    elif isinstance(source, Iterable):
        it = iter(source)
        while (data := await asyncio.to_thread(next, it, _END)) is not _END:
            for piece in _split(data):  # type: ignore[arg-type]
                yield piece
    else:
        raise InvalidArgument(f"files.write: cannot write a {type(source).__name__}; give bytes, str, a Path, "
                              "a binary file object or an iterable of bytes")
