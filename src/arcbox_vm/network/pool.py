"""IPv4 address pool for sandboxes: lowest free address first.

The network, broadcast and gateway addresses are never handed out (the original skipped
"offset 1" assuming the gateway lived there, and could hand out the real gateway).
"""

from __future__ import annotations

import ipaddress

from arcbox_vm.errors import ResourceExhausted


class IpPool:
    def __init__(self, cidr: str, gateway: str) -> None:
        self.network = ipaddress.IPv4Network(cidr)
        self.gateway = ipaddress.IPv4Address(gateway)
        self._leases: dict[ipaddress.IPv4Address, str] = {}
        self._reserved = {self.network.network_address, self.network.broadcast_address, self.gateway}
        self._capacity = self.network.num_addresses - len({a for a in self._reserved if a in self.network})

    @property
    def netmask(self) -> str:
        return str(self.network.netmask)

    @property
    def capacity(self) -> int:
        return self._capacity

    def leases(self) -> dict[str, str]:
        return {str(ip): owner for ip, owner in self._leases.items()}

    def offset(self, ip: str | ipaddress.IPv4Address) -> int:
        return int(ipaddress.IPv4Address(ip)) - int(self.network.network_address)

    def allocate(self, owner: str) -> ipaddress.IPv4Address:
        """Lease the lowest free address to `owner`."""
        if len(self._leases) >= self._capacity:
            raise ResourceExhausted(
                f"IP pool {self.network} is exhausted ({self._capacity} addresses in use); remove sandboxes "
                "or configure a larger network.cidr"
            )
        for ip in self.network.hosts() if self.network.prefixlen < 31 else self.network:
            if ip not in self._reserved and ip not in self._leases:
                self._leases[ip] = owner
                return ip
        raise ResourceExhausted(f"IP pool {self.network} is exhausted")  # pragma: no cover

    def reserve(self, ip: str, owner: str) -> None:
        """Mark `ip` as leased (recovery). Raises ValueError if outside the pool or taken."""
        addr = ipaddress.IPv4Address(ip)
        if addr not in self.network or addr in self._reserved:
            raise ValueError(f"{addr} is not a leasable address of {self.network}")
        if self._leases.get(addr, owner) != owner:
            raise ValueError(f"{addr} is already leased to {self._leases[addr]}")
        self._leases[addr] = owner

    def release(self, ip: str | ipaddress.IPv4Address) -> None:
        self._leases.pop(ipaddress.IPv4Address(ip), None)
