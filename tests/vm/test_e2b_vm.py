"""The REAL `e2b` SDK against a real `arcbox-vm serve` (subprocess, [e2b] enabled on
loopback) booting real QEMU VMs: the core of tests/unit/test_e2b_local.py, in a guest
that has E2B's `user` account and /bin/bash. Nothing leaves this machine."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from e2b import AsyncSandbox, CommandExitException, Sandbox, SandboxQuery  # noqa: E402
from e2b.exceptions import AuthenticationException  # noqa: E402
from e2b.sandbox.commands.command_handle import PtySize  # noqa: E402

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb  # noqa: E402

from .daemon_helpers import Daemon, write_config  # noqa: E402
from .manager_helpers import netns_list  # noqa: E402

pytestmark = pytest.mark.vm
KEY = "e2b_vm_test_key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def e2b_env(tmp_path_factory, guest_image):
    tmp = tmp_path_factory.mktemp("e2b-daemon")
    netns = f"arcbox-t-{os.urandom(3).hex()}"
    cfg = write_config(tmp / "c.toml", guest_image, tmp / "data", tmp / "d.sock", netns=netns,
                       cidr="10.246.0.0/24", on_shutdown="remove")
    api, sbx = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with open(cfg, "a") as f:
        f.write(f'\n[e2b]\nenabled = true\napi_addr = "{api}"\nsandbox_addr = "{sbx}"\napi_keys = ["{KEY}"]\n'
                'watch_interval_s = 0.2\n')
    d = Daemon(cfg, tmp / "d.sock", tmp / "daemon.log").start()
    mp = pytest.MonkeyPatch()
    mp.setenv("E2B_API_KEY", KEY)
    mp.setenv("E2B_API_URL", f"http://{api}")
    mp.setenv("E2B_SANDBOX_URL", f"http://{sbx}")
    for var in ("E2B_DOMAIN", "E2B_DEBUG", "E2B_ACCESS_TOKEN"):
        mp.delenv(var, raising=False)
    try:
        yield d
    finally:
        mp.undo()
        assert d.stop() == 0, d.log.read_text()[-3000:]
        assert netns not in netns_list()


def test_sync_sdk_in_a_vm(e2b_env) -> None:
    sbx = Sandbox.create(timeout=300, metadata={"suite": "e2b-vm"}, envs={"FROM_CREATE": "c"})
    try:
        r = sbx.commands.run("echo hi; echo oops >&2")
        assert (r.stdout, r.stderr, r.exit_code) == ("hi\n", "oops\n", 0)
        with pytest.raises(CommandExitException) as err:
            sbx.commands.run("exit 3")
        assert err.value.exit_code == 3
        assert sbx.commands.run("whoami; pwd; echo $FROM_CREATE").stdout == "user\n/home/user\nc\n"
        assert sbx.commands.run("whoami", user="root").stdout == "root\n"
        assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
        seen: list[str] = []
        sbx.commands.run("for i in 1 2 3; do echo l$i; sleep 0.1; done", on_stdout=seen.append)
        assert "".join(seen) == "l1\nl2\nl3\n"
        bg = sbx.commands.run("sleep 600", background=True)
        assert bg.kill() is True
        cat = sbx.commands.run("cat", background=True, stdin=True)
        sbx.commands.send_stdin(cat.pid, "piped\n")
        sbx.commands.close_stdin(cat.pid)
        assert cat.wait().stdout == "piped\n"

        blob = os.urandom(10 << 20)
        info = sbx.files.write("data/big.bin", blob)  # relative: under /home/user
        assert info.path == "/home/user/data/big.bin"
        assert bytes(sbx.files.read("/home/user/data/big.bin", format="bytes")) == blob
        assert sbx.commands.run("stat -c %U /home/user/data/big.bin").stdout == "user\n"
        sbx.files.write("/tmp/t.txt", "text")
        assert sbx.files.read("/tmp/t.txt") == "text"
        assert sbx.files.make_dir("/tmp/d/e") is True and sbx.files.make_dir("/tmp/d") is False
        assert {e.name for e in sbx.files.list("/tmp")} >= {"t.txt", "d"}
        sbx.files.rename("/tmp/t.txt", "/tmp/u.txt")
        assert sbx.files.exists("/tmp/u.txt") and not sbx.files.exists("/tmp/t.txt")
        assert sbx.files.get_info("/tmp/u.txt").size == 4
        sbx.files.remove("/tmp/d")
        assert not sbx.files.exists("/tmp/d")

        handle = sbx.files.watch_dir("/tmp")
        sbx.files.write("/tmp/watched.txt", "x")
        events: list = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(e.name == "watched.txt" for e in events):
            time.sleep(0.3)
            events += handle.get_new_events()
        handle.stop()
        assert any(e.name == "watched.txt" for e in events)

        out: list[bytes] = []
        pty = sbx.pty.create(PtySize(rows=24, cols=80))
        sbx.pty.resize(pty.pid, PtySize(rows=33, cols=111))
        sbx.pty.send_stdin(pty.pid, b"stty size; exit\n")
        pty.wait(on_pty=out.append)
        assert b"33 111" in b"".join(out)

        listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b-vm"})).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        assert sbx.get_info().metadata == {"suite": "e2b-vm"}
    finally:
        assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False


async def test_async_sdk_and_timeout_in_a_vm(e2b_env) -> None:
    sbx = await AsyncSandbox.create(timeout=300)
    r = await sbx.commands.run("bash --version | head -1")
    assert r.stdout.startswith("GNU bash")
    await sbx.set_timeout(2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and await sbx.is_running():
        await __import__("asyncio").sleep(0.5)
    assert not await sbx.is_running()
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.create(api_key="wrong")


def test_get_host_port_and_the_egress_policy_in_a_vm(e2b_env) -> None:
    """An HTTP server in the guest reached through get_host(port) at E2B_SANDBOX_URL (over
    the agent channel), and create's allow_internet_access / network as the sandbox's
    egress policy, seen over gRPC."""
    sbx = Sandbox.create(timeout=300, allow_internet_access=False, network={"allow_out": ["1.1.1.1"]})
    try:
        net = e2b_env.stub().Inspect(pb.InspectSandboxRequest(id=sbx.sandbox_id), timeout=10).network
        assert (net.egress, list(net.allow_out), list(net.deny_out)) == ("none", ["1.1.1.1/32"], [])
        info = sbx.get_info()
        assert info.allow_internet_access is False and info.network["deny_out"] == ["0.0.0.0/0"]

        blob = os.urandom(5 << 20)
        sbx.files.write("/tmp/site/index.html", "hello from the VM\n")
        sbx.files.write("/tmp/site/big.bin", blob)
        sbx.commands.run("python3 -m http.server 8000 --bind 127.0.0.1 --directory /tmp/site", background=True)
        base = os.environ["E2B_SANDBOX_URL"]
        token = {"E2b-Traffic-Access-Token": sbx.traffic_access_token}
        hdr = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000", **token}
        deadline = time.monotonic() + 30
        while (r := httpx.get(f"{base}/index.html", headers=hdr)).status_code == 502 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (r.status_code, r.text) == (200, "hello from the VM\n")
        r = httpx.get(f"{base}/big.bin", headers={"Host": sbx.get_host(8000), **token}, timeout=60)
        assert r.status_code == 200 and r.content == blob
        r = httpx.get(f"{base}/", headers={**hdr, "E2b-Sandbox-Port": "8001"})
        assert r.status_code == 502 and "port is not open" in r.json()["message"]
        assert httpx.get(f"{base}/", headers={**hdr, "E2b-Traffic-Access-Token": "wrong"}).status_code == 401

        sbx.update_network({"allow_internet_access": True, "deny_out": ["8.8.0.0/16"]})
        net = e2b_env.stub().Inspect(pb.InspectSandboxRequest(id=sbx.sandbox_id), timeout=10).network
        assert (net.egress, list(net.allow_out), list(net.deny_out)) == ("nat", [], ["8.8.0.0/16"])
    finally:
        assert sbx.kill() is True


def test_pause_and_connect_in_a_vm(e2b_env) -> None:
    """pause (to disk: the VMM stops) → listed paused → connect restores it: a file and a
    background process survive, and the guest runs commands again."""
    sbx = Sandbox.create(timeout=300, metadata={"suite": "e2b-vm-pause"})
    try:
        sbx.files.write("/home/user/kept.txt", "from before the pause")
        ticker = sbx.commands.run("while :; do date +%s >> /tmp/ticks; sleep 0.2; done", background=True)
        pid = ticker.pid
        time.sleep(1)
        assert sbx.pause() is True
        assert Sandbox.pause(sbx.sandbox_id) is False
        assert sbx.get_info().state.value == "paused"
        query = SandboxQuery(metadata={"suite": "e2b-vm-pause"}, state=[e2b.SandboxState.PAUSED])
        assert [s.sandbox_id for s in Sandbox.list(query=query).next_items()] == [sbx.sandbox_id]
        assert sbx.is_running() is False
        with pytest.raises(e2b.SandboxNotRunningException):
            sbx.commands.run("true")

        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert again.get_info().state.value == "running"
        assert again.files.read("/home/user/kept.txt") == "from before the pause"
        assert again.commands.run(f"kill -0 {pid} && echo alive").stdout == "alive\n"
        n1 = int(again.commands.run("wc -l < /tmp/ticks").stdout)
        time.sleep(1.5)
        assert int(again.commands.run("wc -l < /tmp/ticks").stdout) > n1, "the background process runs on"
    finally:
        assert sbx.kill() is True
