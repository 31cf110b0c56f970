"""The network port: a lease of (IP, TAP, MAC, boot arguments) per sandbox, and the
sandbox's egress policy (what it may reach beyond its TAP)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Egress = Literal["none", "nat"]


@dataclass(frozen=True)
class NetworkLease:
    ip: str
    gateway: str
    netmask: str
    tap_name: str
    mac: str
    boot_args: tuple[str, ...]


@dataclass(frozen=True)
class EgressPolicy:
    """What one sandbox may reach, resolved (no defaults left to fill in).

    egress "none": nothing but `allow_out`; "nat": anything, through NAT. `deny_out`
    wins over both. CIDRs are normalised IPv4 networks (`models.egress_cidrs`). The
    operator's `[network] blocked` ranges, the host itself and other sandboxes stay out
    of reach whatever this says."""

    egress: Egress = "none"
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"egress": self.egress, "allow_out": list(self.allow_out), "deny_out": list(self.deny_out)}

    @classmethod
    def from_json(cls, data: dict) -> "EgressPolicy":
        return cls(data.get("egress", "none"), tuple(data.get("allow_out", ())), tuple(data.get("deny_out", ())))


class AddressPool(Protocol):
    def reserve(self, ip: str, owner: str) -> None: ...

    def release(self, ip: str) -> None: ...


class Network(Protocol):
    """Sandbox networking as the manager uses it (TAPs via netlink in production).

    Isolation is the adapter's job: a sandbox reaches neither the host nor other
    sandboxes, sends only from its lease's address and MAC, and reaches beyond its TAP
    only what its `EgressPolicy` allows. `policy=None` means the configured default
    (`[network] default_egress`, no allow/deny lists)."""

    netns: str  # named network namespace the VMMs must run in ("" = the host's)
    pool: AddressPool

    async def start(self, keep_taps: set[str] = ...,
                    adopted: Sequence[tuple[NetworkLease, EgressPolicy | None]] = ()) -> None:
        """Set up (namespace, filter and NAT rules) and remove what an earlier manager left,
        except `keep_taps`; the `adopted` leases (re-adopted sandboxes) get their rules in
        the same step."""

    async def allocate(self, owner: str, policy: EgressPolicy | None = None) -> NetworkLease:
        """A new lease with its rules (source check, `policy`) in place."""

    async def set_policy(self, lease: NetworkLease, policy: EgressPolicy | None) -> None:
        """Replace the egress policy of a live lease, atomically."""

    async def release(self, lease: NetworkLease) -> None:
        """Remove the lease's rules and TAP, and free its address."""

    async def release_orphan(self, lease: NetworkLease) -> None:
        """Delete the TAP of a lease found in the state database that the pool does not hold."""

    async def close(self) -> None:
        """Undo everything `start` and `allocate` made."""
