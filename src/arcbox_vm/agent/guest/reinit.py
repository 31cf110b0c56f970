"""REINIT: make a guest restored from a snapshot its own machine (stdlib only).

A restored VM continues exactly where the snapshot was taken: the old wall clock, the
old random state (every clone of one checkpoint would draw the same numbers), the old
hostname, and ``eth0`` with the old address and MAC. The host sends REINIT right after
the restored agent's HELLO, before the sandbox is ready; the body (every field optional)::

    {"time": <host's wall clock, float seconds>, "entropy": "<base64 bytes>",
     "hostname": "...", "ip": "<the kernel ip= value>", "mac": "06:00:..."}

The agent sets the clock first (so later log lines are right), credits the entropy to the
kernel RNG and forces a reseed of its CRNG (RNDADDENTROPY + RNDRESEEDCRNG: nothing drawn
after this repeats what another clone draws), sets the hostname, and re-addresses the
interface: link down (which also drops the old neighbour cache and routes), new MAC,
new address and netmask, link up, default route. It answers REINIT_DONE
``{"errors": [...]}``; an empty list means everything was applied.
"""

from __future__ import annotations

import base64
import errno
import os
import struct
import time

from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Dict, List

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07), Linux 4.17+
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
MAX_ENTROPY = 512  # bytes taken from one request


def set_clock(seconds: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, float(seconds))


def reseed(entropy: bytes) -> None:
    """Credit `entropy` to the kernel RNG and reseed its CRNG now.

    Without the privilege for the ioctls (not PID 1) the bytes are still mixed in by a
    plain write, uncredited."""
    import fcntl

    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
        except OSError:
            os.write(fd, entropy)
        try:
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTTY, errno.EPERM):
                raise
    finally:
        os.close(fd)


def _set_link_down(sock: Any, name: str) -> None:
    import fcntl

    from .netcfg import _IFREQ_FLAGS, IFF_UP, SIOCGIFFLAGS, SIOCSIFFLAGS

    res = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), 0))
    flags = _IFREQ_FLAGS.unpack(res)[1]
    if flags & IFF_UP:
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), flags & ~IFF_UP))


def set_mac(sock: Any, name: str, mac: str) -> None:
    import fcntl

    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError("not a MAC address: %r" % mac)
    fcntl.ioctl(sock.fileno(), SIOCSIFHWADDR, struct.pack("16sH6s16x", name.encode(), ARPHRD_ETHER, raw))


def readdress(ip_param: str, mac: str) -> None:
    """Give the interface of ``ip=`` its new address (and ``mac``), dropping the old state."""
    import socket

    from . import netcfg

    cfg = netcfg.parse_ip_param(ip_param)
    if cfg is None:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _set_link_down(sock, cfg.device)
        if mac:
            set_mac(sock, cfg.device, mac)
    netcfg.configure(cfg, wait=0.0)


def apply(body: Dict[str, Any]) -> List[str]:
    """Apply a REINIT body; returns the errors (one line each), [] when all went well."""
    errors: List[str] = []

    def step(what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # each step is independent: report it, go on
            errors.append("%s: %s" % (what, exc))
            log("reinit: %s failed: %s" % (what, exc))

    if body.get("time") is not None:
        step("clock", set_clock, body["time"])
    if body.get("entropy"):
        try:
            data = base64.b64decode(str(body["entropy"]), validate=True)[:MAX_ENTROPY]
        except ValueError as exc:
            errors.append("entropy: %s" % exc)
        else:
            step("random seed", reseed, data)
    if body.get("hostname"):
        from .sysinit import set_hostname

        step("hostname", set_hostname, str(body["hostname"]))
    if body.get("ip"):
        step("network", readdress, str(body["ip"]), str(body.get("mac") or ""))
    log("reinit: clock, random seed, hostname and network renewed%s" % (
        " (%d error(s))" % len(errors) if errors else ""))
    return errors
