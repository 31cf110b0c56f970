"""IP pool: lowest free first; network, broadcast and gateway never handed out."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcbox_vm.errors import ResourceExhausted
from arcbox_vm.network.backend import guest_mac
from arcbox_vm.paths import manager_tag
from arcbox_vm.network.pool import IpPool


def test_lowest_free_and_reuse():
    pool = IpPool("10.0.0.0/29", "10.0.0.1")
    got = [str(pool.allocate(f"s{i}")) for i in range(5)]
    assert got == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    with pytest.raises(ResourceExhausted, match="exhausted"):
        pool.allocate("more")
    pool.release("10.0.0.4")
    assert str(pool.allocate("again")) == "10.0.0.4"


def test_gateway_anywhere_in_the_range_is_excluded():
    pool = IpPool("10.0.0.0/29", "10.0.0.5")
    got = {str(pool.allocate(str(i))) for i in range(pool.capacity)}
    assert "10.0.0.5" not in got and "10.0.0.0" not in got and "10.0.0.7" not in got
    assert len(got) == 5


def test_slash_30_has_one_guest_address():
    pool = IpPool("10.0.0.0/30", "10.0.0.1")
    assert str(pool.allocate("a")) == "10.0.0.2"
    with pytest.raises(ResourceExhausted):
        pool.allocate("b")


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=24, max_value=30), st.lists(st.booleans(), max_size=80))
def test_pool_never_double_leases(prefix, ops):
    net = ipaddress.IPv4Network(f"10.9.0.0/{prefix}")
    pool = IpPool(str(net), "10.9.0.1")
    held: list[str] = []
    for alloc in ops:
        if alloc or not held:
            try:
                held.append(str(pool.allocate("x")))
            except ResourceExhausted:
                assert len(held) == pool.capacity
        else:
            pool.release(held.pop(0))
        assert len(set(held)) == len(held)
        assert all(ip not in ("10.9.0.0", "10.9.0.1", str(net.broadcast_address)) for ip in held)


def test_mac_is_local_unicast_and_tag_is_stable(tmp_path):
    mac = guest_mac("172.20.3.17")
    assert mac == "06:00:ac:14:03:11"
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b01
    assert manager_tag(tmp_path) == manager_tag(tmp_path) and len(manager_tag(tmp_path)) == 4
