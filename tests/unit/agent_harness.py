"""Run the guest agent on the host as an ordinary process and drive it with frames.

Shared by the agent's unit tests (test_guest_agent.py, test_guest_files.py): the agent is
started as ``python -m arcbox_vm.agent.guest.main --connect unix:PATH`` against a Unix
socket the test listens on; ``Client`` is a small blocking host side.
"""

from __future__ import annotations

import collections
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional

from arcbox_vm.agent import protocol as p

SRC = Path(__file__).resolve().parents[2] / "src"
GUEST_DIR = SRC / "arcbox_vm" / "agent" / "guest"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class ExecFailed(Exception):
    def __init__(self, body: Dict[str, Any]) -> None:
        super().__init__("%s: %s" % (body.get("code"), body.get("message")))
        self.code = body.get("code")
        self.message = body.get("message", "")


class Result:
    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exit: Dict[str, Any] = {}
        self.windows = 0  # stdin credit granted back by the agent

    @property
    def code(self) -> int:
        return self.exit["exit_code"]


class Client:
    """Frames in and out of one agent connection; incoming frames are queued per channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = p.FrameDecoder()
        self.queues: Dict[int, Deque[p.Frame]] = collections.defaultdict(collections.deque)

    def send(self, type: int, ch: int = 0, payload: bytes = b"") -> None:
        self.sock.sendall(p.encode_frame(type, ch, payload))

    def send_json(self, type: int, ch: int, body: Dict[str, Any]) -> None:
        self.sock.sendall(p.encode_json(type, ch, body))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _pump(self, timeout: float) -> bool:
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return False
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("the agent closed the connection")
        for item in self.dec.feed(data):
            assert isinstance(item, p.Frame), "the agent sent a malformed frame: %r" % (item,)
            self.queues[item.channel].append(item)
        return True

    def next(self, ch: int, timeout: float = 10.0) -> p.Frame:
        deadline = time.monotonic() + timeout
        while not self.queues[ch]:
            if not self._pump(deadline - time.monotonic()) and time.monotonic() >= deadline:
                raise TimeoutError("no frame on channel %d within %.1f s" % (ch, timeout))
        return self.queues[ch].popleft()

    def quiet_for(self, ch: int, seconds: float) -> List[p.Frame]:
        """Everything that arrives on ``ch`` until it has been silent for ``seconds``."""
        got: List[p.Frame] = []
        while True:
            try:
                got.append(self.next(ch, timeout=seconds))
            except TimeoutError:
                return got

    def exec(self, ch: int, argv: List[str], **kw: Any) -> int:
        self.send_json(p.MsgType.EXEC, ch, p.exec_request(argv, **kw))
        f = self.next(ch)
        if f.type == p.MsgType.ERROR:
            raise ExecFailed(f.json())
        assert f.type == p.MsgType.STARTED, f
        return int(f.json()["pid"])

    def collect(self, ch: int, grant: bool = True, timeout: float = 15.0) -> Result:
        res = Result()
        consumed = 0
        deadline = time.monotonic() + timeout
        while True:
            f = self.next(ch, timeout=max(0.1, deadline - time.monotonic()))
            if f.type in (p.MsgType.STDOUT, p.MsgType.STDERR):
                (res.stdout if f.type == p.MsgType.STDOUT else res.stderr).extend(f.payload)
                consumed += len(f.payload)
                if grant and consumed >= p.INITIAL_WINDOW // 4:
                    self.sock.sendall(p.encode_window(ch, consumed))
                    consumed = 0
            elif f.type == p.MsgType.WINDOW:
                res.windows += p.decode_window(f.payload)
            elif f.type == p.MsgType.EXIT:
                res.exit = f.json()
                return res
            elif f.type == p.MsgType.ERROR:
                raise ExecFailed(f.json())
            else:
                raise AssertionError("unexpected %r" % f)

    def run(self, argv: List[str], ch: int = 1, **kw: Any) -> Result:
        self.exec(ch, argv, **kw)
        return self.collect(ch)


def spawn_agent(
    sock_path: str,
    log_path: str,
    extra_args: tuple = (),
    python: str = sys.executable,
    env: Optional[Dict[str, str]] = None,
    prelude: str = "",
) -> subprocess.Popen:
    """Start the agent dialing ``unix:sock_path``, its output going to ``log_path``."""
    full_env = dict(os.environ, PYTHONPATH=str(SRC), AGENT_TEST_SECRET="do-not-leak")
    full_env.update(env or {})
    with open(log_path, "wb") as logf:
        if prelude:  # run main() in-process after some setup (e.g. lowering a limit)
            code = "%s\nfrom arcbox_vm.agent.guest.main import main\nmain()\n" % prelude
            cmd = [python, "-c", code]
        else:
            cmd = [python, "-m", "arcbox_vm.agent.guest.main"]
        return subprocess.Popen(
            cmd + ["--connect", "unix:" + sock_path, *extra_args],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )


class AgentProcess:
    """The agent as a child process plus the Unix socket it dials."""

    def __init__(
        self, extra_args: tuple = (), python: str = sys.executable, env: Optional[Dict[str, str]] = None, prelude: str = ""
    ) -> None:
        self.dir = tempfile.mkdtemp(prefix="agt")  # short: Unix socket paths are limited to ~108 bytes
        self.path = os.path.join(self.dir, "a.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.log_path = os.path.join(self.dir, "agent.log")
        self.proc = spawn_agent(self.path, self.log_path, extra_args, python, env, prelude)
        self.conn: Optional[socket.socket] = None

    def accept(self, timeout: float = 15.0) -> socket.socket:
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        conn.settimeout(None)
        self.conn = conn
        return conn

    def connect(self, ack: bool = True) -> tuple:
        """Accept, read HELLO, optionally acknowledge it. Returns (client, hello body)."""
        client = Client(self.accept())
        hello = client.next(0)
        assert hello.type == p.MsgType.HELLO, hello
        if ack:
            client.send_json(p.MsgType.HELLO_ACK, 0, {"proto": p.PROTOCOL_VERSION})
        return client, hello.json()

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def procs_with(token: str) -> List[int]:
    """Pids whose command line contains ``token``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                if token.encode() in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def wait_gone(token: str, limit: float = 3.0) -> List[int]:
    deadline = time.monotonic() + limit
    while True:
        left = [pid for pid in procs_with(token) if alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] != b"Z"


def kill_token(token: str) -> None:
    for pid in procs_with(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def unique_sleep() -> str:
    """A sleep duration unique to this test run, to find its processes in /proc."""
    return "%d.%06d" % (random.randint(700, 999), random.randint(0, 999999))


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
