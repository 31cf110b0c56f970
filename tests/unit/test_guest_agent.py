"""The guest agent, run on the host as an ordinary process (not PID 1).

Each test starts ``python -m arcbox_vm.agent.guest.main --connect unix:PATH`` against a
Unix socket the test listens on, then drives it with protocol frames through a small
blocking client. PID-1 duties are not exercised here (they need a VM); their pure parts
(command line, ``ip=`` parsing) are unit-tested in-process at the end.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from agent_harness import (
    GUEST_DIR,
    IS_ROOT,
    SRC,
    AgentProcess,
    Client,
    ExecFailed,
    alive,
    kill_token,
    rss_kib,
    unique_sleep,
    wait_gone,
)

from arcbox_vm.agent import protocol as p

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guest agent is Linux-only")


@pytest.fixture
def agent():
    a = AgentProcess()
    yield a
    log = a.log()
    a.stop()
    sys.stderr.write("---- agent log ----\n%s\n" % log)  # pytest shows it only when the test failed


@pytest.fixture
def client(agent: AgentProcess) -> Client:
    c, _ = agent.connect()
    return c


# ---- handshake --------------------------------------------------------------------------------


def test_hello_carries_protocol_and_identity(agent: AgentProcess) -> None:
    client, hello = agent.connect()
    assert hello["proto"] == 1 == p.PROTOCOL_VERSION
    assert hello["pid"] == agent.proc.pid
    assert hello["kernel"] == os.uname().release
    assert hello["hostname"] == os.uname().nodename
    assert isinstance(hello["agent_version"], str) and hello["agent_version"]
    assert {"exec", "tty", "flow_control", "shutdown"} <= set(hello["features"])
    client.send(p.MsgType.PING, 0, b"tok")
    f = client.next(0)
    assert (f.type, f.payload) == (p.MsgType.PONG, b"tok")


# ---- exec basics -------------------------------------------------------------------------------


def test_echo_output_and_exit_zero(client: Client) -> None:
    pid = client.exec(1, ["echo", "hello", "world"])
    assert pid > 1
    res = client.collect(1)
    assert bytes(res.stdout) == b"hello world\n" and bytes(res.stderr) == b""
    assert res.exit == {"exit_code": 0, "signal": None, "timed_out": False}


def test_nonzero_exit_code(client: Client) -> None:
    res = client.run(["sh", "-c", "exit 7"])
    assert res.exit == {"exit_code": 7, "signal": None, "timed_out": False}


def test_stdout_and_stderr_are_separate(client: Client) -> None:
    res = client.run(["sh", "-c", "echo out; echo err >&2; echo out2"])
    assert bytes(res.stdout) == b"out\nout2\n"
    assert bytes(res.stderr) == b"err\n"


def test_killed_by_signal_reports_128_plus_signal(client: Client) -> None:
    res = client.run(["sh", "-c", "kill -TERM $$"])
    assert res.exit["exit_code"] == 128 + signal.SIGTERM and res.exit["signal"] == signal.SIGTERM


def test_env_and_cwd_are_applied(client: Client, tmp_path: Path) -> None:
    res = client.run(
        ["sh", "-c", 'echo "$FOO|$PATH|$HOME|${TERM:-none}|${AGENT_TEST_SECRET:-unset}"; pwd'],
        env={"FOO": "bar baz"},
        cwd=str(tmp_path),
    )
    line, cwd = bytes(res.stdout).decode().splitlines()
    foo, path, home, term, secret = line.split("|")
    assert foo == "bar baz"
    assert path == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert home  # the agent user's home
    assert term == "none"  # TERM only for ttys
    assert secret == "unset"  # the agent's own environment does not leak
    assert os.path.realpath(cwd) == os.path.realpath(tmp_path)


def test_request_env_overrides_defaults(client: Client) -> None:
    res = client.run(["sh", "-c", 'echo "$PATH"'], env={"PATH": "/bin:/usr/bin:/custom"})
    assert bytes(res.stdout) == b"/bin:/usr/bin:/custom\n"


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
def test_user_switching(client: Client) -> None:
    res = client.run(["sh", "-c", "id -u; id -g; echo $HOME $USER; pwd"], ch=1, user="nobody")
    uid, gid, env_line, cwd = bytes(res.stdout).decode().split("\n")[:4]
    assert uid == "65534"
    assert env_line.split()[1] == "nobody"
    assert cwd == ("/" if not os.path.isdir(env_line.split()[0]) else env_line.split()[0])

    res = client.run(["sh", "-c", "id -u; id -g"], ch=2, user="1000:1000")
    assert bytes(res.stdout).split() == [b"1000", b"1000"]

    res = client.run(["id", "-u"], ch=3, user="root")
    assert bytes(res.stdout) == b"0\n"

    res = client.run(["sh", "-c", "id -u; id -g; id -G"], ch=4, user="54321")  # no passwd entry
    assert bytes(res.stdout).split() == [b"54321", b"54321", b"54321"]


def test_unknown_user_is_an_error(client: Client) -> None:
    with pytest.raises(ExecFailed) as exc:
        client.exec(1, ["true"], user="no-such-user-xyz")
    assert exc.value.code == p.ErrorCode.NO_SUCH_USER and "no-such-user-xyz" in exc.value.message


# ---- spawn failures ---------------------------------------------------------------------------


def test_command_not_found_is_reported_quickly(client: Client) -> None:
    start = time.monotonic()
    with pytest.raises(ExecFailed) as exc:
        client.exec(1, ["definitely-not-a-command-xyz", "arg"])
    assert time.monotonic() - start < 2.0
    assert exc.value.code == p.ErrorCode.NOT_FOUND
    assert "definitely-not-a-command-xyz" in exc.value.message
    # the agent goes on
    assert bytes(client.run(["echo", "still here"], ch=2).stdout) == b"still here\n"


def test_absolute_path_not_found_and_not_executable(client: Client, tmp_path: Path) -> None:
    with pytest.raises(ExecFailed) as exc:
        client.exec(1, [str(tmp_path / "missing")])
    assert exc.value.code == p.ErrorCode.NOT_FOUND and "missing" in exc.value.message
    script = tmp_path / "noexec.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(ExecFailed) as exc:
        client.exec(2, [str(script)])
    assert exc.value.code == p.ErrorCode.PERMISSION and "noexec.sh" in exc.value.message


def test_bad_working_directory(client: Client) -> None:
    with pytest.raises(ExecFailed) as exc:
        client.exec(1, ["pwd"], cwd="/no/such/dir")
    assert exc.value.code == p.ErrorCode.NOT_FOUND
    assert "/no/such/dir" in exc.value.message and "pwd" in exc.value.message


def test_script_without_shebang_runs_with_sh(client: Client, tmp_path: Path) -> None:
    script = tmp_path / "plain"
    script.write_text("echo from-plain-script\n")
    script.chmod(0o755)
    assert bytes(client.run([str(script)]).stdout) == b"from-plain-script\n"


# ---- timeouts and signals ----------------------------------------------------------------------


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "tty"])
def test_timeout_kills_the_whole_process_group(client: Client, tty: bool) -> None:
    token = unique_sleep()
    try:
        start = time.monotonic()
        client.exec(1, ["sh", "-c", "sleep %s & sleep %s; echo never" % (token, token)], timeout=0.5, tty=tty)
        res = client.collect(1)
        assert 0.4 < time.monotonic() - start < 5.0
        assert res.exit == {"exit_code": 128 + 9, "signal": 9, "timed_out": True}
        assert b"never" not in res.stdout
        assert wait_gone(token) == []
    finally:
        kill_token(token)


@pytest.mark.parametrize("timeout", [1e12, 3e6, 1.7e308])
def test_an_enormous_timeout_does_not_stall_the_agent(agent: AgentProcess, client: Client, timeout: float) -> None:
    """A deadline further away than epoll can wait (2^31-1 ms, ~24.8 days) must not break
    the loop: the agent keeps answering PING and running other commands, and the long
    command still ends by signal as usual."""
    client.exec(1, ["sh", "-c", "echo ready; exec sleep 1000"], timeout=timeout)
    assert client.next(1).payload == b"ready\n"
    for i in range(3):
        token = f"still-there-{i}".encode()
        client.send(p.MsgType.PING, 0, token)
        f = client.next(0, timeout=5)
        assert (f.type, f.payload) == (p.MsgType.PONG, token)
        res = client.run(["echo", f"other-{i}"], ch=2 + i)
        assert (bytes(res.stdout), res.code) == (f"other-{i}\n".encode(), 0)
    client.send_json(p.MsgType.SIGNAL, 1, {"signal": int(signal.SIGTERM)})
    res = client.collect(1)
    assert res.exit == {"exit_code": 143, "signal": int(signal.SIGTERM), "timed_out": False}
    assert "unexpected error in the event loop" not in agent.log()


def test_signal_frame_reaches_the_process_group(client: Client) -> None:
    client.exec(1, ["sh", "-c", "echo ready; exec sleep 30"])
    assert client.next(1).payload == b"ready\n"
    client.send_json(p.MsgType.SIGNAL, 1, {"signal": int(signal.SIGTERM)})
    res = client.collect(1)
    assert res.exit["signal"] == signal.SIGTERM and res.exit["exit_code"] == 143 and not res.exit["timed_out"]


def test_exit_is_not_held_by_a_background_grandchild(client: Client) -> None:
    token = unique_sleep()
    try:
        start = time.monotonic()
        res = client.run(["sh", "-c", "sleep %s & echo done" % token])
        elapsed = time.monotonic() - start
        assert bytes(res.stdout) == b"done\n" and res.code == 0
        assert elapsed < 5.0  # ~1 s grace, not the sleep
    finally:
        kill_token(token)


# ---- bulk data and flow control ----------------------------------------------------------------

BULK = r"""
import hashlib, sys
data = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(N // 32))
sys.stdout.buffer.write(data)
sys.stdout.flush()
sys.stderr.write(hashlib.sha256(data).hexdigest())
"""


def test_large_output_is_byte_exact(client: Client) -> None:
    n = 3 * p.INITIAL_WINDOW  # needs credit from WINDOW frames to finish
    client.exec(1, [sys.executable, "-c", BULK.replace("N", str(n))])
    res = client.collect(1, grant=True)
    assert res.code == 0
    assert len(res.stdout) == n
    assert hashlib.sha256(res.stdout).hexdigest() == bytes(res.stderr).decode()




def test_output_stops_at_the_window_without_credit(agent: AgentProcess, client: Client) -> None:
    total = 6 * p.INITIAL_WINDOW
    writer = "import sys\nfor _ in range(%d): sys.stdout.buffer.write(bytes(65536))" % (total // 65536)
    pid = client.exec(1, [sys.executable, "-c", writer])
    rss_before = rss_kib(agent.proc.pid)
    frames = client.quiet_for(1, 0.7)
    got = sum(len(f.payload) for f in frames if f.type == p.MsgType.STDOUT)
    assert got == p.INITIAL_WINDOW  # exactly the initial credit, then silence
    assert all(f.type == p.MsgType.STDOUT for f in frames)  # no EXIT: the child is blocked
    assert os.path.exists("/proc/%d" % pid) and alive(pid)
    assert rss_kib(agent.proc.pid) - rss_before < 16 * 1024  # the agent did not buffer the rest

    client.send_raw(p.encode_window(1, 100_000))
    frames = client.quiet_for(1, 0.5)
    assert sum(len(f.payload) for f in frames) == 100_000  # exactly the credit granted

    client.send_raw(p.encode_window(1, total))
    res = client.collect(1, grant=False)
    assert got + 100_000 + len(res.stdout) == total and res.code == 0


def test_two_sessions_run_interleaved(client: Client) -> None:
    client.exec(1, ["cat"], stdin=True)
    client.exec(2, ["cat"], stdin=True)
    for i in range(3):
        for ch in (1, 2):
            client.send(p.MsgType.STDIN, ch, b"ch%d-%d\n" % (ch, i))
            out = client.next(ch)
            while out.type == p.MsgType.WINDOW:
                out = client.next(ch)
            assert out.type == p.MsgType.STDOUT and out.payload == b"ch%d-%d\n" % (ch, i)
    client.send(p.MsgType.STDIN_EOF, 2)
    assert client.collect(2).code == 0
    client.send(p.MsgType.STDIN, 1, b"last\n")
    client.send(p.MsgType.STDIN_EOF, 1)
    res = client.collect(1)
    assert res.code == 0 and res.stdout.endswith(b"last\n")


def test_many_concurrent_sessions(client: Client) -> None:
    chans = list(range(1, 21))
    for ch in chans:
        client.exec(ch, ["sh", "-c", "sleep 0.2; echo $0", "s%d" % ch])
    for ch in chans:
        res = client.collect(ch)
        assert bytes(res.stdout) == b"s%d\n" % ch and res.code == 0


def test_session_limit_gives_too_many() -> None:
    a = AgentProcess(prelude="import arcbox_vm.agent.guest.execs as execs_mod\nexecs_mod.MAX_SESSIONS = 3")
    token = unique_sleep()
    try:
        client, _ = a.connect()
        for ch in (1, 2, 3):
            client.exec(ch, ["sleep", token])
        with pytest.raises(ExecFailed) as exc:
            client.exec(4, ["true"])
        assert exc.value.code == p.ErrorCode.TOO_MANY
        client.send_json(p.MsgType.SIGNAL, 1, {"signal": 9})
        assert client.collect(1).exit["signal"] == 9
        assert client.run(["echo", "room again"], ch=5).code == 0  # a slot freed up
    finally:
        a.stop()
        kill_token(token)


# ---- stdin --------------------------------------------------------------------------------------


def test_stdin_round_trip_through_cat(client: Client) -> None:
    payload = random.Random(7).randbytes(300_000)
    client.exec(1, ["cat"], stdin=True)
    for off in range(0, len(payload), p.DATA_CHUNK):  # 300 KB < INITIAL_WINDOW: no need to wait for credit
        client.send(p.MsgType.STDIN, 1, payload[off : off + p.DATA_CHUNK])
    client.send(p.MsgType.STDIN_EOF, 1)
    res = client.collect(1)
    assert bytes(res.stdout) == payload and res.code == 0
    assert res.windows == len(payload)  # every byte written to the child is credited back


def test_stdin_more_than_the_window_with_credit(client: Client) -> None:
    """Send 3 windows' worth, waiting for the agent's WINDOW frames like a real host."""
    size = 3 * p.INITIAL_WINDOW
    data = hashlib.sha256(b"seed").digest() * (size // 32)
    client.exec(1, ["sha256sum"], stdin=True)
    credit, off, windows = p.INITIAL_WINDOW, 0, 0
    while off < size:
        while credit <= 0:
            f = client.next(1)
            assert f.type == p.MsgType.WINDOW, f
            credit += p.decode_window(f.payload)
            windows += p.decode_window(f.payload)
        n = min(p.DATA_CHUNK, credit, size - off)
        client.send(p.MsgType.STDIN, 1, data[off : off + n])
        off += n
        credit -= n
    client.send(p.MsgType.STDIN_EOF, 1)
    res = client.collect(1)
    assert bytes(res.stdout).split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert windows + res.windows == size


def test_stdin_beyond_the_granted_window_ends_the_session(client: Client) -> None:
    token = unique_sleep()
    try:
        client.exec(1, ["sleep", token], stdin=True)  # never reads its stdin
        chunk = bytes(p.DATA_CHUNK)
        for _ in range(p.INITIAL_WINDOW // p.DATA_CHUNK + 4):  # ignores the agent's credit
            client.send(p.MsgType.STDIN, 1, chunk)
        while True:
            f = client.next(1)
            if f.type != p.MsgType.WINDOW:
                break
        assert f.type == p.MsgType.ERROR and f.json()["code"] == p.ErrorCode.BAD_REQUEST
        assert wait_gone(token) == []
    finally:
        kill_token(token)


def test_stdin_false_means_dev_null(client: Client) -> None:
    res = client.run(["cat"], stdin=False)
    assert bytes(res.stdout) == b"" and res.code == 0


# ---- tty ----------------------------------------------------------------------------------------


def test_tty_mode(client: Client) -> None:
    res = client.run(["sh", "-c", "tty; echo $TERM; echo to-stderr >&2"], tty=True)
    lines = bytes(res.stdout).replace(b"\r", b"").split(b"\n")
    assert lines[0].startswith(b"/dev/pts/")
    assert lines[1] == b"xterm-256color"
    assert b"to-stderr" in res.stdout and bytes(res.stderr) == b""  # merged on the terminal
    assert res.code == 0


def test_tty_size_and_resize(client: Client) -> None:
    client.exec(1, ["sh", "-c", "stty size; read line; stty size"], tty=True, rows=30, cols=100, stdin=True)
    buf = bytearray()
    while b"30 100" not in buf:
        f = client.next(1)
        assert f.type == p.MsgType.STDOUT, f
        buf += f.payload
    client.send_json(p.MsgType.RESIZE, 1, {"rows": 40, "cols": 120})
    client.send(p.MsgType.STDIN, 1, b"go\n")
    res = client.collect(1)
    assert b"40 120" in res.stdout and res.code == 0


# ---- bad input ------------------------------------------------------------------------------------


def _error(client: Client, ch: int) -> Dict[str, Any]:
    f = client.next(ch)
    assert f.type == p.MsgType.ERROR, f
    return f.json()


def test_bad_input_gets_errors_and_the_agent_keeps_serving(client: Client) -> None:
    client.send_raw(b"this is not a frame")
    assert _error(client, 0)["code"] == p.ErrorCode.BAD_FRAME

    big = p.DEFAULT_MAX_PAYLOAD + 1
    client.send_raw(p.HEADER.pack(p.MAGIC, p.MsgType.STDIN, 0, 9, big) + bytes(big))
    assert _error(client, 9)["code"] == p.ErrorCode.OVERSIZED

    client.send(0x7F, 3, b"?")
    assert _error(client, 3)["code"] == p.ErrorCode.UNKNOWN_TYPE

    client.send(p.MsgType.EXEC, 4, b"{not json")
    assert _error(client, 4)["code"] == p.ErrorCode.BAD_REQUEST

    client.send_json(p.MsgType.EXEC, 5, {"argv": []})
    assert _error(client, 5)["code"] == p.ErrorCode.BAD_REQUEST

    client.send(p.MsgType.WINDOW, 77, p.WINDOW_STRUCT.pack(5))
    assert _error(client, 77)["code"] == p.ErrorCode.NO_SUCH_CHANNEL

    client.send(p.MsgType.STDOUT, 0, b"x")  # a guest->host type sent by the host
    assert _error(client, 0)["code"] == p.ErrorCode.BAD_REQUEST

    client.send_json(p.MsgType.SHUTDOWN, 0, {"action": "explode"})
    assert _error(client, 0)["code"] == p.ErrorCode.BAD_REQUEST

    for ch in (0, 6):
        client.send(p.MsgType.PING, ch, b"alive?")
        f = client.next(ch)
        assert (f.type, f.channel, f.payload) == (p.MsgType.PONG, ch, b"alive?")
    assert bytes(client.run(["echo", "ok"], ch=8).stdout) == b"ok\n"


def test_bad_frame_on_a_live_session_ends_it(client: Client) -> None:
    token = unique_sleep()
    try:
        client.exec(1, ["sleep", token])
        client.send(p.MsgType.RESIZE, 1, b"[]")  # not an object
        assert _error(client, 1)["code"] == p.ErrorCode.BAD_REQUEST
        assert wait_gone(token) == []
        client.send(p.MsgType.WINDOW, 1, p.WINDOW_STRUCT.pack(1))  # late frame for an ended channel: ignored
        client.send(p.MsgType.PING, 1, b"p")
        assert client.next(1).type == p.MsgType.PONG
    finally:
        kill_token(token)


def test_duplicate_channel_is_refused_without_killing_the_session(client: Client) -> None:
    client.exec(1, ["cat"], stdin=True)
    client.send_json(p.MsgType.EXEC, 1, p.exec_request(["true"]))
    assert _error(client, 1)["code"] == p.ErrorCode.CHANNEL_IN_USE
    client.send(p.MsgType.STDIN, 1, b"x")
    client.send(p.MsgType.STDIN_EOF, 1)
    assert bytes(client.collect(1).stdout) == b"x"


# ---- connection lifecycle -------------------------------------------------------------------------


def test_reconnect_after_the_host_side_closes(agent: AgentProcess) -> None:
    client, _ = agent.connect()
    token = unique_sleep()
    try:
        pid = client.exec(1, ["sleep", token])
        assert agent.conn is not None
        agent.conn.close()
        client2, hello = agent.connect()
        assert hello["proto"] == 1 and hello["pid"] == agent.proc.pid
        assert hello.get("sessions") == 1  # the detached session survived
        assert [d["channel"] for d in hello["detached"]] == [1]
        assert hello["detached"][0]["pid"] == pid and not hello["detached"][0]["exited"]
        assert alive(pid)
        with pytest.raises(ExecFailed) as err:  # a detached session's channel is not reused
            client2.exec(1, ["echo", "again"])
        assert err.value.code == p.ErrorCode.CHANNEL_IN_USE
        assert bytes(client2.run(["echo", "again"], ch=2).stdout) == b"again\n"
        assert alive(pid)
    finally:
        kill_token(token)


# ---- detach and re-attach ------------------------------------------------------------------------


def _attach(client: Client, ch: int) -> Dict[str, Any]:
    client.send(p.MsgType.ATTACH, ch)
    f = client.next(ch)
    if f.type == p.MsgType.ERROR:
        raise ExecFailed(f.json())
    assert f.type == p.MsgType.STARTED, f
    body = f.json()
    assert body["attached"] is True
    return body


def test_attach_after_reconnect_delivers_spooled_and_later_output(agent: AgentProcess, tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = ("echo before; while [ ! -e %s ]; do sleep 0.05; done; echo during >&2; "
              "while [ ! -e %s.2 ]; do sleep 0.05; done; echo after; exit 3") % (go, go)
    client, _ = agent.connect()
    pid = client.exec(1, ["sh", "-c", script])
    assert client.next(1).payload == b"before\n"
    assert agent.conn is not None
    agent.conn.close()  # the host "dies"
    go.touch()  # output while nobody is connected: spooled by the agent
    time.sleep(0.5)
    client2, hello = agent.connect()
    assert [(d["channel"], d["pid"], d["argv0"]) for d in hello["detached"]] == [(1, pid, "sh")]
    body = _attach(client2, 1)
    assert body["pid"] == pid and body["stdin_window"] == p.INITIAL_WINDOW and body["stdin_open"] is False
    f = client2.next(1)
    assert (f.type, f.payload) == (p.MsgType.STDERR, b"during\n")
    Path(str(go) + ".2").touch()
    res = client2.collect(1)
    assert bytes(res.stdout) == b"after\n" and res.code == 3
    agent.conn.close()
    _, hello3 = agent.connect()  # once re-attached and finished it is no longer listed
    assert hello3["detached"] == []


def test_attach_to_a_command_that_finished_while_detached(agent: AgentProcess, tmp_path: Path) -> None:
    go = tmp_path / "go"
    client, _ = agent.connect()
    client.exec(7, ["sh", "-c", "while [ ! -e %s ]; do sleep 0.05; done; echo done-detached; exit 5" % go])
    agent.conn.close()
    go.touch()
    time.sleep(0.8)
    client2, hello = agent.connect()
    assert hello["detached"][0]["channel"] == 7 and hello["detached"][0]["exited"] is True
    _attach(client2, 7)
    res = client2.collect(7)
    assert bytes(res.stdout) == b"done-detached\n" and res.code == 5
    with pytest.raises(ExecFailed) as err:  # attached once: gone
        _attach(client2, 7)
    assert err.value.code == p.ErrorCode.NO_SUCH_CHANNEL


def test_attach_errors(agent: AgentProcess) -> None:
    client, _ = agent.connect()
    with pytest.raises(ExecFailed) as err:
        _attach(client, 42)
    assert err.value.code == p.ErrorCode.NO_SUCH_CHANNEL
    token = unique_sleep()
    try:
        client.exec(3, ["sleep", token])
        with pytest.raises(ExecFailed) as err:
            _attach(client, 3)
        assert err.value.code == p.ErrorCode.CHANNEL_IN_USE
    finally:
        kill_token(token)
    assert bytes(client.run(["echo", "ok"], ch=4).stdout) == b"ok\n"  # the agent keeps serving


def test_detached_output_is_bounded_then_lossless_on_attach(agent: AgentProcess) -> None:
    total = 4 * p.INITIAL_WINDOW
    writer = ("import hashlib,sys\nh=hashlib.sha256()\nfor i in range(%d):\n b=bytes([i%%251])*65536\n"
              " h.update(b); sys.stdout.buffer.write(b)\nsys.stdout.flush()\nsys.stderr.write(h.hexdigest())"
              % (total // 65536))
    client, _ = agent.connect()
    client.send_json(p.MsgType.EXEC, 1, p.exec_request([sys.executable, "-c", writer]))
    assert client.next(1).type == p.MsgType.STARTED
    first = client.quiet_for(1, 0.7)  # the initial window, then silence (no grants)
    got = bytearray(b"".join(f.payload for f in first if f.type == p.MsgType.STDOUT))
    assert len(got) == p.INITIAL_WINDOW
    rss_before = rss_kib(agent.proc.pid)
    agent.conn.close()
    time.sleep(1.0)  # detached: the agent spools one window's worth, then stops reading
    assert rss_kib(agent.proc.pid) - rss_before < 8 * 1024
    client2, hello = agent.connect()
    pid = hello["detached"][0]["pid"]
    assert alive(pid) and not hello["detached"][0]["exited"]  # blocked in write(2), not dropped
    _attach(client2, 1)
    res = client2.collect(1)
    got += res.stdout
    # nothing was in flight when the first connection closed (its window was used up and read),
    # so not one byte is lost: one window before, one spooled, the rest after ATTACH
    assert res.code == 0 and len(got) == total
    assert hashlib.sha256(bytes(got)).hexdigest() == bytes(res.stderr).decode()


def test_stdin_works_after_attach(agent: AgentProcess) -> None:
    client, _ = agent.connect()
    client.exec(2, ["cat"], stdin=True)
    client.send(p.MsgType.STDIN, 2, b"one ")
    f = client.next(2)
    while f.type == p.MsgType.WINDOW:
        f = client.next(2)
    assert (f.type, f.payload) == (p.MsgType.STDOUT, b"one ")
    agent.conn.close()
    client2, _ = agent.connect()
    body = _attach(client2, 2)
    assert body["stdin_open"] is True and body["stdin_window"] == p.INITIAL_WINDOW
    client2.send(p.MsgType.STDIN, 2, b"two")
    client2.send(p.MsgType.STDIN_EOF, 2)
    res = client2.collect(2)
    assert bytes(res.stdout) == b"two" and res.code == 0


def test_version_error_makes_the_agent_retry_later(agent: AgentProcess) -> None:
    client, _ = agent.connect(ack=False)
    client.send_json(p.MsgType.ERROR, 0, {"code": p.ErrorCode.VERSION, "message": "no"})
    with pytest.raises(EOFError):
        client.next(0, timeout=5)
    assert agent.proc.poll() is None  # it logs and waits; it does not die


def test_shutdown_frame_acks_kills_sessions_and_exits(agent: AgentProcess) -> None:
    client, _ = agent.connect()
    token = unique_sleep()
    try:
        client.exec(1, ["sleep", token])
        client.send_json(p.MsgType.SHUTDOWN, 0, {"action": "poweroff"})
        assert client.next(0).type == p.MsgType.SHUTDOWN_ACK
        assert agent.proc.wait(10) == 0  # not PID 1: it only ends its own sessions and exits
        assert wait_gone(token) == []
    finally:
        kill_token(token)


def test_sigterm_ends_sessions_when_not_pid1(agent: AgentProcess) -> None:
    client, _ = agent.connect()
    token = unique_sleep()
    try:
        client.exec(1, ["sleep", token])
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(10) == 0
        assert wait_gone(token) == []
    finally:
        kill_token(token)


def test_orphans_are_reaped() -> None:
    """As PID 1 the agent reaps re-parented orphans; a child subreaper gets the same orphans."""
    prelude = "import ctypes\nassert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER"
    a = AgentProcess(prelude=prelude)
    try:
        client, _ = a.connect()
        res = client.run(["sh", "-c", "sleep 0.3 & echo $!"])
        orphan = int(bytes(res.stdout))
        deadline = time.monotonic() + 5
        while os.path.exists("/proc/%d" % orphan) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists("/proc/%d" % orphan), "the orphan was left a zombie"
        assert a.proc.poll() is None
    finally:
        a.stop()


PIDNS_SCRIPT = """
import os, subprocess, sys, time
sys.path.insert(0, %r)
from arcbox_vm.agent.guest import libc, power
assert os.getpid() == 1
libc.mount = lambda *a, **k: None  # the root remount must never reach the host's filesystem
subprocess.Popen(["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"])  # ignores SIGTERM
subprocess.Popen(["sleep", "100"])
time.sleep(0.2)
power.TERM_GRACE = 0.5
power.shutdown(sys.argv[1])
"""


@pytest.mark.skipif(not (IS_ROOT and shutil.which("unshare")), reason="needs root and unshare")
@pytest.mark.parametrize("action, sig", [("poweroff", signal.SIGINT), ("reboot", signal.SIGHUP)])
def test_pid1_shutdown_sequence_in_a_pid_namespace(action: str, sig: int) -> None:
    """TERM everyone, KILL the stubborn, reboot(2): in a child PID namespace reboot(2) kills
    the namespace's init with SIGINT (power off) or SIGHUP (restart), which we observe."""
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", PIDNS_SCRIPT % str(SRC), action],
        capture_output=True, text=True, timeout=30,
    )
    if "Operation not permitted" in proc.stderr and "unshare" in proc.stderr:
        pytest.skip("cannot create a PID namespace here")
    assert proc.returncode == -sig, proc.stderr
    assert "sending SIGKILL" in proc.stderr


def test_rawbench_mode() -> None:
    a = AgentProcess(extra_args=("--rawbench",))
    try:
        conn = a.accept()
        conn.settimeout(10)
        assert conn.recv(1) == b"R"
        conn.sendall(b"E5\nhello")
        got = b""
        while len(got) < 5:
            got += conn.recv(5 - len(got))
        assert got == b"hello"
        n = 300_000
        conn.sendall(b"S%d\n" % n)
        got = b""
        while len(got) < n:
            chunk = conn.recv(1 << 20)
            assert chunk
            got += chunk
        assert got == bytes(n)
    finally:
        a.stop()
    assert a.proc.returncode == 0


def _recv_exact(conn: Any, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = conn.recv(min(n - len(got), 1 << 20))
        assert chunk, "the agent closed the connection after %d of %d bytes" % (len(got), n)
        got += chunk
    return bytes(got)


def test_rawbench_native_relays_and_upload(tmp_path: Path) -> None:
    """C (head | dd), P (head, spliced) and W (dd into a file) with a socket as the channel."""
    if not (shutil.which("head") and shutil.which("dd")):
        pytest.skip("needs head and dd")
    up = tmp_path / "up.bin"
    a = AgentProcess(extra_args=("--rawbench",),
                     prelude="from arcbox_vm.agent.guest import rawbench\nrawbench.UPLOAD_PATH = %r" % str(up))
    try:
        conn = a.accept()
        conn.settimeout(20)
        assert conn.recv(1) == b"R"
        n = 3 * (1 << 20) + 12345  # not a multiple of dd's block or the splice size
        for kind in (b"C", b"P", b"C", b"P"):
            conn.sendall(b"%s%d\n" % (kind, n))
            assert _recv_exact(conn, n) == bytes(n), kind
        conn.sendall(b"P0\nE2\nok")  # nothing to move, then the agent is still in step
        assert _recv_exact(conn, 2) == b"ok"
        n = 3 << 20
        conn.sendall(b"W%d\n" % n)
        assert conn.recv(1) == b"G"
        conn.sendall(os.urandom(n))
        assert conn.recv(1) == b"K"
        assert not up.exists()
        conn.sendall(b"W1000\nE2\nok")  # not whole MiB: ignored, no G
        assert _recv_exact(conn, 2) == b"ok"
        assert "rawbench: W1000 is not a multiple of 1 MiB" in a.log()
        assert _children(a.proc.pid) == []  # head and dd reaped
    finally:
        a.stop()
    assert a.proc.returncode == 0


def test_rawbench_relay_host_gone_midway() -> None:
    """The host hanging up in the middle of C or P leaves no head/dd behind; the agent reconnects."""
    if not (shutil.which("head") and shutil.which("dd")):
        pytest.skip("needs head and dd")
    a = AgentProcess(extra_args=("--rawbench",))
    try:
        for kind in (b"P", b"C"):
            conn = a.accept()
            conn.settimeout(20)
            assert conn.recv(1) == b"R"
            conn.sendall(b"%s%d\n" % (kind, 1 << 30))
            _recv_exact(conn, 1 << 20)
            conn.close()
        conn = a.accept()
        conn.settimeout(20)
        assert conn.recv(1) == b"R"
        assert _children(a.proc.pid) == []
        assert "relay of 1073741824 bytes failed" in a.log()  # P: the splice's EPIPE
    finally:
        a.stop()
    assert a.proc.returncode == 0


def _children(pid: int) -> List[int]:
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _other_pythons() -> List[str]:
    """python3.8/3.9 on PATH, plus any listed in $AGENT_TEST_PYTHONS (os.pathsep-separated)."""
    candidates = [shutil.which(n) for n in ("python3.8", "python3.9")]
    candidates += [c for c in os.environ.get("AGENT_TEST_PYTHONS", "").split(os.pathsep) if c]
    found = []
    for exe in candidates:
        if exe and exe not in found and subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            found.append(exe)
    return found


# Defined only where an older interpreter exists (a developer's machine or AGENT_TEST_PYTHONS);
# everywhere, test_guest_sources_parse_as_python38 below checks the syntax statically.
_OLDER_PYTHONS = _other_pythons()
if _OLDER_PYTHONS:
    @pytest.mark.parametrize("python", _OLDER_PYTHONS)
    def test_agent_runs_on_older_pythons(python: str) -> None:
        a = AgentProcess(python=python)
        try:
            client, hello = a.connect()
            assert hello["proto"] == 1
            res = client.run(["sh", "-c", "echo old; exit 3"], tty=False)
            assert bytes(res.stdout) == b"old\n" and res.code == 3
            assert b"/dev/pts/" in client.run(["tty"], ch=2, tty=True).stdout
        finally:
            a.stop()


# ---- static checks on the guest sources ----------------------------------------------------------


GUEST_SOURCES = sorted(GUEST_DIR.glob("*.py")) + [SRC / "arcbox_vm" / "agent" / "protocol.py"]


@pytest.mark.parametrize("path", GUEST_SOURCES, ids=lambda p: p.name)
def test_guest_sources_parse_as_python38(path: Path) -> None:
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))


@pytest.mark.parametrize("path", GUEST_SOURCES, ids=lambda p: p.name)
def test_guest_sources_import_only_the_stdlib(path: Path) -> None:
    stdlib = set(sys.stdlib_module_names)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top in stdlib or name.startswith("arcbox_vm.agent.protocol") or name == "arcbox_vm.agent", (
                "%s imports %s, which is not in the guest" % (path.name, name)
            )
            assert top != "asyncio" and top != "subprocess", "%s: keep the guest light (%s)" % (path.name, name)


def test_bundle_ships_every_guest_module() -> None:
    from arcbox_vm.agent import bundle

    files = bundle.agent_files()
    for src in GUEST_DIR.glob("*.py"):
        assert "%s/arcbox_vm/agent/guest/%s" % (bundle.GUEST_LIB_DIR, src.name) in files


# ---- in-process unit tests of the pure parts --------------------------------------------------


def test_cmdline_parsing() -> None:
    from arcbox_vm.agent.guest import cmdline

    text = (
        'console=ttyS0 rw quiet arcbox.channel=serial:arcbox.agent.0 arcbox.hostname=box1 foo="a b" '
        "ip=1.2.3.4::1.2.3.1:255.255.255.0::eth0:off\n"
    )
    args = cmdline.parse_cmdline(text)
    assert args["arcbox.channel"] == "serial:arcbox.agent.0"
    assert args["arcbox.hostname"] == "box1"
    assert args["foo"] == "a b"
    assert args["rw"] == "" and "quiet" in args
    assert args["ip"].startswith("1.2.3.4:")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("serial:arcbox.agent.0", ("serial", "arcbox.agent.0")),
        ("vsock:52", ("vsock", "2:52")),
        ("vsock:3:1024", ("vsock", "3:1024")),
        ("unix:/tmp/a.sock", ("unix", "/tmp/a.sock")),
        ("", ("auto", "")),
        ("auto", ("auto", "")),
    ],
)
def test_channel_spec_parsing(spec: str, expected: tuple) -> None:
    from arcbox_vm.agent.guest import cmdline

    assert cmdline.parse_channel(spec) == expected


@pytest.mark.parametrize("spec", ["serial:", "vsock:x", "vsock:0", "tcp:1.2.3.4:5", "vsock:1:2:3", "nonsense"])
def test_bad_channel_specs(spec: str) -> None:
    from arcbox_vm.agent.guest import cmdline

    with pytest.raises(ValueError):
        cmdline.parse_channel(spec)


def test_ip_param_parsing() -> None:
    from arcbox_vm.agent.guest.netcfg import IpConfig, parse_ip_param

    assert parse_ip_param("172.20.3.17::172.20.0.1:255.255.0.0::eth0:off") == IpConfig(
        address="172.20.3.17", gateway="172.20.0.1", netmask="255.255.0.0", device="eth0", autoconf="off"
    )
    cfg = parse_ip_param("10.0.0.5:10.0.0.9:10.0.0.1:24:guest1:ens3:none:1.1.1.1:8.8.4.4")
    assert (cfg.address, cfg.gateway, cfg.netmask) == ("10.0.0.5", "10.0.0.1", "255.255.255.0")
    assert (cfg.hostname, cfg.device) == ("guest1", "ens3")
    assert cfg.dns == ["1.1.1.1", "8.8.4.4"] and cfg.is_static
    assert parse_ip_param("192.168.1.9") == IpConfig(address="192.168.1.9", netmask="255.255.255.0")
    assert parse_ip_param("10.1.2.3:::::") .netmask == "255.0.0.0"
    assert parse_ip_param("10.1.2.3::::::") .device == "eth0"
    assert parse_ip_param("off") is None and parse_ip_param("none") is None and parse_ip_param("") is None
    assert not parse_ip_param("dhcp").is_static
    assert not parse_ip_param(":::::eth0:dhcp").is_static


@pytest.mark.parametrize(
    "value",
    [
        "1.2.3",
        "256.1.1.1",
        "1.2.3.4::1.2.3:255.0.0.0",
        "1.2.3.4:::255.0.255.0",
        "1.2.3.4:::33",
        "::::::off",
        "1.2.3.4::::::weird",
        "a.b.c.d",
    ],
)
def test_bad_ip_params(value: str) -> None:
    from arcbox_vm.agent.guest.netcfg import parse_ip_param

    with pytest.raises(ValueError):
        parse_ip_param(value)


def test_netmask_forms() -> None:
    from arcbox_vm.agent.guest.netcfg import parse_netmask

    assert parse_netmask("16") == parse_netmask("/16") == parse_netmask("255.255.0.0") == "255.255.0.0"
    assert parse_netmask("0") == "0.0.0.0" and parse_netmask("32") == "255.255.255.255"


def test_rtentry_layout_matches_the_kernel_struct() -> None:
    import struct

    from arcbox_vm.agent.guest import netcfg

    if struct.calcsize("P") == 8:
        assert netcfg._RTENTRY.size == 120  # sizeof(struct rtentry) on LP64
    assert netcfg._IFREQ_ADDR.size == netcfg._IFREQ_FLAGS.size == 40


@pytest.mark.skipif(not (IS_ROOT and shutil.which("unshare") and shutil.which("ip")), reason="needs root, unshare and ip")
def test_netcfg_configures_an_interface_in_a_private_netns() -> None:
    """Apply an ip= config with the real ioctls inside a throwaway network namespace."""
    script = (
        "import sys, subprocess\n"
        "sys.path.insert(0, %r)\n"
        "mk = [['ip', 'link', 'add', 'eth0', 'type', 'dummy'],\n"
        "      ['ip', 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', 'eth1'],\n"
        "      ['ip', 'tuntap', 'add', 'dev', 'eth0', 'mode', 'tap']]\n"
        "if not any(subprocess.run(c, capture_output=True).returncode == 0 for c in mk):\n"
        "    sys.exit(77)\n"
        "from arcbox_vm.agent.guest import netcfg\n"
        "netcfg.loopback_up()\n"
        "netcfg.configure(netcfg.parse_ip_param('172.31.5.7::172.31.0.1:255.255.0.0::eth0:off'))\n"
        "print(subprocess.run(['ip', '-4', '-o', 'addr'], capture_output=True, text=True).stdout)\n"
        "print(subprocess.run(['ip', '-4', 'route'], capture_output=True, text=True).stdout)\n"
        "netcfg.configure(netcfg.parse_ip_param('10.9.9.9::10.200.0.1:255.255.255.0::eth0:off'))\n"  # off-link gw
        "print(subprocess.run(['ip', '-4', 'route'], capture_output=True, text=True).stdout)\n"
    ) % str(SRC)
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 and "unshare" in proc.stderr and "Operation not permitted" in proc.stderr:
        pytest.skip("cannot create a network namespace here")
    if proc.returncode == 77:
        pytest.skip("no dummy, veth or tap interfaces in this kernel")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "lo    inet 127.0.0.1/8" in out or "127.0.0.1/8" in out
    assert "eth0    inet 172.31.5.7/16" in out or "172.31.5.7/16" in out
    assert "default via 172.31.0.1 dev eth0" in out
    assert "default via 10.200.0.1 dev eth0" in out  # needed the host route first


def test_resolv_conf_is_validated(tmp_path: Path) -> None:
    from arcbox_vm.agent.guest import sysinit

    target = tmp_path / "resolv.conf"
    sysinit.write_resolv_conf(["10.0.0.1", "fd00::1"], str(target))
    assert target.read_text().splitlines()[1:] == ["nameserver 10.0.0.1", "nameserver fd00::1"]
    with pytest.raises((OSError, ValueError)):
        sysinit.resolv_conf_text(["10.0.0.1\nsearch evil"])
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "missing-dir" / "resolv.conf")
    sysinit.write_resolv_conf(["10.0.0.2"], str(link))  # replaced by a regular file
    assert not link.is_symlink() and "10.0.0.2" in link.read_text()


def test_user_resolution() -> None:
    from arcbox_vm.agent.guest import spawn

    root = spawn.resolve_user("root")
    assert (root.uid, root.gid, root.switch) == (0, 0, True)
    me = spawn.resolve_user("")
    assert me.uid == os.getuid() and not me.switch
    anon = spawn.resolve_user("4242:4343")
    assert (anon.uid, anon.gid, anon.groups, anon.home) == (4242, 4343, [4343], "/")
    for bad in ("no-such-user-xyz", "root:no-such-group-xyz", ":5", "5:", "99999999999"):
        with pytest.raises(spawn.SpawnError) as exc:
            spawn.resolve_user(bad)
        assert exc.value.code == p.ErrorCode.NO_SUCH_USER


def test_user_lookups_are_cached_until_the_account_files_change(monkeypatch: pytest.MonkeyPatch) -> None:
    from arcbox_vm.agent.guest import spawn

    calls = []
    real = spawn._resolve_user
    monkeypatch.setattr(spawn, "_resolve_user", lambda spec: calls.append(spec) or real(spec))
    spawn._users_key = None
    assert spawn.resolve_user("root").uid == 0
    assert spawn.resolve_user("root").uid == 0
    assert calls == ["root"]
    monkeypatch.setattr(spawn, "_ACCOUNT_FILES", ("/etc/passwd", "/nonexistent-group-file"))
    spawn.resolve_user("root")  # another key: looked up again
    assert calls == ["root", "root"]


def _wait_child(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_pipe_sessions_start_with_posix_spawn_and_fall_back_to_fork(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """posix_spawn (a vfork) for pipes as the agent's own user; when it refuses (here: a
    script without #!, ENOEXEC) nothing ran, and the fork path runs it as execvp would."""
    from arcbox_vm.agent.guest import spawn

    used = []
    real = spawn._posix_spawn
    monkeypatch.setattr(spawn, "_posix_spawn", lambda *a: used.append(real(*a)) or used[-1])
    me = spawn.resolve_user("")
    env = spawn.build_env(me, {}, False)
    child = spawn.spawn(["sh", "-c", "pwd; exit 3"], env, str(tmp_path), me, False, 24, 80, False)
    assert used[-1] == child.pid > 0
    assert _wait_child(child.pid) == 3
    assert os.read(child.stdout, 4096).decode().strip() == str(tmp_path)
    assert os.getcwd() != str(tmp_path)  # the agent's own directory is back
    script = tmp_path / "noshebang"
    script.write_text("exit 5\n")
    script.chmod(0o755)
    child2 = spawn.spawn([str(script)], env, "/", me, False, 24, 80, False)
    assert used[-1] == 0  # refused: the fork path started it
    assert _wait_child(child2.pid) == 5
    for c in (child, child2):
        for fd in (c.stdout, c.stderr):
            os.close(fd)


def test_wait_status_decoding() -> None:
    from arcbox_vm.agent.guest.procs import decode_status

    assert decode_status(3 << 8) == (3, None)
    assert decode_status(9) == (137, 9)
    assert decode_status(0) == (0, None)
