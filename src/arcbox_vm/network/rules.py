"""The nftables rules that isolate sandboxes: pure functions from configuration and
leases to `nft -f` scripts (running them is firewall.py's job).

One table of ours, family inet (IPv4 and IPv6), named after the data dir's tag, so
start-up can delete whatever a crashed manager left without touching anyone else's
rules. `P*` below is our TAP prefix (`ab<tag>-*`).

- prerouting (priority raw, before conntrack): from a TAP, IPv6 is dropped, and IPv4
  only with the lease's source address and MAC (`leases`: TAP . IP . MAC) passes.
- input (traffic to the host itself, any of its addresses): from a TAP only replies to
  connections the host opened, and the operator's `host_allow`.
- forward: TAP to TAP dropped; into a TAP only replies (no new connection reaches a
  sandbox from another network); out of a TAP the destination is checked on *every*
  packet (so a policy change cuts open connections too): `blocked` drops, then the
  sandbox's own chain (`egress` map: TAP -> jump sb_<TAP>): deny_out drops, allow_out
  accepts, then egress "nat" accepts or "none" drops. Unknown TAP: dropped.
- output: no IPv6 to a TAP.
- postrouting: guest traffic leaving through a non-sandbox interface is masqueraded.

Per-sandbox state is one set element, one map element and one small chain, replaced
(flush + refill) or removed in one `nft -f` transaction: atomic, and correct whatever
was there before.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from arcbox_vm.config.sections import NetworkConfig, parse_host_allow
from arcbox_vm.ports.network import EgressPolicy, NetworkLease

FAMILY = "inet"


def table_name(tag: str) -> str:
    return f"arcbox_vm_{tag}"


def sandbox_chain(tap_name: str) -> str:
    """The name of a TAP's policy chain (nft names take no '-')."""
    return "sb_" + tap_name.replace("-", "_")


def blocked_ranges(blocked: Iterable[str], blocked_except: Iterable[str], cidr: str) -> list[str]:
    """`blocked` minus `blocked_except`, plus the sandbox network itself: disjoint, sorted."""
    nets = [ipaddress.IPv4Network(b) for b in blocked]
    for hole in (ipaddress.IPv4Network(e) for e in blocked_except):
        out: list[ipaddress.IPv4Network] = []
        for net in nets:
            if hole.supernet_of(net):
                continue  # wholly opened
            if net.supernet_of(hole):
                out.extend(net.address_exclude(hole))
            else:
                out.append(net)
        nets = out
    nets.append(ipaddress.IPv4Network(cidr))
    return [str(n) for n in ipaddress.collapse_addresses(nets)]


def collapse(cidrs: Iterable[str]) -> list[str]:
    """Overlapping or adjacent CIDRs merged (nft refuses overlapping interval elements)."""
    return [str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv4Network(c) for c in cidrs)]


def allows_egress(policy: EgressPolicy) -> bool:
    """Whether the policy lets anything leave (then IPv4 forwarding must be on)."""
    return policy.egress == "nat" or bool(policy.allow_out)


@dataclass(frozen=True)
class Firewall:
    """Everything the table depends on, from the configuration."""

    tag: str
    tap_prefix: str
    cidr: str
    blocked: tuple[str, ...]
    host_allow: tuple[str, ...]
    default_egress: str = "none"

    @classmethod
    def from_config(cls, cfg: NetworkConfig, tag: str, tap_prefix: str) -> "Firewall":
        return cls(tag=tag, tap_prefix=tap_prefix, cidr=cfg.cidr,
                   blocked=tuple(blocked_ranges(cfg.blocked, cfg.blocked_except, cfg.cidr)),
                   host_allow=tuple(cfg.host_allow), default_egress=cfg.default_egress)

    @property
    def table(self) -> str:
        return table_name(self.tag)

    def policy(self, policy: EgressPolicy | None) -> EgressPolicy:
        return policy if policy is not None else EgressPolicy(self.default_egress)  # type: ignore[arg-type]

    def install(self, adopted: Sequence[tuple[NetworkLease, EgressPolicy | None]] = ()) -> str:
        """Replace our table (whatever an earlier manager left) and add the `adopted`
        sandboxes' rules: one transaction."""
        script = removal(self.tag) + self.ruleset()
        for lease, policy in adopted:
            script += self.sandbox(lease, policy)
        return script

    def ruleset(self) -> str:
        t, p = self.table, f'"{self.tap_prefix}*"'
        blocked = _elements(self.blocked)
        host_rules = "".join(f"    {_host_rule(entry)}\n" for entry in self.host_allow)
        return f"""table {FAMILY} {t} {{
  set blocked {{
    type ipv4_addr; flags interval;{blocked}
  }}
  set leases {{
    type ifname . ipv4_addr . ether_addr;
  }}
  map egress {{
    type ifname : verdict;
  }}
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    iifname {p} meta nfproto ipv6 drop
    iifname {p} iifname . ip saddr . ether saddr != @leases drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {p} jump guest_to_host
  }}
  chain guest_to_host {{
    ct state established,related accept
{host_rules}    drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {p} oifname {p} drop
    oifname {p} ct state established,related accept
    oifname {p} drop
    iifname {p} jump guest_out
  }}
  chain guest_out {{
    ip daddr @blocked drop
    iifname vmap @egress
    drop
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    oifname {p} meta nfproto ipv6 drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {self.cidr} oifname != {p} masquerade
  }}
}}
"""

    def sandbox(self, lease: NetworkLease, policy: EgressPolicy | None) -> str:
        """Add a lease's rules, or replace its policy: idempotent, one transaction."""
        pol = self.policy(policy)
        t, tap, chain = self.table, lease.tap_name, sandbox_chain(lease.tap_name)
        lines = [f"add chain {FAMILY} {t} {chain}", f"flush chain {FAMILY} {t} {chain}"]
        if pol.deny_out:
            lines.append(f"add rule {FAMILY} {t} {chain} ip daddr {{ {', '.join(collapse(pol.deny_out))} }} drop")
        if pol.allow_out:
            lines.append(f"add rule {FAMILY} {t} {chain} ip daddr {{ {', '.join(collapse(pol.allow_out))} }} accept")
        lines.append(f"add rule {FAMILY} {t} {chain} {'accept' if pol.egress == 'nat' else 'drop'}")
        lines.append(f'add element {FAMILY} {t} leases {{ "{tap}" . {lease.ip} . {lease.mac} }}')
        lines.append(f'add element {FAMILY} {t} egress {{ "{tap}" : jump {chain} }}')
        return "\n".join(lines) + "\n"

    def sandbox_removal(self, lease: NetworkLease) -> str:
        """Remove a lease's rules; succeeds whether or not they exist (each is added first)."""
        t, tap, chain = self.table, lease.tap_name, sandbox_chain(lease.tap_name)
        element = f'"{tap}" . {lease.ip} . {lease.mac}'
        return "\n".join([
            f"add chain {FAMILY} {t} {chain}",
            f'add element {FAMILY} {t} egress {{ "{tap}" : jump {chain} }}',
            f'delete element {FAMILY} {t} egress {{ "{tap}" }}',
            f"flush chain {FAMILY} {t} {chain}",
            f"delete chain {FAMILY} {t} {chain}",
            f"add element {FAMILY} {t} leases {{ {element} }}",
            f"delete element {FAMILY} {t} leases {{ {element} }}",
        ]) + "\n"


def removal(tag: str) -> str:
    """Delete our table if present (and the ip-family NAT table of earlier versions):
    `add` first, so the `delete` never fails (no `destroy` before nftables 1.0.8)."""
    t = table_name(tag)
    return "".join(f"add table {fam} {t}\ndelete table {fam} {t}\n" for fam in (FAMILY, "ip"))


def _elements(cidrs: Sequence[str]) -> str:
    return f" elements = {{ {', '.join(cidrs)} }};" if cidrs else ""


def _host_rule(entry: str) -> str:
    ip, port, proto = parse_host_allow(entry)
    if proto == "icmp":
        return f"ip daddr {ip} icmp type echo-request accept"
    return f"ip daddr {ip} {proto} dport {port} accept"
