"""Port forwarding on real VMs: `python3 -m http.server` in the guest, fetched from the host
through the forwarded port — with network "none", with a TAP network in a namespace of its
own, and through the daemon's CLI (`create -p`, `port`).

The guest's server listens on its loopback only (127.0.0.1): the agent channel is the only
way in, so every fetch proves the forward and nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from arcbox_vm import PortMapping, SandboxManager, SandboxNetworkSpec, SandboxSpec, SandboxState
from arcbox_vm.errors import SandboxNotFound

from .daemon_helpers import arcbox, module_daemon, ok
from .manager_helpers import fresh_netns_name, make_config, netns_list

pytestmark = pytest.mark.vm

GUEST_PORT = 8000
SILENT_PORT = 8001  # forwarded, but nothing listens on it in the guest
HIDDEN_PORT = 18002  # served in the guest, never forwarded


def page(size: int) -> bytes:
    return hashlib.sha256(b"seed").hexdigest().encode() * (size // 64) + b"\n"


def fetch(port: int, path: str = "/index.html", timeout: float = 60) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        assert resp.status == 200
        return resp.read()


def wait_served(port: int, timeout: float = 120) -> bytes:
    """Fetch until the guest's server answers (it starts slowly under emulation)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fetch(port, timeout=30)
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def connection_ends(sock: socket.socket, timeout: float = 30) -> str:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return "eof"
    except ConnectionResetError:
        return "reset"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def listening_ports(pid: int | str = "self") -> set[int]:
    """TCP ports process `pid` listens on (its sockets in LISTEN state, IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def socket_fds(pid: int | str = "self") -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


async def serve_in_guest(mgr: SandboxManager, sid: str, port: int, content: bytes) -> str:
    """index.html with `content` in /srv/<port>, served by http.server on the guest's loopback."""
    async def chunks():
        yield content

    await mgr.write_file(sid, f"/srv/{port}/index.html", chunks(), make_parents=True)
    return await mgr.start_exec(sid, ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                      "--directory", f"/srv/{port}"])


def port_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("port-") and not t.done()]


async def test_http_server_through_a_forwarded_port_with_network_none(backend, guest_image, tmp_path):
    """Fetch, an unforwarded port, 50 concurrent fetches, and a removal with connections open."""
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        await mgr.start()
        listening_before, sockets_before = listening_ports(), socket_fds()
        spec = SandboxSpec(network=SandboxNetworkSpec(mode="none"),
                           ports=[PortMapping(GUEST_PORT), PortMapping(SILENT_PORT)])
        sid, ip = await mgr.create_sandbox(spec)
        assert ip == ""
        await mgr.wait_ready(sid, 240)
        web, silent = mgr.inspect_sandbox(sid).ports
        assert (web.guest_port, silent.guest_port) == (GUEST_PORT, SILENT_PORT)
        assert web.host_addr == "127.0.0.1" and web.host_port and silent.host_port
        content = page(256 * 1024)  # a page of several credit windows
        await serve_in_guest(mgr, sid, GUEST_PORT, content)
        await serve_in_guest(mgr, sid, HIDDEN_PORT, b"hidden\n")
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, wait_served, web.host_port) == content

        # only what is forwarded is reachable: the listeners are exactly the two mappings,
        # and the silent one resets (nothing listens on it in the guest)
        assert listening_ports() - listening_before == {web.host_port, silent.host_port}
        sock = socket.create_connection(("127.0.0.1", silent.host_port), timeout=10)
        assert await loop.run_in_executor(None, connection_ends, sock) == "reset"
        sock.close()
        out, _, code = await (await mgr.run_in_sandbox(sid, [
            "python3", "-c", f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{HIDDEN_PORT}/').read())"
        ])).collect()
        assert code == 0 and b"hidden" in out, "the hidden server runs, in the guest"
        assert HIDDEN_PORT not in listening_ports()

        # 50 concurrent connections, each gets the whole page
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            pages = await asyncio.gather(*(loop.run_in_executor(pool, fetch, web.host_port) for _ in range(50)))
        assert all(p == content for p in pages)

        # removal with connections open: half-sent requests keep them open in the guest
        clients = []
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", web.host_port), timeout=10)
            s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n")
            clients.append(s)
        await asyncio.sleep(2)
        assert len(port_tasks()) == 5
        await mgr.remove_sandbox(sid, force=True)
        with pytest.raises(SandboxNotFound):
            mgr.inspect_sandbox(sid)
        assert port_tasks() == [], "no forwarding task is left"
        assert listening_ports() == listening_before, "no listener is left"
        assert refused(web.host_port) and refused(silent.host_port)
        ends = await asyncio.gather(*(loop.run_in_executor(None, connection_ends, s) for s in clients))
        assert set(ends) <= {"reset", "eof"}
        for s in clients:
            s.close()
        assert socket_fds() <= sockets_before, "no socket is left"
    finally:
        await mgr.close()


async def test_forwarding_with_a_tap_network_in_a_namespace(backend, guest_image, tmp_path):
    """The VM's network lives in a namespace of its own; the forward does not care."""
    ns = fresh_netns_name()
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path, cidr="10.248.0.0/24", netns=ns))
    try:
        sid, ip = await mgr.create_sandbox(SandboxSpec(ports=[PortMapping(GUEST_PORT)]))
        assert ip.startswith("10.248.0.")
        await mgr.wait_ready(sid, 240)
        (web,) = mgr.inspect_sandbox(sid).ports
        content = page(64 * 1024)
        await serve_in_guest(mgr, sid, GUEST_PORT, content)
        assert await asyncio.get_running_loop().run_in_executor(None, wait_served, web.host_port) == content
        await mgr.stop_sandbox(sid, 10)
        assert mgr.inspect_sandbox(sid).state == SandboxState.STOPPED and refused(web.host_port)
        await mgr.remove_sandbox(sid)
    finally:
        await mgr.close()
    assert ns not in netns_list()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, guest_image):
    with module_daemon(tmp_path_factory.mktemp("ports-daemon"), guest_image, "10.249.0.0/24") as d:
        yield d



def test_daemon_cli_create_p_and_port(daemon, tmp_path):
    busy = socket.create_server(("127.0.0.1", 0))
    p = arcbox(daemon, "create", "--network", "none", "-p", f"{busy.getsockname()[1]}:80")
    assert p.returncode == 1 and b"is in use" in p.stderr, p.stderr
    busy.close()

    fixed = socket.create_server(("127.0.0.1", 0))
    fixed_port = fixed.getsockname()[1]
    fixed.close()
    sid = ok(arcbox(daemon, "create", "--network", "none", "-p", f"{fixed_port}:{GUEST_PORT}",
                    "-p", f"127.0.0.1::{GUEST_PORT}")).splitlines()[-1]
    lines = ok(arcbox(daemon, "port", sid)).splitlines()
    assert lines[0] == f"{GUEST_PORT}/tcp -> 127.0.0.1:{fixed_port}"
    assert lines[1].startswith(f"{GUEST_PORT}/tcp -> 127.0.0.1:") and len(lines) == 2
    chosen = int(lines[1].rpartition(":")[2])
    assert ok(arcbox(daemon, "port", sid, str(GUEST_PORT))).splitlines() == [
        f"127.0.0.1:{fixed_port}", f"127.0.0.1:{chosen}"]

    content = page(128 * 1024)
    src = tmp_path / "index.html"
    src.write_bytes(content)
    ok(arcbox(daemon, "exec", sid, "--", "mkdir", "-p", "/srv/www"))
    ok(arcbox(daemon, "cp", str(src), f"{sid}:/srv/www/index.html"))
    ok(arcbox(daemon, "exec", "-d", sid, "--", "python3", "-m", "http.server", str(GUEST_PORT), "--bind",
              "127.0.0.1", "--directory", "/srv/www"))
    assert wait_served(fixed_port) == content
    assert fetch(chosen) == content
    assert ok(arcbox(daemon, "rm", "-f", sid)) == f"{sid}\n"
    assert refused(fixed_port) and refused(chosen)
    assert not {fixed_port, chosen} & listening_ports(daemon.pid)
