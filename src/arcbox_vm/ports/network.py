"""The network port: a lease of (IP, TAP, MAC, boot arguments) per sandbox."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class NetworkLease:
    ip: str
    gateway: str
    netmask: str
    tap_name: str
    mac: str
    boot_args: tuple[str, ...]


class AddressPool(Protocol):
    def reserve(self, ip: str, owner: str) -> None: ...

    def release(self, ip: str) -> None: ...


class Network(Protocol):
    """Sandbox networking as the manager uses it (TAPs via netlink in production)."""

    netns: str  # named network namespace the VMMs must run in ("" = the host's)
    pool: AddressPool

    async def start(self, keep_taps: set[str] = ...) -> None:
        """Set up (namespace, NAT) and remove what an earlier manager left, except `keep_taps`."""

    async def allocate(self, owner: str) -> NetworkLease: ...

    async def release(self, lease: NetworkLease) -> None: ...

    async def release_orphan(self, lease: NetworkLease) -> None:
        """Delete the TAP of a lease found in the state database that the pool does not hold."""

    async def close(self) -> None:
        """Undo everything `start` and `allocate` made."""
