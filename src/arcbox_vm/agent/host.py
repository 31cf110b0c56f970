"""The host's side of the agent channel: handshake, multiplexing, flow control.

One `AgentConnection` wraps the byte stream the VMM hands us when the guest agent dials
(a virtio-serial chardev socket under QEMU, `<uds_path>_<port>` under Firecracker). A
reader task demultiplexes frames to `ExecSession`s by channel number. Output credit is
granted back to the guest only as the consumer takes chunks out, so a slow reader stops
the guest's pipes instead of growing host memory.

File transfers (`write_file`, `read_file`, `stat`, `list_dir`) use their own channels and
the same credit scheme in both directions: an upload sends FILE_DATA only against credit
the agent returns as it writes to disk, a download grants credit back only as the caller
takes chunks out. Neither side holds more than one window (1 MiB) per transfer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import posixpath
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from arcbox_vm.agent import protocol as p
from arcbox_vm.errors import (
    AgentDisconnected,
    AgentError,
    BootFailed,
    ExecError,
    FileTooLarge,
    GuestFileError,
    GuestFileNotFound,
    GuestNoSpace,
    GuestPermissionDenied,
    InvalidArgument,
)
from arcbox_vm.models import FileStat, OutputChunk

log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class ExitStatus:
    """How a guest command ended. exit_code is 128+signal when killed by a signal."""

    exit_code: int
    signal: int | None = None
    timed_out: bool = False


class ExecSession:
    """One command running in the guest, on its own channel.

    Iterate it (`async for chunk in session`) to get `OutputChunk`s; the last one has
    stream "exit". Writing stdin respects the credit the guest grants.
    """

    def __init__(self, conn: "AgentConnection", channel: int, request: dict[str, Any]) -> None:
        self._conn = conn
        self.channel = channel
        self.request = request
        self.pid: int | None = None
        self.exit_status: ExitStatus | None = None
        self._started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue: asyncio.Queue[OutputChunk | BaseException] = asyncio.Queue()
        self._stdin_credit = p.INITIAL_WINDOW
        self._credit_event = asyncio.Event()
        self._consumed = 0  # output bytes taken by the consumer, not yet granted back
        self._done = False

    # -- frames from the guest (called by the connection's reader) --------------------

    def _on_frame(self, frame: p.Frame) -> None:
        t = frame.type
        if t in (p.MsgType.STDOUT, p.MsgType.STDERR):
            stream = "stdout" if t == p.MsgType.STDOUT else "stderr"
            self._queue.put_nowait(OutputChunk(stream, frame.payload))
        elif t == p.MsgType.STARTED:
            body = frame.json()
            if body.get("attached"):  # a re-attached session starts with the stdin credit left
                self._stdin_credit = int(body.get("stdin_window", p.INITIAL_WINDOW))
            if not self._started.done():
                self._started.set_result(int(body.get("pid", 0)))
        elif t == p.MsgType.EXIT:
            body = frame.json()
            status = ExitStatus(int(body.get("exit_code", -1)), body.get("signal"), bool(body.get("timed_out")))
            self.exit_status = status
            self._queue.put_nowait(OutputChunk("exit", b"", status.exit_code))
            self._finish()
        elif t == p.MsgType.WINDOW:
            self._stdin_credit += p.decode_window(frame.payload)
            self._credit_event.set()
        elif t == p.MsgType.ERROR:
            body = frame.json()
            code = str(body.get("code", p.ErrorCode.INTERNAL))
            err = ExecError(str(body.get("message", "the guest agent reported an error")), code=code)
            if not self._started.done():
                self._started.set_exception(err)
            else:
                self._queue.put_nowait(err)
            self._finish()
        elif t == p.MsgType.PONG:
            pass
        else:
            log.warning("unexpected %r on exec channel %d", frame, self.channel)

    def _on_disconnect(self, exc: BaseException) -> None:
        if self._done:
            return
        if not self._started.done():
            self._started.set_exception(exc)
        else:
            self._queue.put_nowait(exc)
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._credit_event.set()
        self._conn._sessions.pop(self.channel, None)

    # -- consumer side ---------------------------------------------------------------

    async def wait_started(self) -> int:
        self.pid = await self._started
        return self.pid

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[OutputChunk]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.stream != "exit" and item.data:
                await self._grant(len(item.data))
            yield item
            if item.stream == "exit":
                return

    async def _grant(self, n: int) -> None:
        self._consumed += n
        if self._consumed >= p.INITIAL_WINDOW // 4 and not self._done:
            inc, self._consumed = self._consumed, 0
            with contextlib.suppress(AgentDisconnected):
                await self._conn._send(p.encode_window(self.channel, inc))

    async def collect(self) -> tuple[bytes, bytes, ExitStatus]:
        """Run to completion, returning (stdout, stderr, status). For small outputs."""
        out, err = bytearray(), bytearray()
        async for chunk in self:
            if chunk.stream == "stdout":
                out += chunk.data
            elif chunk.stream == "stderr":
                err += chunk.data
        assert self.exit_status is not None
        return bytes(out), bytes(err), self.exit_status

    async def write_stdin(self, data: bytes) -> None:
        """Send stdin bytes, waiting for guest credit when the window is used up."""
        view = memoryview(data)
        while view:
            while self._stdin_credit <= 0 and not self._done:
                self._credit_event.clear()
                await self._credit_event.wait()
            if self._done:
                raise AgentError("the command has already exited; stdin was not delivered", code="closed")
            n = min(len(view), self._stdin_credit, p.DATA_CHUNK)
            self._stdin_credit -= n
            await self._conn._send(p.encode_frame(p.MsgType.STDIN, self.channel, bytes(view[:n])))
            view = view[n:]

    async def close_stdin(self) -> None:
        if not self._done:
            await self._conn._send(p.encode_frame(p.MsgType.STDIN_EOF, self.channel))

    async def resize(self, rows: int, cols: int) -> None:
        if not self._done:
            await self._conn._send(p.encode_json(p.MsgType.RESIZE, self.channel, {"rows": rows, "cols": cols}))

    async def signal(self, signum: int) -> None:
        if not self._done:
            await self._conn._send(p.encode_json(p.MsgType.SIGNAL, self.channel, {"signal": int(signum)}))

    @property
    def done(self) -> bool:
        return self._done


class AgentConnection:
    """A live, handshaken channel to one guest agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict[str, Any],
                 decoder: p.FrameDecoder) -> None:
        self._reader = reader
        self._writer = writer
        self.hello = hello
        self._decoder = decoder
        self._sessions: dict[int, Any] = {}  # channel -> ExecSession or a file operation
        self.detached: dict[int, dict[str, Any]] = _detached_sessions(hello)
        self._channels = itertools.count(max(self.detached, default=0) + 1)  # never a detached one's number
        self._write_lock = asyncio.Lock()
        self._pings: dict[bytes, asyncio.Future[float]] = {}
        self._shutdown_ack: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read_loop(), name="agent-reader")

    @property
    def kernel_release(self) -> str:
        return str(self.hello.get("kernel", ""))

    async def _send(self, data: bytes) -> None:
        if self.closed.done():
            raise AgentDisconnected()
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                raise AgentDisconnected(f"writing to the guest agent failed: {exc}") from exc

    async def _read_loop(self) -> None:
        reason: BaseException = AgentDisconnected()
        try:
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    break
                for item in self._decoder.feed(data):
                    if isinstance(item, p.DecodeError):
                        log.warning("bad data from the guest agent: %s", item.message)
                        continue
                    self._dispatch(item)
        except (ConnectionError, OSError) as exc:
            reason = AgentDisconnected(f"the guest agent's channel failed: {exc}")
        except asyncio.CancelledError:
            reason = AgentDisconnected("the connection to the guest agent was closed by the host")
            raise
        except Exception as exc:  # a bug in dispatch must not hang every session
            log.exception("agent channel reader crashed")
            reason = AgentDisconnected(f"the host's agent reader failed: {exc!r}")
        finally:
            self._teardown(reason)

    def _teardown(self, reason: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        for session in list(self._sessions.values()):
            session._on_disconnect(reason)
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(reason)
        if self._shutdown_ack and not self._shutdown_ack.done():
            self._shutdown_ack.set_result(None)  # a closed channel is what shutdown looks like
        with contextlib.suppress(Exception):
            self._writer.close()

    def _dispatch(self, frame: p.Frame) -> None:
        if frame.channel != p.CONTROL_CHANNEL:
            session = self._sessions.get(frame.channel)
            if session is None:
                if frame.type not in (p.MsgType.WINDOW, p.MsgType.ERROR):
                    log.debug("frame for unknown channel %d dropped: %r", frame.channel, frame)
                return
            try:
                session._on_frame(frame)
            except p.ProtocolError as exc:
                log.warning("malformed %r from the guest agent: %s", frame, exc.message)
            return
        if frame.type == p.MsgType.PONG:
            fut = self._pings.pop(frame.payload, None)
            if fut and not fut.done():
                fut.set_result(time.perf_counter())
        elif frame.type == p.MsgType.PING:
            asyncio.ensure_future(self._send_quietly(p.encode_frame(p.MsgType.PONG, 0, frame.payload)))
        elif frame.type == p.MsgType.SHUTDOWN_ACK:
            if self._shutdown_ack and not self._shutdown_ack.done():
                self._shutdown_ack.set_result(None)
        elif frame.type == p.MsgType.ERROR:
            with contextlib.suppress(p.ProtocolError):
                body = frame.json()
                log.warning("guest agent error: %s: %s", body.get("code"), body.get("message"))
        elif frame.type == p.MsgType.HELLO:
            log.info("guest agent re-announced itself: %s", frame.payload[:200])
            asyncio.ensure_future(self._send_quietly(_hello_ack()))
        else:
            log.debug("unexpected control frame %r", frame)

    async def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(AgentDisconnected):
            await self._send(data)

    def _send_nowait(self, data: bytes) -> None:
        """Queue a small frame without waiting (cleanup of a failed or cancelled operation).

        Safe next to `_send`: `write()` appends whole frames to the transport's buffer, the
        lock only serialises waiting for it to drain.
        """
        if self.closed.done():
            return
        with contextlib.suppress(Exception):
            self._writer.write(data)

    def _new_channel(self) -> int:
        return next(self._channels)

    def reserve_channels(self, up_to: int) -> None:
        """Never hand out channel numbers <= `up_to` (they name earlier commands, e.g. in a
        state database that outlived the previous connection)."""
        nxt = self._new_channel()
        self._channels = itertools.count(max(nxt, up_to + 1))

    @property
    def supports_attach(self) -> bool:
        return p.FEATURE_ATTACH in (self.hello.get("features") or [])

    # -- public operations -----------------------------------------------------------

    async def exec(self, request: dict[str, Any]) -> ExecSession:
        """Start a command (an EXEC body from `protocol.exec_request`); returns once it runs.

        Raises ExecError when the guest cannot start it (not found, bad user, ...).
        """
        channel = self._new_channel()
        session = ExecSession(self, channel, request)
        self._sessions[channel] = session
        try:
            await self._send(p.encode_json(p.MsgType.EXEC, channel, request))
            await session.wait_started()
        except BaseException:
            self._sessions.pop(channel, None)
            raise
        return session

    async def attach(self, channel: int) -> ExecSession:
        """Take over a command that kept running, detached, while no host was connected
        (listed in this connection's HELLO, see `detached`). Its spooled output comes
        first, then the rest and the exit, as for `exec`.

        Raises ExecError(code="no_such_channel") when the agent has no such session.
        """
        if not self.supports_attach:
            raise ExecError("the guest agent is too old to re-attach commands; rebuild the image "
                            "(`arcbox-vm image build`) or re-inject the agent", code="unsupported")
        if channel in self._sessions:
            raise ExecError(f"channel {channel} is attached already", code=p.ErrorCode.CHANNEL_IN_USE)
        session = ExecSession(self, channel, {"argv": [str(self.detached.get(channel, {}).get("argv0", ""))]})
        self._sessions[channel] = session
        try:
            await self._send(p.encode_frame(p.MsgType.ATTACH, channel))
            await session.wait_started()
        except BaseException:
            if self._sessions.get(channel) is session:
                self._sessions.pop(channel, None)
            raise
        self.detached.pop(channel, None)
        return session

    # -- files -----------------------------------------------------------------------

    @property
    def supports_files(self) -> bool:
        return p.FEATURE_FILES in (self.hello.get("features") or [])

    def _require_files(self) -> None:
        if not self.supports_files:
            raise GuestFileError("the guest agent is too old for file transfer; rebuild the image "
                                 "(`arcbox-vm image build`) or re-inject the agent")

    def _open_channel(self, op: Any) -> None:
        self._sessions[op.channel] = op

    async def write_file(self, path: str, chunks: AsyncIterable[bytes], *, mode: int = 0o644, uid: int = 0,
                         gid: int = 0, make_parents: bool = False, size: int | None = None,
                         max_bytes: int = 0) -> int:
        """Stream `chunks` into the guest file `path` (atomically replaced); returns bytes written.

        The guest writes to a temporary file next to `path` and renames it into place after
        fsync; any failure (guest error, an exception from `chunks`, cancellation, a lost
        channel) removes the temporary file. `max_bytes` > 0 aborts with FileTooLarge once
        more than that many bytes came from `chunks`. Memory: one 64 KiB frame at a time.
        """
        self._require_files()
        body = p.file_write_request(path, mode, uid, gid, make_parents, size)
        _check_request(p.MsgType.FILE_WRITE, body)
        op = _FileWrite(self, self._new_channel(), path)
        self._open_channel(op)
        try:
            await self._send(p.encode_json(p.MsgType.FILE_WRITE, op.channel, body))
            await op.ready
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
                    n = await op.take_credit(len(view))
                    await self._send(p.encode_frame(p.MsgType.FILE_DATA, op.channel, bytes(view[:n])))
                    view = view[n:]
            op.check()
            await self._send(p.encode_frame(p.MsgType.FILE_END, op.channel))
            return await op.done
        except BaseException:
            op.cancel()
            raise
        finally:
            self._sessions.pop(op.channel, None)

    async def read_file(self, path: str, *, max_bytes: int = 0) -> "FileReader":
        """Open the guest file `path` for streaming: returns once the guest opened it.

        Iterate the reader for bytes chunks; `aclose()` (or `async with`) aborts early.
        `max_bytes` > 0 refuses (FileTooLarge) a file announced or found to be larger.
        """
        self._require_files()
        body = {"path": path}
        _check_request(p.MsgType.FILE_READ, body)
        reader = FileReader(self, self._new_channel(), path, max_bytes)
        self._open_channel(reader)
        try:
            await self._send(p.encode_json(p.MsgType.FILE_READ, reader.channel, body))
            await reader._opened
        except BaseException:
            await reader.aclose()
            raise
        if max_bytes and reader.size > max_bytes:
            await reader.aclose()
            raise FileTooLarge(f"{path} is {reader.size} bytes, more than the limit of {max_bytes} bytes")
        return reader

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileStat:
        """What the guest says about `path` (lstat when follow_symlinks is false)."""
        body = await self._file_request(p.MsgType.FILE_STAT, {"path": path, "follow_symlinks": follow_symlinks},
                                        p.MsgType.FILE_STAT_RESULT, path)
        return _file_stat(body, path)

    async def list_dir(self, path: str, *, limit: int = 0) -> "DirListing":
        """The entries of the guest directory `path`, sorted by name (not following symlinks).

        At most `limit` (0 = the protocol's maximum) entries; `.truncated` says some were left out.
        """
        req: dict[str, Any] = {"path": path}
        if limit:
            req["limit"] = limit
        body = await self._file_request(p.MsgType.FILE_LIST, req, p.MsgType.FILE_LIST_RESULT, path)
        entries = body.get("entries")
        if not isinstance(entries, list):
            raise AgentError("the guest agent sent a malformed directory listing")
        listing = DirListing(_file_stat(e, posixpath.join(path, str(e.get("name", "")))) for e in entries
                             if isinstance(e, dict))
        listing.truncated = bool(body.get("truncated"))
        return listing

    async def _file_request(self, type: int, body: dict[str, Any], reply: int, path: str) -> dict[str, Any]:
        self._require_files()
        _check_request(type, body)
        op = _FileRequest(self, self._new_channel(), path, reply)
        self._open_channel(op)
        try:
            await self._send(p.encode_json(type, op.channel, body))
            return await op.result
        finally:
            self._sessions.pop(op.channel, None)

    async def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the agent in seconds."""
        token = os.urandom(8)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[token] = fut
        start = time.perf_counter()
        try:
            await self._send(p.encode_frame(p.MsgType.PING, 0, token))
            end = await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(token, None)
        return end - start

    async def shutdown(self, action: str = "reboot", timeout: float = 5.0) -> bool:
        """Ask the agent to stop everything and halt the VM. True if it acknowledged."""
        self._shutdown_ack = asyncio.get_running_loop().create_future()
        try:
            await self._send(p.encode_json(p.MsgType.SHUTDOWN, 0, {"action": action}))
            await asyncio.wait_for(self._shutdown_ack, timeout)
            return True
        except (AgentDisconnected, asyncio.TimeoutError):
            return False

    def start_keepalive(self, interval: float, timeout: float) -> None:
        """Ping every `interval` s; no answer for `timeout` s declares the agent gone: every
        session then ends with AgentDisconnected and `closed` resolves (never a hang)."""
        self._keepalive = asyncio.create_task(self._keepalive_loop(interval, timeout), name="agent-keepalive")

    async def _keepalive_loop(self, interval: float, timeout: float) -> None:
        while not self.closed.done():
            await asyncio.sleep(interval)
            try:
                await self.ping(timeout)
            except asyncio.TimeoutError:
                log.warning("the guest agent did not answer a ping for %.0f s; giving up on it", timeout)
                self._teardown(AgentDisconnected(f"the guest agent did not answer for {timeout:.0f} s "
                                                 "(the VM is frozen or overloaded)"))
                self._reader_task.cancel()
                return
            except AgentDisconnected:
                return

    async def close(self) -> None:
        keepalive = getattr(self, "_keepalive", None)
        if keepalive is not None:
            keepalive.cancel()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        with contextlib.suppress(Exception):
            self._writer.close()
            await self._writer.wait_closed()


# -- file operations ---------------------------------------------------------------------

READ_COALESCE = 1 << 20  # a FileReader joins queued frames into chunks of up to this many bytes


class DirListing(list):
    """`list_dir`'s result: a list of FileStat plus `truncated` (the guest left entries out)."""

    truncated: bool = False


def file_error(body: dict[str, Any], path: str) -> Exception:
    """The exception for a guest ERROR about a file operation (`.code` holds the guest's code)."""
    code = str(body.get("code", p.ErrorCode.INTERNAL))
    msg = str(body.get("message", "")) or f"the guest agent refused the operation on {path} ({code})"
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
    if not isinstance(body, dict):
        raise AgentError("the guest agent sent a malformed file description")
    try:
        return FileStat(path=str(body.get("path") or path), name=str(body.get("name", "")),
                        type=str(body.get("type", "other")), size=int(body.get("size", 0)),
                        mode=int(body.get("mode", 0)), uid=int(body.get("uid", 0)), gid=int(body.get("gid", 0)),
                        mtime=float(body.get("mtime", 0.0)), link_target=str(body.get("link_target", "")))
    except (TypeError, ValueError) as exc:
        raise AgentError(f"the guest agent sent a malformed file description: {exc}") from None


class _FileOp:
    """Common part of the file operations registered on a channel."""

    def __init__(self, conn: AgentConnection, channel: int, path: str) -> None:
        self._conn = conn
        self.channel = channel
        self.path = path
        self.finished = False

    def _finish(self) -> None:
        self.finished = True
        if self._conn._sessions.get(self.channel) is self:
            del self._conn._sessions[self.channel]

    def cancel(self) -> None:
        """Abandon the operation; the guest is told (it removes a partial upload)."""
        if not self.finished:
            self._finish()
            self._conn._send_nowait(p.encode_error(self.channel, p.ErrorCode.CANCELLED,
                                                  "the host cancelled the transfer"))

    def _body(self, frame: p.Frame) -> dict[str, Any] | None:
        try:
            return frame.json()
        except p.ProtocolError as exc:
            self._fail(AgentError(f"the guest agent sent a malformed {frame!r}: {exc.message}"))
            return None

    def _fail(self, exc: BaseException) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class _FileRequest(_FileOp):
    """FILE_STAT / FILE_LIST: one request, one answer."""

    def __init__(self, conn: AgentConnection, channel: int, path: str, reply: int) -> None:
        super().__init__(conn, channel, path)
        self.reply = reply
        self.result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def _on_frame(self, frame: p.Frame) -> None:
        if frame.type == self.reply:
            body = self._body(frame)
            if body is not None and not self.result.done():
                self.result.set_result(body)
            self._finish()
        elif frame.type == p.MsgType.ERROR:
            body = self._body(frame)
            if body is not None:
                self._fail(file_error(body, self.path))
        else:
            log.warning("unexpected %r on file channel %d", frame, self.channel)

    def _fail(self, exc: BaseException) -> None:
        if not self.result.done():
            self.result.set_exception(exc)
        self._finish()

    def _on_disconnect(self, exc: BaseException) -> None:
        self._fail(exc)


class _FileWrite(_FileOp):
    """The host half of an upload: waits for FILE_READY, spends credit, waits for FILE_DONE."""

    def __init__(self, conn: AgentConnection, channel: int, path: str) -> None:
        super().__init__(conn, channel, path)
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[str] = loop.create_future()
        self.done: asyncio.Future[int] = loop.create_future()
        self.credit = p.INITIAL_WINDOW
        self._credit_event = asyncio.Event()
        self.error: BaseException | None = None

    def _on_frame(self, frame: p.Frame) -> None:
        t = frame.type
        if t == p.MsgType.WINDOW:
            try:
                self.credit += p.decode_window(frame.payload)
            except p.ProtocolError as exc:
                self._fail(AgentError(f"the guest agent sent a malformed WINDOW: {exc.message}"))
                return
            self._credit_event.set()
        elif t == p.MsgType.FILE_READY:
            if self._body(frame) is not None and not self.ready.done():
                self.ready.set_result(self.path)
        elif t == p.MsgType.FILE_DONE:
            body = self._body(frame)
            if body is not None:
                if not self.ready.done():
                    self.ready.set_result(self.path)
                if not self.done.done():
                    self.done.set_result(int(body.get("size", 0)))
                self._finish()
        elif t == p.MsgType.ERROR:
            body = self._body(frame)
            if body is not None:
                self._fail(file_error(body, self.path))
        else:
            log.warning("unexpected %r on file channel %d", frame, self.channel)

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
        n = min(want, self.credit, p.DATA_CHUNK)
        self.credit -= n
        return n


class FileReader:
    """A download in progress: `size` (as announced), `info` (a FileStat), async-iterates bytes.

    Credit is granted back to the guest only as chunks are taken, so a slow consumer
    stops the guest's reads; at most one window (1 MiB) is ever queued here. A guest that
    sends beyond its credit is cut off. `aclose()` aborts the transfer (also `async with`).
    """

    def __init__(self, conn: AgentConnection, channel: int, path: str, max_bytes: int = 0) -> None:
        self._conn = conn
        self.channel = channel
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self.info: FileStat | None = None
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue: collections.deque[bytes] = collections.deque()
        self._event = asyncio.Event()
        self._granted = p.INITIAL_WINDOW  # credit given to the guest, in total
        self._received = 0
        self._consumed = 0  # taken by the consumer, not yet granted back
        self._delivered = 0
        self._eof = False
        self._error: BaseException | None = None
        self.finished = False

    # -- frames from the guest --------------------------------------------------------

    def _on_frame(self, frame: p.Frame) -> None:
        t = frame.type
        if t == p.MsgType.FILE_DATA:
            self._received += len(frame.payload)
            if self._received > self._granted:
                self._fail(AgentError(f"the guest agent sent more of {self.path} than the window allows; "
                                      "transfer aborted", code=p.ErrorCode.BAD_REQUEST), tell_guest=True)
                return
            self._queue.append(frame.payload)
            self._event.set()
        elif t == p.MsgType.FILE_INFO:
            try:
                self.info = _file_stat(frame.json(), self.path)
            except (p.ProtocolError, AgentError) as exc:
                self._fail(AgentError(f"the guest agent sent a malformed FILE_INFO: {exc}"), tell_guest=True)
                return
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
            log.warning("unexpected %r on file channel %d", frame, self.channel)

    def _on_disconnect(self, exc: BaseException) -> None:
        self._fail(exc)

    def _fail(self, exc: BaseException, tell_guest: bool = False) -> None:
        if self._error is None and not self._eof:
            self._error = exc
        if not self._opened.done():
            self._opened.set_exception(exc)
            self._opened.exception()
        self._queue.clear()
        self._event.set()
        if tell_guest and not self.finished:
            self._conn._send_nowait(p.encode_error(self.channel, p.ErrorCode.CANCELLED, "transfer aborted by the host"))
        self._unregister()

    def _unregister(self) -> None:
        self.finished = True
        if self._conn._sessions.get(self.channel) is self:
            del self._conn._sessions[self.channel]

    # -- consumer side ---------------------------------------------------------------

    def __aiter__(self) -> "FileReader":
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
        data = parts[0] if len(parts) == 1 else b"".join(parts)
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
                await self._conn._send(p.encode_window(self.channel, inc))

    async def read_all(self) -> bytes:
        """Everything, in memory (for small files)."""
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        """Stop the transfer (the guest closes the file); safe to call more than once."""
        if not self.finished:
            self._unregister()
            self._conn._send_nowait(p.encode_error(self.channel, p.ErrorCode.CANCELLED, "the host closed the download"))
        self._queue.clear()
        if self._error is None and not self._eof:
            self._error = AgentError(f"the download of {self.path} was closed", code="closed")
        if not self._opened.done():
            self._opened.cancel()

    async def __aenter__(self) -> "FileReader":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _detached_sessions(hello: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """HELLO's "detached" list as {channel: entry}; malformed entries are ignored."""
    out: dict[int, dict[str, Any]] = {}
    items = hello.get("detached")
    for item in items if isinstance(items, list) else []:
        ch = item.get("channel") if isinstance(item, dict) else None
        if isinstance(ch, int) and not isinstance(ch, bool) and 0 < ch <= 0xFFFFFFFF:
            out[ch] = item
    return out


def _hello_ack() -> bytes:
    return p.encode_json(p.MsgType.HELLO_ACK, 0, {"proto": p.PROTOCOL_VERSION})


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> AgentConnection:
    """Wait for the agent's HELLO on a fresh stream, check its version, acknowledge it."""
    decoder = p.FrameDecoder()
    while True:
        data = await reader.read(_READ_SIZE)
        if not data:
            raise AgentDisconnected("the channel closed before the guest agent said HELLO")
        for item in decoder.feed(data):
            if isinstance(item, p.DecodeError) or item.type != p.MsgType.HELLO:
                continue  # noise before HELLO (e.g. a stale partial frame) is skipped
            try:
                hello = item.json()
            except p.ProtocolError:
                continue
            proto = hello.get("proto")
            if proto not in p.SUPPORTED_VERSIONS:
                writer.write(p.encode_error(0, p.ErrorCode.VERSION,
                                            f"host supports protocol {sorted(p.SUPPORTED_VERSIONS)}, agent sent {proto!r}"))
                await writer.drain()
                raise AgentError(
                    f"the guest agent speaks protocol {proto!r}, this host supports {sorted(p.SUPPORTED_VERSIONS)}: "
                    "rebuild the image (`arcbox-vm image build`) or re-inject the agent", code="version")
            writer.write(_hello_ack())
            await writer.drain()
            conn = AgentConnection(reader, writer, hello, decoder)
            # frames that arrived in the same read as HELLO
            return conn


class AgentListener:
    """Listens on the endpoint's Unix socket and yields the agent's connection.

    Bind it *before* starting the VMM: the VMM connects to it (QEMU as a chardev client,
    Firecracker when the guest dials its vsock port).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._on_connect, path=str(self.path),
                                                       limit=_READ_SIZE * 2)
        os.chmod(self.path, 0o600)

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.put_nowait((reader, writer))

    async def accept(self, timeout: float, vmm_exit: asyncio.Future[Any] | None = None,
                     describe_exit: Any = None) -> AgentConnection:
        """Wait for a connection whose agent says HELLO; fail fast if the VMM exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BootFailed(f"the guest agent did not say HELLO within {timeout:.0f} s; "
                                 "see the VM console log for why")
            get = asyncio.ensure_future(self._conns.get())
            waiters: set[asyncio.Future[Any]] = {get}
            if vmm_exit is not None:
                waiters.add(vmm_exit)
            done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                if vmm_exit is not None and vmm_exit in done:
                    raise BootFailed(describe_exit() if callable(describe_exit) else "the VMM exited during boot")
                continue
            reader, writer = get.result()
            hs = asyncio.ensure_future(handshake(reader, writer))
            waiters = {hs} | ({vmm_exit} if vmm_exit is not None else set())
            done, _ = await asyncio.wait(waiters, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if hs in done:
                try:
                    return hs.result()
                except AgentDisconnected:
                    continue  # e.g. QEMU reconnecting; wait for the next connection
            hs.cancel()
            with contextlib.suppress(BaseException):
                await hs
            writer.close()
            if vmm_exit is not None and vmm_exit in done:
                raise BootFailed(describe_exit() if callable(describe_exit) else "the VMM exited during boot")

    async def close(self, unlink: bool = True) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        while not self._conns.empty():
            _, w = self._conns.get_nowait()
            w.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
