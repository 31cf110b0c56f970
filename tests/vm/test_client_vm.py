"""The Python client (sync and asyncio) against the real daemon booting real VMs.

One daemon for the module; most tests share one sandbox, a few make their own to check
creation, the context managers and boot failures.
"""

from __future__ import annotations

import hashlib
import io
import os
import time

import pytest

from arcbox_vm.client import AsyncClient, AsyncSandbox, Client, Sandbox
from arcbox_vm.errors import (
    BootFailed,
    ExecError,
    GuestFileNotFound,
    InvalidArgument,
    InvalidState,
    SandboxAlreadyExists,
    SandboxNotFound,
)

from .daemon_helpers import module_daemon

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, guest_image):
    with module_daemon(tmp_path_factory.mktemp("client-daemon"), guest_image, "10.243.0.0/24") as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    with Client(socket=daemon.socket) as c:
        yield c


@pytest.fixture(scope="module")
def sb(daemon):
    with Sandbox.create(socket=daemon.socket, labels={"suite": "client"}, env={"GREETING": "hello"}) as s:
        yield s


def test_create_context_manager_runs_and_removes(daemon, client):
    with Sandbox.create(socket=daemon.socket, memory_mib=256, labels={"job": "x"}, network="none") as box:
        info = box.info()
        assert (str(info.state), info.labels, info.memory_mib, info.network) == ("ready", {"job": "x"}, 256, None)
        r = box.run(["python3", "-c", "print(1)"], timeout=30)
        assert (r.stdout, r.stderr, r.exit_code, r.timed_out, r.ok) == (b"1\n", b"", 0, False, True)
        assert [s.id for s in client.list(labels={"job": "x"})] == [box.id]
        sandbox_id = box.id
    assert all(s.id != sandbox_id for s in client.list())
    with pytest.raises(SandboxNotFound):
        client.inspect(sandbox_id)


def test_run_results_streams_and_errors(sb):
    r = sb.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.stdout, r.stderr, r.exit_code, r.ok) == (b"out\n", b"err\n", 7, False)
    assert sb.run('echo "$GREETING from $(pwd)"', working_dir="/tmp").stdout == b"hello from /tmp\n"
    assert sb.run(["sh", "-c", "echo $GREETING"], env={"GREETING": "bye"}).stdout == b"bye\n"
    assert sb.run(["id", "-un"], user="sandbox").stdout == b"sandbox\n"
    r = sb.run(["sleep", "100"], timeout=1)
    assert r.timed_out and not r.ok
    with pytest.raises(ExecError) as info:
        sb.run(["no-such-command-xyz"])
    assert info.value.code == "not_found" and "no-such-command-xyz" in str(info.value)
    with pytest.raises(InvalidArgument):
        sb.run([])


def test_streaming_callbacks_get_output_as_it_comes(sb):
    seen: list[tuple[str, float, bytes]] = []
    t0 = time.monotonic()
    r = sb.run(["sh", "-c", "echo one; sleep 2; echo two >&2; echo three"],
               on_stdout=lambda b: seen.append(("out", time.monotonic() - t0, b)),
               on_stderr=lambda b: seen.append(("err", time.monotonic() - t0, b)))
    assert r.exit_code == 0 and r.stdout == b"one\nthree\n" and r.stderr == b"two\n"
    assert b"".join(d for s, _, d in seen if s == "out") == b"one\nthree\n"
    first_out = next(t for s, t, d in seen if d.startswith(b"one"))
    first_err = next(t for s, t, _ in seen if s == "err")
    assert first_err - first_out >= 1.0  # "one" came before the command slept, not at the end
    chunks = list(sb.run_stream(["sh", "-c", "echo a; exit 3"]))
    assert chunks[-1].stream == "exit" and chunks[-1].exit_code == 3 and chunks[-1].done


def test_files_write_read_stat_list(sb, tmp_path):
    assert sb.files.write("/tmp/a.txt", b"data", mode=0o600) == 4
    assert sb.files.read("/tmp/a.txt") == b"data"
    st = sb.files.stat("/tmp/a.txt")
    assert (st.type, st.size, st.mode, st.name) == ("file", 4, 0o600, "a.txt")
    sb.files.write("/tmp/deep/er/b.txt", io.BytesIO(b"from a file object"))
    sb.files.write("/tmp/deep/er/c.txt", (part for part in [b"from ", b"an ", b"iterator"]))
    names = sorted(e.name for e in sb.files.list("/tmp/deep/er"))
    assert names == ["b.txt", "c.txt"]
    assert sb.run(["cat", "/tmp/deep/er/b.txt", "/tmp/deep/er/c.txt"]).stdout == b"from a file objectfrom an iterator"
    assert sb.files.stat("/tmp/deep").type == "dir"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5 * (1 << 20) + 3))
    sb.files.write("/tmp/big.bin", big)
    digest = hashlib.sha256()
    sizes = []
    for chunk in sb.files.read_stream("/tmp/big.bin"):
        digest.update(chunk)
        sizes.append(len(chunk))
    assert digest.hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest() and max(sizes) <= 1 << 20
    assert sb.files.exists("/tmp/a.txt") and not sb.files.exists("/tmp/nope")
    with pytest.raises(GuestFileNotFound):
        sb.files.read("/tmp/nope")


def test_exec_with_stdin_and_a_terminal(sb):
    with sb.exec(["sh", "-c", "tr a-z A-Z; echo done >&2"]) as session:
        session.write(b"hello ")
        session.write("world\n")
        session.close_stdin()
        r = session.wait()
    assert (r.stdout, r.stderr, r.exit_code) == (b"HELLO WORLD\n", b"done\n", 0)
    session = sb.exec(["sh"], tty=True, tty_size=(100, 30))

    def read_until(marker: bytes) -> bytes:
        out = b""
        for chunk in session:
            out += chunk.data
            if marker in out:
                return out
        raise AssertionError(f"{marker!r} never came: {out!r}")

    read_until(b"# ")
    session.write(b"stty size; echo $((6*7))\n")
    assert b"30 100\r\n42" in read_until(b"42")
    session.resize(120, 40)
    session.write(b"stty size; exit 5\n")
    r = session.wait()
    assert r.exit_code == 5 and b"40 120" in r.stdout


def test_events_connect_and_state_errors(daemon, client, sb):
    again = Sandbox.connect(sb.id, socket=daemon.socket, remove_on_exit=False)
    with again:
        events = client.events(id=sb.id)  # subscribed from here on
        time.sleep(0.5)
        assert again.run("true").exit_code == 0
        assert [next(events).action, next(events).action] == ["running", "idle"]
        events.close()
    assert str(client.inspect(sb.id).state) == "ready"  # connect + leaving did not remove it
    history = client.events(id=sb.id, since=0)
    assert next(history).action == "created"
    history.close()
    with pytest.raises(SandboxNotFound):
        Sandbox.connect("no-such-sandbox", socket=daemon.socket)
    with pytest.raises(SandboxAlreadyExists):
        client.create(id=sb.id)
    assert b"arcbox-agent" in b"".join(sb.logs())


def test_stopped_sandbox_refuses_commands(daemon, client):
    with Sandbox.create(socket=daemon.socket, network="none") as box:
        box.stop(timeout=20)
        assert str(box.info().state) == "stopped"
        with pytest.raises(InvalidState, match="stopped"):
            box.run("true")


def test_boot_failure_raises_and_removes_the_sandbox(daemon, client):
    images = daemon.config.parent / "data" / "named-images"  # kernels are named, from the daemon's images dir
    images.mkdir(parents=True, exist_ok=True)
    (images / "not-a-kernel").write_bytes(b"garbage\n")
    with pytest.raises(BootFailed) as info:
        Sandbox.create(socket=daemon.socket, id="cli-bad-kernel", kernel="not-a-kernel", network="none")
    assert "cli-bad-kernel" in str(info.value)
    with pytest.raises(SandboxNotFound):
        client.inspect("cli-bad-kernel")


async def test_async_sandbox(daemon):
    async with await AsyncSandbox.create(socket=daemon.socket, network="none") as box:
        r = await box.run(["uname", "-r"])
        assert r.exit_code == 0 and r.stdout.strip()
        seen: list[bytes] = []

        async def on_out(data: bytes) -> None:
            seen.append(data)

        await box.run(["sh", "-c", "echo x; echo y"], on_stdout=on_out)
        assert b"".join(seen) == b"x\ny\n"
        session = await box.exec(["cat"])
        await session.write(b"ping")
        await session.close_stdin()
        assert (await session.wait()).stdout == b"ping"
        await box.files.write("/tmp/x", b"async")
        assert await box.files.read("/tmp/x") == b"async"
        sandbox_id = box.id
    async with AsyncClient(socket=daemon.socket) as client:
        with pytest.raises(SandboxNotFound):
            await client.inspect(sandbox_id)
