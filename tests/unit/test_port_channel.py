"""The host end of a port channel against a scripted guest: what a misbehaving agent can
make the host hold (never more than the credit it granted), and what the host sends."""

from __future__ import annotations

import asyncio

import pytest

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host.port_channel import PortChannel, PortClosed
from arcbox_vm.errors import AgentDisconnected, AgentError

M = p.MsgType


class FakeHost:
    """A ChannelHost that records the frames sent (decoded)."""

    def __init__(self) -> None:
        self.sent: list[p.Frame] = []
        self.released = False

    async def send_frame(self, data: bytes) -> None:
        self.sent.extend(p.FrameDecoder().feed(data))

    def send_frame_nowait(self, data: bytes) -> None:
        self.sent.extend(p.FrameDecoder().feed(data))

    def release_channel(self, handler: object) -> None:
        self.released = True

    def types(self) -> list[int]:
        return [f.type for f in self.sent]


async def opened(host: FakeHost) -> PortChannel:
    ch = PortChannel(host, 5, 8080)
    task = asyncio.ensure_future(ch.open())
    await asyncio.sleep(0)
    assert host.sent[0].type == M.PORT_CONNECT and host.sent[0].json() == {"port": 8080}
    ch._on_frame(p.Frame(M.PORT_CONNECTED, 5, b"{}"))
    await task
    return ch


async def test_refused_connect_raises_the_guest_error() -> None:
    host = FakeHost()
    ch = PortChannel(host, 5, 8080)
    task = asyncio.ensure_future(ch.open())
    await asyncio.sleep(0)
    ch._on_frame(p.Frame(M.ERROR, 5, p.encode_json(M.ERROR, 5, {"code": "refused", "message": "nothing"})[12:]))
    with pytest.raises(AgentError) as err:
        await task
    assert err.value.code == "refused" and host.released


async def test_data_beyond_the_granted_credit_drops_the_connection() -> None:
    host = FakeHost()
    ch = await opened(host)
    ch._on_frame(p.Frame(M.PORT_DATA, 5, b"a" * p.PORT_WINDOW))  # exactly the window: fine
    assert ch.held == p.PORT_WINDOW
    ch._on_frame(p.Frame(M.PORT_DATA, 5, b"b"))  # one byte more than granted
    assert host.sent[-1].type == M.ERROR and host.sent[-1].json()["code"] == "bad_request"
    assert ch.done and host.released and ch.held == p.PORT_WINDOW
    with pytest.raises(AgentError, match="beyond the credit"):
        await ch.read()
    assert not ch._incoming, "what it held is dropped"


async def test_credit_comes_back_only_for_what_was_written() -> None:
    host = FakeHost()
    ch = await opened(host)
    chunk = b"c" * (p.PORT_WINDOW // 8)
    for _ in range(8):
        ch._on_frame(p.Frame(M.PORT_DATA, 5, chunk))
    data = await ch.read()
    await ch.consumed(len(data))  # one chunk written out: below the grant batch
    assert M.WINDOW not in host.types()
    ch._on_frame(p.Frame(M.PORT_DATA, 5, b"x"))  # still over the window counting ungranted bytes
    assert ch.done, "bytes written but not granted back still count against the guest"


async def test_grants_in_batches_and_at_the_end_of_the_queue() -> None:
    host = FakeHost()
    ch = await opened(host)
    for _ in range(3):
        ch._on_frame(p.Frame(M.PORT_DATA, 5, b"d" * 100))
    for _ in range(3):
        await ch.consumed(len(await ch.read()))
    windows = [p.decode_window(f.payload) for f in host.sent if f.type == M.WINDOW]
    assert windows == [300], "the queue ran empty: everything is granted back"
    ch._on_frame(p.Frame(M.PORT_EOF, 5, b""))
    assert await ch.read() == b""
    ch._on_frame(p.Frame(M.PORT_DATA, 5, b"late"))  # data after EOF is a violation
    assert ch.done and host.sent[-1].type == M.ERROR


async def test_writes_wait_for_credit_and_are_cut_at_the_credit() -> None:
    host = FakeHost()
    ch = await opened(host)
    writer = asyncio.ensure_future(ch.write(b"w" * (p.PORT_WINDOW + 1000)))
    await asyncio.sleep(0.05)
    sent = sum(len(f.payload) for f in host.sent if f.type == M.PORT_DATA)
    assert sent == p.PORT_WINDOW and not writer.done()
    ch._on_frame(p.Frame(M.WINDOW, 5, p.WINDOW_STRUCT.pack(500)))
    await asyncio.sleep(0.05)
    assert sum(len(f.payload) for f in host.sent if f.type == M.PORT_DATA) == p.PORT_WINDOW + 500
    ch._on_frame(p.Frame(M.WINDOW, 5, p.WINDOW_STRUCT.pack(10**9)))  # more than ever sent: capped
    await writer
    assert ch.credit <= p.PORT_WINDOW
    assert all(len(f.payload) <= p.DATA_CHUNK for f in host.sent if f.type == M.PORT_DATA)


async def test_guest_close_and_disconnect_fail_the_reader_and_writer() -> None:
    host = FakeHost()
    ch = await opened(host)
    ch._on_frame(p.Frame(M.PORT_DATA, 5, b"dropped"))
    ch._on_frame(p.Frame(M.PORT_CLOSE, 5, b""))
    with pytest.raises(PortClosed):
        await ch.read()
    with pytest.raises(PortClosed):
        await ch.write(b"x")
    ch.close()  # already over: no PORT_CLOSE back
    assert M.PORT_CLOSE not in host.types()

    host2 = FakeHost()
    ch2 = await opened(host2)
    reader = asyncio.ensure_future(ch2.read())
    await asyncio.sleep(0)
    ch2._on_disconnect(AgentDisconnected())
    with pytest.raises(AgentDisconnected):
        await reader


async def test_host_close_sends_port_close_once() -> None:
    host = FakeHost()
    ch = await opened(host)
    ch.close()
    ch.close()
    assert host.types().count(M.PORT_CLOSE) == 1 and host.released
