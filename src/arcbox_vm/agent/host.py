"""The host's side of the agent channel: handshake, multiplexing, flow control.

One `AgentConnection` wraps the byte stream the VMM hands us when the guest agent dials
(a virtio-serial chardev socket under QEMU, `<uds_path>_<port>` under Firecracker). A
reader task demultiplexes frames to `ExecSession`s by channel number. Output credit is
granted back to the guest only as the consumer takes chunks out, so a slow reader stops
the guest's pipes instead of growing host memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from arcbox_vm.agent import protocol as p
from arcbox_vm.errors import AgentDisconnected, AgentError, BootFailed, ExecError
from arcbox_vm.models import OutputChunk

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
        self._sessions: dict[int, ExecSession] = {}
        self._channels = itertools.count(1)
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

    # -- public operations -----------------------------------------------------------

    async def exec(self, request: dict[str, Any]) -> ExecSession:
        """Start a command (an EXEC body from `protocol.exec_request`); returns once it runs.

        Raises ExecError when the guest cannot start it (not found, bad user, ...).
        """
        channel = next(self._channels)
        session = ExecSession(self, channel, request)
        self._sessions[channel] = session
        try:
            await self._send(p.encode_json(p.MsgType.EXEC, channel, request))
            await session.wait_started()
        except BaseException:
            self._sessions.pop(channel, None)
            raise
        return session

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

    async def close(self) -> None:
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        with contextlib.suppress(Exception):
            self._writer.close()
            await self._writer.wait_closed()


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
