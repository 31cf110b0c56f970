"""The sandbox network as the manager sees it: leases of (IP, TAP, MAC, boot argument).

One object per manager. `start()` creates the namespace if configured (remembering
that we did), removes TAPs and NAT tables a crashed manager of the same data dir left
behind, and installs NAT when enabled; `close()` undoes all of that.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from arcbox_vm.config.sections import NetworkConfig
from arcbox_vm.network import nat, netns, tap
from arcbox_vm.network.pool import IpPool
from arcbox_vm.paths import manager_tag
from arcbox_vm.ports.network import NetworkLease

__all__ = ["NetworkLease", "TapNetwork", "guest_mac", "manager_tag"]

log = logging.getLogger(__name__)


def guest_mac(ip: str) -> str:
    """06:00:<ip bytes>: locally administered, unicast, derived from the address."""
    b = ipaddress.IPv4Address(ip).packed
    return "06:00:" + ":".join(f"{x:02x}" for x in b)


class TapNetwork:
    """The production `arcbox_vm.ports.Network`: TAPs (netlink), an IP pool, optional NAT."""

    def __init__(self, cfg: NetworkConfig, data_dir: Path) -> None:
        self.cfg = cfg
        self.tag = manager_tag(data_dir)
        self.tap_prefix = f"ab{self.tag}-"
        self.pool = IpPool(cfg.cidr, cfg.gateway)
        self.netns = cfg.netns
        self._created_netns = False
        # "we created this namespace" must survive a restart that adopts running VMs
        self._netns_marker = Path(data_dir) / "netns-created"
        self._started = False

    async def start(self, keep_taps: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Create the namespace if needed; remove our TAPs that no sandbox owns (`keep_taps`
        are re-adopted ones) and a stale NAT table; install NAT if configured."""
        if self._started:
            return
        if self.netns:
            created = netns.ensure(self.netns)
            marked = self._netns_marker.exists() and self._netns_marker.read_text().strip() == self.netns
            self._created_netns = created or marked
            if created:
                self._netns_marker.write_text(self.netns + "\n")
        for name in await tap.list_taps(self.netns, self.tap_prefix):
            if name in keep_taps:
                continue
            log.warning("removing TAP %s left behind by an earlier manager", name)
            await tap.delete_tap(self.netns, name)
        await nat.remove(self.netns, self.tag)
        if self.cfg.nat:
            await nat.install(self.netns, self.tag, self.cfg.cidr, self.tap_prefix)
        self._started = True

    def tap_name(self, ip: str) -> str:
        return f"{self.tap_prefix}{self.pool.offset(ip):x}"

    async def allocate(self, owner: str) -> NetworkLease:
        await self.start()
        ip = str(self.pool.allocate(owner))
        name = self.tap_name(ip)
        try:
            await tap.create_tap(self.netns, name, self.cfg.gateway, ip)
        except BaseException:
            self.pool.release(ip)
            raise
        args = [f"ip={ip}::{self.cfg.gateway}:{self.pool.netmask}::eth0:off"]
        if self.cfg.dns:
            args.append("arcbox.dns=" + ",".join(self.cfg.dns))
        return NetworkLease(ip, self.cfg.gateway, self.pool.netmask, name, guest_mac(ip), tuple(args))

    async def release_orphan(self, lease: NetworkLease) -> None:
        """Delete the TAP of a lease the pool does not hold (found in the state at start)."""
        if self.netns and not netns.exists(self.netns):
            return  # opening a missing namespace would create it
        await tap.delete_tap(self.netns, lease.tap_name)

    async def release(self, lease: NetworkLease) -> None:
        try:
            await tap.delete_tap(self.netns, lease.tap_name)
        finally:
            self.pool.release(lease.ip)

    async def close(self) -> None:
        if not self._started:
            return
        for name in await tap.list_taps(self.netns, self.tap_prefix):
            await tap.delete_tap(self.netns, name)
        await nat.remove(self.netns, self.tag)
        if self._created_netns:
            netns.remove(self.netns)
            self._netns_marker.unlink(missing_ok=True)
        self._started = False
