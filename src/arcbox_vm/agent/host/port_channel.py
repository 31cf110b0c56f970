"""Forwarded TCP connections: the host end of a port channel, and the splice between it
and a TCP stream (one accepted client connection).

A `PortChannel` is opened with PORT_CONNECT; the guest agent connects to 127.0.0.1:PORT in
the guest and answers PORT_CONNECTED (or ERROR, e.g. ``refused``). Then bytes flow both
ways with the protocol's credit: the host sends PORT_DATA only against credit the guest
granted, and grants credit back only for bytes written to the client socket and drained,
so the guest can never make the host hold more than one PORT_WINDOW per connection (more
than that is a protocol violation: the connection is dropped). PORT_EOF is a half-close
either way; PORT_CLOSE (either way) drops the connection at once (the client gets a reset).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host.channels import ChannelHost
from arcbox_vm.errors import AgentDisconnected, AgentError

log = logging.getLogger(__name__)

GRANT_BATCH = p.PORT_WINDOW // 4  # credit is returned in batches of at least this
STREAM_LIMIT = 64 * 1024  # the client stream's read buffer (its transport pauses at twice this)
WRITE_HIGH_WATER = 64 * 1024  # the client transport's write buffer before drain() waits
CLOSE_TIMEOUT = 30.0  # seconds a finished client connection gets to take its last bytes


class PortClosed(AgentError):
    """The guest dropped the forwarded connection (PORT_CLOSE): its program reset it."""

    def __init__(self, message: str = "the connection was reset in the guest") -> None:
        super().__init__(message, code="closed")


class PortChannel:
    """The host end of one forwarded connection (a `ChannelHandler`)."""

    def __init__(self, host: ChannelHost, channel: int, port: int) -> None:
        self._host = host
        self.channel = channel
        self.port = port
        loop = asyncio.get_running_loop()
        self._connected: asyncio.Future[None] = loop.create_future()
        self._incoming: collections.deque[bytes] = collections.deque()
        self.held = 0  # bytes from the guest queued or being written to the client
        self._ungranted = 0  # written to the client, not yet granted back (held + this <= PORT_WINDOW)
        self._peer_eof = False
        self._failure: BaseException | None = None
        self._wakeup = asyncio.Event()
        self.credit = p.PORT_WINDOW  # bytes we may still send to the guest
        self._done = False

    # -- frames from the guest (called by the connection's reader) --------------------

    def _on_frame(self, frame: p.Frame) -> None:
        t = frame.type
        if t == p.MsgType.PORT_DATA:
            if self._peer_eof or self.held + self._ungranted + len(frame.payload) > p.PORT_WINDOW:
                what = "after its PORT_EOF" if self._peer_eof else "beyond the credit it was granted"
                self._violation(f"the guest agent sent data {what} on port channel {self.channel}")
                return
            self._incoming.append(frame.payload)
            self.held += len(frame.payload)
        elif t == p.MsgType.PORT_EOF:
            self._peer_eof = True
        elif t == p.MsgType.WINDOW:
            self.credit = min(self.credit + p.decode_window(frame.payload), p.PORT_WINDOW)
        elif t == p.MsgType.PORT_CONNECTED:
            if not self._connected.done():
                self._connected.set_result(None)
        elif t == p.MsgType.PORT_CLOSE:
            self._fail(PortClosed())
        elif t == p.MsgType.ERROR:
            try:
                body = frame.json()
            except p.ProtocolError:
                body = {}
            code = str(body.get("code", p.ErrorCode.INTERNAL))
            self._fail(AgentError(str(body.get("message") or f"the guest agent refused port {self.port} ({code})"),
                                  code=code))
        else:
            log.warning("unexpected %r on port channel %d", frame, self.channel)
            return
        self._wakeup.set()

    def _on_disconnect(self, exc: BaseException) -> None:
        self._fail(exc)

    def _violation(self, message: str) -> None:
        log.warning("%s; dropping the connection", message)
        self._host.send_frame_nowait(p.encode_error(self.channel, p.ErrorCode.BAD_REQUEST, message))
        self._fail(AgentError(message, code=p.ErrorCode.BAD_REQUEST))

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._incoming.clear()
        if not self._connected.done():
            self._connected.set_exception(exc)
        self._wakeup.set()
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._host.release_channel(self)

    # -- the forwarding side ----------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done

    async def open(self) -> None:
        """PORT_CONNECT; returns once the guest connected. AgentError(code="refused") when
        nothing listens on the port in the guest."""
        await self._host.send_frame(p.encode_json(p.MsgType.PORT_CONNECT, self.channel, {"port": self.port}))
        await self._connected

    async def _wait(self) -> None:
        self._wakeup.clear()
        await self._wakeup.wait()

    async def read(self) -> bytes:
        """The next bytes from the guest; b"" at its EOF. Raises when the connection was dropped."""
        while not self._incoming:
            if self._failure is not None:
                raise self._failure
            if self._peer_eof:
                return b""
            await self._wait()
        return self._incoming.popleft()

    async def consumed(self, n: int) -> None:
        """`n` bytes from `read()` are written out: grant them back (in batches)."""
        self.held -= n
        self._ungranted += n
        if self._ungranted >= GRANT_BATCH or (not self._incoming and self._ungranted):
            inc, self._ungranted = self._ungranted, 0
            if not self._done:
                await self._host.send_frame(p.encode_window(self.channel, inc))

    async def write(self, data: bytes) -> None:
        """Send bytes to the guest program, waiting for credit as needed."""
        view = memoryview(data)
        while view:
            while self.credit <= 0 and self._failure is None:
                await self._wait()
            if self._failure is not None:
                raise self._failure
            n = min(len(view), self.credit, p.DATA_CHUNK)
            self.credit -= n
            await self._host.send_frame(p.encode_frame(p.MsgType.PORT_DATA, self.channel, bytes(view[:n])))
            view = view[n:]

    async def wait_credit(self) -> int:
        """Credit available to send (waits while there is none). Raises when dropped."""
        while self.credit <= 0 and self._failure is None:
            await self._wait()
        if self._failure is not None:
            raise self._failure
        return self.credit

    async def write_eof(self) -> None:
        if self._failure is not None:
            raise self._failure
        await self._host.send_frame(p.encode_frame(p.MsgType.PORT_EOF, self.channel))

    def close(self) -> None:
        """Drop the connection: PORT_CLOSE to the guest (its program sees a reset)."""
        if not self._done:
            self._host.send_frame_nowait(p.encode_frame(p.MsgType.PORT_CLOSE, self.channel))
            self._fail(PortClosed("the connection was closed by the host"))

    def finished(self) -> None:
        """Both directions ended cleanly: forget the channel (nothing is sent)."""
        if not self._done:
            self._finish()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a client connection with a reset (RST), dropping what is buffered."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def splice(channel: PortChannel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Forward between a client stream and a port channel until both directions ended.

    Client → guest: read only as much as the guest's credit allows. Guest → client: write,
    wait for the transport to drain, then grant the credit back. A failure on either side
    (reset, the guest's PORT_CLOSE, a lost agent) or cancellation drops the connection
    both ways: RST to the client, PORT_CLOSE to the guest. Never raises but CancelledError.
    """
    writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    async def upstream() -> None:
        while True:
            credit = await channel.wait_credit()
            data = await reader.read(min(credit, p.DATA_CHUNK))
            if not data:
                await channel.write_eof()
                return
            await channel.write(data)

    async def downstream() -> None:
        while True:
            data = await channel.read()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            await channel.consumed(len(data))

    tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
    clean = False
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in done if t.exception() is not None]
        if failed:
            exc = failed[0].exception()
            if not isinstance(exc, (ConnectionError, AgentDisconnected, PortClosed)):
                log.info("forwarded connection to guest port %d dropped: %s", channel.port, exc)
        else:
            clean = True
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        if not clean:
            channel.close()
            reset(writer)
    channel.finished()
    writer.close()  # after what is still buffered (at most WRITE_HIGH_WATER)
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except (ConnectionError, asyncio.TimeoutError):
        reset(writer)
    except BaseException:
        reset(writer)
        raise
