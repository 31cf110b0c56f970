"""Port forwarding in the guest agent, run on the host as an ordinary process.

The agent connects to 127.0.0.1:PORT "in the guest", which here is the host's loopback:
each test runs a small TCP server there and drives the agent with PORT_* frames through the
blocking client of agent_harness.py.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from agent_harness import AgentProcess, Client

from arcbox_vm.agent import protocol as p

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guest agent is Linux-only")

M = p.MsgType


class Server:
    """A TCP server on the loopback; `handler(conn)` runs in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.events: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handler(conn)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def close(self) -> None:
        self.sock.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    a = AgentProcess()
    yield a
    log = a.log()
    a.stop()
    sys.stderr.write("---- agent log ----\n%s\n" % log)


@pytest.fixture
def client(agent: AgentProcess) -> Client:
    c, _ = agent.connect()
    return c


def connect(client: Client, ch: int, port: int) -> p.Frame:
    client.send_json(M.PORT_CONNECT, ch, {"port": port})
    return client.next(ch)


def read_until_eof(client: Client, ch: int, grant: bool = True, timeout: float = 10.0) -> bytes:
    """PORT_DATA until PORT_EOF, granting credit back as it comes (WINDOW frames are skipped)."""
    out = bytearray()
    while True:
        f = client.next(ch, timeout)
        if f.type == M.PORT_DATA:
            out += f.payload
            if grant:
                client.send_raw(p.encode_window(ch, len(f.payload)))
        elif f.type == M.PORT_EOF:
            return bytes(out)
        elif f.type != M.WINDOW:
            raise AssertionError("unexpected %r" % f)


def still_serving(client: Client) -> None:
    client.send(M.PING, 0, b"alive")
    f = client.next(0)
    assert (f.type, f.payload) == (M.PONG, b"alive")


def test_hello_advertises_port_forwarding(agent: AgentProcess) -> None:
    _, hello = agent.connect()
    assert p.FEATURE_PORTS in hello["features"]


def test_echo_half_close_and_the_channel_is_forgotten(client: Client) -> None:
    srv = Server(echo)
    f = connect(client, 3, srv.port)
    assert (f.type, f.json()) == (M.PORT_CONNECTED, {})
    client.send(M.PORT_DATA, 3, b"hello ")
    client.send(M.PORT_DATA, 3, b"world")
    client.send(M.PORT_EOF, 3)  # the server sees EOF only now, echoes everything and closes
    assert read_until_eof(client, 3) == b"hello world"
    assert {f.type for f in client.quiet_for(3, 0.3)} <= {M.WINDOW}  # credit for our data may trail
    # finished: late frames on the channel are dropped quietly, never answered
    client.send_raw(p.encode_window(3, 100) + p.encode_frame(M.PORT_CLOSE, 3))
    assert [f for f in client.quiet_for(3, 0.5) if f.type != M.WINDOW] == []
    still_serving(client)
    assert not srv.errors


def test_server_that_answers_after_reading_everything(client: Client) -> None:
    """Half-close both ways: the guest program reads to EOF, then answers on the same socket."""
    def count(conn: socket.socket) -> None:
        n = 0
        while data := conn.recv(65536):
            n += len(data)
        conn.sendall(b"got %d" % n)

    srv = Server(count)
    assert connect(client, 5, srv.port).type == M.PORT_CONNECTED
    sent = 0
    credit = p.PORT_WINDOW
    payload = b"x" * 60000
    while sent < 3 * p.PORT_WINDOW:  # beyond one window: needs the agent's WINDOW grants
        while credit < len(payload):
            f = client.next(5)
            assert f.type == M.WINDOW, f
            credit += p.decode_window(f.payload)
        client.send(M.PORT_DATA, 5, payload)
        credit -= len(payload)
        sent += len(payload)
    client.send(M.PORT_EOF, 5)
    assert read_until_eof(client, 5) == b"got %d" % sent


def test_nothing_listening_is_refused(client: Client) -> None:
    f = connect(client, 7, closed_port())
    assert f.type == M.ERROR
    assert f.json()["code"] == p.ErrorCode.REFUSED
    assert "connection refused" in f.json()["message"]
    client.send(M.PORT_DATA, 7, b"pipelined")  # dropped quietly: the request failed
    assert client.quiet_for(7, 0.3) == []
    still_serving(client)


@pytest.mark.parametrize("body", [{}, {"port": 0}, {"port": 65536}, {"port": "80"}, {"port": True}])
def test_malformed_requests_are_bad_requests(client: Client, body: dict) -> None:
    client.send_json(M.PORT_CONNECT, 9, body)
    f = client.next(9)
    assert (f.type, f.json()["code"]) == (M.ERROR, p.ErrorCode.BAD_REQUEST)


def test_guest_to_host_data_never_exceeds_the_credit(client: Client) -> None:
    """A program sending 4 MiB: without WINDOW from the host at most PORT_WINDOW arrives;
    with it, all of it."""
    total = 4 << 20

    def blast(conn: socket.socket) -> None:
        conn.sendall(b"y" * total)

    srv = Server(blast)
    assert connect(client, 11, srv.port).type == M.PORT_CONNECTED
    got = 0
    for f in client.quiet_for(11, 1.0):
        assert f.type == M.PORT_DATA, f
        got += len(f.payload)
    assert got == p.PORT_WINDOW, "the agent sent exactly the credit it had, then stopped"
    client.send_raw(p.encode_window(11, got))
    rest = read_until_eof(client, 11)
    assert got + len(rest) == total
    assert not srv.errors


def test_host_data_beyond_the_window_is_refused_and_resets(client: Client) -> None:
    ready = threading.Event()
    outcome: list[str] = []

    def stall(conn: socket.socket) -> None:
        ready.wait(10)  # reads nothing until the agent gave up
        try:
            while conn.recv(65536):
                pass
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")

    srv = Server(stall)
    assert connect(client, 13, srv.port).type == M.PORT_CONNECTED
    chunk = b"z" * (p.PORT_WINDOW // 4)
    for _ in range(4):  # exactly the window: accepted
        client.send(M.PORT_DATA, 13, chunk)
    time.sleep(0.3)
    client.send(M.PORT_DATA, 13, b"!" * (p.PORT_WINDOW + 1))  # no window left for this
    errors = [f for f in client.quiet_for(13, 1.0) if f.type == M.ERROR]
    assert [e.json()["code"] for e in errors] == [p.ErrorCode.BAD_REQUEST]
    assert "beyond the granted window" in errors[0].json()["message"]
    ready.set()
    deadline = time.monotonic() + 5
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.02)
    assert outcome == ["reset"], "the guest program's connection was reset"
    still_serving(client)


def test_host_close_resets_the_guest_connection(client: Client) -> None:
    outcome: list[str] = []

    def wait(conn: socket.socket) -> None:
        try:
            conn.recv(10)
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")

    srv = Server(wait)
    assert connect(client, 15, srv.port).type == M.PORT_CONNECTED
    client.send(M.PORT_CLOSE, 15)
    deadline = time.monotonic() + 5
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.02)
    assert outcome == ["reset"]
    assert client.quiet_for(15, 0.3) == [], "PORT_CLOSE is never answered"


def test_guest_program_reset_is_sent_as_port_close(client: Client) -> None:
    def rst(conn: socket.socket) -> None:
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    srv = Server(rst)
    assert connect(client, 17, srv.port).type == M.PORT_CONNECTED
    client.send(M.PORT_DATA, 17, b"go")
    frames = [f for f in client.quiet_for(17, 1.0) if f.type != M.WINDOW]
    assert [f.type for f in frames] == [M.PORT_CLOSE]
    client.send(M.PORT_DATA, 17, b"late")  # crossed our PORT_CLOSE: ignored
    assert [f for f in client.quiet_for(17, 0.3) if f.type != M.WINDOW] == []


def test_many_connections_at_once(client: Client) -> None:
    srv = Server(echo)
    channels = list(range(100, 200))
    for ch in channels:
        client.send_json(M.PORT_CONNECT, ch, {"port": srv.port})
    for ch in channels:
        assert client.next(ch).type == M.PORT_CONNECTED
    for ch in channels:
        client.send(M.PORT_DATA, ch, b"conn %d" % ch)
        client.send(M.PORT_EOF, ch)
    for ch in channels:
        assert read_until_eof(client, ch) == b"conn %d" % ch
    assert srv.accepted == 100 and not srv.errors


def test_channel_in_use(client: Client) -> None:
    srv = Server(echo)
    assert connect(client, 21, srv.port).type == M.PORT_CONNECTED
    f = connect(client, 21, srv.port)
    assert (f.type, f.json()["code"]) == (M.ERROR, p.ErrorCode.CHANNEL_IN_USE)
    client.send_json(M.EXEC, 21, p.exec_request(["true"]))
    f = client.next(21)
    assert (f.type, f.json()["code"]) == (M.ERROR, p.ErrorCode.CHANNEL_IN_USE)
    client.send(M.PORT_DATA, 21, b"still open")  # the CHANNEL_IN_USE errors did not end it
    client.send(M.PORT_EOF, 21)
    assert read_until_eof(client, 21) == b"still open"


def test_losing_the_host_resets_forwarded_connections(agent: AgentProcess) -> None:
    outcome: list[str] = []

    def wait(conn: socket.socket) -> None:
        try:
            conn.recv(10)
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")

    srv = Server(wait)
    client, _ = agent.connect()
    assert connect(client, 23, srv.port).type == M.PORT_CONNECTED
    client.sock.close()  # the daemon went away
    deadline = time.monotonic() + 5
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.02)
    assert outcome == ["reset"]
    client, hello = agent.connect()  # it dials again, with no forwarded connection left
    assert hello["detached"] == []
    f = connect(client, 23, srv.port)
    assert f.type == M.PORT_CONNECTED, "channel numbers of the lost connection are free again"
