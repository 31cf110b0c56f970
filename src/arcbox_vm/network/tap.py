"""TAP devices through netlink (pyroute2): one per sandbox, point-to-point /32.

Every TAP carries the gateway address locally with the guest's address as its peer, so
the kernel installs a /32 route to the guest through that TAP. There is no bridge: two
guests cannot reach each other at layer 2, and the firewall (rules.py) drops what the
host's routing would carry between them. IPv6 is disabled on every TAP.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Iterator

from pyroute2 import IPRoute

from arcbox_vm.errors import ArcboxError
from arcbox_vm.network.netns import entered


@contextmanager
def _ipr(netns: str) -> Iterator[IPRoute]:
    """This worker thread inside `netns` (setns, no fork) with a netlink socket there.

    The whole operation runs inside: TAP creation goes through /dev/net/tun, whose
    devices appear in the namespace of the thread that creates them."""
    with entered(netns):
        ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()


def _create(netns: str, name: str, gateway: str, guest_ip: str) -> None:
    with _ipr(netns) as ipr:
        for idx in ipr.link_lookup(ifname=name):  # stale device of the same name
            ipr.link("del", index=idx)
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        idx = ipr.link_lookup(ifname=name)[0]
        try:
            _disable_ipv6(name)  # before it is up: no link-local address, no neighbour discovery
            ipr.addr("add", index=idx, local=gateway, address=guest_ip, prefixlen=32)
            ipr.link("set", index=idx, state="up")
        except Exception:
            ipr.link("del", index=idx)
            raise


def _disable_ipv6(name: str) -> None:
    """No IPv6 on the TAP (the firewall drops it too). /proc/sys/net is the namespace of
    this thread, which `_ipr` entered; a host without IPv6 has nothing to disable."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except FileNotFoundError:
        pass


def _delete(netns: str, name: str) -> None:
    with _ipr(netns) as ipr:
        for idx in ipr.link_lookup(ifname=name):
            ipr.link("del", index=idx)


def _list(netns: str, prefix: str) -> list[str]:
    with _ipr(netns) as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return [n for n in names if n and n.startswith(prefix)]


async def create_tap(netns: str, name: str, gateway: str, guest_ip: str) -> None:
    try:
        await asyncio.to_thread(_create, netns, name, gateway, guest_ip)
    except Exception as exc:
        where = f" in network namespace {netns}" if netns else ""
        raise ArcboxError(f"creating TAP device {name}{where} failed: {exc} (creating TAPs needs root)") from exc


async def delete_tap(netns: str, name: str) -> None:
    await asyncio.to_thread(_delete, netns, name)


async def list_taps(netns: str, prefix: str) -> list[str]:
    return await asyncio.to_thread(_list, netns, prefix)

