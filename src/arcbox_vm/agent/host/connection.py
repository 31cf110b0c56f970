"""The connection to one guest agent: read loop, dispatch, control frames, channel numbers.

One `AgentConnection` wraps the byte stream the VMM hands us when the guest agent dials
(a virtio-serial chardev socket under QEMU, `<uds_path>_<port>` under Firecracker). A
reader task demultiplexes frames by channel number to the handlers in its `ChannelTable`
(exec sessions, file transfers); channel 0 (control: PING/PONG, SHUTDOWN, ERROR, a
re-announced HELLO) it answers itself. It is the `ChannelHost` its handlers send through.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterable, Iterable
from typing import Any

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host.channels import READ_SIZE, ChannelHandler, ChannelTable
from arcbox_vm.agent.host.exec_channel import ExecChannel
from arcbox_vm.agent.host.file_ops import (
    DirListing,
    FileReader,
    _check_request,
    _dir_listing,
    _file_stat,
    _FileRequest,
    _FileWrite,
)
from arcbox_vm.agent.host.port_channel import PortChannel
from arcbox_vm.errors import AgentDisconnected, AgentError, AgentUnresponsive, ExecError, GuestFileError
from arcbox_vm.models import FileStat

log = logging.getLogger(__name__)


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


class AgentConnection:
    """A live, handshaken channel to one guest agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict[str, Any],
                 decoder: p.FrameDecoder, pending: Iterable[p.Frame | p.DecodeError] = ()) -> None:
        """`decoder` holds what was read after HELLO but not decoded yet; `pending` is what was
        decoded after it (both from the handshake's last read): dispatched before reading on."""
        self._reader = reader
        self._writer = writer
        self.hello = hello
        self._decoder = decoder
        self._pending = list(pending)
        self._table = ChannelTable()  # channel -> ExecChannel or a file operation
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

    # -- ChannelHost: what the channel handlers use -----------------------------------

    async def send_frame(self, data: bytes) -> None:
        if self.closed.done():
            raise AgentDisconnected()
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                raise AgentDisconnected(f"writing to the guest agent failed: {exc}") from exc

    def send_frame_nowait(self, data: bytes) -> None:
        """Queue a small frame without waiting (cleanup of a failed or cancelled operation).

        Safe next to `send_frame`: `write()` appends whole frames to the transport's buffer,
        the lock only serialises waiting for it to drain.
        """
        if self.closed.done():
            return
        with contextlib.suppress(Exception):
            self._writer.write(data)

    def release_channel(self, handler: ChannelHandler) -> None:
        self._table.remove(handler)

    # -- the reader ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason: BaseException = AgentDisconnected()
        try:
            pending, self._pending = self._pending, []
            self._dispatch_all(pending)
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    break
                self._dispatch_all(self._decoder.feed(data))
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

    def _dispatch_all(self, items: Iterable[p.Frame | p.DecodeError]) -> None:
        for item in items:
            if isinstance(item, p.DecodeError):
                log.warning("bad data from the guest agent: %s", item.message)
                continue
            self._dispatch(item)

    def _teardown(self, reason: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        for handler in self._table.handlers():
            handler._on_disconnect(reason)
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(reason)
        if self._shutdown_ack and not self._shutdown_ack.done():
            self._shutdown_ack.set_result(None)  # a closed channel is what shutdown looks like
        with contextlib.suppress(Exception):
            self._writer.close()

    def _dispatch(self, frame: p.Frame) -> None:
        if frame.channel != p.CONTROL_CHANNEL:
            handler = self._table.get(frame.channel)
            if handler is None:
                if frame.type not in (p.MsgType.WINDOW, p.MsgType.ERROR):
                    log.debug("frame for unknown channel %d dropped: %r", frame.channel, frame)
                return
            try:
                handler._on_frame(frame)
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
            await self.send_frame(data)

    # -- channel numbers -------------------------------------------------------------

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

    # -- commands --------------------------------------------------------------------

    async def exec(self, request: dict[str, Any]) -> ExecChannel:
        """Start a command (an EXEC body from `protocol.exec_request`); returns once it runs.

        Raises ExecError when the guest cannot start it (not found, bad user, ...).
        """
        session = ExecChannel(self, self._new_channel(), request)
        self._table.add(session)
        try:
            await self.send_frame(p.encode_json(p.MsgType.EXEC, session.channel, request))
            await session.wait_started()
        except BaseException:
            self._table.remove(session)
            raise
        return session

    async def attach(self, channel: int) -> ExecChannel:
        """Take over a command that kept running, detached, while no host was connected
        (listed in this connection's HELLO, see `detached`). Its spooled output comes
        first, then the rest and the exit, as for `exec`.

        Raises ExecError(code="no_such_channel") when the agent has no such session.
        """
        if not self.supports_attach:
            raise ExecError("the guest agent is too old to re-attach commands; rebuild the image "
                            "(`arcbox-vm image build`) or re-inject the agent", code="unsupported")
        if channel in self._table:
            raise ExecError(f"channel {channel} is attached already", code=p.ErrorCode.CHANNEL_IN_USE)
        session = ExecChannel(self, channel, {"argv": [str(self.detached.get(channel, {}).get("argv0", ""))]})
        self._table.add(session)
        try:
            await self.send_frame(p.encode_frame(p.MsgType.ATTACH, channel))
            await session.wait_started()
        except BaseException:
            self._table.remove(session)
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
        self._table.add(op)
        try:
            return await op.run(body, chunks, size=size, max_bytes=max_bytes)
        finally:
            self._table.remove(op)

    async def read_file(self, path: str, *, max_bytes: int = 0) -> FileReader:
        """Open the guest file `path` for streaming: returns once the guest opened it.

        Iterate the reader for bytes chunks; `aclose()` (or `async with`) aborts early.
        `max_bytes` > 0 refuses (FileTooLarge) a file announced or found to be larger.
        """
        self._require_files()
        body = {"path": path}
        _check_request(p.MsgType.FILE_READ, body)
        reader = FileReader(self, self._new_channel(), path, max_bytes)
        self._table.add(reader)
        await reader._open(body)
        return reader

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileStat:
        """What the guest says about `path` (lstat when follow_symlinks is false)."""
        body = await self._file_request(p.MsgType.FILE_STAT, {"path": path, "follow_symlinks": follow_symlinks},
                                        p.MsgType.FILE_STAT_RESULT, path)
        return _file_stat(body, path)

    async def list_dir(self, path: str, *, limit: int = 0) -> DirListing:
        """The entries of the guest directory `path`, sorted by name (not following symlinks).

        At most `limit` (0 = the protocol's maximum) entries; `.truncated` says some were left out.
        """
        req: dict[str, Any] = {"path": path}
        if limit:
            req["limit"] = limit
        body = await self._file_request(p.MsgType.FILE_LIST, req, p.MsgType.FILE_LIST_RESULT, path)
        return _dir_listing(body, path)

    async def _file_request(self, type: int, body: dict[str, Any], reply: int, path: str) -> dict[str, Any]:
        self._require_files()
        _check_request(type, body)
        op = _FileRequest(self, self._new_channel(), path, reply)
        self._table.add(op)
        try:
            return await op.run(type, body)
        finally:
            self._table.remove(op)

    # -- port forwarding -----------------------------------------------------------

    @property
    def supports_ports(self) -> bool:
        return p.FEATURE_PORTS in (self.hello.get("features") or [])

    async def connect_port(self, port: int) -> PortChannel:
        """A TCP connection to 127.0.0.1:`port` inside the guest, through the agent (see
        port_channel.py); returns once the guest connected. AgentError(code="refused") when
        nothing listens there."""
        if not self.supports_ports:
            raise AgentError("the guest agent is too old to forward ports; rebuild the image "
                             "(`arcbox-vm image build`) or re-inject the agent", code="unsupported")
        channel = PortChannel(self, self._new_channel(), port)
        self._table.add(channel)
        try:
            await channel.open()
        except BaseException:
            channel.close()  # the guest forgets it too, should it connect after all
            raise
        return channel

    # -- control ---------------------------------------------------------------------

    async def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the agent in seconds."""
        token = os.urandom(8)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[token] = fut
        start = time.perf_counter()
        try:
            await self.send_frame(p.encode_frame(p.MsgType.PING, 0, token))
            end = await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(token, None)
        return end - start

    async def shutdown(self, action: str = "reboot", timeout: float = 5.0) -> bool:
        """Ask the agent to stop everything and halt the VM. True if it acknowledged."""
        self._shutdown_ack = asyncio.get_running_loop().create_future()
        try:
            await self.send_frame(p.encode_json(p.MsgType.SHUTDOWN, 0, {"action": action}))
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
                self._teardown(AgentUnresponsive(f"the guest agent did not answer for {timeout:.0f} s "
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
