"""The connection to one guest agent: read loop, dispatch, control frames, channel numbers.

One `AgentConnection` wraps the byte stream the VMM hands us when the guest agent dials
(a virtio-serial chardev socket under QEMU, `<uds_path>_<port>` under Firecracker). A
reader task demultiplexes frames by channel number to the handlers in its `ChannelTable`
(exec sessions, file transfers); channel 0 (control: PING/PONG, SHUTDOWN, ERROR, a
re-announced HELLO) it answers itself. It is the `ChannelHost` its handlers send through.

The guest is not trusted (see `limits`): a send that misses its deadline fails the
connection; `close()` aborts, never waits for a flush; at most one PONG and one HELLO_ACK
are pending (PINGs / HELLOs meanwhile are dropped); channel-0 frames and malformed frames
are rate-limited (over the limit: cut off with `AgentProtocolViolation`); a malformed
frame ends its channel (`ProtocolViolation`, the guest gets an ERROR); log lines are
rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host import limits
from arcbox_vm.agent.host.channels import READ_SIZE, ChannelHandler, ChannelTable
from arcbox_vm.agent.host.exec_channel import ExecChannel
from arcbox_vm.agent.host.file_api import FileTransfers
from arcbox_vm.agent.host.limits import AgentProtocolViolation, ProtocolViolation, _detached_sessions
from arcbox_vm.agent.host.port_channel import PortChannel
from arcbox_vm.errors import AgentDisconnected, AgentError, AgentUnresponsive, ExecError

log = logging.getLogger(__name__)


def _hello_ack() -> bytes:
    return p.encode_json(p.MsgType.HELLO_ACK, 0, {"proto": p.PROTOCOL_VERSION})


class AgentConnection(FileTransfers):
    """A live, handshaken channel to one guest agent.

    `send_timeout`, the rate limits and the log limits default to `limits`' values.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict[str, Any],
                 decoder: p.FrameDecoder, pending: Iterable[p.Frame | p.DecodeError] = (), *,
                 send_timeout: float = limits.SEND_TIMEOUT,
                 control_rate: float = limits.CONTROL_RATE, control_burst: float = limits.CONTROL_BURST,
                 violation_rate: float = limits.VIOLATION_RATE,
                 violation_burst: float = limits.VIOLATION_BURST) -> None:
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
        self.send_timeout = send_timeout
        self._pings: dict[bytes, asyncio.Future[float]] = {}
        self._shutdown_ack: asyncio.Future[None] | None = None
        self._replies: dict[str, asyncio.Task[None]] = {}  # PONG / HELLO_ACK being sent: at most one of each
        self.dropped_replies = 0  # PINGs / HELLOs not answered because the previous answer was still unsent
        self._control = limits.TokenBucket(control_rate, control_burst)
        self._violations = limits.TokenBucket(violation_rate, violation_burst)
        self._log = limits.LogLimiter(log)
        self._torn_down = False
        self._keepalive: asyncio.Task[None] | None = None
        self._expected: dict[int, asyncio.Future[p.Frame]] = {}  # control reply type -> waiter (expect())
        self.closed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read_loop(), name="agent-reader")

    @property
    def kernel_release(self) -> str:
        return str(self.hello.get("kernel", ""))

    # -- ChannelHost: what the channel handlers use -----------------------------------

    def _gone(self) -> AgentDisconnected:
        reason = self.closed.result() if self.closed.done() else None
        return reason if isinstance(reason, AgentDisconnected) else AgentDisconnected()

    async def send_frame(self, data: bytes) -> None:
        """Send encoded frames, waiting for the stream to drain.

        The drain has a deadline, `send_timeout` seconds: a guest that has not taken the
        bytes by then has stopped reading, and the connection is failed (AgentDisconnected
        here and on every stream). Waiting for an earlier sender is not counted: that one's
        own deadline bounds it (callers that need a shorter bound wrap the call in theirs).
        """
        if self.closed.done():
            raise self._gone()
        async with self._write_lock:
            if self.closed.done():
                raise self._gone()
            try:
                self._writer.write(data)
                async with asyncio.timeout(self.send_timeout):
                    await self._writer.drain()
            except TimeoutError:
                exc = AgentUnresponsive(f"the guest agent stopped reading its channel: {len(data)} bytes could "
                                        f"not be sent within {self.send_timeout:g} s")
                self._fail(exc)
                raise exc from None
            except (ConnectionError, OSError) as exc:
                if self.closed.done():
                    raise self._gone() from None
                raise AgentDisconnected(f"writing to the guest agent failed: {exc}") from exc
            if self.closed.done():  # aborted meanwhile (drain then returns quietly): maybe never sent
                raise self._gone()

    def send_frame_nowait(self, data: bytes) -> None:
        """Queue a small frame without waiting (cleanup of a failed or cancelled operation).

        Safe next to `send_frame`: `write()` appends whole frames to the transport's buffer,
        the lock only serialises waiting for it to drain. Best effort: dropped when the
        connection is gone or the guest is not reading (more than MAX_BUFFERED_NOWAIT queued).
        """
        if self.closed.done():
            return
        with contextlib.suppress(Exception):
            if self._writer.transport.get_write_buffer_size() > limits.MAX_BUFFERED_NOWAIT:
                return
            self._writer.write(data)

    def release_channel(self, handler: ChannelHandler) -> None:
        self._table.remove(handler)

    # -- the reader ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason: BaseException = AgentDisconnected()
        try:
            pending, self._pending = self._pending, []
            self._dispatch_all(pending)
            while not self.closed.done():
                data = await self._reader.read(READ_SIZE)
                if not data:
                    break
                self._dispatch_all(self._decoder.feed(data))
                await asyncio.sleep(0)  # one guest's flood never keeps the loop from the others
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
            if self.closed.done():
                return  # the guest was cut off by an earlier frame of this batch
            if isinstance(item, p.DecodeError):
                self._violation(f"bad data from the guest agent: {item.message}")
                continue
            try:
                self._dispatch(item)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not end the reader (a bug here)
                self._log(logging.ERROR, "error handling %r from the guest agent", item, exc_info=True)
                self._violation(f"the host could not handle {item!r}: {exc!r}")

    def _violation(self, why: str) -> None:
        """The guest sent something malformed: log it (rate-limited); too many cut it off."""
        self._log(logging.WARNING, "%s", why)
        if not self._violations.take():
            self._fail(AgentProtocolViolation(
                f"the guest agent sent more than {self._violations.burst:g} malformed frames "
                f"(over {self._violations.rate:g} a second) and was cut off; the last: {limits.clean_text(why, 300)}"))

    def _channel_violation(self, handler: ChannelHandler, frame: p.Frame, why: str,
                           exc: ProtocolViolation | None = None) -> None:
        """`frame` broke the protocol on `handler`'s channel: that channel ends with
        ProtocolViolation, the guest is told with an ERROR on it (it drops the session)."""
        if exc is None:
            exc = ProtocolViolation(f"the guest agent broke the protocol on channel {frame.channel}: {why}")
        self._table.remove(handler)
        with contextlib.suppress(Exception):
            handler._on_disconnect(exc)
        self.send_frame_nowait(p.encode_error(frame.channel, limits.VIOLATION,
                                              limits.clean_text(why, 200)))
        self._violation(f"{frame!r}: {why}")

    def _fail(self, reason: BaseException) -> None:
        """Give up on the connection now: streams end with `reason`, the stream is aborted."""
        if not self._torn_down:
            log.warning("giving up on the guest agent: %s", reason)
        self._teardown(reason)
        if asyncio.current_task() is not self._reader_task:
            self._reader_task.cancel()

    def _teardown(self, reason: BaseException) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        if not self.closed.done():
            self.closed.set_result(reason)
        for handler in self._table.handlers():
            self._table.remove(handler)
            with contextlib.suppress(Exception):
                handler._on_disconnect(reason)
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(reason)
                fut.exception()
        if self._shutdown_ack and not self._shutdown_ack.done():
            self._shutdown_ack.set_result(None)  # a closed channel is what shutdown looks like
        for task in self._replies.values():
            task.cancel()
        self._replies.clear()
        for fut in self._expected.values():
            if not fut.done():
                fut.set_exception(reason)
                fut.exception()  # retrieved: nobody may be waiting any more
        self._log.flush()
        with contextlib.suppress(Exception):
            self._writer.transport.abort()  # never wait for a flush the guest may never allow

    def _dispatch(self, frame: p.Frame) -> None:
        if frame.channel != p.CONTROL_CHANNEL:
            if frame.type == p.MsgType.PING:  # "either way, any channel"
                if self._control_frame():
                    self._reply("PING", p.encode_frame(p.MsgType.PONG, frame.channel, frame.payload))
                return
            handler = self._table.get(frame.channel)
            if handler is None:
                return  # a late frame for a channel that ended (or never was): dropped
            try:
                handler._on_frame(frame)
            except p.ProtocolError as exc:  # malformed: a bad body, a wrong type, a value out of range
                self._channel_violation(handler, frame, exc.message)
            except ProtocolViolation as exc:  # e.g. beyond the credit
                self._channel_violation(handler, frame, str(exc), exc)
            except Exception as exc:  # noqa: BLE001 - a bug in a handler ends its channel, not the reader
                self._log(logging.ERROR, "error handling %r from the guest agent", frame, exc_info=True)
                self._channel_violation(handler, frame, f"the host could not handle it: {exc!r}")
            return
        if not self._control_frame():
            return
        if frame.type == p.MsgType.PONG:
            fut = self._pings.pop(frame.payload, None)
            if fut and not fut.done():
                fut.set_result(time.perf_counter())
        elif frame.type == p.MsgType.PING:
            self._reply("PING", p.encode_frame(p.MsgType.PONG, 0, frame.payload))
        elif frame.type == p.MsgType.SHUTDOWN_ACK:
            if self._shutdown_ack and not self._shutdown_ack.done():
                self._shutdown_ack.set_result(None)
        elif frame.type in self._expected:
            fut = self._expected.pop(frame.type)
            if not fut.done():
                fut.set_result(frame)
        elif frame.type == p.MsgType.ERROR:
            try:
                code, msg = limits.error_body(frame.json())
            except p.ProtocolError as exc:
                self._violation(f"malformed ERROR from the guest agent: {exc.message}")
                return
            self._log(logging.WARNING, "guest agent error: %s: %r", code, msg[:500])
        elif frame.type == p.MsgType.HELLO:
            self._log(logging.INFO, "guest agent re-announced itself: %r", frame.payload[:200])
            self._reply("HELLO", _hello_ack())
        else:
            self._violation(f"unexpected control frame from the guest agent: {frame!r}")

    def _control_frame(self) -> bool:
        """Count one control frame against the rate limit; False (and the guest is cut off) when over."""
        if self._control.take():
            return True
        self._fail(AgentProtocolViolation(
            f"the guest agent flooded the control channel (more than {self._control.burst:g} frames at once, "
            f"over {self._control.rate:g} a second) and was cut off"))
        return False

    def _reply(self, kind: str, data: bytes) -> None:
        """Answer a PING or HELLO (`kind`) — unless the previous answer to that kind is still
        being sent (the guest is not reading): then this one is dropped. So at most one
        task, holding at most one frame, per kind."""
        task = self._replies.get(kind)
        if task is not None and not task.done():
            self.dropped_replies += 1
            if self.dropped_replies & (self.dropped_replies - 1) == 0:  # 1, 2, 4, 8, ...: a few lines in all
                self._log(logging.WARNING, "the guest agent sends %s faster than it reads the answers; "
                          "%d dropped so far", kind, self.dropped_replies)
            return
        self._replies[kind] = asyncio.create_task(self._send_quietly(data), name="agent-reply")

    async def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(AgentDisconnected):
            await self.send_frame(data)

    # -- channel numbers -------------------------------------------------------------

    def _new_channel(self) -> int:
        ch = next(self._channels)
        if ch > limits.MAX_CHANNEL:
            self._channels = itertools.count(limits.MAX_CHANNEL + 1)
            raise AgentError("this connection to the guest agent has used up its channel numbers; "
                             "restart the sandbox", code="exhausted")
        return ch

    def reserve_channels(self, up_to: int) -> None:
        """Never hand out channel numbers <= `up_to` (they name earlier commands, e.g. in a
        state database that outlived the previous connection)."""
        nxt = next(self._channels)
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
        """Round trip to the agent in seconds; TimeoutError after `timeout` seconds whatever
        the guest does (sending the PING counts against it too)."""
        token = os.urandom(8)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[token] = fut
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await self.send_frame(p.encode_frame(p.MsgType.PING, 0, token))
                end = await fut
        finally:
            self._pings.pop(token, None)
        return end - start

    async def shutdown(self, action: str = "reboot", timeout: float = 5.0) -> bool:
        """Ask the agent to stop everything and halt the VM. True if it acknowledged (or the
        channel closed); False after `timeout` seconds whatever the guest does."""
        self._shutdown_ack = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.send_frame(p.encode_json(p.MsgType.SHUTDOWN, 0, {"action": action}))
                await self._shutdown_ack
            return True
        except (AgentDisconnected, TimeoutError):
            return False

    def expect(self, reply_type: int) -> asyncio.Future[p.Frame]:
        """A future for the next control frame of `reply_type` (e.g. REINIT_DONE, see
        agent/host/reinit.py); it fails with the reason if the channel closes first."""
        fut = self._expected[reply_type] = asyncio.get_running_loop().create_future()
        return fut

    def start_keepalive(self, interval: float, timeout: float) -> None:
        """Ping every `interval` s; no answer for `timeout` s declares the agent gone: every
        session then ends with AgentDisconnected and `closed` resolves (never a hang)."""
        self._keepalive = asyncio.create_task(self._keepalive_loop(interval, timeout), name="agent-keepalive")

    def stop_keepalive(self) -> None:
        """No more pings (a paused VM cannot answer them); `start_keepalive` starts again."""
        if self._keepalive is not None:
            self._keepalive.cancel()

    async def _keepalive_loop(self, interval: float, timeout: float) -> None:
        while not self.closed.done():
            await asyncio.sleep(interval)
            try:
                await self.ping(timeout)
            except TimeoutError:
                self._fail(AgentUnresponsive(f"the guest agent did not answer for {timeout:.0f} s "
                                             "(the VM is frozen or overloaded)"))
                return
            except AgentDisconnected:
                return

    async def close(self) -> None:
        """Drop the connection now: the stream is aborted (what is still unsent is lost; never
        waits for the guest to read it), streams end with AgentDisconnected."""
        self.stop_keepalive()
        self._teardown(AgentDisconnected("the connection to the guest agent was closed by the host"))
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), limits.CLOSE_TIMEOUT)
