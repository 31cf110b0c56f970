"""Background commands through the real daemon: start, list, attach, detach, signal.

One daemon and one sandbox for the module (network off); every test starts its own
commands. The durability side (a background command survives a daemon crash) is in
test_durability.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.client import Client
from arcbox_vm.errors import ExecNotAttachable, ExecNotFound

from .daemon_helpers import module_daemon

pytestmark = pytest.mark.vm

CLI = str(Path(sys.executable).with_name("arcbox-vm"))
MIB = 1 << 20


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, guest_image):
    with module_daemon(tmp_path_factory.mktemp("background-daemon"), guest_image, "10.244.0.0/24") as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    with Client(socket=daemon.socket) as c:
        yield c


@pytest.fixture(scope="module")
def sid(daemon, client):
    created = client.create(network="none")
    client.wait_ready(created.id)
    yield created.id
    client.remove(created.id, force=True)


def status(client: Client, sid: str, exec_id: str) -> str:
    return {e.exec_id: e.status for e in client.list_execs(sid)}[exec_id]


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_unattended_output_never_blocks_and_the_tail_is_kept(client, sid):
    # 4 MiB of numbered 64-byte lines, then a marker file, then wait to be told to exit
    script = ("i=0; while [ $i -lt 65536 ]; do printf '%063d\\n' $i; i=$((i+1)); done; touch /tmp/bg-written; "
              "while [ ! -e /tmp/bg-go ]; do sleep 0.1; done; echo bye >&2; exit 4")
    exec_id = client.start(sid, ["sh", "-c", script])
    assert exec_id and status(client, sid, exec_id) == "detached"
    assert client.inspect(sid).state == "running"
    # nobody reads, yet the command gets past 4 MiB of output: the daemon drains it
    wait_for(lambda: client.run(sid, ["test", "-e", "/tmp/bg-written"]).exit_code == 0, timeout=120)
    client.run(sid, ["touch", "/tmp/bg-go"])
    with client.attach(sid, exec_id) as session:
        result = session.wait()
    assert result.exit_code == 4 and result.stderr == b"bye\n"
    lines = result.stdout.splitlines()
    # exactly the newest 1 MiB of output (stderr's "bye" counts too if it came before the attach)
    assert len(result.stdout) in (MIB, MIB - len(result.stderr)), len(result.stdout)
    numbers = [int(x) for x in lines[1:]]  # the first kept line may be cut
    assert numbers == list(range(numbers[0], 65536)), "the kept tail is contiguous and ends at the last line"
    assert status(client, sid, exec_id) == "exited"
    assert {e.exec_id: e.exit_code for e in client.list_execs(sid)}[exec_id] == 4
    wait_for(lambda: client.inspect(sid).state == "ready")


def test_detach_and_reattach_then_signal(client, sid):
    exec_id = client.start(sid, ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done"])
    session = client.attach(sid, exec_id)
    first = [next(iter(session)) for _ in range(3)]
    assert all(o.stream == "stdout" for o in first)
    with pytest.raises(ExecNotAttachable):  # one client at a time
        client.attach(sid, exec_id).wait()
    session.kill()  # leaving detaches; the command runs on
    wait_for(lambda: status(client, sid, exec_id) == "detached")
    time.sleep(0.5)
    session = client.attach(sid, exec_id)
    got = next(iter(session))
    assert got.stream == "stdout" and int(got.data.split()[0]) > int(first[-1].data.split()[-1])
    client.signal(sid, exec_id, signal.SIGTERM)
    result = session.wait()
    assert result.exit_code == 128 + signal.SIGTERM
    assert status(client, sid, exec_id) == "exited"
    with pytest.raises(ExecNotFound):
        client.attach(sid, "424242").wait()
    with pytest.raises(ExecNotAttachable):
        client.signal(sid, exec_id, signal.SIGTERM)  # not running any more


def test_stdin_of_a_background_command(client, sid):
    exec_id = client.start(sid, ["sh", "-c", "read line; echo got:$line; exit 2"], stdin=True)
    time.sleep(0.3)
    session = client.attach(sid, exec_id)
    session.write(b"hello\n")
    result = session.wait()
    assert (result.stdout, result.exit_code) == (b"got:hello\n", 2)


def test_grpc_start_attach_signal_errors(daemon, sid):
    stub = daemon.stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.Start(pb.StartRequest(id=sid, cmd=["no-such-command-here"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.Start(pb.StartRequest(id="no-such-sandbox", cmd=["true"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    exec_id = stub.Start(pb.StartRequest(id=sid, cmd=["sleep", "600"])).exec_id
    with pytest.raises(grpc.RpcError) as err:
        stub.Signal(pb.SignalRequest(id=sid, exec_id=exec_id, signal=99))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Signal(pb.SignalRequest(id=sid, exec_id="", signal=9))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.Signal(pb.SignalRequest(id=sid, exec_id=exec_id))  # 0 = SIGKILL
    msgs = list(stub.Attach(pb.AttachRequest(id=sid, exec_id=exec_id)))
    assert msgs[-1].stream == "exit" and msgs[-1].exit_code == 128 + signal.SIGKILL


def test_cli_exec_detached_execs_signal_attach(daemon, sid):
    env = dict(os.environ, ARCBOX_VM_SOCKET=str(daemon.socket))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, *args], capture_output=True, env=env, timeout=120, stdin=subprocess.DEVNULL)

    started = cli("exec", "-d", sid, "--", "sh", "-c", "echo started; sleep 600")
    assert started.returncode == 0, started.stderr
    exec_id = started.stdout.decode().strip()
    assert exec_id.isdigit()
    listed = cli("execs", sid)
    row = [line.split() for line in listed.stdout.decode().splitlines() if line.split()[:1] == [exec_id]]
    assert row and row[0][1] == "detached", listed.stdout.decode()
    assert cli("signal", sid, exec_id, "-s", "TERM").returncode == 0
    attached = cli("attach", sid, exec_id)
    assert attached.returncode == 128 + signal.SIGTERM, attached.stderr
    assert attached.stdout == b"started\n"
    bad = cli("signal", sid, exec_id, "-s", "NOPE")
    assert bad.returncode != 0 and b"unknown signal" in bad.stderr


def test_sandbox_objects_sync_and_async(daemon, sid):
    import asyncio

    from arcbox_vm.client import AsyncSandbox, Sandbox

    with Sandbox.connect(sid, socket=daemon.socket, remove_on_exit=False) as box:
        exec_id = box.start(["sh", "-c", "echo hi; exit 3"])
        wait_for(lambda: [e.status for e in box.execs() if e.exec_id == exec_id] == ["exited"])
        result = box.attach(exec_id).wait()  # finished while nobody was attached: output and code kept
        assert (result.stdout, result.exit_code) == (b"hi\n", 3)

    async def main() -> int:
        async with await AsyncSandbox.connect(sid, socket=daemon.socket, remove_on_exit=False) as abox:
            exec_id = await abox.start(["sleep", "600"])
            await abox.signal(exec_id, signal.SIGKILL)
            session = await abox.attach(exec_id)
            return (await session.wait()).exit_code

    assert asyncio.run(main()) == 128 + signal.SIGKILL
