"""Port forwarding (Docker's `-p`) through the guest agent: no DNAT, no guest network.

Each `PortMapping` of a sandbox is a TCP listener on the host, on exactly the address asked
for (the loopback by default; 0.0.0.0 exposes the guest port to every network the host is
on — allowed, and documented as such). A connection accepted there opens a port channel to
the guest agent, which connects to 127.0.0.1:GUEST_PORT inside the VM; the bytes are
spliced both ways with the channel's credit flow control (`agent/host/port_channel.py`).
So forwarding works with network "none" and whatever namespace the VMs' network lives in.

- create (`reserve`): every mapping is bound and listening before anything else is made; a
  host port in use fails the create with HostPortUnavailable (RESOURCE_EXHAUSTED), a host
  address that is not the host's or a privileged port with InvalidArgument — the listeners
  bound so far are closed. The host ports chosen (for host_port 0) go into the record.
- READY (`start`): the listeners accept; connections made while the sandbox booted waited in
  the listen backlog. After a daemon restart the re-adopted sandbox listens again on the
  recorded host ports (one that is taken meanwhile is logged and left out).
- stop, failure, removal, and a shutdown that leaves the VMs running (`release`): the
  listeners close and every connection is reset (and its task awaited).

In-process callers (the E2B API's port proxy) open a stream to a guest port without any
listener (`connect`, the manager's `connect_port`): a `PortStream` of a READY or RUNNING
sandbox, closed like a forwarded connection when the sandbox stops or is removed.

Bounds: at most `[limits] max_port_connections` forwarded connections per sandbox, all its
listeners and port streams together; at the limit the listeners stop accepting (new
clients wait in the backlog) until one ends, and `connect` raises ResourceExhausted. Per
connection the host holds at most one PORT_WINDOW from the guest, the client stream's read
buffer and a drained write buffer (port_channel.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
from typing import Any

from arcbox_vm import logctx
from arcbox_vm.agent.host import AgentConnection, PortChannel, splice
from arcbox_vm.agent.host.port_channel import STREAM_LIMIT, reset
from arcbox_vm.config.sections import LimitsConfig
from arcbox_vm.errors import (
    AgentError,
    BootFailed,
    HostPortUnavailable,
    InvalidArgument,
    InvalidState,
    ResourceExhausted,
)
from arcbox_vm.manager.steps import Step
from arcbox_vm.models import PortMapping, SandboxState

log = logging.getLogger(__name__)

BACKLOG = 128  # connections waiting to be accepted, per listener
ACCEPT_BATCH = 64  # connections accepted per wakeup of one listener
ACCEPT_RETRY_S = 0.5  # pause after accept(2) failed (e.g. out of file descriptors)


def _bind_error(m: PortMapping, exc: OSError) -> Exception:
    where = m.host_endpoint if m.host_port else f"a free port on {m.host_addr}"
    if exc.errno == errno.EADDRINUSE:
        if not m.host_port:
            return HostPortUnavailable(f"cannot listen on {where}: no free port left")
        return HostPortUnavailable(f"host port {where} is in use; choose another host port, or 0 for any free one")
    if exc.errno == errno.EADDRNOTAVAIL:
        return InvalidArgument(f"host address {m.host_addr} is not an address of this host; use 127.0.0.1 "
                               "(the default) or an address the host has")
    if exc.errno == errno.EACCES:
        return InvalidArgument(f"host port {m.host_port} needs privileges this daemon does not have; "
                               "use a port above 1023")
    if exc.errno == errno.EAFNOSUPPORT:
        return InvalidArgument(f"host address {m.host_addr}: this host has no IPv6")
    return HostPortUnavailable(f"cannot listen on {where}: {exc.strerror or exc}")


def listen(m: PortMapping) -> socket.socket:
    """A non-blocking listening socket for `m` (SO_REUSEADDR: a port whose old connections
    linger in TIME_WAIT can be listened on again; still exclusive while we listen)."""
    family = socket.AF_INET6 if ":" in m.host_addr else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise _bind_error(m, exc) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((m.host_addr, m.host_port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _bind_error(m, exc) from None
    return sock


class SandboxPorts:
    """The listeners of one sandbox's port mappings and the connections they forward."""

    def __init__(self, sandbox_id: str, max_connections: int) -> None:
        self.sandbox_id = sandbox_id
        self.max_connections = max_connections
        self.listeners: list[tuple[PortMapping, socket.socket]] = []
        self.tasks: set[asyncio.Task] = set()
        self.channels: set[PortChannel] = set()  # the connections forwarded right now
        self.streams: set[PortStream] = set()  # port streams of in-process callers (`open_stream`)
        self._agent: AgentConnection | None = None
        self._accepting = False
        self._closed = False

    def bind(self, mappings: list[PortMapping], *, strict: bool = True) -> list[PortMapping]:
        """Listen on every mapping; returns them with the host ports chosen. `strict`: one that
        fails closes the others and raises; else it is logged and left out."""
        out = []
        for m in mappings:
            try:
                sock = listen(m)
            except (HostPortUnavailable, InvalidArgument) as exc:
                if strict:
                    self._close_listeners()
                    raise
                log.warning("guest port %d is not forwarded any more: %s", m.guest_port, exc)
                out.append(m)
                continue
            actual = dataclasses.replace(m, host_port=sock.getsockname()[1])
            self.listeners.append((actual, sock))
            out.append(actual)
        return out

    def serve(self, agent: AgentConnection) -> None:
        """Accept connections and forward them through `agent`."""
        self._agent = agent
        self._resume()

    @property
    def connections(self) -> int:
        return len(self.tasks) + len(self.streams)

    def _resume(self) -> None:
        if self._accepting or self._closed or self._agent is None:
            return
        loop = asyncio.get_running_loop()
        for m, sock in self.listeners:
            loop.add_reader(sock.fileno(), self._accept, m, sock)
        self._accepting = True

    def _pause(self) -> None:
        if not self._accepting:
            return
        loop = asyncio.get_running_loop()
        for _, sock in self.listeners:
            loop.remove_reader(sock.fileno())
        self._accepting = False

    def _accept(self, m: PortMapping, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            if self.connections >= self.max_connections:
                log.info("%d forwarded connections open ([limits] max_port_connections): new ones wait",
                         self.connections)
                self._pause()
                return
            try:
                conn, _peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: not now
                log.warning("cannot accept a connection on %s: %s", m.host_endpoint, exc)
                self._pause()
                loop.call_later(ACCEPT_RETRY_S, self._resume)
                return
            conn.setblocking(False)
            task = loop.create_task(self._forward(m, conn), name=f"port-{self.sandbox_id}-{m.host_port}")
            self.tasks.add(task)
            task.add_done_callback(self._forwarded)

    def _forwarded(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("forwarding a connection failed", exc_info=task.exception())
        if self.connections < self.max_connections:
            self._resume()

    async def open_stream(self, agent: AgentConnection, port: int) -> "PortStream":
        """A `PortStream` to 127.0.0.1:`port` in the guest, counted like a forwarded
        connection. ResourceExhausted at the limit; the agent's errors as they are."""
        if self._closed:
            raise AgentError("the sandbox's ports are closed (it is stopping)", code="closed")
        if self.connections >= self.max_connections:
            raise ResourceExhausted(f"{self.connections} connections to the sandbox's ports are open "
                                    "([limits] max_port_connections); try again when one ends")
        stream = PortStream(self, port)
        self.streams.add(stream)  # the slot is taken while the guest connects
        try:
            channel = await agent.connect_port(port)
        except BaseException:
            self._stream_done(stream)
            raise
        if self._closed:  # closed while the guest connected
            channel.close()
            self._stream_done(stream)
            raise AgentError("the sandbox's ports are closed (it is stopping)", code="closed")
        stream.channel = channel
        return stream

    def _stream_done(self, stream: "PortStream") -> None:
        self.streams.discard(stream)
        if self.connections < self.max_connections:
            self._resume()

    async def _forward(self, m: PortMapping, conn: socket.socket) -> None:
        logctx.sandbox_id.set(self.sandbox_id)
        assert self._agent is not None
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=STREAM_LIMIT)
        except BaseException:
            conn.close()
            raise
        try:
            channel = await self._agent.connect_port(m.guest_port)
        except BaseException as exc:
            reset(writer)
            if isinstance(exc, AgentError):
                log.info("connection to %s not forwarded: %s", m.host_endpoint, exc)
                return
            raise
        self.channels.add(channel)
        try:
            await splice(channel, reader, writer)
        finally:
            self.channels.discard(channel)

    def _close_listeners(self) -> None:
        self._pause()
        for _, sock in self.listeners:
            sock.close()
        self.listeners = []

    async def close(self) -> None:
        """Close the listeners, reset every connection and wait for their tasks."""
        self._closed = True
        self._close_listeners()
        for stream in list(self.streams):
            stream.abort()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class PortStream:
    """A TCP connection to a guest port for an in-process caller, through the agent.

    `read()` returns the guest's next bytes (b"" at its EOF); asking for more is what grants
    the previous ones back to the guest, so the host holds at most one PORT_WINDOW of them.
    `write()` waits for the guest's credit. `close()` ends it: cleanly after both EOFs,
    else with a reset (PORT_CLOSE; the guest program sees ECONNRESET). Errors are the
    channel's: PortClosed (reset in the guest, or the sandbox stopped), AgentDisconnected.
    """

    def __init__(self, owner: SandboxPorts, port: int) -> None:
        self._owner = owner
        self.port = port
        self.channel: PortChannel | None = None
        self._unconsumed = 0
        self._eof_in = self._eof_out = False
        self._closed = False

    async def read(self) -> bytes:
        assert self.channel is not None
        if self._unconsumed:
            n, self._unconsumed = self._unconsumed, 0
            await self.channel.consumed(n)
        data = await self.channel.read()
        self._unconsumed = len(data)
        self._eof_in = not data
        return data

    async def write(self, data: bytes) -> None:
        assert self.channel is not None
        if data:
            await self.channel.write(data)

    async def write_eof(self) -> None:
        assert self.channel is not None
        if not self._eof_out:
            self._eof_out = True
            await self.channel.write_eof()

    def abort(self) -> None:
        """Reset the connection (PORT_CLOSE) and free its slot."""
        if self._closed:
            return
        self._closed = True
        if self.channel is not None:
            self.channel.close()
        self._owner._stream_done(self)

    def close(self) -> None:
        if self._closed:
            return
        if self.channel is not None and self._eof_in and self._eof_out and not self.channel.done:
            self._closed = True
            self.channel.finished()
            self._owner._stream_done(self)
        else:
            self.abort()

    async def __aenter__(self) -> "PortStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def connect(sb: Any, limits: LimitsConfig, port: int) -> PortStream:
    """A `PortStream` to TCP `port` in `sb`'s guest (READY or RUNNING), through its agent."""
    if not 0 < port < 65536:
        raise InvalidArgument(f"port must be 1..65535, got {port}")
    if sb.state not in (SandboxState.READY, SandboxState.RUNNING) or sb.vm is None:
        raise InvalidState(sb.id, sb.state.value, "ports are reachable only in a ready or running sandbox")
    fw = sb.forwards
    if fw is None:  # no port mappings: this sandbox's connections are counted here all the same
        fw = sb.forwards = SandboxPorts(sb.id, limits.max_port_connections)
    return await fw.open_stream(sb.vm.agent, port)


# -- the sandbox lifecycle's hooks (lifecycle.py, context.py) ---------------------------------


def reserve(sb: Any, limits: LimitsConfig) -> None:
    """At create: listen on every mapping of `sb` (raises before anything is made, see the
    module docstring); `sb.ports` gets the host ports chosen."""
    if not sb.ports:
        return
    fw = SandboxPorts(sb.id, limits.max_port_connections)
    sb.ports = fw.bind(sb.ports)
    sb.forwards = fw


def start(sb: Any, limits: LimitsConfig) -> None:
    """READY (booted or re-adopted): forward connections to the guest agent; after a
    restart, listen on the recorded host ports again first."""
    if not sb.ports or sb.vm is None:
        return
    fw = sb.forwards
    if fw is None:
        fw = sb.forwards = SandboxPorts(sb.id, limits.max_port_connections)
        fw.bind(sb.ports, strict=False)
    if not sb.vm.agent.supports_ports:
        log.warning("the guest agent cannot forward ports (too old): connections to %s will be reset",
                    ", ".join(m.host_endpoint for m in sb.ports))
    fw.serve(sb.vm.agent)


async def release(sb: Any) -> None:
    """Close `sb`'s listeners and connections (stop, failure, removal, leaving it running)."""
    fw, sb.forwards = sb.forwards, None
    if fw is not None:
        await fw.close()


def add_boot_check(plan: Any, sb: Any) -> None:
    """A boot step after the agent's HELLO: a sandbox with ports needs an agent that forwards."""
    if not sb.ports:
        return

    async def check() -> None:
        if not plan.state["agent"].supports_ports:
            raise BootFailed("the guest agent in this image is too old to forward ports (-p); rebuild the image "
                             "(`arcbox-vm image build`) or create the sandbox without ports")

    plan.steps.insert_after("wait-hello", Step("ports", check))
