"""The host side of the agent channel against a hostile guest.

Code in a sandbox is root in its guest: it can replace the agent and say anything on the
channel, or stop reading it. Each test plays such a guest on the agent end of a socket
pair, against the real host code (`handshake`, `AgentConnection`, `AgentListener`), and
measures what it costs the host: memory (tracemalloc), time, tasks, log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host import AgentConnection, AgentListener, ExecChannel, FileReader, handshake, limits
from arcbox_vm.agent.host.file_ops import _dir_listing, _file_stat, _FileRequest, _FileWrite
from arcbox_vm.agent.host.limits import AgentProtocolViolation, ProtocolViolation
from arcbox_vm.errors import AgentDisconnected, AgentError, ExecError
from arcbox_vm.manager.boot import BootedVm
from arcbox_vm.manager.exec_stream import ExecStream

MiB = 1 << 20
FEATURES = ["exec", "tty", "files", "attach"]


def hello(**fields: Any) -> bytes:
    return p.encode_json(p.MsgType.HELLO, 0, {"proto": p.PROTOCOL_VERSION, "features": FEATURES, **fields})


class Guest:
    """The hostile agent: a raw non-blocking socket. It reads only when the test says so."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.decoder = p.FrameDecoder()
        self.frames: list[p.Frame] = []
        self.loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()  # whole writes: a PONG never lands inside another write

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.loop.sock_sendall(self.sock, data)

    async def next(self, timeout: float = 5.0, skip: tuple[int, ...] = (p.MsgType.HELLO_ACK,)) -> p.Frame:
        """The next frame from the host (HELLO_ACK skipped)."""
        deadline = self.loop.time() + timeout
        while True:
            while self.frames:
                frame = self.frames.pop(0)
                if frame.type not in skip:
                    return frame
            data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), deadline - self.loop.time())
            assert data, "the host closed the stream"
            for item in self.decoder.feed(data):
                assert isinstance(item, p.Frame), item
                self.frames.append(item)

    async def at_eof(self, timeout: float = 3.0) -> bool:
        """True once the host closed its end (what came before the EOF is discarded)."""
        deadline = self.loop.time() + timeout
        try:
            while True:
                data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), deadline - self.loop.time())
                if not data:
                    return True
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    async def answer_pings(self) -> None:
        """Read forever, answering PINGs (a guest that behaves, apart from what the test sends)."""
        while True:
            frame = await self.next(timeout=3600, skip=())
            if frame.type == p.MsgType.PING:  # shielded: cancelling this never leaves half a frame
                await asyncio.shield(self.send(p.encode_frame(p.MsgType.PONG, frame.channel, frame.payload)))

    def close(self) -> None:
        self.sock.close()


async def connect(hello_frame: bytes | None = None) -> tuple[AgentConnection, Guest]:
    host_sock, guest_sock = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=host_sock)
    guest = Guest(guest_sock)
    await guest.send(hello_frame or hello())
    conn = await asyncio.wait_for(handshake(reader, writer), 5)
    return conn, guest


@contextlib.asynccontextmanager
async def hostile(hello_frame: bytes | None = None) -> Any:
    conn, guest = await connect(hello_frame)
    try:
        yield conn, guest
    finally:
        await conn.close()
        guest.close()


async def start_exec(conn: AgentConnection, guest: Guest, pid: int = 42) -> ExecChannel:
    task = asyncio.ensure_future(conn.exec(p.exec_request(["cmd"])))
    req = await guest.next()
    assert req.type == p.MsgType.EXEC
    await guest.send(p.encode_json(p.MsgType.STARTED, req.channel, {"pid": pid}))
    return await asyncio.wait_for(task, 5)


async def ping_works(conn: AgentConnection, guest: Guest) -> bool:
    """The connection is alive: a host PING gets its PONG from the guest."""
    ping = asyncio.ensure_future(conn.ping(5))
    frame = await guest.next()
    while frame.type != p.MsgType.PING:
        frame = await guest.next()
    await guest.send(p.encode_frame(p.MsgType.PONG, 0, frame.payload))
    return await ping >= 0


@contextlib.contextmanager
def traced() -> Iterator[dict[str, float]]:
    """Memory allocated while the block runs: {"peak": MiB above the start, "end": MiB left}."""
    out: dict[str, float] = {}
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        yield out
        cur, peak = tracemalloc.get_traced_memory()
        out["peak"], out["end"] = (peak - base) / MiB, (cur - base) / MiB
    finally:
        tracemalloc.stop()


class LogCount(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def host_log() -> Iterator[LogCount]:
    handler = LogCount()
    logger = logging.getLogger("arcbox_vm.agent.host")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


async def timed(coro: Any, limit: float) -> tuple[Any, float]:
    """(result or exception, seconds) of `coro`; the test fails if it runs past `limit`."""

    async def outcome() -> Any:
        try:
            return await coro
        except Exception as exc:  # noqa: BLE001 - the caller checks which
            return exc

    t0 = time.monotonic()
    task = asyncio.ensure_future(outcome())
    done, _ = await asyncio.wait({task}, timeout=limit)
    if not done:
        task.cancel()
        pytest.fail(f"still running after {limit} s")
    return task.result(), time.monotonic() - t0


# ---- 1. a guest that stops reading ------------------------------------------------------------


async def test_a_guest_that_never_reads_and_floods_pings_costs_one_pending_pong() -> None:
    """Before: each PING spawned a task holding its 1 MiB echo (300 PINGs: +302 MiB, 302 tasks),
    and ping/shutdown/close never returned. Now: one PONG pending, the rest dropped."""
    async with hostile() as (conn, guest):
        tasks_before = len(asyncio.all_tasks())
        big_ping = p.encode_frame(p.MsgType.PING, 0, b"x" * p.DEFAULT_MAX_PAYLOAD)
        with traced() as mem:
            for _ in range(300):  # the guest never reads a byte of what the host sends
                await guest.send(big_ping)
            await asyncio.sleep(0.3)
            pending = len(asyncio.all_tasks()) - tasks_before
        assert pending <= 1, pending
        assert conn.dropped_replies >= 299 - 1
        assert mem["peak"] < 16, mem  # measured: about 5 MiB of peak, 2 MiB left
        assert not conn.closed.done()  # 300 control frames are within the rate limit

        result, took = await timed(conn.ping(timeout=1), 3)
        assert isinstance(result, TimeoutError) and took < 2, (result, took)
        result, took = await timed(conn.shutdown(timeout=1), 3)
        assert result is False and took < 2, (result, took)
        result, took = await timed(conn.close(), 2)
        assert took < 1, took
    assert conn.closed.done()


async def test_a_send_that_cannot_complete_fails_the_connection_and_its_streams() -> None:
    async with hostile() as (conn, guest):
        conn.send_timeout = 0.5
        session = await start_exec(conn, guest)
        # stdin within the guest's credit (1 MiB), but the guest never reads it
        result, took = await timed(session.write_stdin(b"i" * p.INITIAL_WINDOW), 5)
        assert isinstance(result, AgentDisconnected) and "stopped reading" in str(result), result
        assert took < 1.5
        assert isinstance(conn.closed.result(), AgentDisconnected)
        with pytest.raises(AgentDisconnected, match="stopped reading"):
            async for _ in session:
                pass
        result, took = await timed(conn.ping(timeout=5), 1)  # fails at once: the connection is gone
        assert isinstance(result, AgentDisconnected)


class FakeProcess:
    """A VMM that ignores stop requests until killed."""

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.calls: list[str] = []

    async def request_stop(self) -> None:
        self.calls.append("request_stop")

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    async def kill(self) -> None:
        self.calls.append("kill")
        if self.returncode is None:
            self.returncode = -9
            self.exited.set_result(-9)

    async def cleanup(self) -> None:
        self.calls.append("cleanup")


async def test_stop_of_a_guest_that_stopped_reading_finishes_in_time() -> None:
    """What stop / rm -f use — BootedVm.shutdown(timeout) then destroy() — with a guest
    that stopped reading while the host had output to send it: done in timeout + ~1 s."""
    async with hostile() as (conn, guest):
        session = await start_exec(conn, guest)
        stdin = asyncio.ensure_future(session.write_stdin(b"i" * p.INITIAL_WINDOW))  # stuck: nobody reads
        await asyncio.sleep(0.2)
        assert not stdin.done()
        with tempfile.TemporaryDirectory() as d:
            listener = AgentListener(Path(d) / "agent.sock")
            proc = FakeProcess()
            vm = BootedVm("sb", Path(d) / "work", proc, conn, listener)  # type: ignore[arg-type]
            t0 = time.monotonic()
            graceful = await asyncio.wait_for(vm.shutdown(timeout=2), 5)
            await asyncio.wait_for(vm.destroy(), 3)
            took = time.monotonic() - t0
        assert graceful is False and took < 3.5, took
        assert proc.calls.index("kill") < proc.calls.index("cleanup")
        assert conn.closed.done()
        with pytest.raises(AgentDisconnected):
            await asyncio.wait_for(stdin, 1)


# ---- 2. output beyond the credit window ---------------------------------------------------------


async def test_stdout_beyond_the_window_ends_the_session_and_memory_stays_bounded() -> None:
    """Before: 400 MiB of STDOUT queued against a 1 MiB window (+401 MiB). Now the session
    ends with ProtocolViolation at the first byte over, the guest is told, memory ~ one window."""
    async with hostile() as (conn, guest):
        session = await start_exec(conn, guest)
        frame = p.encode_frame(p.MsgType.STDOUT, session.channel, b"o" * p.DATA_CHUNK)
        with traced() as mem:
            for _ in range((50 * MiB) // p.DATA_CHUNK):  # 50 MiB, never waiting for WINDOW
                await guest.send(frame)
            await asyncio.sleep(0.2)
        assert mem["peak"] < 8, mem  # measured: about 1.8 MiB of peak
        assert session.done and session.queued_bytes == 0
        with pytest.raises(ProtocolViolation, match="beyond the 1048576 bytes of credit"):
            async for _ in session:
                pass
        err = await guest.next()
        assert (err.type, err.channel, err.json()["code"]) == (p.MsgType.ERROR, session.channel, "protocol_violation")
        assert session.channel not in conn._table
        assert not conn.closed.done() and await ping_works(conn, guest)  # only that session ended


async def test_output_is_granted_back_as_consumed_so_an_honest_guest_never_overruns() -> None:
    async with hostile() as (conn, guest):
        session = await start_exec(conn, guest)
        credit, sent, got = p.INITIAL_WINDOW, 0, 0

        async def consume() -> None:
            nonlocal got
            async for chunk in session:
                got += len(chunk.data)

        consumer = asyncio.ensure_future(consume())
        while sent < 8 * MiB:  # exactly within the credit, refilled by WINDOW frames
            while credit <= 0:
                w = await guest.next()
                assert w.type == p.MsgType.WINDOW
                credit += p.decode_window(w.payload)
            n = min(credit, p.DATA_CHUNK)
            await guest.send(p.encode_frame(p.MsgType.STDERR if sent % 3 else p.MsgType.STDOUT, session.channel,
                                            b"x" * n))
            credit -= n
            sent += n
        await guest.send(p.encode_json(p.MsgType.EXIT, session.channel, {"exit_code": 0}))
        await asyncio.wait_for(consumer, 5)
        assert got == sent and session.exit_status is not None and session.exit_status.exit_code == 0


async def test_tiny_output_frames_are_stored_compactly() -> None:
    """Output credit spent as 2-byte frames alternating stdout/stderr (the worst case for
    per-frame objects) with nobody reading: the host keeps the bytes plus ~8 per frame.
    Before: ~100 bytes per frame (6.2 MiB for these 65 536 frames, ~100 MiB for a whole
    window of 1-byte frames); now 0.7 MiB."""
    async with hostile() as (conn, guest):
        session = await start_exec(conn, guest)
        frames = 65_536
        out = p.encode_frame(p.MsgType.STDOUT, session.channel, b"aa")
        err = p.encode_frame(p.MsgType.STDERR, session.channel, b"bb")
        with traced() as mem:
            await guest.send((out + err) * (frames // 2))
            while session.queued_bytes < 2 * frames:
                await asyncio.sleep(0.05)
        assert not session.done and session.queued_bytes == 2 * frames
        assert mem["end"] < 2, mem
        chunks = []
        for _ in range(4):
            chunks.append(await session.__aiter__().__anext__())
        assert [(c.stream, c.data) for c in chunks] == [("stdout", b"aa"), ("stderr", b"bb")] * 2


# ---- 3. one guest must not degrade the daemon ---------------------------------------------------


async def _dial(path: Path, payload: bytes = b"") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, str(path))
    if payload:
        await asyncio.get_running_loop().sock_sendall(s, payload)
    return s


async def _closed_by_host(s: socket.socket, timeout: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await asyncio.wait_for(loop.sock_recv(s, 65536), timeout)
            if not data:
                return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_extra_connections_to_the_agent_socket_are_closed_at_once() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "agent.sock"
        listener = AgentListener(path)
        await listener.start()
        socks: list[socket.socket] = []
        try:
            # booting: a few may wait for accept (a reconnect), the rest are closed at once
            socks = [await _dial(path) for _ in range(10)]
            await asyncio.sleep(0.2)
            assert listener._conns.qsize() == 2 and listener.refused == 8
            for s in socks:  # the two waiting ones go away without a HELLO
                s.close()
            first = await _dial(path, hello())
            conn = await listener.accept(5)
            # the agent is connected: every further connection is closed at once
            extra = [await _dial(path, hello()) for _ in range(50)]
            assert all([await _closed_by_host(s) for s in extra])
            assert listener._conns.qsize() == 0 and listener.refused == 58
            for s in extra:
                s.close()
            # the agent's connection dropped: a re-dial is accepted (what re-adoption relies on)
            await conn.close()
            first.close()
            redial = await _dial(path, hello())
            again = await listener.accept(5)
            assert not again.closed.done()
            await again.close()
            redial.close()
        finally:
            await listener.close()


async def test_a_flood_of_control_frames_cuts_the_guest_off_with_a_reason(host_log: LogCount) -> None:
    """Before: one log line per ERROR frame (80k frames/s kept the loop busy logging) and no
    limit. Now: the guest is cut off after the burst; a handful of log lines."""
    async with hostile() as (conn, guest):
        session = await start_exec(conn, guest)
        host_log.records.clear()
        flood = p.encode_error(0, "x", "y" * 20) * 80_000
        t0 = time.monotonic()
        with contextlib.suppress(ConnectionError):
            await guest.send(flood)
        reason = await asyncio.wait_for(conn.closed, 5)
        took = time.monotonic() - t0
        assert isinstance(reason, AgentProtocolViolation) and reason.code == "protocol_violation"
        assert "flooded the control channel" in str(reason)
        assert len(host_log.records) <= limits.LOG_BURST + 5, len(host_log.records)
        assert took < 2, took
        with pytest.raises(AgentProtocolViolation):  # its streams end with the reason too
            async for _ in session:
                pass
        assert await guest.at_eof()


async def test_errors_and_late_frames_on_data_channels_are_dropped_quietly(host_log: LogCount) -> None:
    async with hostile() as (conn, guest):
        host_log.records.clear()
        junk = b"".join(p.encode_error(ch, "x", "late") + p.encode_frame(p.MsgType.STDOUT, ch, b"late")
                        for ch in range(1, 20_001))
        await guest.send(junk)
        assert await ping_works(conn, guest)
        assert not conn.closed.done() and host_log.records == []


async def test_garbage_is_rate_limited_then_cut_off(host_log: LogCount) -> None:
    async with hostile() as (conn, guest):
        host_log.records.clear()
        garbage = b"".join(b"\x00garbage" + p.encode_frame(p.MsgType.PONG, 0, b"") for _ in range(5000))
        with contextlib.suppress(ConnectionError):
            await guest.send(garbage)
        reason = await asyncio.wait_for(conn.closed, 5)
        assert isinstance(reason, AgentProtocolViolation) and "malformed frames" in str(reason)
        assert len(host_log.records) <= limits.LOG_BURST + 5


async def test_the_manager_is_told_why_the_guest_was_cut_off() -> None:
    """watch_vmm turns `closed` into the sandbox's failed event: the reason says what happened."""
    from arcbox_vm.manager import lifecycle
    from arcbox_vm.models import SandboxState

    events: list[dict[str, Any]] = []
    agent_errors: list[str] = []

    class Ctx:
        config = type("C", (), {"agent": type("A", (), {"keepalive_interval_s": 60.0, "keepalive_timeout_s": 60.0})})
        observers = type("O", (), {"agent_error": staticmethod(lambda sid, kind: agent_errors.append(kind))})

        def emit(self, sb: Any, kind: str, **attrs: Any) -> None:
            events.append({"kind": kind, **attrs})

        async def release_network(self, sb: Any) -> None:
            pass

    async with hostile() as (conn, guest):
        proc = FakeProcess()
        with tempfile.TemporaryDirectory() as d:
            vm = BootedVm("sb", Path(d) / "work", proc, conn, AgentListener(Path(d) / "a.sock"))  # type: ignore[arg-type]
            sb = type("SB", (), {"state": SandboxState.RUNNING, "removed": False, "vm": vm, "error": None,
                                 "tasks": {}, "id": "sb"})()
            watch = asyncio.ensure_future(lifecycle.watch_vmm(Ctx(), sb))  # type: ignore[arg-type]
            with contextlib.suppress(ConnectionError):
                await guest.send(p.encode_frame(p.MsgType.PONG, 0, b"?") * 5000)
            t0 = time.monotonic()
            await asyncio.wait_for(watch, 10)
            took = time.monotonic() - t0
        assert took < 2, took  # a guest that was cut off is not waited for (it does not power off)
        assert sb.state == SandboxState.FAILED and "kill" in proc.calls and agent_errors == ["disconnected"]
        assert events[-1]["kind"] == "failed" and events[-1]["reason"] == "agent_protocol_violation"
        assert "flooded the control channel" in events[-1]["error"]


# ---- 4. numbers and strings from the guest are checked ------------------------------------------


@pytest.mark.parametrize("body", [
    {"pid": "abc"}, {"pid": 2**70}, {"pid": -5}, {"pid": 0}, {"pid": 1.5}, {"pid": True}, {"pid": None},
    {"pid": limits.MAX_PID + 1}, {}, {"pid": 7, "attached": True, "stdin_window": 2**40},
    {"pid": 7, "attached": "yes"},
])
async def test_started_with_a_lying_pid_is_refused(body: dict[str, Any]) -> None:
    async with hostile() as (conn, guest):
        task = asyncio.ensure_future(conn.exec(p.exec_request(["cmd"])))
        req = await guest.next()
        await guest.send(p.encode_json(p.MsgType.STARTED, req.channel, body))
        with pytest.raises(ProtocolViolation, match="broke the protocol"):
            await asyncio.wait_for(task, 5)
        err = await guest.next()
        assert (err.type, err.channel) == (p.MsgType.ERROR, req.channel)  # the guest drops the session
        assert len(conn._table) == 0 and await ping_works(conn, guest)


@pytest.mark.parametrize("body", [
    {"exit_code": 2**40}, {"exit_code": 2**70}, {"exit_code": "x"}, {"exit_code": None}, {"exit_code": -1},
    {"exit_code": 256}, {"exit_code": 1.0}, {"exit_code": True}, {},
    {"exit_code": 137, "signal": 0}, {"exit_code": 137, "signal": 1000}, {"exit_code": 137, "signal": "9"},
    {"exit_code": 0, "timed_out": "yes"},
])
async def test_an_impossible_exit_status_ends_the_stream_with_an_error(body: dict[str, Any]) -> None:
    """Before: 2**40 came out as the exit code (an int32 field downstream), "x" crashed the
    reader. Now: an "error" end, and the manager is told the command is over."""
    async with hostile() as (conn, guest):
        session = await start_exec(conn, guest)
        ended: list[int | None] = []
        stream = ExecStream(session, ended.append)
        await guest.send(p.encode_json(p.MsgType.EXIT, session.channel, body))
        chunks = [c async for c in stream]
        assert [c.stream for c in chunks] == ["error"] and b"broke the protocol" in chunks[0].data
        assert ended == [None]  # the sandbox goes back to READY, never stays RUNNING
        assert session.exit_status is None and await ping_works(conn, guest)


async def test_real_exit_statuses_pass() -> None:
    async with hostile() as (conn, guest):
        for body, want in (({"exit_code": 0}, (0, None, False)), ({"exit_code": 255, "signal": None}, (255, None, False)),
                           ({"exit_code": 137, "signal": 9, "timed_out": True}, (137, 9, True))):
            session = await start_exec(conn, guest)
            await guest.send(p.encode_json(p.MsgType.EXIT, session.channel, body))
            status = (await session.collect())[2]
            assert (status.exit_code, status.signal, status.timed_out) == want


async def test_an_error_with_a_hostile_code_and_message_is_bounded() -> None:
    async with hostile() as (conn, guest):
        task = asyncio.ensure_future(conn.exec(p.exec_request(["cmd"])))
        req = await guest.next()
        await guest.send(p.encode_json(p.MsgType.ERROR, req.channel, {"code": "x\r\nevil: 1", "message": "m\x00" * 100_000}))
        with pytest.raises(ExecError) as info:
            await asyncio.wait_for(task, 5)
        assert info.value.code == "internal"  # it becomes gRPC metadata: never a hostile string
        assert len(str(info.value)) <= limits.MAX_ERROR_MESSAGE and "\x00" not in str(info.value)


@pytest.mark.parametrize("fields,match", [
    ({"detached": [{"channel": 0xFFFFFFFF, "pid": 5}]}, "channel must be an integer in 1..2147483647"),
    ({"detached": [{"channel": 3, "pid": 5}] * 2}, "listed twice"),
    ({"detached": [{"channel": i + 1, "pid": 5} for i in range(limits.MAX_DETACHED + 1)]}, "at most 1024"),
    ({"detached": [{"channel": "7", "pid": 5}]}, "channel must be an integer"),
    ({"detached": [{"channel": 7, "pid": 2**40}]}, "pid must be an integer"),
    ({"detached": {"channel": 7}}, "detached must be a list"),
    ({"features": ["x"] * 100_000}, "features must be a list"),
    ({"features": ["x" * 1000]}, "features must be a list"),
    ({"pid": "1"}, "pid must be an integer"),
    ({"sessions": -1}, "sessions must be an integer"),
    ({"kernel": 5}, "kernel must be a string"),
])
async def test_a_lying_hello_is_refused(fields: dict[str, Any], match: str) -> None:
    host_sock, guest_sock = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=host_sock)
    guest = Guest(guest_sock)
    try:
        await guest.send(hello(**fields))
        with pytest.raises(AgentError, match=match) as info:
            await asyncio.wait_for(handshake(reader, writer), 5)
        assert info.value.code == "protocol_violation"
        err = await guest.next()
        assert err.type == p.MsgType.ERROR and err.json()["code"] == p.ErrorCode.BAD_REQUEST
    finally:
        writer.transport.abort()
        guest.close()


async def test_hello_text_is_cut_and_a_high_detached_channel_leaves_room() -> None:
    top = limits.MAX_GUEST_CHANNEL
    frame = hello(kernel="k" * 100_000, hostname="h\n" * 1000, extra="x" * 1000,
                  detached=[{"channel": top, "pid": 9, "argv0": "a" * 100_000}])
    async with hostile(frame) as (conn, guest):
        assert len(conn.kernel_release) == limits.MAX_HELLO_TEXT and "extra" not in conn.hello
        assert set(conn.detached) == {top} and len(conn.detached[top]["argv0"]) == limits.MAX_ARGV0
        session = await start_exec(conn, guest)
        assert session.channel == top + 1
        conn.reserve_channels(limits.MAX_CHANNEL)  # e.g. a state database that says so
        with pytest.raises(AgentError, match="used up its channel numbers") as info:
            await conn.exec(p.exec_request(["cmd"]))
        assert info.value.code == "exhausted"


@pytest.mark.parametrize("change", [
    {"size": -1}, {"size": 2**64}, {"mode": 2**40}, {"uid": -1}, {"gid": "0"}, {"mtime": float("nan")},
    {"mtime": 1e300}, {"type": "weird"}, {"name": "n" * 100_000}, {"link_target": 5}, {"size": "12"},
])
async def test_a_lying_stat_is_refused(change: dict[str, Any]) -> None:
    good = {"path": "/f", "name": "f", "type": "file", "size": 3, "mode": 0o644, "uid": 0, "gid": 0,
            "mtime": 1.5, "link_target": ""}
    assert _file_stat(good, "/f").size == 3
    async with hostile() as (conn, guest):
        task = asyncio.ensure_future(conn.stat("/f"))
        req = await guest.next()
        payload = json.dumps({**good, **change}).encode()  # json writes NaN as NaN: the guest may too
        await guest.send(p.encode_frame(p.MsgType.FILE_STAT_RESULT, req.channel, payload))
        with pytest.raises(ProtocolViolation):
            await asyncio.wait_for(task, 5)
        assert await ping_works(conn, guest)


async def test_a_listing_with_too_many_entries_is_refused() -> None:
    with pytest.raises(p.ProtocolError, match="at most 10000"):
        _dir_listing({"entries": [{}] * (p.LIST_LIMIT + 1)}, "/d")
    listing = _dir_listing({"entries": [{"name": "a"}], "truncated": True}, "/d")
    assert [e.path for e in listing] == ["/d/a"] and listing.truncated
    async with hostile() as (conn, guest):
        task = asyncio.ensure_future(conn.list_dir("/d"))
        req = await guest.next()
        await guest.send(p.encode_json(p.MsgType.FILE_LIST_RESULT, req.channel,
                                       {"path": "/d", "entries": [{}] * 50_000, "truncated": False}))
        with pytest.raises(ProtocolViolation, match="at most 10000"):
            await asyncio.wait_for(task, 5)


async def test_an_upload_whose_done_lies_about_the_size_fails() -> None:
    async def chunks() -> Any:
        yield b"data"

    async with hostile() as (conn, guest):
        task = asyncio.ensure_future(conn.write_file("/f", chunks()))
        req = await guest.next()
        await guest.send(p.encode_json(p.MsgType.FILE_READY, req.channel, {"path": "/f"}))
        assert (await guest.next()).type == p.MsgType.FILE_DATA
        assert (await guest.next()).type == p.MsgType.FILE_END
        await guest.send(p.encode_json(p.MsgType.FILE_DONE, req.channel, {"size": "4"}))
        with pytest.raises(ProtocolViolation, match="size must be an integer"):
            await asyncio.wait_for(task, 5)


async def test_a_download_beyond_its_window_is_cut_off_and_small_frames_are_joined() -> None:
    async with hostile() as (conn, guest):
        task = asyncio.ensure_future(conn.read_file("/f"))
        req = await guest.next()
        await guest.send(p.encode_json(p.MsgType.FILE_INFO, req.channel, {"path": "/f", "type": "file", "size": 1}))
        reader = await asyncio.wait_for(task, 5)
        with traced() as mem:  # 128 KiB as 1-byte frames: joined as they arrive
            await guest.send(p.encode_frame(p.MsgType.FILE_DATA, req.channel, b"d") * (128 << 10))
            while sum(len(c) for c in reader._queue) < 128 << 10:
                await asyncio.sleep(0.05)
        assert len(reader._queue) <= (128 << 10) // 4096 + 1 and mem["end"] < 1, mem
        # nobody took anything, so no credit came back: 960 KiB more is 64 KiB beyond the window
        await guest.send(p.encode_frame(p.MsgType.FILE_DATA, req.channel, b"d" * p.DATA_CHUNK) * 15)
        err = await guest.next()
        assert (err.type, err.channel) == (p.MsgType.ERROR, req.channel)
        assert reader.finished and len(reader._queue) == 0
        with pytest.raises(ProtocolViolation, match="more of /f than the window allows"):
            async for _ in reader:
                pass


# ---- 5. fuzz ------------------------------------------------------------------------------------


def _lying_bodies(rng: random.Random) -> list[bytes]:
    values: list[Any] = [0, 1, -1, 2**31, 2**63, 2**70, -(2**70), 1.5, float("nan"), float("inf"), True, None, "",
                         "x" * 300, [], {}, [1] * 50, {"a": {"b": {}}}, "\x00\n\r", 4294967295, 65536]
    keys = ["pid", "exit_code", "signal", "timed_out", "attached", "stdin_window", "code", "message", "size",
            "mode", "uid", "gid", "mtime", "type", "name", "path", "link_target", "entries", "truncated",
            "proto", "features", "detached", "channel", "kernel"]
    out = []
    for _ in range(400):
        body = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 6))}
        if rng.random() < 0.3:
            body["pid"] = rng.randint(1, 100)
        if rng.random() < 0.2:
            body["exit_code"] = rng.randint(0, 255)
        if rng.random() < 0.1:
            body["entries"] = [{"name": f"e{i}", "size": rng.choice(values)} for i in range(rng.randint(0, 30))]
        out.append(json.dumps(body).encode())
    out += [b"", b"{", b"[]", b"null", b"[" * 5000, b'{"a":' * 3000, bytes(range(256)), b"\xff\xfe"]
    return out


def _fuzz_frames(rng: random.Random, count: int, channels: list[int]) -> list[bytes]:
    """`count` frames of random types, channels and payloads; some truncated, oversized or
    behind garbage.

    The magic appears nowhere but at the start of a frame, and truncation keeps the header:
    so wherever the host's decoder loses its place it finds it again at a real header, and
    never has more than ~1 MiB to skip — the test can then bring it back in step at the end
    and check the connection still works. (A guest that declares a 4 GiB frame makes the
    host skip 4 GiB of its own later bytes: its loss, and not interesting to fuzz.)"""
    types = [int(t) for t in p.MsgType] + [0x00, 0x08, 0x1B, 0x2F, 0x3F, 0x7F, 0xFF]

    def no_magic(b: bytes) -> bytes:
        return b.replace(b"AV", b"Av")

    bodies = [no_magic(b) for b in _lying_bodies(rng)]
    raws = [no_magic(rng.randbytes(rng.choice((0, 1, 4, 8, 13, 64, 300)))) for _ in range(200)]
    raws += [b"z" * p.DATA_CHUNK, b"A" * 40, p.WINDOW_STRUCT.pack(0), p.WINDOW_STRUCT.pack(0xFFFFFFFF)]
    chans = channels + [0] * len(channels) + [rng.getrandbits(32) for _ in range(20)] + [0xFFFFFFFF]
    out: list[bytes] = []
    while len(out) < count:
        roll = rng.random()
        t = rng.choice(types)
        ch = rng.choice(chans)
        payload = rng.choice(bodies) if rng.random() < 0.5 else rng.choice(raws)
        frame = p.HEADER.pack(p.MAGIC, t, rng.choice((0, 0, 0, 0xFF)), ch, len(payload)) + payload
        if not out:  # oversized (one in the pool): the decoder skips the next MiB; more and little is left
            frame = p.HEADER.pack(p.MAGIC, t, 0, ch, p.DEFAULT_MAX_PAYLOAD + rng.randint(1, 4096))
        elif roll < 0.03:  # truncated: the next frames' bytes complete it
            frame = frame[: rng.randint(p.HEADER_SIZE, len(frame))]
        elif roll < 0.05:  # garbage before the frame
            frame = no_magic(rng.randbytes(rng.randint(1, 40))) + frame
        if frame.find(p.MAGIC, 1) < 0 and not frame.endswith(b"A"):  # the magic only where a frame starts
            out.append(frame)
    return out


FUZZ_FRAMES = 1_000_000
FUZZ_BATCH = 20_000


def _register_handlers(conn: AgentConnection, channels: list[int]) -> None:
    """Put a handler of every kind on the fuzzed channels (the guest's frames will kill most)."""
    for i, ch in enumerate(channels):
        if ch in conn._table:
            continue
        kind = i % 5
        if kind == 0:
            handler: Any = ExecChannel(conn, ch, {"argv": ["x"]})
        elif kind == 1:
            handler = FileReader(conn, ch, "/f")
        elif kind == 2:
            handler = _FileRequest(conn, ch, "/f", p.MsgType.FILE_STAT_RESULT, _file_stat)
        elif kind == 3:
            handler = _FileRequest(conn, ch, "/d", p.MsgType.FILE_LIST_RESULT, _dir_listing)
        else:
            handler = _FileWrite(conn, ch, "/f")
        conn._table.add(handler)


async def _fuzz(conn: AgentConnection, guest: Guest, frames: int, seed: int,
                on_batch: Any = lambda sent: None) -> int:
    """Throw `frames` fuzzed frames at `conn`; returns how many were sent before it closed (if it did)."""
    rng = random.Random(seed)
    channels = list(range(1, 33))
    pool = _fuzz_frames(rng, 50_000, channels)
    sent = 0
    while sent < frames and not conn.closed.done():
        on_batch(sent)
        _register_handlers(conn, channels)
        batch = b"".join(rng.choices(pool, k=min(FUZZ_BATCH, frames - sent)))
        try:
            await guest.send(batch)
        except ConnectionError:
            break
        del batch  # (so what memory is left after a batch is the host's)
        sent += min(FUZZ_BATCH, frames - sent)
    return sent


def _loop_errors() -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    return errors


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _held_bytes(conn: AgentConnection) -> int:
    """What the connection holds of the guest's bytes: buffers and every handler's queue."""
    held = conn._decoder.buffered + len(conn._reader._buffer) + conn._writer.transport.get_write_buffer_size()
    for h in conn._table.handlers():
        held += h.queued_bytes if isinstance(h, ExecChannel) else sum(map(len, getattr(h, "_queue", ())))
    return held


async def test_fuzz_a_million_frames_without_limits(host_log: LogCount) -> None:
    """10**6 random frames (random types and channels, lying JSON, raw bytes, 1 in 50 000
    oversized, 3% truncated, 2% behind garbage) at a connection whose rate limits are off, so
    every frame is handled: the reader never crashes, the loop reports nothing, memory stays
    bounded, and afterwards the connection still works.

    Memory is watched three ways: what the connection holds (buffers, queues) and the
    process's RSS after every batch of 20 000 frames, and tracemalloc over a window of
    100 000 frames in the middle (tracing all 10**6 would take minutes)."""
    errors = _loop_errors()
    conn, guest = await connect()
    seen = {"frames": 0, "bad": 0}
    dispatch_all = conn._dispatch_all

    def counting(items: list[Any]) -> None:
        for item in items:
            seen["bad" if isinstance(item, p.DecodeError) else "frames"] += 1
        dispatch_all(items)

    watch = {"held": 0, "tasks": 0, "rss0": _rss_mib(), "rss": 0.0}
    window: dict[str, float] = {}
    tasks0 = len(asyncio.all_tasks())

    def on_batch(sent: int) -> None:
        watch["held"] = max(watch["held"], _held_bytes(conn))
        watch["tasks"] = max(watch["tasks"], len(asyncio.all_tasks()) - tasks0)
        watch["rss"] = max(watch["rss"], _rss_mib() - watch["rss0"])
        if sent == 400_000:
            tracemalloc.start()
            window["base"] = tracemalloc.get_traced_memory()[0]
        elif sent == 500_000:
            cur, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            window["peak"], window["end"] = (peak - window["base"]) / MiB, (cur - window["base"]) / MiB

    try:
        conn._dispatch_all = counting  # type: ignore[method-assign]
        conn._control = limits.TokenBucket(float("inf"), float("inf"))
        conn._violations = limits.TokenBucket(float("inf"), float("inf"))
        drain = asyncio.ensure_future(guest.answer_pings())  # it reads: PONGs and ERRORs must not back up
        host_log.records.clear()
        t0 = time.monotonic()
        sent = await _fuzz(conn, guest, FUZZ_FRAMES, seed=20260501, on_batch=on_batch)
        # whatever state the decoder is in (inside a frame, skipping an oversized one): 3 MiB of
        # zeros end it, then a clean stream; the connection must still answer
        await guest.send(bytes(3 * MiB))
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        assert conn._decoder.buffered <= p.HEADER_SIZE + p.DEFAULT_MAX_PAYLOAD
        assert await ping_works(conn, guest)
        took = time.monotonic() - t0
        assert sent == FUZZ_FRAMES and not conn.closed.done()
        assert seen["frames"] > 0.85 * FUZZ_FRAMES, seen  # decoded and dispatched, not skipped
        assert watch["held"] < 8 * MiB and watch["tasks"] <= 4, watch
        assert watch["rss"] < 100, watch
        assert window["peak"] < 32 and window["end"] < 4, window
        assert not [r for r in host_log.records if "reader crashed" in r.getMessage()]
        assert errors == []
        print(f"fuzz: {sent} frames sent, {seen['frames']} dispatched, {seen['bad']} decode errors, in {took:.1f} s; "
              f"held at most {watch['held'] / MiB:.1f} MiB, tasks +{watch['tasks']}, RSS +{watch['rss']:.0f} MiB; "
              f"tracemalloc over 100k frames: peak +{window['peak']:.1f} MiB, left +{window['end']:.1f} MiB; "
              f"{len(host_log.records)} log lines (rate-limited)")
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        await conn.close()
        guest.close()
        asyncio.get_running_loop().set_exception_handler(None)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_fuzz_with_the_default_limits_closes_cleanly_with_a_reason(seed: int, host_log: LogCount) -> None:
    errors = _loop_errors()
    conn, guest = await connect()
    try:
        sent = await _fuzz(conn, guest, 200_000, seed=seed)
        if not conn.closed.done():
            await asyncio.sleep(0.5)
        # a stream of garbage breaks the protocol: the guest is cut off, cleanly, saying why
        reason = conn.closed.result()
        assert isinstance(reason, AgentProtocolViolation), reason
        assert "was cut off" in str(reason)
        assert sent < 200_000 and not conn._reader_task.cancelled()
        assert await asyncio.wait_for(conn._reader_task, 1) is None  # ended by itself, no exception
        assert len(conn._table) == 0
        assert not [r for r in host_log.records if "reader crashed" in r.getMessage()]
        assert errors == []
    finally:
        await conn.close()
        guest.close()
        asyncio.get_running_loop().set_exception_handler(None)
