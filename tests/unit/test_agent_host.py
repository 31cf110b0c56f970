"""The host side of the agent channel (`arcbox_vm.agent.host`) against a scripted agent.

The agent end of a socket pair is driven with raw frames, so what the host does with
bytes that arrive together (HELLO and what follows it in the same read) is pinned down
exactly; the real agent is exercised in test_guest_agent.py / test_guest_files.py.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host import AgentConnection, ChannelTable, ExitStatus, handshake
from arcbox_vm.errors import AgentDisconnected
from arcbox_vm.manager.exec_stream import ExecHandle

HELLO = p.encode_json(p.MsgType.HELLO, 0, {"proto": p.PROTOCOL_VERSION, "features": ["exec"]})


class ScriptedAgent:
    """The agent's end of the stream: raw bytes out, decoded frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = p.FrameDecoder()
        self.frames: list[p.Frame] = []

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def next(self, timeout: float = 5.0) -> p.Frame:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            assert data, "the host closed the stream"
            for item in self.decoder.feed(data):
                assert isinstance(item, p.Frame), item
                self.frames.append(item)
        return self.frames.pop(0)


async def _pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], ScriptedAgent]:
    host_sock, agent_sock = socket.socketpair()
    host = await asyncio.open_connection(sock=host_sock)
    agent = ScriptedAgent(*await asyncio.open_connection(sock=agent_sock))
    return host, agent


async def _close(conn: AgentConnection, agent: ScriptedAgent) -> None:
    await conn.close()
    agent.writer.close()


async def test_frames_in_the_same_read_as_hello_are_dispatched() -> None:
    (reader, writer), agent = await _pair()
    # one write: HELLO and a PING right behind it, so the host reads them together
    await agent.write(HELLO + p.encode_frame(p.MsgType.PING, 0, b"token-1"))
    conn = await asyncio.wait_for(handshake(reader, writer), 5)
    try:
        ack = await agent.next()
        assert ack.type == p.MsgType.HELLO_ACK and ack.json() == {"proto": p.PROTOCOL_VERSION}
        pong = await agent.next()
        assert (pong.type, pong.channel, pong.payload) == (p.MsgType.PONG, 0, b"token-1")
    finally:
        await _close(conn, agent)


async def test_a_partial_frame_after_hello_is_completed_by_the_next_read() -> None:
    (reader, writer), agent = await _pair()
    second = p.encode_frame(p.MsgType.PING, 0, b"token-3")
    await agent.write(HELLO + p.encode_frame(p.MsgType.PING, 0, b"token-2") + second[:7])
    conn = await asyncio.wait_for(handshake(reader, writer), 5)
    try:
        assert (await agent.next()).type == p.MsgType.HELLO_ACK
        assert (await agent.next()).payload == b"token-2"
        await agent.write(second[7:])
        assert (await agent.next()).payload == b"token-3"
        ping = asyncio.ensure_future(conn.ping(5))  # and the connection goes on as usual
        token = await agent.next()
        assert token.type == p.MsgType.PING
        await agent.write(p.encode_frame(p.MsgType.PONG, 0, token.payload))
        assert await ping >= 0
    finally:
        await _close(conn, agent)


class RecordingHandler:
    """A ChannelHandler that only records what the connection delivers to it."""

    def __init__(self, channel: int) -> None:
        self.channel = channel
        self.frames: list[p.Frame] = []
        self.disconnected: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    def _on_frame(self, frame: p.Frame) -> None:
        self.frames.append(frame)

    def _on_disconnect(self, exc: BaseException) -> None:
        self.disconnected.set_result(exc)


async def test_the_connection_routes_frames_by_channel_and_reports_the_disconnect() -> None:
    (reader, writer), agent = await _pair()
    await agent.write(HELLO)
    conn = await asyncio.wait_for(handshake(reader, writer), 5)
    assert (await agent.next()).type == p.MsgType.HELLO_ACK
    mine, other = RecordingHandler(5), RecordingHandler(6)
    conn._table.add(mine)
    conn._table.add(other)
    await agent.write(p.encode_frame(p.MsgType.STDOUT, 5, b"out") + p.encode_frame(p.MsgType.STDOUT, 9, b"lost"))
    while not mine.frames:
        await asyncio.sleep(0.01)
    assert [(f.type, f.payload) for f in mine.frames] == [(p.MsgType.STDOUT, b"out")] and other.frames == []
    conn.release_channel(other)
    conn.release_channel(RecordingHandler(5))  # not the registered one: left alone
    assert 5 in conn._table and 6 not in conn._table
    agent.writer.close()
    assert isinstance(await asyncio.wait_for(mine.disconnected, 5), AgentDisconnected)
    assert not other.disconnected.done()
    await conn.close()


def test_channel_table_removes_only_the_registered_handler() -> None:
    table = ChannelTable()
    a: Any = type("H", (), {"channel": 3})()
    b: Any = type("H", (), {"channel": 3})()
    table.add(a)
    table.remove(b)
    assert table.get(3) is a and len(table) == 1
    table.remove(a)
    assert table.get(3) is None and len(table) == 0 and 3 not in table


async def test_resize_takes_columns_first_on_every_host_api() -> None:
    (reader, writer), agent = await _pair()
    await agent.write(HELLO)
    conn = await asyncio.wait_for(handshake(reader, writer), 5)
    try:
        assert (await agent.next()).type == p.MsgType.HELLO_ACK
        start = asyncio.ensure_future(conn.exec(p.exec_request(["sh"], tty=True, rows=24, cols=80)))
        req = await agent.next()
        assert req.type == p.MsgType.EXEC
        await agent.write(p.encode_json(p.MsgType.STARTED, req.channel, {"pid": 7}))
        session = await asyncio.wait_for(start, 5)

        await session.resize(120, 40)
        resize = await agent.next()
        assert (resize.type, resize.channel) == (p.MsgType.RESIZE, req.channel)
        assert resize.json() == {"cols": 120, "rows": 40}
        await ExecHandle(session, lambda code: None).resize(100, 30)  # the manager's handle: same order
        assert (await agent.next()).json() == {"cols": 100, "rows": 30}

        await agent.write(p.encode_json(p.MsgType.EXIT, req.channel, {"exit_code": 0}))
        assert (await session.collect())[2] == ExitStatus(0)
        assert len(conn._table) == 0
    finally:
        await _close(conn, agent)
