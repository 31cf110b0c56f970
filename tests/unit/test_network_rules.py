"""The nftables text that isolates sandboxes (network/rules.py: pure functions), the
configuration and spec fields it comes from, and — where nft and root are at hand — that
the kernel accepts it (`nft -c`: checked, never committed, in a throwaway namespace)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from arcbox_vm.config.sections import DEFAULT_BLOCKED, NetworkConfig, parse_host_allow
from arcbox_vm.models import SandboxNetworkSpec, SandboxSpec, egress_cidrs
from arcbox_vm.network.rules import Firewall, allows_egress, blocked_ranges, collapse, removal, sandbox_chain
from arcbox_vm.ports.network import EgressPolicy, NetworkLease

TAG = "1a2b"
PREFIX = f"ab{TAG}-"
LEASE = NetworkLease("172.20.0.2", "172.20.0.1", "255.255.0.0", f"{PREFIX}2", "06:00:ac:14:00:02", ())


def firewall(**cfg: object) -> Firewall:
    return Firewall.from_config(NetworkConfig(**cfg), TAG, PREFIX)


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def chain(text: str, name: str) -> list[str]:
    """The body lines of chain `name` in a ruleset."""
    body, inside = [], False
    for line in lines(text):
        if line == f"chain {name} {{":
            inside = True
        elif inside and line == "}":
            return body
        elif inside:
            body.append(line)
    raise AssertionError(f"no chain {name}")


# -- the table -------------------------------------------------------------------------


def test_table_is_inet_named_after_the_tag_and_hooks_every_path():
    text = firewall().ruleset()
    assert text.startswith("table inet arcbox_vm_1a2b {")
    hooks = {name: chain(text, name)[0] for name in ("prerouting", "input", "forward", "output", "postrouting")}
    assert hooks["prerouting"] == "type filter hook prerouting priority raw; policy accept;", "before conntrack"
    assert hooks["input"] == "type filter hook input priority filter; policy accept;"
    assert hooks["forward"] == "type filter hook forward priority filter; policy accept;"
    assert hooks["postrouting"] == "type nat hook postrouting priority srcnat; policy accept;"
    # policies stay accept: only traffic of our TAPs is judged, the host's own is not ours to touch
    assert all("policy accept" in h for h in hooks.values())


def test_source_check_and_ipv6():
    pre = chain(firewall().ruleset(), "prerouting")[1:]
    assert pre == [f'iifname "{PREFIX}*" meta nfproto ipv6 drop',
                   f'iifname "{PREFIX}*" iifname . ip saddr . ether saddr != @leases drop']
    assert chain(firewall().ruleset(), "output")[1:] == [f'oifname "{PREFIX}*" meta nfproto ipv6 drop']


def test_host_gets_only_replies_and_the_operator_allowances():
    text = firewall(host_allow=["172.20.0.1:53/udp", "172.20.0.1:53/tcp", "172.20.0.1/icmp"]).ruleset()
    assert chain(text, "input")[1:] == [f'iifname "{PREFIX}*" jump guest_to_host']
    assert chain(text, "guest_to_host") == [
        "ct state established,related accept",
        "ip daddr 172.20.0.1 udp dport 53 accept",
        "ip daddr 172.20.0.1 tcp dport 53 accept",
        "ip daddr 172.20.0.1 icmp type echo-request accept",
        "drop",
    ]
    assert chain(firewall().ruleset(), "guest_to_host") == ["ct state established,related accept", "drop"]


def test_forward_no_tap_to_tap_nothing_new_in_every_packet_out_checked():
    text = firewall().ruleset()
    p = f'"{PREFIX}*"'
    assert chain(text, "forward")[1:] == [
        f"iifname {p} oifname {p} drop",
        f"oifname {p} ct state established,related accept",
        f"oifname {p} drop",
        f"iifname {p} jump guest_out",
    ]
    # no "established" shortcut out of a sandbox: a narrowed policy cuts open connections
    assert chain(text, "guest_out") == ["ip daddr @blocked drop", "iifname vmap @egress", "drop"]
    assert chain(text, "postrouting")[1:] == [f"ip saddr 172.20.0.0/16 oifname != {p} masquerade"]


def test_blocked_set_holds_the_defaults_and_the_sandbox_network():
    text = firewall(cidr="100.100.0.0/24", gateway="100.100.0.1", blocked=["169.254.0.0/16"]).ruleset()
    assert "elements = { 100.100.0.0/24, 169.254.0.0/16 };" in text
    default = firewall().blocked
    for net in DEFAULT_BLOCKED:
        assert any(ipaddress.IPv4Network(net).subnet_of(ipaddress.IPv4Network(b)) for b in default), net


def test_an_empty_blocked_list_still_blocks_the_sandbox_network():
    fw = firewall(blocked=[])
    assert fw.blocked == ("172.20.0.0/16",)


# -- blocked minus the operator's exceptions --------------------------------------------


def test_blocked_except_opens_a_hole():
    got = blocked_ranges(["10.0.0.0/8"], ["10.232.0.0/30"], "172.20.0.0/16")
    nets = [ipaddress.IPv4Network(n) for n in got]
    assert ipaddress.IPv4Network("172.20.0.0/16") in nets
    for ip in ("10.232.0.1", "10.232.0.2", "10.232.0.3"):
        assert not any(ipaddress.IPv4Address(ip) in n for n in nets)
    for ip in ("10.0.0.1", "10.232.0.4", "10.255.255.255", "10.232.0.0" if False else "10.231.255.255"):
        assert any(ipaddress.IPv4Address(ip) in n for n in nets), ip


def test_blocked_except_covering_a_whole_range_and_outside_any():
    assert blocked_ranges(["10.0.0.0/8", "169.254.0.0/16"], ["10.0.0.0/7", "8.8.8.8/32"], "192.168.5.0/24") == \
        ["169.254.0.0/16", "192.168.5.0/24"]


def test_the_sandbox_network_cannot_be_excepted():
    assert "172.20.0.0/16" in blocked_ranges([], ["172.16.0.0/12"], "172.20.0.0/16")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(4, 32)), max_size=5),
       st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(4, 32)), max_size=5),
       st.integers(0, 2**32 - 1))
def test_blocked_ranges_is_the_set_difference(blocked, excepted, probe):
    def nets(pairs):
        return [str(ipaddress.IPv4Network((a, p), strict=False)) for a, p in pairs]

    b, e = nets(blocked), nets(excepted)
    got = [ipaddress.IPv4Network(n) for n in blocked_ranges(b, e, "198.18.0.0/24")]
    ip = ipaddress.IPv4Address(probe)
    expected = (any(ip in ipaddress.IPv4Network(n) for n in b) and not any(ip in ipaddress.IPv4Network(n) for n in e)) \
        or ip in ipaddress.IPv4Network("198.18.0.0/24")
    assert any(ip in n for n in got) == expected
    assert all(not x.overlaps(y) for i, x in enumerate(got) for y in got[i + 1:]), "nft needs disjoint intervals"


# -- one sandbox ------------------------------------------------------------------------


def test_sandbox_rules_nat_with_deny():
    script = firewall().sandbox(LEASE, EgressPolicy("nat", (), ("1.2.3.0/24",)))
    assert lines(script) == [
        "add chain inet arcbox_vm_1a2b sb_ab1a2b_2",
        "flush chain inet arcbox_vm_1a2b sb_ab1a2b_2",
        "add rule inet arcbox_vm_1a2b sb_ab1a2b_2 ip daddr { 1.2.3.0/24 } drop",
        "add rule inet arcbox_vm_1a2b sb_ab1a2b_2 accept",
        f'add element inet arcbox_vm_1a2b leases {{ "{PREFIX}2" . 172.20.0.2 . 06:00:ac:14:00:02 }}',
        f'add element inet arcbox_vm_1a2b egress {{ "{PREFIX}2" : jump sb_ab1a2b_2 }}',
    ]


def test_sandbox_rules_none_with_allow_deny_first_then_drop():
    script = lines(firewall().sandbox(LEASE, EgressPolicy("none", ("8.8.8.0/24", "10.1.0.0/16"), ("8.8.8.8/32",))))
    rules = [line for line in script if line.startswith("add rule")]
    assert rules == [
        "add rule inet arcbox_vm_1a2b sb_ab1a2b_2 ip daddr { 8.8.8.8/32 } drop",
        "add rule inet arcbox_vm_1a2b sb_ab1a2b_2 ip daddr { 8.8.8.0/24, 10.1.0.0/16 } accept",
        "add rule inet arcbox_vm_1a2b sb_ab1a2b_2 drop",
    ]


def test_sandbox_rules_none_reaches_nothing():
    rules = [line for line in lines(firewall().sandbox(LEASE, EgressPolicy())) if line.startswith("add rule")]
    assert rules == ["add rule inet arcbox_vm_1a2b sb_ab1a2b_2 drop"]


def test_no_policy_means_the_configured_default():
    assert "sb_ab1a2b_2 accept" in firewall(default_egress="nat").sandbox(LEASE, None)
    assert "sb_ab1a2b_2 drop" in firewall().sandbox(LEASE, None)
    assert "sb_ab1a2b_2 accept" in firewall(nat=True).sandbox(LEASE, None), "nat = true is default_egress nat"


def test_overlapping_cidrs_are_merged():
    assert collapse(["10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8"]) == ["10.0.0.0/7"]
    script = firewall().sandbox(LEASE, EgressPolicy("none", ("10.0.0.0/8", "10.1.0.0/16")))
    assert "ip daddr { 10.0.0.0/8 } accept" in script


def test_replacing_a_policy_is_the_same_idempotent_script():
    """Flush + refill in one transaction: applying it again, or over another policy, is fine."""
    a = firewall().sandbox(LEASE, EgressPolicy("nat"))
    assert lines(a)[:2] == ["add chain inet arcbox_vm_1a2b sb_ab1a2b_2", "flush chain inet arcbox_vm_1a2b sb_ab1a2b_2"]


def test_removal_never_fails_on_missing_parts():
    got = lines(firewall().sandbox_removal(LEASE))
    for i, line in enumerate(got):
        if line.startswith("delete element") or line.startswith("delete chain"):
            what = line.split()[4]
            assert any(prev.startswith("add") and what in prev for prev in got[:i]), line
    assert "delete chain inet arcbox_vm_1a2b sb_ab1a2b_2" in got


def test_install_replaces_the_table_and_adds_adopted_sandboxes():
    script = firewall().install([(LEASE, EgressPolicy("nat"))])
    assert script.startswith(removal(TAG))
    assert "add table ip arcbox_vm_1a2b\ndelete table ip arcbox_vm_1a2b" in script, "the NAT table of older versions"
    assert script.index("table inet arcbox_vm_1a2b {") < script.index("sb_ab1a2b_2 accept")


def test_chain_names_and_egress():
    assert sandbox_chain("ab1a2b-1f") == "sb_ab1a2b_1f"
    assert allows_egress(EgressPolicy("nat")) and allows_egress(EgressPolicy("none", ("1.1.1.1/32",)))
    assert not allows_egress(EgressPolicy("none", (), ("1.1.1.1/32",)))


def test_policy_json_round_trip():
    pol = EgressPolicy("none", ("1.1.1.1/32",), ("2.0.0.0/8",))
    assert EgressPolicy.from_json(pol.to_json()) == pol
    assert EgressPolicy.from_json({}) == EgressPolicy()


# -- configuration and spec ---------------------------------------------------------------


def test_network_config_defaults_isolate():
    cfg = NetworkConfig()
    assert cfg.default_egress == "none" and cfg.host_allow == [] and cfg.blocked_except == []
    assert cfg.blocked == DEFAULT_BLOCKED
    assert "169.254.0.0/16" in cfg.blocked and "100.64.0.0/10" in cfg.blocked


def test_nat_true_is_the_old_default_egress_nat():
    assert NetworkConfig(nat=True).default_egress == "nat"
    assert NetworkConfig(nat=True, default_egress="none").default_egress == "none"


@pytest.mark.parametrize("entry, parsed", [
    ("172.20.0.1:53/udp", ("172.20.0.1", 53, "udp")),
    (" 10.0.0.1:8080/TCP", ("10.0.0.1", 8080, "tcp")),
    ("172.20.0.1/icmp", ("172.20.0.1", 0, "icmp")),
])
def test_host_allow_parses(entry, parsed):
    assert parse_host_allow(entry) == parsed


@pytest.mark.parametrize("entry", ["172.20.0.1:53", "172.20.0.1/udp", "172.20.0.1:0/tcp", "172.20.0.1:70000/tcp",
                                   "host:53/udp", "[::1]:53/udp", "172.20.0.1:53/sctp", "1.2.3.4:53/udp; drop"])
def test_host_allow_refuses(entry):
    with pytest.raises(ValidationError, match="host_allow"):
        NetworkConfig(host_allow=[entry])


def test_blocked_entries_must_be_networks():
    with pytest.raises(ValidationError, match="blocked"):
        NetworkConfig(blocked=["10.0.0.1/8"])
    with pytest.raises(ValidationError, match="blocked_except"):
        NetworkConfig(blocked_except=["nope"])


def test_spec_egress_fields():
    net = SandboxNetworkSpec(egress="nat", allow_out=["1.2.3.4", "10.0.0.0/8", "1.2.3.4/32"], deny_out=["9.9.9.9"])
    assert net.allow_out == ["1.2.3.4/32", "10.0.0.0/8"] and net.deny_out == ["9.9.9.9/32"]
    assert SandboxSpec().network.egress is None, "None = the daemon's default_egress"


@pytest.mark.parametrize("kw, match", [
    ({"egress": "open"}, "egress"),
    ({"allow_out": "1.2.3.4/32"}, "list"),
    ({"allow_out": ["10.0.0.1/8"]}, "host bits"),
    ({"deny_out": ["::/0"]}, "IPv6"),
    ({"allow_out": ["1.2.3.4/32 } accept; drop"]}, "not a CIDR"),
    ({"allow_out": [f"10.0.{i // 256}.{i % 256}" for i in range(257)]}, "at most"),
    ({"mode": "none", "allow_out": ["1.2.3.4/32"]}, "mode 'tap'"),
])
def test_spec_refuses(kw, match):
    with pytest.raises(ValidationError, match=match):
        SandboxNetworkSpec(**kw)


def test_egress_cidrs_helper():
    assert egress_cidrs([]) == []
    assert egress_cidrs(("0.0.0.0/0",)) == ["0.0.0.0/0"]


# -- the kernel accepts the text -----------------------------------------------------------


def _nft_check(script: str) -> subprocess.CompletedProcess:
    # a throwaway namespace; -c checks the transaction and commits nothing
    return subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=script, capture_output=True, text=True)


needs_nft = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"),
                               reason="checking rules needs root, nft and unshare")


@needs_nft
def test_nft_accepts_the_whole_script():
    fw = firewall(host_allow=["172.20.0.1:53/udp", "172.20.0.1/icmp"], blocked_except=["10.232.0.0/24"])
    other = NetworkLease("172.20.0.3", "172.20.0.1", "255.255.0.0", f"{PREFIX}3", "06:00:ac:14:00:03", ())
    script = fw.install([(LEASE, EgressPolicy("nat", (), ("8.8.8.8/32",))), (other, None)])
    script += fw.sandbox(LEASE, EgressPolicy("none", ("0.0.0.0/0", "1.1.1.1/32"), ("1.0.0.0/8",)))
    script += fw.sandbox_removal(other) + fw.sandbox_removal(other)
    res = _nft_check(script)
    assert res.returncode == 0, res.stderr
