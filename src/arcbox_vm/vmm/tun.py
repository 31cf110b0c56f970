"""The VMM's end of a sandbox's TAP device (`/dev/net/tun`, ioctls; no fork).

A confined QEMU cannot open the TAP itself: it has no capabilities, `/dev/net/tun` is
usually root-only, and it runs in a network namespace with nothing in it. The daemon
opens the device instead — in the namespace the TAP lives in, from a worker thread that
joins it — and QEMU gets the open descriptor (`-netdev tap,fd=N`): it can use exactly that
one device and name no other.

Under the Firecracker jailer, Firecracker opens the TAP by name itself (the jailer makes
`/dev/net/tun` in the jail); `set_owner` gives the device to the jailed uid/gid, which the
kernel requires of a caller without CAP_NET_ADMIN.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct

from arcbox_vm.errors import VmmError
from arcbox_vm.network.netns import entered

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


def _ifreq(name: str, flags: int) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise VmmError(f"bad TAP device name {name!r}")
    return struct.pack("16sH22x", raw, flags)


def _attach(netns: str, name: str) -> int:
    """An open `/dev/net/tun` attached to TAP `name` (in `netns`), close-on-exec."""
    with entered(netns):
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            # vnet headers: QEMU probes the flag on the descriptor and offloads checksums
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except BaseException:
            os.close(fd)
            raise
    return fd


def _set_owner(netns: str, name: str, uid: int, gid: int) -> None:
    fd = _attach(netns, name)
    try:
        fcntl.ioctl(fd, TUNSETOWNER, uid)
        fcntl.ioctl(fd, TUNSETGROUP, gid)
    finally:
        os.close(fd)


def _where(netns: str) -> str:
    return f" in network namespace {netns}" if netns else ""


async def open_tap(netns: str, name: str) -> int:
    """An open descriptor of TAP `name` (it must exist: the network lease made it). The
    caller passes it on and closes it."""
    try:
        return await asyncio.to_thread(_attach, netns, name)
    except OSError as exc:
        raise VmmError(f"cannot open TAP device {name}{_where(netns)}: {exc.strerror or exc}") from exc


async def set_owner(netns: str, name: str, uid: int, gid: int) -> None:
    """Let `uid`/`gid` attach to TAP `name` without privileges (it stays persistent)."""
    try:
        await asyncio.to_thread(_set_owner, netns, name, uid, gid)
    except OSError as exc:
        raise VmmError(f"cannot give TAP device {name}{_where(netns)} to {uid}:{gid}: "
                       f"{exc.strerror or exc}") from exc
