"""File transfers over the agent channel: upload, download, stat, list.

Each transfer has its own channel and uses the same credit scheme as exec in both
directions: an upload sends FILE_DATA only against credit the agent returns as it writes
to disk, a download grants credit back only as the caller takes chunks out. Neither side
holds more than one window (1 MiB) per transfer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import posixpath
from collections.abc import AsyncIterable, Callable
from typing import Any

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host import limits
from arcbox_vm.agent.host.channels import ChannelHost
from arcbox_vm.agent.host.limits import ProtocolViolation
from arcbox_vm.errors import (
    AgentDisconnected,
    AgentError,
    FileTooLarge,
    GuestFileError,
    GuestFileNotFound,
    GuestNoSpace,
    GuestPermissionDenied,
    InvalidArgument,
)
from arcbox_vm.models import FileStat

log = logging.getLogger(__name__)

# FILE_DATA frames of an upload: the guest's per-frame work (decode, route, write) is
# interpreted Python under emulation, so 4x fewer frames than DATA_CHUNK is measurably
# faster there; the guest writes each one straight from its receive buffer.
UPLOAD_FRAME = 256 * 1024
READ_COALESCE = 1 << 20  # a FileReader joins queued frames into chunks of up to this many bytes
SMALL_FRAME = 4096  # FILE_DATA frames smaller than this are joined as they arrive (bounds the count of queued objects)


class DirListing(list):
    """`list_dir`'s result: a list of FileStat plus `truncated` (the guest left entries out)."""

    truncated: bool = False


def file_error(body: dict[str, Any], path: str) -> Exception:
    """The exception for a guest ERROR about a file operation (`.code` holds the guest's code;
    code and message are checked and bounded, see `limits.error_body`)."""
    code, msg = limits.error_body(body)
    msg = msg or f"the guest agent refused the operation on {path} ({code})"
    exc: Exception
    if code == p.ErrorCode.NOT_FOUND:
        exc = GuestFileNotFound(msg, path)
    elif code == p.ErrorCode.PERMISSION:
        exc = GuestPermissionDenied(msg, path)
    elif code == p.ErrorCode.TOO_LARGE:
        exc = FileTooLarge(msg)
    elif code == "no_space":
        exc = GuestNoSpace(msg, path)
    elif code == p.ErrorCode.BAD_REQUEST:
        exc = InvalidArgument(msg)
    elif code in (p.ErrorCode.INTERNAL, p.ErrorCode.NO_SUCH_CHANNEL, p.ErrorCode.CHANNEL_IN_USE,
                  p.ErrorCode.UNKNOWN_TYPE, p.ErrorCode.OVERSIZED, p.ErrorCode.BAD_FRAME):
        exc = AgentError(msg, code=code)
    else:  # is_a_directory, not_a_directory, exists, no_space, not_regular, io, too_many, ...
        exc = GuestFileError(msg, path)
    exc.code = code  # type: ignore[attr-defined]
    return exc


def _check_request(type: int, body: dict[str, Any]) -> None:
    try:
        p.validate_file_request(type, body)
    except p.ProtocolError as exc:
        raise InvalidArgument(exc.message) from None


def _file_stat(body: Any, path: str) -> FileStat:
    """A stat object from the guest as a FileStat (every field checked: ProtocolError)."""
    f = limits.stat_fields(body)
    f["path"] = f["path"] or path
    return FileStat(**f)


def _dir_listing(body: dict[str, Any], path: str) -> DirListing:
    """A FILE_LIST_RESULT body as a DirListing of the directory `path` (checked: ProtocolError)."""
    entries = body.get("entries")
    if not isinstance(entries, list) or len(entries) > p.LIST_LIMIT:
        raise p.ProtocolError(p.ErrorCode.BAD_REQUEST,
                              f"entries must be a list of at most {p.LIST_LIMIT} stat objects")
    listing = DirListing()
    for e in entries:
        f = limits.stat_fields(e)
        f["path"] = posixpath.join(path, f["name"])
        listing.append(FileStat(**f))
    listing.truncated = limits.guest_bool(body, "truncated")
    return listing


class _FileOp:
    """Common part of the file operations registered on a channel."""

    def __init__(self, host: ChannelHost, channel: int, path: str) -> None:
        self._host = host
        self.channel = channel
        self.path = path
        self.finished = False

    def _finish(self) -> None:
        self.finished = True
        self._host.release_channel(self)

    def cancel(self) -> None:
        """Abandon the operation; the guest is told (it removes a partial upload)."""
        if not self.finished:
            self._finish()
            self._host.send_frame_nowait(p.encode_error(self.channel, p.ErrorCode.CANCELLED,
                                                        "the host cancelled the transfer"))

    def _body(self, frame: p.Frame) -> dict[str, Any]:
        """The frame's JSON body; bad JSON raises ProtocolError (the connection ends the
        channel with ProtocolViolation)."""
        return frame.json()

    def _fail(self, exc: BaseException) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class _FileRequest(_FileOp):
    """FILE_STAT / FILE_LIST: one request, one answer, checked by `parse` as it arrives."""

    def __init__(self, host: ChannelHost, channel: int, path: str, reply: int,
                 parse: Callable[[dict[str, Any], str], Any]) -> None:
        super().__init__(host, channel, path)
        self.reply = reply
        self.parse = parse
        self.result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def run(self, type: int, body: dict[str, Any]) -> Any:
        """Send the request; returns the parsed answer (raises the guest's error)."""
        await self._host.send_frame(p.encode_json(type, self.channel, body))
        return await self.result

    def _on_frame(self, frame: p.Frame) -> None:
        if frame.type == self.reply:
            result = self.parse(self._body(frame), self.path)
            if not self.result.done():
                self.result.set_result(result)
            self._finish()
        elif frame.type == p.MsgType.ERROR:
            self._fail(file_error(self._body(frame), self.path))
        else:
            raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, f"{frame!r} is not valid on this file channel")

    def _fail(self, exc: BaseException) -> None:
        if not self.result.done():
            self.result.set_exception(exc)
            self.result.exception()  # retrieved: `run` may have been cancelled already
        self._finish()

    def _on_disconnect(self, exc: BaseException) -> None:
        self._fail(exc)


class _FileWrite(_FileOp):
    """The host half of an upload: waits for FILE_READY, spends credit, waits for FILE_DONE."""

    def __init__(self, host: ChannelHost, channel: int, path: str) -> None:
        super().__init__(host, channel, path)
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[str] = loop.create_future()
        self.done: asyncio.Future[int] = loop.create_future()
        self.credit = p.INITIAL_WINDOW
        self._credit_event = asyncio.Event()
        self.error: BaseException | None = None

    async def run(self, body: dict[str, Any], chunks: AsyncIterable[bytes], *, size: int | None,
                  max_bytes: int) -> int:
        """Send the FILE_WRITE request `body`, then `chunks` against credit, then FILE_END;
        returns the size the guest wrote. Any failure cancels the upload in the guest."""
        path = self.path
        try:
            await self._host.send_frame(p.encode_json(p.MsgType.FILE_WRITE, self.channel, body))
            await self.ready
            sent = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                view = memoryview(chunk).cast("B")
                sent += len(view)
                if max_bytes and sent > max_bytes:
                    raise FileTooLarge(f"{path}: the upload exceeds the limit of {max_bytes} bytes")
                if size is not None and sent > size:
                    raise InvalidArgument(f"{path}: the upload sent more than its declared size of {size} bytes")
                while view:
                    n = await self.take_credit(len(view))
                    await self._host.send_frame(p.encode_frame(p.MsgType.FILE_DATA, self.channel, view[:n]))
                    view = view[n:]
            self.check()
            await self._host.send_frame(p.encode_frame(p.MsgType.FILE_END, self.channel))
            return await self.done
        except BaseException:
            self.cancel()
            raise

    def _on_frame(self, frame: p.Frame) -> None:
        t = frame.type
        if t == p.MsgType.WINDOW:
            self.credit += p.decode_window(frame.payload)
            self._credit_event.set()
        elif t == p.MsgType.FILE_READY:
            self._body(frame)
            if not self.ready.done():
                self.ready.set_result(self.path)
        elif t == p.MsgType.FILE_DONE:
            size = limits.guest_int(self._body(frame), "size", 0, limits.MAX_FILE_SIZE, 0)
            if not self.ready.done():
                self.ready.set_result(self.path)
            if not self.done.done():
                self.done.set_result(size)
            self._finish()
        elif t == p.MsgType.ERROR:
            self._fail(file_error(self._body(frame), self.path))
        else:
            raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, f"{frame!r} is not valid on a file write channel")

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        for fut in (self.ready, self.done):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: `done` may never be awaited after an early failure
        self._credit_event.set()
        self._finish()

    def _on_disconnect(self, exc: BaseException) -> None:
        self._fail(exc)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    async def take_credit(self, want: int) -> int:
        """Wait for credit; returns how many bytes (<= want, <= one frame) may be sent now."""
        while self.credit <= 0 and self.error is None:
            self._credit_event.clear()
            await self._credit_event.wait()
        self.check()
        n = min(want, self.credit, UPLOAD_FRAME)
        self.credit -= n
        return n


class FileReader:
    """A download in progress: `size` (as announced), `info` (a FileStat), async-iterates bytes.

    Credit is granted back to the guest only as chunks are taken, so a slow consumer
    stops the guest's reads; at most one window (1 MiB) is ever queued here. A guest that
    sends beyond its credit is cut off. `aclose()` aborts the transfer (also `async with`).
    """

    def __init__(self, host: ChannelHost, channel: int, path: str, max_bytes: int = 0) -> None:
        self._host = host
        self.channel = channel
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self.info: FileStat | None = None
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue: collections.deque[bytes | bytearray] = collections.deque()
        self._event = asyncio.Event()
        self._granted = p.INITIAL_WINDOW  # credit given to the guest, in total
        self._received = 0
        self._consumed = 0  # taken by the consumer, not yet granted back
        self._delivered = 0
        self._eof = False
        self._error: BaseException | None = None
        self.finished = False

    async def _open(self, body: dict[str, Any]) -> None:
        """Send the FILE_READ request `body`; returns once the guest opened the file."""
        try:
            await self._host.send_frame(p.encode_json(p.MsgType.FILE_READ, self.channel, body))
            await self._opened
        except BaseException:
            await self.aclose()
            raise
        if self.max_bytes and self.size > self.max_bytes:
            await self.aclose()
            raise FileTooLarge(f"{self.path} is {self.size} bytes, more than the limit of {self.max_bytes} bytes")

    # -- frames from the guest --------------------------------------------------------

    def _on_frame(self, frame: p.Frame) -> None:
        t = frame.type
        if t == p.MsgType.FILE_DATA:
            n = len(frame.payload)
            self._received += n
            if self._received > self._granted:
                raise ProtocolViolation(f"the guest agent sent more of {self.path} than the window allows "
                                        f"({self._received - self._granted} bytes beyond the credit); "
                                        "transfer aborted")
            if not n:
                return  # an empty frame carries nothing (and must cost nothing)
            tail = self._queue[-1] if self._queue else None
            if n < SMALL_FRAME and isinstance(tail, bytearray) and len(tail) + n <= SMALL_FRAME:
                tail += frame.payload  # small frames are joined: a window of 1-byte frames stays a window
            else:
                self._queue.append(bytearray(frame.payload) if n < SMALL_FRAME else frame.payload)
            self._event.set()
        elif t == p.MsgType.FILE_INFO:
            if self.info is not None:
                raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, "FILE_INFO twice")
            self.info = _file_stat(frame.json(), self.path)
            self.size = self.info.size
            if not self._opened.done():
                self._opened.set_result(None)
        elif t == p.MsgType.FILE_END:
            self._eof = True
            self._event.set()
            self._unregister()
        elif t == p.MsgType.ERROR:
            try:
                body = frame.json()
            except p.ProtocolError:
                body = {}
            self._fail(file_error(body, self.path))
        else:
            raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, f"{frame!r} is not valid on a file read channel")

    def _on_disconnect(self, exc: BaseException) -> None:
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self._eof:
            self._error = exc
        if not self._opened.done():
            self._opened.set_exception(exc)
            self._opened.exception()
        self._queue.clear()
        self._event.set()
        self._unregister()

    def _unregister(self) -> None:
        self.finished = True
        self._host.release_channel(self)

    # -- consumer side ---------------------------------------------------------------

    def __aiter__(self) -> FileReader:
        return self

    async def __anext__(self) -> bytes:
        while not self._queue:
            if self._error is not None:
                raise self._error
            if self._eof:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        parts = [self._queue.popleft()]
        total = len(parts[0])
        while self._queue and total + len(self._queue[0]) <= READ_COALESCE:
            total += len(self._queue[0])
            parts.append(self._queue.popleft())
        data = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        self._delivered += total
        if self.max_bytes and self._delivered > self.max_bytes:
            await self.aclose()
            raise FileTooLarge(f"{self.path} grew beyond the limit of {self.max_bytes} bytes while it was read")
        await self._grant(total)
        return data

    async def _grant(self, n: int) -> None:
        self._consumed += n
        if self._consumed >= p.INITIAL_WINDOW // 4 and not self.finished:
            inc, self._consumed = self._consumed, 0
            self._granted += inc
            with contextlib.suppress(AgentDisconnected):
                await self._host.send_frame(p.encode_window(self.channel, inc))

    async def read_all(self) -> bytes:
        """Everything, in memory (for small files)."""
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        """Stop the transfer (the guest closes the file); safe to call more than once."""
        if not self.finished:
            self._unregister()
            self._host.send_frame_nowait(p.encode_error(self.channel, p.ErrorCode.CANCELLED,
                                                        "the host closed the download"))
        self._queue.clear()
        if self._error is None and not self._eof:
            self._error = AgentError(f"the download of {self.path} was closed", code="closed")
        if not self._opened.done():
            self._opened.cancel()

    async def __aenter__(self) -> FileReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
