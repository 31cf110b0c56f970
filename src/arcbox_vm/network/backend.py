"""The sandbox network as the manager sees it: leases of (IP, TAP, MAC, boot argument),
each with its firewall rules.

One object per manager. `start()` creates the namespace if configured (remembering
that we did), removes TAPs a crashed manager of the same data dir left behind and
replaces our nftables table (rules.py) in one transaction, with the rules of re-adopted
sandboxes; `close()` undoes all of that. Each lease's rules are added with it, replaced
by `set_policy` and removed with it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path

from arcbox_vm.config.sections import NetworkConfig
from arcbox_vm.network import firewall, netns, rules, tap
from arcbox_vm.network.pool import IpPool
from arcbox_vm.paths import manager_tag
from arcbox_vm.ports.network import EgressPolicy, NetworkLease

__all__ = ["NetworkLease", "TapNetwork", "guest_mac", "manager_tag"]

log = logging.getLogger(__name__)


def guest_mac(ip: str) -> str:
    """06:00:<ip bytes>: locally administered, unicast, derived from the address."""
    b = ipaddress.IPv4Address(ip).packed
    return "06:00:" + ":".join(f"{x:02x}" for x in b)


class TapNetwork:
    """The production `arcbox_vm.ports.Network`: TAPs (netlink), an IP pool, nftables rules."""

    def __init__(self, cfg: NetworkConfig, data_dir: Path) -> None:
        self.cfg = cfg
        self.tag = manager_tag(data_dir)
        self.tap_prefix = f"ab{self.tag}-"
        self.firewall = rules.Firewall.from_config(cfg, self.tag, self.tap_prefix)
        self.pool = IpPool(cfg.cidr, cfg.gateway)
        self.netns = cfg.netns
        self._created_netns = False
        # "we created this namespace" must survive a restart that adopts running VMs
        self._netns_marker = Path(data_dir) / "netns-created"
        self._started = False
        self._forwarding = False
        # TAPs whose rules may exist; rule changes run one at a time, so a policy update
        # racing a release can never re-add the rules of a lease that is gone
        self._live: set[str] = set()
        self._rules_lock: asyncio.Lock | None = None

    def _lock(self) -> asyncio.Lock:
        if self._rules_lock is None:
            self._rules_lock = asyncio.Lock()
        return self._rules_lock

    @property
    def table(self) -> str:
        """Our nftables table (family inet) in `netns`."""
        return self.firewall.table

    async def start(self, keep_taps: set[str] = frozenset(),  # type: ignore[assignment]
                    adopted: Sequence[tuple[NetworkLease, EgressPolicy | None]] = ()) -> None:
        """Create the namespace if needed; remove our TAPs that no sandbox owns (`keep_taps`
        are re-adopted ones); replace our table, with the `adopted` leases' rules."""
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
        async with self._lock():
            await firewall.nft(self.netns, self.firewall.install(adopted))
            self._live = {lease.tap_name for lease, _ in adopted}
        if any(rules.allows_egress(self.firewall.policy(p)) for _, p in adopted):
            await self._enable_forwarding()
        self._started = True

    async def _enable_forwarding(self) -> None:
        if not self._forwarding:
            await firewall.enable_forwarding(self.netns)
            self._forwarding = True

    def tap_name(self, ip: str) -> str:
        return f"{self.tap_prefix}{self.pool.offset(ip):x}"

    async def allocate(self, owner: str, policy: EgressPolicy | None = None) -> NetworkLease:
        await self.start()
        ip = str(self.pool.allocate(owner))
        name = self.tap_name(ip)
        args = [f"ip={ip}::{self.cfg.gateway}:{self.pool.netmask}::eth0:off"]
        if self.cfg.dns:
            args.append("arcbox.dns=" + ",".join(self.cfg.dns))
        lease = NetworkLease(ip, self.cfg.gateway, self.pool.netmask, name, guest_mac(ip), tuple(args))
        try:
            await tap.create_tap(self.netns, name, self.cfg.gateway, ip)
            self._live.add(name)
            try:
                await self.set_policy(lease, policy)
            except BaseException:
                await self._remove(lease)
                raise
        except BaseException:
            self.pool.release(ip)
            raise
        return lease

    async def set_policy(self, lease: NetworkLease, policy: EgressPolicy | None) -> None:
        """The lease's source check and egress policy, replacing what it had: one transaction.
        A lease released meanwhile is left alone."""
        if rules.allows_egress(self.firewall.policy(policy)):
            await self._enable_forwarding()
        async with self._lock():
            if lease.tap_name not in self._live:
                log.info("not setting the policy of %s: its lease was released", lease.tap_name)
                return
            await firewall.nft(self.netns, self.firewall.sandbox(lease, policy))

    async def _remove(self, lease: NetworkLease) -> None:
        try:
            async with self._lock():
                self._live.discard(lease.tap_name)
                await firewall.nft(self.netns, self.firewall.sandbox_removal(lease))
        finally:
            await tap.delete_tap(self.netns, lease.tap_name)

    async def release_orphan(self, lease: NetworkLease) -> None:
        """Delete the TAP of a lease the pool does not hold (found in the state at start);
        its rules go with the table `start` replaces."""
        if self.netns and not netns.exists(self.netns):
            return  # opening a missing namespace would create it
        await tap.delete_tap(self.netns, lease.tap_name)

    async def release(self, lease: NetworkLease) -> None:
        try:
            await self._remove(lease)
        finally:
            self.pool.release(lease.ip)

    async def close(self) -> None:
        if not self._started:
            return
        for name in await tap.list_taps(self.netns, self.tap_prefix):
            await tap.delete_tap(self.netns, name)
        async with self._lock():
            self._live.clear()
            await firewall.nft(self.netns, rules.removal(self.tag), check=False)
        if self._created_netns:
            netns.remove(self.netns)
            self._netns_marker.unlink(missing_ok=True)
        self._started = False
