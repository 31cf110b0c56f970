"""PID-1 boot duties: filesystems, hostname, network, DNS, Ctrl-Alt-Del.

Runs only when the agent is PID 1 (never on a test host). Each step is independent and
guarded: a missing /dev/shm or a read-only /etc must not stop the agent from reaching
the host, because a guest that never says HELLO is impossible to debug from outside.
Everything is done with syscalls and /proc writes; no program is spawned (except the
``mount`` binary when ctypes is missing).
"""

from __future__ import annotations

import os

from . import libc
from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Callable, Dict, List

_NSE = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC

# (source, target, fstype, flags, data); mounted in this order, each only if not mounted.
MOUNTS = (
    ("proc", "/proc", "proc", _NSE, ""),
    ("sysfs", "/sys", "sysfs", _NSE, ""),
    ("devtmpfs", "/dev", "devtmpfs", libc.MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", libc.MS_NOSUID | libc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ("tmpfs", "/dev/shm", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=1777"),
)


def ensure_std_fds() -> None:
    """Make sure fds 0-2 are open (to /dev/null if need be).

    The kernel gives init /dev/console as 0-2 only if it can open it. If they were closed,
    the next pipe would land on fd 0-2 and confuse the dup2 dance when spawning children.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                new = os.open("/dev/null", os.O_RDWR)
            except OSError:
                return  # no /dev yet; nothing better to do
            if new != fd:
                os.dup2(new, fd)
                os.close(new)


def _step(name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:
        log("boot step %s failed: %s" % (name, exc))


def remount_root_rw() -> None:
    """Remount / read-write when it is read-only but the command line says ``rw``."""
    if os.statvfs("/").f_flag & os.ST_RDONLY:
        libc.mount("", "/", "", libc.MS_REMOUNT, "")
        log("remounted / read-write")


def mount_filesystems() -> None:
    """Mount what a normal userland expects, skipping anything already mounted."""
    for source, target, fstype, flags, data in MOUNTS:
        try:
            if os.path.ismount(target):
                continue
            if not os.path.isdir(target):
                os.makedirs(target, 0o755)
            libc.mount(source, target, fstype, flags, data)
        except OSError as exc:
            log("cannot mount %s on %s: %s" % (fstype, target, exc))
    _step("ptmx", _link_ptmx)


def _link_ptmx() -> None:
    """/dev/ptmx -> pts/ptmx so openpty() uses our devpts instance."""
    if os.path.islink("/dev/ptmx") or not os.path.exists("/dev/pts/ptmx"):
        return
    try:
        os.unlink("/dev/ptmx")
    except FileNotFoundError:
        pass
    os.symlink("pts/ptmx", "/dev/ptmx")


def write_proc(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def set_hostname(name: str) -> None:
    """sethostname(2) through /proc (no ctypes needed)."""
    if not name or len(name) > 64 or any(c.isspace() or c == "/" for c in name):
        raise ValueError("invalid hostname %r" % name)
    write_proc("/proc/sys/kernel/hostname", name)


def etc_hostname(path: str = "/etc/hostname") -> str:
    """The image's own hostname (what a normal init would set), or ""."""
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def resolv_conf_text(servers: List[str]) -> str:
    """The /etc/resolv.conf content for ``servers`` (validated IPv4 or IPv6 addresses)."""
    import socket

    lines = ["# written by arcbox-vm-agent from arcbox.dns="]
    for s in servers:
        family = socket.AF_INET6 if ":" in s else socket.AF_INET
        socket.inet_pton(family, s)  # raises OSError/ValueError for junk
        lines.append("nameserver %s" % s)
    return "\n".join(lines) + "\n"


def write_resolv_conf(servers: List[str], path: str = "/etc/resolv.conf") -> None:
    """Write resolv.conf; a dangling symlink (e.g. into systemd-resolved's /run) is replaced."""
    text = resolv_conf_text(servers)
    try:
        with open(path, "w") as f:
            f.write(text)
    except FileNotFoundError:
        if not os.path.islink(path):
            raise
        os.unlink(path)
        with open(path, "w") as f:
            f.write(text)


def mount_proc() -> None:
    """/proc first: the command line, which drives everything else, is read from it."""
    if not os.path.ismount("/proc"):
        libc.mount("proc", "/proc", "proc", _NSE, "")


def setup() -> Dict[str, str]:
    """All PID-1 duties, in dependency order. Never raises; returns the parsed command line."""
    from .cmdline import parse_cmdline, read_cmdline

    _step("stdio", ensure_std_fds)
    _step("proc", mount_proc)
    args = parse_cmdline(read_cmdline())
    if "rw" in args and "ro" not in args:
        _step("remount-rw", remount_root_rw)
    _step("mounts", mount_filesystems)
    from . import log as logmod

    logmod.init(console=True)  # /dev is certainly there now
    _step("ctrl-alt-del", lambda: write_proc("/proc/sys/kernel/ctrl-alt-del", "0"))
    _step("loopback", _loopback)

    ipcfg = None
    if args.get("ip"):
        from . import netcfg

        try:
            ipcfg = netcfg.parse_ip_param(args["ip"])
        except ValueError as exc:
            log("ignoring ip=%s: %s" % (args["ip"], exc))
        if ipcfg is not None:
            cfg = ipcfg
            _step("network", lambda: netcfg.configure(cfg))

    hostname = args.get("arcbox.hostname") or (ipcfg.hostname if ipcfg else "") or etc_hostname()
    if hostname:
        _step("hostname", lambda: set_hostname(hostname))

    dns = [s for s in args.get("arcbox.dns", "").split(",") if s]
    if dns:
        _step("resolv.conf", lambda: write_resolv_conf(dns))
    return args


def _loopback() -> None:
    from . import netcfg

    netcfg.loopback_up()
