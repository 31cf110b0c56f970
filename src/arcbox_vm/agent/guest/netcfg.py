"""Guest network setup from the kernel ``ip=`` argument, with ioctls only.

The host passes ``ip=<guest>::<gw>:<netmask>::<iface>:off`` (the kernel's own format), but
Debian's cloud kernel is built without CONFIG_IP_PNP and ignores it, so the agent applies
it itself. Everything is done with the classic socket ioctls (SIOCSIFADDR, SIOCSIFNETMASK,
SIOCSIFFLAGS, SIOCADDRT): no ``ip``/``ifconfig`` binary is needed in the image and no
process is spawned at boot. Parsing is pure and unit-tested on the host.
"""

from __future__ import annotations

import errno
import struct
import time

from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import List, Optional

SIOCADDRT = 0x890B
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C

IFF_UP = 0x1
IFF_RUNNING = 0x40
RTF_UP = 0x1
RTF_GATEWAY = 0x2
RTF_HOST = 0x4
AF_INET = 2

# struct ifreq is 40 bytes on 64-bit Linux (16-byte name + 24-byte union); a larger buffer
# is harmless, a smaller one is not, so pad to 40 everywhere.
_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_ADDR = struct.Struct("16sHH4s16x")
_SOCKADDR_IN = struct.Struct("HH4s8x")
# struct rtentry in native layout; the trailing "0L" pads it to sizeof(struct rtentry).
_RTENTRY = struct.Struct("@L16s16s16sHhLPhPLLH0L")

_DYNAMIC = ("on", "any", "dhcp", "bootp", "rarp", "both")
_STATIC = ("", "off", "none", "static")


class IpConfig:
    """The parts of ``ip=`` the agent uses. ``autoconf`` other than static means DHCP etc."""

    __slots__ = ("address", "gateway", "netmask", "hostname", "device", "autoconf", "dns")

    def __init__(
        self,
        address: str = "",
        gateway: str = "",
        netmask: str = "",
        hostname: str = "",
        device: str = "eth0",
        autoconf: str = "off",
        dns: Optional[List[str]] = None,
    ) -> None:
        self.address = address
        self.gateway = gateway
        self.netmask = netmask
        self.hostname = hostname
        self.device = device
        self.autoconf = autoconf
        self.dns = list(dns or [])

    @property
    def is_static(self) -> bool:
        return self.autoconf in _STATIC

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IpConfig) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return "IpConfig(%s)" % ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.__slots__)


def parse_ipv4(text: str) -> bytes:
    """Strict dotted-quad to 4 bytes (inet_aton would accept "1" or "0x7f.1"). ValueError if bad."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts):
        raise ValueError("not an IPv4 address: %r" % text)
    return bytes(int(p) for p in parts)


def format_ipv4(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


def parse_netmask(text: str) -> str:
    """A dotted netmask, or a prefix length ("24" or "/24"), to dotted form; must be contiguous."""
    t = text[1:] if text.startswith("/") else text
    if t.isdigit():
        bits = int(t)
        if bits > 32:
            raise ValueError("prefix length out of range: %r" % text)
        value = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    else:
        value = struct.unpack(">I", parse_ipv4(text))[0]
    inverted = ~value & 0xFFFFFFFF
    if inverted & (inverted + 1):
        raise ValueError("netmask is not contiguous: %r" % text)
    return format_ipv4(struct.pack(">I", value))


def classful_netmask(address: str) -> str:
    """The netmask the kernel assumes when ``ip=`` gives none (class A/B/C)."""
    first = parse_ipv4(address)[0]
    if first < 128:
        return "255.0.0.0"
    if first < 192:
        return "255.255.0.0"
    return "255.255.255.0"


def parse_ip_param(value: str) -> Optional[IpConfig]:
    """Parse the value of the kernel ``ip=`` argument.

    Format: ``client:server:gw:netmask:hostname:device:autoconf:dns0:dns1:ntp0`` (fields may be
    empty or missing). Returns None for ``off``/``none``/empty, an IpConfig with a dynamic
    ``autoconf`` for ``dhcp`` and friends (which the agent cannot do), else a static config.
    Raises ValueError naming the bad field.
    """
    value = value.strip()
    if value in ("", "off", "none"):
        return None
    if value in _DYNAMIC:
        return IpConfig(autoconf=value)
    fields = value.split(":")
    fields += [""] * (10 - len(fields))
    client, _server, gw, mask, hostname, device, autoconf, dns0, dns1 = fields[:9]
    autoconf = autoconf or "off"
    if autoconf not in _STATIC and autoconf not in _DYNAMIC:
        raise ValueError("unknown autoconf mode %r in ip=" % autoconf)
    cfg = IpConfig(hostname=hostname, device=device or "eth0", autoconf=autoconf)
    if client:
        parse_ipv4(client)
        cfg.address = client
        cfg.netmask = parse_netmask(mask) if mask else classful_netmask(client)
    elif autoconf in _STATIC:
        raise ValueError("ip= has no guest address and autoconf is %r" % autoconf)
    if gw:
        parse_ipv4(gw)
        cfg.gateway = gw
    for d in (dns0, dns1):
        if d:
            parse_ipv4(d)
            cfg.dns.append(d)
    return cfg


# ---- applying it (Linux ioctls) -------------------------------------------------------


def _ifreq_addr(name: str, address: str) -> bytes:
    return _IFREQ_ADDR.pack(name.encode(), AF_INET, 0, parse_ipv4(address))


def _sockaddr(address: str) -> bytes:
    return _SOCKADDR_IN.pack(AF_INET, 0, parse_ipv4(address))


def set_link_up(sock: object, name: str, wait: float = 0.0) -> None:
    """Set IFF_UP on ``name``; if it does not exist yet, retry for up to ``wait`` seconds."""
    import fcntl

    fd = sock.fileno()  # type: ignore[attr-defined]
    deadline = time.monotonic() + wait
    while True:
        try:
            res = fcntl.ioctl(fd, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), 0))
            break
        except OSError as exc:
            if exc.errno != errno.ENODEV or time.monotonic() >= deadline:
                raise OSError(exc.errno, "interface %s: %s" % (name, exc.strerror)) from None
            time.sleep(0.05)
    flags = _IFREQ_FLAGS.unpack(res)[1]
    if flags & IFF_UP:
        return
    fcntl.ioctl(fd, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), flags | IFF_UP | IFF_RUNNING))


def _add_route(sock: object, dst: str, gateway: str, genmask: str, flags: int, device: str) -> None:
    import array
    import fcntl

    dev = array.array("b", device.encode() + b"\0")  # rt_dev is a char *; keep it alive
    req = _RTENTRY.pack(
        0, _sockaddr(dst), _sockaddr(gateway or "0.0.0.0"), _sockaddr(genmask), flags, 0, 0, 0, 0, dev.buffer_info()[0], 0, 0, 0
    )
    fcntl.ioctl(sock.fileno(), SIOCADDRT, req)  # type: ignore[attr-defined]
    del dev


def add_default_route(sock: object, gateway: str, device: str) -> None:
    """Default route via ``gateway``; if the kernel says it is not on-link, add a host route first."""
    try:
        _add_route(sock, "0.0.0.0", gateway, "0.0.0.0", RTF_UP | RTF_GATEWAY, device)
        return
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return
        if exc.errno != errno.ENETUNREACH:
            raise
    _add_route(sock, gateway, "", "255.255.255.255", RTF_UP | RTF_HOST, device)
    _add_route(sock, "0.0.0.0", gateway, "0.0.0.0", RTF_UP | RTF_GATEWAY, device)


def configure(cfg: IpConfig, wait: float = 3.0) -> None:
    """Give ``cfg.device`` its address and netmask, bring it up, add the default route."""
    import fcntl
    import socket

    if not cfg.is_static:
        raise OSError(errno.EOPNOTSUPP, "ip=%s needs DHCP, which the agent does not do" % cfg.autoconf)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        set_link_up(sock, cfg.device, wait=wait)  # also waits for the device to appear
        fcntl.ioctl(sock.fileno(), SIOCSIFADDR, _ifreq_addr(cfg.device, cfg.address))
        fcntl.ioctl(sock.fileno(), SIOCSIFNETMASK, _ifreq_addr(cfg.device, cfg.netmask))
        set_link_up(sock, cfg.device)
        if cfg.gateway:
            add_default_route(sock, cfg.gateway, cfg.device)
    log("network: %s %s/%s gw %s" % (cfg.device, cfg.address, cfg.netmask, cfg.gateway or "-"))


def loopback_up() -> None:
    """Bring ``lo`` up; the kernel then assigns 127.0.0.1/8 and ::1 itself."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        set_link_up(sock, "lo")
