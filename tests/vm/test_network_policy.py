"""Network isolation and egress policies on real VMs, whose root is the attacker.

Layout, entirely inside namespaces this module creates (no packet leaves them): the
manager's namespace NS holds the TAPs (gateway 10.241.0.1, guests from 10.241.0.0/24),
our table, and a listener on every address of NS (the "host"). UP is a fake upstream
behind a veth (10.242.0.1 in NS; UP1 = 10.242.0.2, UP2 = 10.242.0.3 and the metadata
address 169.254.169.254 in UP); UP has no route to the guests, so it is reached through
our masquerade only. The config excepts 10.242.0.0/30 from the blocked private ranges
(both upstream addresses are private) — 169.254.0.0/16 stays blocked.

Two VMs serve the whole module (booting is slow under emulation): A is the attacker, B
its neighbour. The tests run in file order; each sets the policies it needs.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time

import pytest
import pytest_asyncio

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec

from .manager_helpers import fresh_netns_name, make_config

pytestmark = pytest.mark.vm

GW, UP_NS, UP1, UP2, META = "10.241.0.1", "10.242.0.1", "10.242.0.2", "10.242.0.3", "169.254.169.254"
PORT, ALLOWED_PORT = 8080, 8081

# A TCP + UDP listener: answers "ok", logs "tcp <peer> <local address>" / "udp <peer> <payload>".
SERVER = r"""
import socket, sys, threading
def serve(proto):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    if proto == "tcp":
        s.listen(16)
        while True:
            c, peer = s.accept()
            print("tcp", peer[0], c.getsockname()[0], flush=True)
            c.sendall(b"ok"); c.close()
    while True:
        data, peer = s.recvfrom(100)
        print("udp", peer[0], data.decode(errors="replace"), flush=True)
        s.sendto(b"ok", peer)
threading.Thread(target=serve, args=("udp",), daemon=True).start()
print("listening", flush=True)
serve("tcp")
"""

# Run in the guest: every check at once (one interpreter start under emulation), a JSON
# list of booleans back. kinds: tcp (connect + "ok"), udp (send payload, "ok" back), ping.
PROBE = r"""
import json, socket, subprocess, sys, threading
checks = json.loads(sys.argv[1])
out = [False] * len(checks)
def run(i, c):
    try:
        if c["kind"] == "ping":
            out[i] = subprocess.run(["ping", "-c", "1", "-W", "3", c["ip"]], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL).returncode == 0
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if c["kind"] == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(4)
        if c.get("src"):
            s.bind((c["src"], 0))
        if c["kind"] == "tcp":
            s.connect((c["ip"], c["port"]))
        else:
            s.sendto(c.get("payload", "-").encode(), (c["ip"], c["port"]))
        out[i] = s.recv(2) == b"ok"
    except OSError:
        out[i] = False
threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(checks)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(args), capture_output=True, text=True)
    if check:
        assert res.returncode == 0, f"{args}: {res.stderr}"
    return res


class Listener:
    def __init__(self, ns: str, port: int) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(port)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "listening"
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def saw(self, text: str) -> bool:
        time.sleep(0.3)
        return any(text in line for line in self.lines)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def tcp(ip: str, port: int = PORT) -> dict:
    return {"kind": "tcp", "ip": ip, "port": port}


def udp(ip: str, payload: str, src: str = "", port: int = PORT) -> dict:
    return {"kind": "udp", "ip": ip, "port": port, "payload": payload, "src": src}


def ping(ip: str) -> dict:
    return {"kind": "ping", "ip": ip}


class Lab:
    def __init__(self, ns: str, up: str, cfg) -> None:  # noqa: ANN001
        self.ns, self.up, self.cfg = ns, up, cfg
        self.mgr = SandboxManager(cfg)
        self.a = self.b = ""
        self.ip: dict[str, str] = {}
        self.listeners: dict[str, Listener] = {}

    async def run(self, sid: str, argv: list[str]) -> tuple[bytes, bytes, int]:
        stream = await self.mgr.run_in_sandbox(sid, argv, timeout_seconds=90)
        return await stream.collect()

    async def sh_in(self, sid: str, script: str) -> None:
        out, err, code = await self.run(sid, ["sh", "-c", script])
        assert code == 0, (script, out, err)

    async def probe(self, sid: str, *checks: dict) -> list[bool]:
        out, err, code = await self.run(sid, ["python3", "-c", PROBE, json.dumps(list(checks))])
        assert code == 0, (out, err)
        return json.loads(out.decode().strip().splitlines()[-1])

    def nft(self, *args: str) -> str:
        return sh("ip", "netns", "exec", self.ns, "nft", *args, check=False).stdout

    @property
    def table(self) -> str:
        return "arcbox_vm_" + self.mgr.adapters.network.tag  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def namespaces():
    ns, up = fresh_netns_name(), fresh_netns_name()
    vn, vu = f"vn{ns[-6:]}", f"vu{up[-6:]}"
    try:
        for cmd in (
            ["ip", "netns", "add", ns], ["ip", "netns", "add", up],
            ["ip", "link", "add", vn, "netns", ns, "type", "veth", "peer", "name", vu, "netns", up],
            ["ip", "-n", ns, "addr", "add", f"{UP_NS}/24", "dev", vn],
            ["ip", "-n", up, "addr", "add", f"{UP1}/24", "dev", vu],
            ["ip", "-n", up, "addr", "add", f"{UP2}/24", "dev", vu],
            ["ip", "-n", up, "addr", "add", f"{META}/32", "dev", "lo"],
            ["ip", "-n", ns, "link", "set", vn, "up"], ["ip", "-n", up, "link", "set", vu, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"], ["ip", "-n", up, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "route", "add", f"{META}/32", "via", UP1],
        ):
            sh(*cmd)
        yield ns, up
    finally:
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "del", up, check=False)


@pytest_asyncio.fixture(scope="module")
async def lab(backend, guest_image, tmp_path_factory, namespaces):
    ns, up = namespaces
    cfg = make_config(backend, guest_image, tmp_path_factory.mktemp("netpolicy"), cidr="10.241.0.0/24", netns=ns,
                      network={"host_allow": [f"{GW}:{ALLOWED_PORT}/tcp"], "blocked_except": ["10.242.0.0/30"]})
    lab = Lab(ns, up, cfg)
    lab.listeners = {"host": Listener(ns, PORT), "host-allowed": Listener(ns, ALLOWED_PORT), "up": Listener(up, PORT)}
    try:
        lab.a, lab.ip["a"] = await lab.mgr.create_sandbox(SandboxSpec(
            id="pol-a", network=SandboxNetworkSpec(allow_out=[UP1, META])))
        lab.b, lab.ip["b"] = await lab.mgr.create_sandbox(SandboxSpec(
            id="pol-b", network=SandboxNetworkSpec(egress="nat")))
        await asyncio.gather(lab.mgr.wait_ready(lab.a, 300), lab.mgr.wait_ready(lab.b, 300))
        yield lab
    finally:
        for listener in lab.listeners.values():
            listener.stop()
        await lab.mgr.close()


async def test_policy_is_shown_defaults_to_none_and_ipv6_is_off(lab: Lab):
    a, b = lab.mgr.inspect_sandbox(lab.a).network, lab.mgr.inspect_sandbox(lab.b).network
    assert (a.egress, a.allow_out, a.deny_out) == ("none", (f"{UP1}/32", f"{META}/32"), ()), \
        "no egress in the spec = the default, none"
    assert (b.egress, b.allow_out) == ("nat", ())
    ipv6_off = sh("ip", "netns", "exec", lab.ns, "cat", f"/proc/sys/net/ipv6/conf/{a.tap_name}/disable_ipv6")
    assert ipv6_off.stdout.strip() == "1", "no IPv6 on a TAP"


async def test_guest_reaches_no_host_service_but_the_allowed_port(lab: Lab):
    """A listener on every address of the host (the gateway sits on every TAP): refused;
    the operator's host_allow port works; replies to the host's own connections pass."""
    host = lab.listeners["host"]
    got = await lab.probe(lab.a, tcp(GW), tcp(UP_NS), udp(GW, "to-host"), ping(GW), tcp(GW, ALLOWED_PORT))
    assert got == [False, False, False, False, True], got
    assert host.lines == [], "nothing arrived at the host's listener"
    assert lab.listeners["host-allowed"].saw(f"tcp {lab.ip['a']} {GW}")
    assert sh("ip", "netns", "exec", lab.ns, "ping", "-c", "1", "-W", "5", lab.ip["a"], check=False).returncode == 0


async def test_sandboxes_cannot_reach_each_other(lab: Lab):
    """Neither ping nor TCP, either way — even routed through the gateway on purpose (the
    host answers no ARP for a neighbour), even for B, which may leave through NAT."""
    a, b = lab.ip["a"], lab.ip["b"]
    await lab.sh_in(lab.a, f"ip route replace {b}/32 via {GW}")
    await lab.sh_in(lab.b, f"ip route replace {a}/32 via {GW}")
    await lab.mgr.start_exec(lab.b, ["sh", "-c", f"exec python3 -c '{SERVER}' {PORT} > /tmp/listener.log 2>&1"])
    for _ in range(60):
        out, _, _ = await lab.run(lab.b, ["cat", "/tmp/listener.log"])
        if b"listening" in out:
            break
        await asyncio.sleep(0.5)
    # the control: the host reaches B's listener (so it is up)
    control = sh("ip", "netns", "exec", lab.ns, sys.executable, "-c",
                 f"import socket; s=socket.create_connection(('{b}', {PORT}), timeout=30); print(s.recv(2))",
                 check=False)
    assert "ok" in control.stdout, control.stderr
    assert await lab.probe(lab.a, tcp(b), ping(b), udp(b, "a-to-b")) == [False, False, False]
    assert await lab.probe(lab.b, tcp(a), ping(a)) == [False, False]
    out, _, _ = await lab.run(lab.b, ["cat", "/tmp/listener.log"])
    assert a.encode() not in out, out


async def test_a_spoofed_source_is_dropped(lab: Lab):
    """The guest (root) adds a second address and sends from it: nothing arrives; the same
    datagram from its own address does."""
    up = lab.listeners["up"]
    await lab.sh_in(lab.a, "ip addr add 10.241.0.99/32 dev eth0")
    try:
        got = await lab.probe(lab.a, udp(UP1, "spoof-1", src="10.241.0.99"), udp(UP1, "legit", src=lab.ip["a"]))
        assert got == [False, True], got
        assert up.saw("legit") and not up.saw("spoof"), up.lines
    finally:
        await lab.sh_in(lab.a, "ip addr del 10.241.0.99/32 dev eth0")


async def test_allow_out_deny_out_and_none(lab: Lab):
    """allow_out: one upstream address, not the other; never the blocked metadata address,
    although allow_out lists it; deny_out wins over allow_out; none reaches nothing."""
    assert await lab.probe(lab.a, tcp(UP1), tcp(UP2), tcp(META)) == [True, False, False]
    assert not lab.listeners["up"].saw(f"{META}")
    # deny wins over allow (both the same address) and over egress nat
    await lab.mgr.update_network(lab.a, egress="nat", allow_out=[UP1], deny_out=[UP1])
    assert await lab.probe(lab.a, tcp(UP1), tcp(UP2), tcp(META)) == [False, True, False]
    await lab.mgr.update_network(lab.a, egress="none", allow_out=[], deny_out=[])
    assert await lab.probe(lab.a, tcp(UP1), tcp(UP2), tcp(META), ping(UP1)) == [False, False, False, False]
    info = lab.mgr.inspect_sandbox(lab.a).network
    assert (info.egress, info.allow_out, info.deny_out) == ("none", (), ())


async def test_update_at_runtime_cuts_an_open_connection(lab: Lab):
    """A policy change is effective at once, for connections already open too."""
    echo = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
while True:
    d = c.recv(100)
    if not d: break
    c.sendall(d)
"""
    srv = subprocess.Popen(["ip", "netns", "exec", lab.up, sys.executable, "-c", echo, str(PORT + 2)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
        await lab.mgr.update_network(lab.a, allow_out=[UP1])
        talk = f"""
import socket, time
s = socket.create_connection(("{UP1}", {PORT + 2}), timeout=10)
s.sendall(b"1"); assert s.recv(1) == b"1"
open("/tmp/talk.state", "w").write("open")
while open("/tmp/talk.go").read().strip() != "go": time.sleep(0.2)
s.settimeout(8)
try:
    s.sendall(b"2"); r = s.recv(1); print("echo" if r == b"2" else "closed")
except OSError:
    print("cut")
"""
        await lab.sh_in(lab.a, "echo wait > /tmp/talk.go; rm -f /tmp/talk.state")
        stream = await lab.mgr.run_in_sandbox(lab.a, ["python3", "-c", talk], timeout_seconds=120)
        collect = asyncio.ensure_future(stream.collect())
        for _ in range(120):
            out, _, _ = await lab.run(lab.a, ["cat", "/tmp/talk.state"])
            if out.strip() == b"open":
                break
            await asyncio.sleep(0.5)
        else:
            pytest.fail("the connection never opened")
        await lab.mgr.update_network(lab.a, allow_out=[])
        await lab.sh_in(lab.a, "echo go > /tmp/talk.go")
        out, err, code = await collect
        assert out.strip() == b"cut", (out, err, code)
    finally:
        srv.kill()
        srv.wait()


async def test_policy_survives_a_restart_then_nothing_is_left(lab: Lab):
    """The policy is recorded: a new manager re-adopting the VM re-applies it (the table is
    replaced at start); closing leaves no table, chain or set of ours."""
    await lab.mgr.update_network(lab.a, egress="none", allow_out=[UP2], deny_out=[])
    await lab.mgr.close(remove_sandboxes=False)
    assert lab.table in lab.nft("list", "tables"), "VMs left running stay isolated meanwhile"
    lab.mgr = SandboxManager(lab.cfg)
    await lab.mgr.start()
    info = lab.mgr.inspect_sandbox(lab.a)
    assert info.state.value == "ready" and info.network.allow_out == (f"{UP2}/32",)
    assert await lab.probe(lab.a, tcp(UP1), tcp(UP2)) == [False, True]
    assert await lab.probe(lab.b, tcp(lab.ip["a"]), tcp(UP1)) == [False, True], "B's nat policy, re-applied"
    chain = lab.nft("list", "table", "inet", lab.table)
    assert re.search(r"ip daddr 10\.242\.0\.3 accept", chain), chain

    await lab.mgr.remove_sandbox(lab.b, force=True)
    chain = lab.nft("list", "table", "inet", lab.table)
    tap_b = "sb_" + lab.mgr.adapters.network.tap_prefix.replace("-", "_")  # type: ignore[attr-defined]
    assert lab.ip["b"] not in chain and len(re.findall(tap_b, chain)) == 2, "only A's chain and its map entry"
    await lab.mgr.close()
    assert "arcbox_vm_" not in lab.nft("list", "tables")
    assert lab.nft("list", "ruleset").strip() == "", "nothing of ours (tables, chains, sets) is left"


async def test_without_netns_the_rules_live_in_the_host_namespace(backend, guest_image, tmp_path):
    """No traffic here (this is the host's namespace): the table and the lease's elements
    appear with the sandbox and are gone after close."""
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path, cidr="172.98.0.0/24"))
    try:
        sid, ip = await mgr.create_sandbox(SandboxSpec(network=SandboxNetworkSpec(deny_out=["192.0.2.0/24"])))
        table = "arcbox_vm_" + mgr.adapters.network.tag  # type: ignore[attr-defined]
        text = sh("nft", "list", "table", "inet", table).stdout
        assert ip in text and "192.0.2.0/24" in text and "masquerade" in text
        await mgr.remove_sandbox(sid, force=True)
        assert ip not in sh("nft", "list", "table", "inet", table).stdout
    finally:
        await mgr.close()
    assert table not in sh("nft", "list", "tables").stdout
