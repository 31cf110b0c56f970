"""The VMM's end of a TAP (vmm/tun.py), on a real TAP in a network namespace of the test's
own: a descriptor the daemon opens there for a confined QEMU (vnet headers on), and the
owner a jailed Firecracker needs."""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import struct
import subprocess

import pytest

from arcbox_vm.errors import VmmError
from arcbox_vm.vmm import tun

TUNGETIFF = 0x800454D2


@pytest.fixture
def tap_in_netns():
    assert os.geteuid() == 0, "the suite runs as root (TAPs, namespaces)"
    ns, name = f"arcbox-t-{secrets.token_hex(3)}", f"abt-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", name, "mode", "tap"], check=True)
        yield ns, name
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def sysfs(ns: str, name: str, attr: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{name}/{attr}"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_open_tap_in_its_namespace_with_vnet_headers(tap_in_netns):
    ns, name = tap_in_netns
    fd = asyncio.run(tun.open_tap(ns, name))
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, b"\0" * 40)
        got_name, flags = struct.unpack("16sH22x", ifr)
        assert got_name.rstrip(b"\0").decode() == name
        assert flags & tun.IFF_TAP and flags & tun.IFF_NO_PI and flags & tun.IFF_VNET_HDR
        assert os.get_inheritable(fd) is False, "only passed on on purpose (pass_fds)"
    finally:
        os.close(fd)
    with pytest.raises(VmmError, match=f"cannot open TAP device {name} in network namespace"):
        asyncio.run(tun.open_tap(ns + "x", name))  # no such namespace


def test_set_owner_gives_the_tap_to_a_jailed_uid(tap_in_netns):
    ns, name = tap_in_netns
    asyncio.run(tun.set_owner(ns, name, 5001, 5002))
    assert (sysfs(ns, name, "owner"), sysfs(ns, name, "group")) == ("5001", "5002")
    assert sysfs(ns, name, "tun_flags").lower().startswith("0x"), "still a (persistent) TAP"


def test_bad_names_are_refused():
    with pytest.raises(VmmError, match="bad TAP device name"):
        tun._ifreq("x" * 16, tun.IFF_TAP)
