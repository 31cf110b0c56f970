"""The guest agent's spliced output (``transport.SpliceOut``), on the host: a Conn over one
end of a socket pair, pipes standing in for a command's stdout. Every case checks that the
peer reads well-formed frames carrying exactly the pipe's bytes, in queue order."""

from __future__ import annotations

import errno
import fcntl
import os
import socket

import pytest

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.guest import transport
from arcbox_vm.agent.guest.transport import Conn

F_SETPIPE_SZ = 1031


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    conn = Conn(a.fileno(), "test", keep=a)
    yield conn, b
    conn.close()
    b.close()


def _pipe_with(data: bytes) -> tuple[int, int]:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)  # holds every test's bytes: the write never blocks
    os.set_blocking(r, False)
    os.write(w, data)
    return r, w


def _flush_all(conn: Conn, peer: socket.socket) -> list:
    """Flush until the queue is empty, reading the peer meanwhile; the frames it got."""
    dec = p.FrameDecoder()
    frames = []
    peer.setblocking(False)
    for _ in range(10_000):
        done = conn.flush()
        try:
            while True:
                chunk = peer.recv(1 << 20)
                if not chunk:
                    break
                frames += list(dec.feed(chunk))
        except BlockingIOError:
            pass
        if done and not conn.out_bytes:
            break
    peer.setblocking(True)
    peer.settimeout(0.2)
    try:
        while True:
            chunk = peer.recv(1 << 20)
            if not chunk:
                break
            frames += list(dec.feed(chunk))
    except (TimeoutError, socket.timeout, BlockingIOError):
        pass
    return frames


def test_spliced_frames_keep_order_with_ordinary_ones(pair) -> None:
    conn, peer = pair
    one, two = os.urandom(200_000), os.urandom(70_000)
    r1, w1 = _pipe_with(one)
    r2, w2 = _pipe_with(two)
    try:
        conn.send_frame(p.MsgType.STARTED, 1, b"{}")
        first = conn.send_splice(p.MsgType.STDOUT, 1, r1, len(one))
        conn.send_frame(p.MsgType.STDERR, 2, b"between")
        second = conn.send_splice(p.MsgType.STDOUT, 2, r2, len(two))
        assert conn.out_bytes == 2 * p.HEADER_SIZE * 2 + 2 + len("between") + len(one) + len(two)
        frames = _flush_all(conn, peer)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    assert [(f.type, f.channel) for f in frames] == [
        (p.MsgType.STARTED, 1), (p.MsgType.STDOUT, 1), (p.MsgType.STDERR, 2), (p.MsgType.STDOUT, 2)]
    assert bytes(frames[1].payload) == one and bytes(frames[3].payload) == two
    assert first.done and second.done and conn.out_bytes == 0


def test_unsplice_reads_the_owed_bytes_before_the_pipe_closes(pair) -> None:
    conn, peer = pair
    data = os.urandom(100_000)
    r, w = _pipe_with(data + b"later bytes stay in the pipe")
    item = conn.send_splice(p.MsgType.STDOUT, 3, r, len(data))
    conn.unsplice(item)  # what Session._close_fd does first
    assert item.done
    rest = os.read(r, 1000)
    os.close(r)
    os.close(w)
    assert rest == b"later bytes stay in the pipe"  # exactly the promised bytes were taken
    frames = _flush_all(conn, peer)
    assert [(f.type, bytes(f.payload)) for f in frames] == [(p.MsgType.STDOUT, data)]


def test_a_channel_that_refuses_splice_gets_the_bytes_by_read_and_write(pair, monkeypatch) -> None:
    conn, peer = pair

    def refuse(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(transport.os, "splice", refuse)
    data = os.urandom(90_000)
    r, w = _pipe_with(data)
    try:
        conn.send_splice(p.MsgType.STDOUT, 1, r, len(data))
        frames = _flush_all(conn, peer)
    finally:
        os.close(r)
        os.close(w)
    assert [bytes(f.payload) for f in frames] == [data]
    assert conn.can_splice is False  # sessions read+write from now on


def test_bytes_taken_from_the_pipe_by_someone_else_leave_the_stream_framed(pair) -> None:
    """Only root in the guest can read the agent's pipe; if it does, the frame the header
    promised is padded (never short) so the host keeps decoding the stream."""
    conn, peer = pair
    data = os.urandom(80_000)
    r, w = _pipe_with(data)
    try:
        conn.send_splice(p.MsgType.STDOUT, 1, r, len(data))
        stolen = os.read(r, 50_000)  # the thief
        conn.send_frame(p.MsgType.EXIT, 1, b'{"exit_code": 0}')
        frames = _flush_all(conn, peer)
    finally:
        os.close(r)
        os.close(w)
    assert [f.type for f in frames] == [p.MsgType.STDOUT, p.MsgType.EXIT]
    got = bytes(frames[0].payload)
    assert len(got) == len(data) and got[: len(data) - len(stolen)] == data[len(stolen):]
    assert bytes(frames[1].payload) == b'{"exit_code": 0}'


def test_dropping_the_queue_marks_spliced_items_done_and_leaves_their_bytes(pair) -> None:
    conn, peer = pair
    data = os.urandom(70_000)
    r, w = _pipe_with(data)
    try:
        item = conn.send_splice(p.MsgType.STDOUT, 1, r, len(data))
        conn.close_queue()  # a lost or replaced host
        assert item.done and conn.out_bytes == 0
        assert os.read(r, 1 << 20) == data  # a detached session spools them from the pipe
    finally:
        os.close(r)
        os.close(w)
