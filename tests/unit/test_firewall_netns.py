"""The isolation rules on real packets, fast: no VM — each "guest" is a network namespace
behind a veth pair whose host end carries a TAP's name, address and route, so our table
treats it exactly like a sandbox's TAP.

Layout (all namespaces made here, nothing leaves them): NS holds the "TAPs" (gateway
10.231.0.1, guests .2 and .3) and our table; UP is a fake upstream behind a veth
(10.232.0.1 in NS; 10.232.0.2, 10.232.0.3 and 169.254.169.254 in UP), which has no route
to the guests: it is reached through our masquerade only.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time

import pytest

from arcbox_vm.config.sections import NetworkConfig
from arcbox_vm.network import firewall
from arcbox_vm.network.backend import guest_mac
from arcbox_vm.network.rules import Firewall
from arcbox_vm.ports.network import EgressPolicy, NetworkLease

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"),
                                reason="needs root, nft and ip (network namespaces)")

GW, UP1, UP2, META = "10.231.0.1", "10.232.0.2", "10.232.0.3", "169.254.169.254"
PORT = 8080

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
        print("udp", peer[0], data.decode(), flush=True)
        s.sendto(b"ok", peer)
threading.Thread(target=serve, args=("udp",), daemon=True).start()
print("listening", flush=True)
serve("tcp")
"""

# exit 0: answered; 1: no answer. udp sends `payload` (the listener logs it)
CLIENT = r"""
import socket, sys
proto, ip, port, src, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.settimeout(0.7)
if src:
    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT (root): send from any source address
    s.bind((src, 0))
try:
    if proto == "tcp":
        s.connect((ip, port))
    else:
        s.sendto(payload.encode(), (ip, port))
    sys.exit(0 if s.recv(2) == b"ok" else 2)
except OSError:
    sys.exit(1)
"""


class Listener:
    """A TCP + UDP listener in a namespace; `lines` is what it saw ("tcp <peer> <local>",
    "udp <peer> <payload>")."""

    def __init__(self, ns: str, port: int = PORT) -> None:
        self.proc = subprocess.Popen(in_ns(ns, sys.executable, "-c", SERVER, str(port)), stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "listening"
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def saw(self, text: str) -> bool:
        time.sleep(0.2)
        return any(text in line for line in self.lines)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(args), capture_output=True, text=True)
    if check:
        assert res.returncode == 0, f"{args}: {res.stderr}"
    return res


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


class Lab:
    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.prefix = f"ab{self.tag}-"
        n = secrets.token_hex(3)
        self.ns, self.up = f"arcbox-t-fw{n}", f"arcbox-t-up{n}"
        self.guests: dict[str, tuple[str, NetworkLease]] = {}  # name -> (namespace, lease)
        self.servers: list[Listener] = []
        self.fw = Firewall.from_config(
            NetworkConfig(cidr="10.231.0.0/24", gateway=GW, host_allow=[f"{GW}:{PORT + 1}/tcp"],
                          blocked_except=["10.232.0.0/30"]), self.tag, self.prefix)

    def up_all(self) -> None:
        ns, up = self.ns, self.up
        vn, vu = f"vn{self.tag}", f"vu{self.tag}"
        for cmd in (
            ["ip", "netns", "add", ns], ["ip", "netns", "add", up],
            ["ip", "link", "add", vn, "netns", ns, "type", "veth", "peer", "name", vu, "netns", up],
            ["ip", "-n", ns, "addr", "add", "10.232.0.1/24", "dev", vn],
            ["ip", "-n", up, "addr", "add", f"{UP1}/24", "dev", vu],
            ["ip", "-n", up, "addr", "add", f"{UP2}/24", "dev", vu],
            ["ip", "-n", up, "addr", "add", f"{META}/32", "dev", "lo"],
            ["ip", "-n", ns, "link", "set", vn, "up"], ["ip", "-n", up, "link", "set", vu, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"], ["ip", "-n", up, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "route", "add", f"{META}/32", "via", UP1],
        ):
            sh(*cmd)
        sh(*in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"))

    def guest(self, name: str, offset: int) -> NetworkLease:
        ip = f"10.231.0.{offset}"
        g = f"{self.ns}-{name}"
        tap = f"{self.prefix}{offset:x}"
        lease = NetworkLease(ip, GW, "255.255.255.0", tap, guest_mac(ip), ())
        for cmd in (
            ["ip", "netns", "add", g],
            ["ip", "link", "add", tap, "netns", self.ns, "type", "veth", "peer", "name", "eth0", "netns", g],
            ["ip", "-n", self.ns, "addr", "add", GW, "peer", f"{ip}/32", "dev", tap],
            ["ip", "-n", self.ns, "link", "set", tap, "up"],
            ["ip", "-n", g, "link", "set", "eth0", "address", lease.mac],
            ["ip", "-n", g, "addr", "add", f"{ip}/24", "dev", "eth0"],
            ["ip", "-n", g, "link", "set", "eth0", "up"], ["ip", "-n", g, "link", "set", "lo", "up"],
            ["ip", "-n", g, "route", "add", "default", "via", GW],
        ):
            sh(*cmd)
        self.guests[name] = (g, lease)
        return lease

    def serve(self, ns: str, port: int = PORT) -> Listener:
        listener = Listener(ns, port)
        self.servers.append(listener)
        return listener

    def connect(self, guest: str, ip: str, port: int = PORT, src: str = "", proto: str = "tcp",
                payload: str = "-") -> bool:
        g, _ = self.guests[guest]
        res = sh(*in_ns(g, sys.executable, "-c", CLIENT, proto, ip, str(port), src, payload), check=False)
        assert res.returncode in (0, 1), res.stderr
        return res.returncode == 0

    def route_via_gateway(self, guest: str, ip: str) -> None:
        """What a hostile guest does to reach a neighbour of its /24 at layer 3 (the host
        answers no ARP for other guests)."""
        g, _ = self.guests[guest]
        sh("ip", "-n", g, "route", "replace", f"{ip}/32", "via", GW)

    def ping(self, guest: str, ip: str) -> bool:
        g, _ = self.guests[guest]
        return sh(*in_ns(g, "ping", "-c", "1", "-W", "1", ip), check=False).returncode == 0

    def apply(self, script: str) -> None:
        asyncio.run(firewall.nft(self.ns, script))

    def tables(self) -> str:
        return sh(*in_ns(self.ns, "nft", "list", "tables")).stdout

    def close(self) -> None:
        for listener in self.servers:
            listener.stop()
        for g, _ in self.guests.values():
            sh("ip", "netns", "del", g, check=False)
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "netns", "del", self.up, check=False)


@pytest.fixture
def lab():
    lab = Lab()
    try:
        lab.up_all()
        yield lab
    finally:
        lab.close()


def test_isolation_on_real_packets(lab: Lab):
    a = lab.guest("a", 2)
    b = lab.guest("b", 3)
    lab.apply(lab.fw.install([(a, EgressPolicy("none", (UP1 + "/32", META + "/32"))), (b, EgressPolicy("nat"))]))
    host = lab.serve(lab.ns)  # every address of the manager's namespace, the gateway included
    up = lab.serve(lab.up)
    at_b = lab.serve(f"{lab.ns}-b")

    # the host: nothing but the operator's host_allow (port 8081 is allowed, 8080 is not)
    assert not lab.connect("a", GW) and not lab.connect("a", "10.232.0.1"), "the host's own addresses"
    assert not lab.connect("a", GW, proto="udp") and not lab.ping("a", GW)
    assert not host.lines, host.lines
    lab.serve(lab.ns, PORT + 1)
    assert lab.connect("a", GW, PORT + 1)
    # but the host reaches a guest (its replies come back as established)
    assert sh(*in_ns(lab.ns, "ping", "-c", "1", "-W", "2", a.ip), check=False).returncode == 0

    # sandbox <-> sandbox: neither ping nor TCP nor UDP, either way — even routed through the
    # gateway on purpose, and although b may leave through NAT
    lab.route_via_gateway("a", b.ip)
    lab.route_via_gateway("b", a.ip)
    assert not lab.connect("a", b.ip) and not lab.ping("a", b.ip)
    assert not lab.connect("a", b.ip, proto="udp", payload="a-to-b")
    assert not lab.connect("b", a.ip) and not lab.ping("b", a.ip)
    assert not at_b.lines, at_b.lines

    # allow_out: UP1 yes, UP2 no; the metadata address stays blocked although allow_out lists it
    assert lab.connect("a", UP1) and lab.ping("a", UP1)
    assert not lab.connect("a", UP2)
    assert not lab.connect("a", META)
    # egress nat: anything not blocked (10.232.0.0/30 is excepted: UP1, UP2), never the metadata address
    assert lab.connect("b", UP1) and lab.connect("b", UP2) and not lab.connect("b", META)

    # spoofing: another source address, or another MAC, on the guest's own TAP: never arrives
    assert lab.connect("a", UP1, proto="udp", payload="legit")
    assert up.saw("legit"), "the listener logs what arrives"
    for i, src in enumerate(("10.231.0.99", b.ip, "10.232.0.3", "8.8.8.8")):
        lab.connect("a", UP1, src=src, proto="udp", payload=f"spoof-{i}")
    ga, _ = lab.guests["a"]
    sh("ip", "-n", ga, "link", "set", "eth0", "address", "06:00:de:ad:be:ef")
    assert not lab.connect("a", UP1, proto="udp", payload="spoof-mac")
    assert not up.saw("spoof"), up.lines
    sh("ip", "-n", ga, "link", "set", "eth0", "address", a.mac)
    assert lab.connect("a", UP1)

    # a policy update takes effect at once: deny wins over allow
    lab.apply(lab.fw.sandbox(a, EgressPolicy("nat", (UP1 + "/32",), (UP1 + "/32",))))
    assert not lab.connect("a", UP1) and lab.connect("a", UP2)
    lab.apply(lab.fw.sandbox(a, EgressPolicy("none")))
    assert not lab.connect("a", UP1) and not lab.connect("a", UP2)

    # a removed lease passes nothing any more (its TAP name is unknown: fail closed)
    lab.apply(lab.fw.sandbox_removal(b))
    assert not lab.connect("b", UP1)
    out = sh(*in_ns(lab.ns, "nft", "list", "table", "inet", lab.fw.table)).stdout
    assert "sb_" + lab.prefix.replace("-", "_") + "3" not in out and b.mac not in out

    # the port-8080 listener on the host never saw a guest
    assert not host.lines, host.lines
    lab.apply(f"add table inet {lab.fw.table}\ndelete table inet {lab.fw.table}\n")
    assert "arcbox_vm_" not in lab.tables()


def test_without_our_table_the_same_lab_is_wide_open(lab: Lab):
    """The control: every check above fails for the reason it claims, not for a routing gap."""
    a = lab.guest("a", 2)
    b = lab.guest("b", 3)
    sh("ip", "-n", lab.up, "route", "add", "10.231.0.0/24", "via", "10.232.0.1")  # no masquerade without us
    lab.route_via_gateway("a", b.ip)
    lab.route_via_gateway("b", a.ip)
    host, up, at_b = lab.serve(lab.ns), lab.serve(lab.up), lab.serve(f"{lab.ns}-b")
    assert lab.connect("a", GW) and lab.ping("a", GW) and host.lines
    assert lab.connect("a", b.ip) and at_b.lines
    assert lab.connect("a", UP2) and lab.connect("a", META)
    lab.connect("a", UP1, src="10.231.0.99", proto="udp", payload="spoof-0")
    assert up.saw("spoof-0")


def test_a_policy_change_cuts_an_open_connection(lab: Lab):
    """Every packet out of a sandbox is checked (no 'established' shortcut on the way out)."""
    a = lab.guest("a", 2)
    lab.apply(lab.fw.install([(a, EgressPolicy("none", (UP1 + "/32",)))]))
    g, _ = lab.guests["a"]
    echo = r"""
import socket, sys
s = socket.socket(); s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
while True:
    d = c.recv(100)
    if not d: break
    c.sendall(d)
"""
    srv = subprocess.Popen(in_ns(lab.up, sys.executable, "-c", echo, str(PORT)), stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
    talk = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
s.sendall(b"1"); assert s.recv(1) == b"1"
print("open", flush=True)
sys.stdin.readline()
s.settimeout(2)
try:
    s.sendall(b"2"); print("echo" if s.recv(1) == b"2" else "closed", flush=True)
except OSError:
    print("cut", flush=True)
"""
    client = subprocess.Popen(in_ns(g, sys.executable, "-c", talk, UP1, str(PORT)), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None and client.stdin is not None
    assert client.stdout.readline().strip() == "open"
    lab.apply(lab.fw.sandbox(a, EgressPolicy("none", (), ())))
    client.stdin.write("\n")
    client.stdin.flush()
    t0 = time.monotonic()
    assert client.stdout.readline().strip() == "cut"
    assert time.monotonic() - t0 < 10
    client.wait()
    srv.kill()
    srv.wait()
