"""Named network namespaces (the `ip netns` kind, bound under /run/netns).

No fork happens in our process: namespaces are made and removed by `ip netns`
(fork+exec in C), and netlink sockets inside one are opened from a thread that joins it
with setns(2) (`entered`). Forking a process that runs gRPC threads is unsafe.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import subprocess
from collections.abc import Iterator

from arcbox_vm.errors import ArcboxError

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", "netns", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ArcboxError(f"ip netns {' '.join(args)} failed: {proc.stderr.strip()}")


def ensure(name: str) -> bool:
    """Create namespace `name` if missing; True if we created it."""
    if exists(name):
        return False
    _ip("add", name)
    return True


def remove(name: str) -> None:
    if exists(name):
        _ip("delete", name)


def exec_prefix(name: str) -> list[str]:
    """argv prefix that runs a program inside namespace `name` ("" = no prefix)."""
    return ["ip", "netns", "exec", name] if name else []


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with *this thread* inside namespace `name` (call from a worker thread).

    Sockets created inside stay in that namespace after the thread returns to its own.
    """
    if not name:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def write_sysctl(name: str, key: str, value: str) -> None:
    """Write /proc/sys/<key> as seen inside namespace `name` (call from a worker thread:
    /proc/sys/net belongs to the namespace of the thread that opens it)."""
    with entered(name), open(os.path.join("/proc/sys", key), "w") as f:
        f.write(value)
