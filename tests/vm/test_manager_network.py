"""TAP networking on real VMs, entirely inside network namespaces the test creates.

Layout: the manager's namespace NS holds the TAPs (gateway 10.231.0.1, guests from
10.231.0.0/24); a second namespace UP is a fake upstream joined to NS by a veth pair
(10.232.0.1 in NS, 10.232.0.2 in UP). UP has no route to the guests, so the guest reaches
10.232.0.2 only through our NAT (and only because the test's config excepts it from the
blocked private ranges). No packet leaves these namespaces. The isolation rules
themselves are tested in test_network_policy.py.
"""

from __future__ import annotations

import subprocess

import pytest

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec

from .manager_helpers import fresh_netns_name, iface_exists, make_config, netns_list

pytestmark = pytest.mark.vm


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


@pytest.fixture
def two_namespaces():
    ns, up = fresh_netns_name(), fresh_netns_name()
    veth_ns, veth_up = f"vn{ns[-6:]}", f"vu{up[-6:]}"
    for cmd in (
        ["ip", "netns", "add", ns], ["ip", "netns", "add", up],
        ["ip", "link", "add", veth_ns, "netns", ns, "type", "veth", "peer", "name", veth_up, "netns", up],
        ["ip", "-n", ns, "addr", "add", "10.232.0.1/30", "dev", veth_ns],
        ["ip", "-n", up, "addr", "add", "10.232.0.2/30", "dev", veth_up],
        ["ip", "-n", ns, "link", "set", veth_ns, "up"], ["ip", "-n", up, "link", "set", veth_up, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"], ["ip", "-n", up, "link", "set", "lo", "up"],
    ):
        res = sh(*cmd)
        assert res.returncode == 0, f"{cmd}: {res.stderr}"
    yield ns, up
    sh("ip", "netns", "del", ns)
    sh("ip", "netns", "del", up)


async def run(mgr, sid, argv):
    stream = await mgr.run_in_sandbox(sid, argv, timeout_seconds=60)
    return await stream.collect()


async def test_tap_ping_both_ways_nat_dns_and_cleanup(backend, guest_image, tmp_path, two_namespaces):
    ns, up = two_namespaces
    # nat = true is the old switch (default_egress "nat"); the upstream is a private address,
    # blocked unless excepted; the host answers pings only because host_allow says so
    cfg = make_config(backend, guest_image, tmp_path, cidr="10.231.0.0/24", netns=ns, nat=True,
                      dns=["10.232.0.2"], network={"blocked_except": ["10.232.0.0/30"],
                                                   "host_allow": ["10.231.0.1/icmp"]})
    mgr = SandboxManager(cfg)
    try:
        sid, ip = await mgr.create_sandbox(SandboxSpec(id="net-1"))
        assert ip == "10.231.0.2", "lowest free address after the gateway"
        await mgr.wait_ready(sid)
        tap = mgr.inspect_sandbox(sid).network.tap_name
        # host side (the manager's namespace) -> guest
        res = sh("ip", "netns", "exec", ns, "ping", "-c", "2", "-W", "3", ip)
        assert res.returncode == 0, res.stdout + res.stderr
        # guest -> gateway (host_allow)
        out, err, code = await run(mgr, sid, ["ping", "-c", "2", "-W", "3", "10.231.0.1"])
        assert code == 0, (out, err)
        assert mgr.inspect_sandbox(sid).network.egress == "nat"
        # guest -> the fake upstream, through our masquerade
        out, err, code = await run(mgr, sid, ["ping", "-c", "2", "-W", "3", "10.232.0.2"])
        assert code == 0, (out, err)
        # the guest got its address from ip= (configured by our agent) and DNS from the config
        out, _, _ = await run(mgr, sid, ["cat", "/etc/resolv.conf"])
        assert b"nameserver 10.232.0.2" in out
        out, _, _ = await run(mgr, sid, ["ip", "-4", "-o", "addr", "show", "eth0"])
        assert b"10.231.0.2/24" in out
        # our table exists in the namespace, not in the host's
        assert "arcbox_vm_" in sh("ip", "netns", "exec", ns, "nft", "list", "tables").stdout
        assert "arcbox_vm_" + mgr.adapters.network.tag not in sh("nft", "list", "tables").stdout
        await mgr.remove_sandbox(sid, force=True)
        assert not iface_exists(tap, ns)
    finally:
        await mgr.close()
    assert "arcbox_vm_" not in sh("ip", "netns", "exec", ns, "nft", "list", "tables").stdout
    assert ns in netns_list(), "a namespace the manager did not create must be left alone"


async def test_without_network_the_guest_has_no_eth0(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        sid, ip = await mgr.create_sandbox(SandboxSpec(network=SandboxNetworkSpec(mode="none")))
        assert ip == ""
        await mgr.wait_ready(sid)
        assert mgr.inspect_sandbox(sid).network is None
        out, _, code = await run(mgr, sid, ["sh", "-c", "ls /sys/class/net"])
        assert out.split() == [b"lo"]
    finally:
        await mgr.close()
