"""Port forwarding through SandboxManager over the local VMM test double.

The guest agent runs as a host process there, so the guest's 127.0.0.1:GUESTPORT is the
host's loopback: a forwarded connection reaches a server this test runs, through the whole
path — the manager's listener, a port channel, the real agent, its socket — in seconds.
Sandboxes have network "none": forwarding needs no guest network.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from test_manager_local import Rig, gone, rig, ready_sandbox, rss_bytes, spec, wait_for  # noqa: F401 - rig is a fixture

from arcbox_vm import PortMapping, SandboxState
from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host import PortClosed
from arcbox_vm.errors import (
    AgentDisconnected,
    AgentError,
    BootFailed,
    HostPortUnavailable,
    InvalidArgument,
    InvalidState,
    ResourceExhausted,
    SandboxNotFound,
)
from tests.support.local_vmm import LocalDriver

S = SandboxState
MiB = 1 << 20

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class GuestServer:
    """A TCP server on the loopback, standing for a program listening in the guest."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.open = 0
        self.most = 0
        self.ends: list[str] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> "GuestServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.most = max(self.most, self.open)
        try:
            await self.handler(reader, writer)
            self.ends.append("done")
        except (ConnectionError, asyncio.IncompleteReadError):
            self.ends.append("reset")
        finally:
            self.open -= 1
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def guest_server(handler: Handler = echo) -> GuestServer:
    return await GuestServer(handler).start()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def roundtrip(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send `data`, half-close, read everything back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def ended(reader: asyncio.StreamReader, timeout: float = 10.0) -> str:
    """How a client connection ends once the other side drops it: "reset" or "eof"."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
        return "eof"
    except ConnectionError:
        return "reset"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def port_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("port-") and not t.done()]


# -- forwarding ------------------------------------------------------------------------------


async def test_forward_reaches_the_guest_loopback_without_a_network(rig: Rig) -> None:
    srv = await guest_server()
    mgr = rig.manager()
    sid = await ready_sandbox(mgr, "fwd", ports=[PortMapping(guest_port=srv.port)])
    (m,) = mgr.inspect_sandbox(sid).ports
    assert (m.guest_port, m.host_addr, m.protocol) == (srv.port, "127.0.0.1", "tcp")
    assert m.host_port > 0 and m.host_port != srv.port, "host_port 0 became a free port, shown by inspect"
    assert str(m) == f"{srv.port}/tcp -> 127.0.0.1:{m.host_port}"

    assert await roundtrip(m.host_port, b"hello") == b"hello"
    data = os.urandom(6 * MiB)  # many windows both ways
    assert hashlib.sha256(await roundtrip(m.host_port, data)).digest() == hashlib.sha256(data).digest()
    # 50 connections at once, each its own bytes
    got = await asyncio.gather(*(roundtrip(m.host_port, b"conn %d " % i * 1000) for i in range(50)))
    assert got == [b"conn %d " % i * 1000 for i in range(50)]
    assert srv.ends.count("done") == 52 and srv.most > 1
    await wait_for(lambda: not port_tasks(), what="the connections' tasks to end")
    await mgr.remove_sandbox(sid)
    srv.close()


async def test_connections_made_while_booting_wait_for_ready(rig: Rig) -> None:
    """The host port listens from create on: a client that connects early is served once
    the sandbox is ready (it waits in the listen backlog), never refused."""
    srv = await guest_server()
    mgr = rig.manager()
    host_port = free_port()
    await mgr.create_sandbox(spec("early", ports=[PortMapping(srv.port, host_port)]))
    assert mgr.inspect_sandbox("early").state == S.STARTING
    early = asyncio.ensure_future(roundtrip(host_port, b"before ready"))
    await mgr.wait_ready("early", 15)
    assert await early == b"before ready"
    await mgr.remove_sandbox("early")
    srv.close()


async def test_a_guest_port_nobody_listens_on_resets_the_client(rig: Rig) -> None:
    mgr = rig.manager()
    closed = free_port()
    sid = await ready_sandbox(mgr, "nolisten", ports=[PortMapping(closed)])
    (m,) = mgr.inspect_sandbox(sid).ports
    reader, writer = await asyncio.open_connection("127.0.0.1", m.host_port)  # the host side accepts...
    assert await ended(reader) == "reset", "...and resets once the guest refused"
    writer.close()
    assert refused(free_port()), "a port that is not forwarded is not listened on"
    srv = await guest_server()  # the sandbox is fine: other forwards go on working
    await mgr.remove_sandbox(sid)
    sid = await ready_sandbox(mgr, "nolisten2", ports=[PortMapping(srv.port)])
    assert await roundtrip(mgr.inspect_sandbox(sid).ports[0].host_port, b"ok") == b"ok"
    await mgr.remove_sandbox(sid)
    srv.close()


async def test_half_close_both_ways(rig: Rig) -> None:
    """The guest program reads to EOF before it answers; then it half-closes, and the client
    can still send after the guest's EOF."""
    async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(b"got %d" % len(data))
        writer.write_eof()

    srv = await guest_server(count_then_answer)
    mgr = rig.manager()
    sid = await ready_sandbox(mgr, "half", ports=[PortMapping(srv.port)])
    port = mgr.inspect_sandbox(sid).ports[0].host_port
    assert await roundtrip(port, b"x" * (3 * p.PORT_WINDOW + 7)) == b"got %d" % (3 * p.PORT_WINDOW + 7)
    await mgr.remove_sandbox(sid)
    srv.close()


# -- create errors ---------------------------------------------------------------------------


async def test_a_host_port_in_use_fails_create_and_nothing_is_made(rig: Rig) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    first = free_port()
    mgr = rig.manager()
    await mgr.start()
    with pytest.raises(HostPortUnavailable) as err:
        await mgr.create_sandbox(spec("busy", ports=[PortMapping(80, first), PortMapping(81, busy_port)]))
    assert isinstance(err.value, ResourceExhausted), "RESOURCE_EXHAUSTED over the API"
    assert f"host port 127.0.0.1:{busy_port} is in use" in str(err.value)
    with pytest.raises(SandboxNotFound):
        mgr.inspect_sandbox("busy")
    assert gone(mgr, "busy") == []
    assert not refused(busy_port) and refused(first), "the mapping bound before the failure was closed"
    socket.create_server(("127.0.0.1", first)).close()  # and can be bound again
    busy.close()

    with pytest.raises(InvalidArgument, match="not an address of this host"):
        await mgr.create_sandbox(spec("addr", ports=[PortMapping(80, 0, "192.0.2.1")]))
    mgr.config.limits.max_port_mappings = 2
    with pytest.raises(InvalidArgument, match="3 port mappings are more than the 2 allowed"):
        await mgr.create_sandbox(spec("many", ports=["80", "81", "82"]))
    with pytest.raises(ValueError, match="mapped twice"):
        spec("twice", ports=[f"{first}:80", f"{first}:81"])
    assert mgr.list_sandboxes() == []


# -- bounds ----------------------------------------------------------------------------------


async def test_connections_beyond_the_limit_wait_until_one_ends(rig: Rig) -> None:
    srv = await guest_server()
    mgr = rig.manager()
    mgr.config.limits.max_port_connections = 2
    sid = await ready_sandbox(mgr, "limit", ports=[PortMapping(srv.port)])
    port = mgr.inspect_sandbox(sid).ports[0].host_port
    clients = []
    for i in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"%d" % i)
        assert await asyncio.wait_for(reader.read(10), 10) == b"%d" % i
        clients.append((reader, writer))
    reader3, writer3 = await asyncio.open_connection("127.0.0.1", port)  # the kernel's backlog takes it
    writer3.write(b"third")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader3.read(10), 0.5)
    assert srv.most == 2 and len(port_tasks()) == 2
    clients[0][1].close()  # one ends: the third is served
    assert await asyncio.wait_for(reader3.read(10), 10) == b"third"
    assert srv.most == 2
    for _, w in (clients[1], (reader3, writer3)):
        w.close()
    await mgr.remove_sandbox(sid)
    srv.close()


async def test_a_client_that_does_not_read_stops_the_guest_program(rig: Rig) -> None:
    """Flow control end to end: the guest program can write only what the buffers on the way
    hold (one PORT_WINDOW on the host); the rest waits until the client reads."""
    total = 64 * MiB
    written = 0

    async def blast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        chunk = b"\xab" * MiB
        for _ in range(total // MiB):
            writer.write(chunk)
            await writer.drain()
            written += len(chunk)

    srv = await guest_server(blast)
    mgr = rig.manager()
    sid = await ready_sandbox(mgr, "slow", ports=[PortMapping(srv.port)])
    port = mgr.inspect_sandbox(sid).ports[0].host_port
    rss_before = rss_bytes()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MiB)
    await asyncio.sleep(2.0)
    (channel,) = mgr._ctx.sandboxes[sid].forwards.channels
    assert channel.held + channel._ungranted == p.PORT_WINDOW, "the host holds exactly the credit it granted"
    assert written < total // 2, f"the guest program wrote {written >> 20} MiB into a connection nobody reads"
    await asyncio.sleep(1.0)
    stalled = written
    await asyncio.sleep(1.0)
    assert written == stalled, "and it is blocked"
    assert channel.held + channel._ungranted == p.PORT_WINDOW
    assert rss_bytes() - rss_before < 32 * MiB
    got = 0
    while data := await asyncio.wait_for(reader.read(MiB), 30):
        assert set(data) == {0xAB}
        got += len(data)
    assert got == total == written
    writer.close()
    await mgr.remove_sandbox(sid)
    srv.close()


# -- the end of a sandbox --------------------------------------------------------------------


async def test_remove_with_open_connections_leaves_nothing_behind(rig: Rig) -> None:
    srv = await guest_server()
    mgr = rig.manager()
    await mgr.start()
    fds_before = set(os.listdir("/proc/self/fd"))
    sid = await ready_sandbox(mgr, "busyrm", ports=[PortMapping(srv.port), PortMapping(srv.port)])
    ports = [m.host_port for m in mgr.inspect_sandbox(sid).ports]
    clients = []
    for i in range(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[i % 2])
        writer.write(b"x" * 100_000)
        clients.append((reader, writer))
    await wait_for(lambda: srv.open == 10, what="10 forwarded connections")
    assert len(port_tasks()) == 10

    await mgr.remove_sandbox(sid)
    assert port_tasks() == [], "no forwarding task outlives the sandbox"
    assert all(refused(port) for port in ports), "no listener is left"
    assert await asyncio.gather(*(ended(r) for r, _ in clients)) == ["reset"] * 10
    for _, w in clients:
        w.close()
    await wait_for(lambda: srv.open == 0, what="the guest side of every connection to close")
    await asyncio.sleep(0.1)
    assert set(os.listdir("/proc/self/fd")) <= fds_before, "no socket (or other fd) is left"
    assert gone(mgr, sid) == []
    srv.close()


async def test_stop_closes_the_listeners_and_inspect_keeps_the_mapping(rig: Rig) -> None:
    srv = await guest_server()
    mgr = rig.manager()
    sid = await ready_sandbox(mgr, "stopped", ports=[PortMapping(srv.port)])
    (m,) = mgr.inspect_sandbox(sid).ports
    reader, writer = await asyncio.open_connection("127.0.0.1", m.host_port)
    await mgr.stop_sandbox(sid, timeout_seconds=10)
    assert await ended(reader) == "reset"
    writer.close()
    assert refused(m.host_port)
    info = mgr.inspect_sandbox(sid)
    assert info.state == S.STOPPED and info.ports == (m,)
    assert port_tasks() == []
    await mgr.remove_sandbox(sid)
    srv.close()


async def test_restart_listens_again_on_the_same_host_port(rig: Rig) -> None:
    srv = await guest_server()
    first = rig.manager()
    await first.start()
    sid = await ready_sandbox(first, "again", ports=[PortMapping(srv.port)])
    (m,) = first.inspect_sandbox(sid).ports
    assert await roundtrip(m.host_port, b"before") == b"before"
    reader, writer = await asyncio.open_connection("127.0.0.1", m.host_port)
    writer.write(b"open across the restart")
    assert await asyncio.wait_for(reader.read(100), 10) == b"open across the restart"

    await first.close(remove_sandboxes=False)
    assert await ended(reader) == "reset", "the daemon's connections end with it"
    writer.close()
    assert refused(m.host_port), "nothing listens while no manager runs"

    second = rig.manager()
    await second.start()
    info = second.inspect_sandbox(sid)
    assert info.state == S.READY and info.ports == (m,), "the recorded host port, not a new one"
    assert await roundtrip(m.host_port, b"after") == b"after"
    await second.remove_sandbox(sid)
    assert refused(m.host_port)
    srv.close()


class OldAgentDriver(LocalDriver):
    """The local driver with an agent from before port forwarding (no "ports" feature)."""

    def argv(self, workdir: Path, endpoint) -> list[str]:  # noqa: ANN001
        argv = super().argv(workdir, endpoint)
        code = argv[argv.index("-c") + 1]
        argv[argv.index("-c") + 1] = ("import arcbox_vm.agent.guest.connection as c\n"
                                      "c.FEATURES.remove('ports')\n" + code)
        return argv


async def test_an_agent_too_old_to_forward_fails_the_boot_and_frees_the_port(rig: Rig) -> None:
    mgr = rig.manager(driver=OldAgentDriver())
    host_port = free_port()
    await mgr.create_sandbox(spec("old", ports=[PortMapping(8080, host_port)]))
    with pytest.raises(BootFailed, match="too old to forward ports"):
        await mgr.wait_ready("old", 15)
    assert mgr.inspect_sandbox("old").state == S.FAILED
    assert refused(host_port)
    await ready_sandbox(mgr, "old-no-ports")  # without ports the old agent is fine
    await mgr.remove_sandbox("old")
    await mgr.remove_sandbox("old-no-ports")



# -- connect_port: a stream to a guest port for in-process callers ---------------------------


async def test_connect_port_streams_to_the_guest_and_shares_the_connection_limit(rig: Rig) -> None:
    srv = await guest_server()
    mgr = rig.manager()
    mgr.config.limits.max_port_connections = 2
    await mgr.create_sandbox(spec("stream", ports=[PortMapping(srv.port)]))
    with pytest.raises(InvalidState, match="ready or running"):
        await mgr.connect_port("stream", srv.port)  # still booting
    await mgr.wait_ready("stream", 15)
    host_port = mgr.inspect_sandbox("stream").ports[0].host_port

    data = os.urandom(3 * p.PORT_WINDOW + 5)  # more than a window each way
    async with await mgr.connect_port("stream", srv.port) as s1:
        writer = asyncio.ensure_future(s1.write(data))
        got = bytearray()
        while len(got) < len(data):
            got += await s1.read()
        await writer
        await s1.write_eof()
        assert bytes(got) == data and await s1.read() == b""
    await wait_for(lambda: srv.ends == ["done"], what="a clean end in the guest")

    s1 = await mgr.connect_port("stream", srv.port)
    s2 = await mgr.connect_port("stream", srv.port)
    with pytest.raises(ResourceExhausted, match="max_port_connections"):
        await mgr.connect_port("stream", srv.port)
    reader, writer3 = await asyncio.open_connection("127.0.0.1", host_port)  # the listener waits too
    writer3.write(b"third")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.read(10), 0.5)
    s2.close()  # a stream ends: the listener accepts again
    assert await asyncio.wait_for(reader.read(10), 10) == b"third"
    writer3.close()
    forwards = mgr._ctx.sandboxes["stream"].forwards
    await wait_for(lambda: forwards.connections == 1, what="only s1 left")

    with pytest.raises(AgentError) as err:
        await mgr.connect_port("stream", free_port())
    assert err.value.code == "refused" and forwards.connections == 1

    await mgr.remove_sandbox("stream")  # an open stream ends: reset, or its agent gone first
    with pytest.raises((PortClosed, AgentDisconnected)):
        await s1.read()
    s1.close()
    with pytest.raises(SandboxNotFound):
        await mgr.connect_port("stream", srv.port)
    srv.close()


async def test_connect_port_without_mappings_or_network(rig: Rig) -> None:
    srv = await guest_server()
    mgr = rig.manager()
    sid = await ready_sandbox(mgr, "plain")
    stream = await mgr.connect_port(sid, srv.port)
    await stream.write(b"ping")
    assert await stream.read() == b"ping"
    await mgr.stop_sandbox(sid, timeout_seconds=10)  # stopping ends it
    with pytest.raises((PortClosed, AgentDisconnected)):
        await stream.read()
    stream.close()
    with pytest.raises(InvalidState):
        await mgr.connect_port(sid, srv.port)
    await mgr.remove_sandbox(sid)
    srv.close()
