"""E2B's network options (create's `allow_internet_access` and `network`, the body of
`PUT /sandboxes/{id}/network`) as the sandbox's egress policy, and back for get_info.

E2B: a destination is reachable if it is in allowOut, or if internet access is on and it
is not in denyOut (allowOut wins over denyOut; allow_internet_access=false is the same as
denyOut 0.0.0.0/0). Ours (models.SandboxNetworkSpec): egress "none" | "nat", allow_out
opens holes in "none", deny_out wins over both. So:

- everything denied (allow_internet_access false, or 0.0.0.0/0 in denyOut): egress "none",
  allow_out = allowOut, deny_out empty (with E2B's allow winning, other denials change
  nothing);
- else: egress "nat" when allow_internet_access is true, else the daemon's
  `[network] default_egress` (E2B's cloud would allow; this daemon's operator decides);
  allow_out = allowOut; deny_out = denyOut less what allowOut allows, so allow still wins.

Entries are IPv4 addresses or CIDRs. Domain names (allowOut) are not supported (400);
IPv6 entries in denyOut are dropped (sandboxes have no IPv6), in allowOut refused. Whatever
the policy says, the host, other sandboxes and `[network] blocked` stay out of reach.
Sandboxes without a TAP (`[e2b] network = "none"`) reach nothing at all: asking them for
internet access or allowOut is refused (400), denials are accepted (they already hold).

Not supported (400 when asked for): egressProxy, rules, maskRequestHost, httpsPorts, and
an allowPublicTraffic that contradicts `[e2b] secure` (secured sandboxes' ports need the
traffic access token). dnsServers only matters with domains in allowOut: ignored.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import ValidationError

from arcbox_vm.errors import InvalidArgument
from arcbox_vm.models import SandboxInfo, SandboxNetworkSpec

ALL = ipaddress.IPv4Network("0.0.0.0/0")
ALL_TRAFFIC = str(ALL)

Net = ipaddress.IPv4Network


def _entries(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"network.{what} must be a list of strings")
    if len(value) > 1024:
        raise InvalidArgument(f"network.{what} holds at most 1024 entries")
    return value


def _networks(value: Any, what: str) -> list[Net]:
    out = []
    for item in _entries(value, what):
        try:
            net = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise InvalidArgument(f"network.{what}: {item[:100]!r} is not an IPv4 address or CIDR (domain names are "
                                  "not supported by this server)") from None
        if isinstance(net, ipaddress.IPv6Network):
            if what == "denyOut":
                continue  # nothing to deny: sandboxes have no IPv6
            raise InvalidArgument(f"network.{what}: {item[:100]!r} is IPv6; sandboxes have IPv4 only")
        out.append(net)
    return out


def _minus(deny: list[Net], allow: list[Net]) -> list[Net]:
    """`deny` without the addresses in `allow`."""
    out = list(deny)
    for a in allow:
        rest: list[Net] = []
        for d in out:
            if d.subnet_of(a):
                continue
            if a.subnet_of(d):
                rest.extend(d.address_exclude(a))
            else:
                rest.append(d)
        out = rest
    return out


def _check_unsupported(network: dict[str, Any], secure: bool) -> None:
    if network.get("egressProxy") is not None:
        raise InvalidArgument("network.egressProxy is not supported by this server")
    if network.get("rules"):
        raise InvalidArgument("network.rules (request transforms) are not supported by this server")
    if network.get("maskRequestHost"):
        raise InvalidArgument("network.maskRequestHost is not supported by this server")
    if network.get("httpsPorts"):
        raise InvalidArgument("network.httpsPorts is not supported by this server: ports are proxied as plain HTTP")
    public = network.get("allowPublicTraffic")
    if public is not None and public == secure:
        raise InvalidArgument("network.allowPublicTraffic=true is not supported: this server's sandbox ports need the "
                              "trafficAccessToken (E2b-Traffic-Access-Token)" if public else
                              "network.allowPublicTraffic=false is not supported: this server does not secure "
                              "sandboxes ([e2b] secure = false)")


def egress_spec(allow_internet: Any, network: Any, *, mode: str, secure: bool,
                default_egress: str | None = None) -> SandboxNetworkSpec:
    """The network spec of an E2B sandbox (`mode`: the [e2b] network setting). `default_egress`:
    what "internet access not mentioned" means (None = the daemon's default, left unset)."""
    if allow_internet is not None and not isinstance(allow_internet, bool):
        raise InvalidArgument("allow_internet_access must be a boolean")
    if network is None:
        network = {}
    if not isinstance(network, dict):
        raise InvalidArgument("network must be an object")
    _check_unsupported(network, secure)
    allow = _networks(network.get("allowOut"), "allowOut")
    deny = _networks(network.get("denyOut"), "denyOut")
    if mode == "none":
        if allow_internet or allow:
            raise InvalidArgument("this server's E2B sandboxes have no network ([e2b] network = \"none\"): they reach "
                                  "nothing outside, so allow_internet_access=true and network.allowOut cannot be "
                                  "honoured")
        return SandboxNetworkSpec(mode="none")
    if allow_internet is False or any(d == ALL for d in deny):
        egress: str | None = "none"
        deny = []
    else:
        egress = "nat" if allow_internet else default_egress
        deny = _minus(deny, allow)
    try:
        return SandboxNetworkSpec(mode="tap", egress=egress,  # type: ignore[arg-type]
                                  allow_out=[str(n) for n in allow], deny_out=[str(n) for n in deny])
    except ValidationError as exc:
        raise InvalidArgument("network: " + "; ".join(e["msg"].removeprefix("Value error, ")
                                                      for e in exc.errors())) from None


def e2b_view(info: SandboxInfo) -> tuple[bool, dict[str, Any]]:
    """(allowInternetAccess, network {allowOut, denyOut}) of a sandbox, as E2B would say it."""
    net = info.network
    if net is None:  # no TAP: nothing is reachable
        return False, {"denyOut": [ALL_TRAFFIC]}
    if net.egress == "nat":
        return True, {"allowOut": list(net.allow_out), "denyOut": list(net.deny_out)}
    return False, {"allowOut": list(net.allow_out), "denyOut": [ALL_TRAFFIC]}
