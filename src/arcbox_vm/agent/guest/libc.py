"""mount(2) and reboot(2) for PID 1, through ctypes when it is there.

Python's os module has neither call. ctypes gives direct syscalls (no child process:
spawning ``mount`` costs ~0.1 s each under software emulation), but minimal images such
as python3-minimal ship without it, so every call has a fallback: the ``mount`` binary
(busybox or util-linux) for mounts, /proc/sysrq-trigger for reboot/poweroff. The
fallback runs programs with a bare fork/exec so ``subprocess`` is not imported at boot.
"""

from __future__ import annotations

import os

from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, List, Optional

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32

RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC

_FLAG_OPTS = ((MS_RDONLY, "ro"), (MS_NOSUID, "nosuid"), (MS_NODEV, "nodev"), (MS_NOEXEC, "noexec"), (MS_REMOUNT, "remount"))
_MOUNT_BINARIES = ("/bin/mount", "/usr/bin/mount", "/sbin/mount", "/usr/sbin/mount", "/bin/busybox", "/usr/bin/busybox")

_libc: Any = None  # None = not tried yet, False = unavailable, else the CDLL


def _get_libc() -> Any:
    global _libc
    if _libc is None:
        try:
            import ctypes

            lib = ctypes.CDLL(None, use_errno=True)
            lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
            lib.mount.restype = ctypes.c_int
            lib.reboot.argtypes = [ctypes.c_int]
            lib.reboot.restype = ctypes.c_int
            _libc = lib
        except Exception as exc:  # ImportError (no ctypes), OSError, AttributeError
            log("ctypes unavailable (%s); using the mount binary and sysrq fallbacks" % exc)
            _libc = False
    return _libc


def _enc(s: Optional[str]) -> Optional[bytes]:
    return s.encode() if s else None


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raises OSError naming the target on failure."""
    lib = _get_libc()
    if lib:
        import ctypes

        if lib.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "mount %s on %s: %s" % (fstype or source, target, os.strerror(err)))
        return
    opts = [name for bit, name in _FLAG_OPTS if flags & bit]
    if flags & MS_REMOUNT and not flags & MS_RDONLY:
        opts.append("rw")
    if data:
        opts.append(data)
    argv = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    if opts:
        argv += ["-o", ",".join(opts)]
    argv += [source or "none", target] if not flags & MS_REMOUNT else [target]
    rc = run_program(_mount_binary(), argv)
    if rc != 0:
        raise OSError(0, "mount %s on %s: the mount program failed with status %d" % (fstype, target, rc))


def _mount_binary() -> str:
    for path in _MOUNT_BINARIES:
        if os.access(path, os.X_OK):
            return path
    raise OSError(2, "no ctypes and no mount binary: cannot mount filesystems")


def reboot(action: str) -> None:
    """reboot(2) with RB_AUTOBOOT ("reboot") or RB_POWER_OFF ("poweroff"). Returns only on failure."""
    lib = _get_libc()
    if lib:
        import ctypes

        lib.reboot(RB_POWER_OFF if action == "poweroff" else RB_AUTOBOOT)
        log("reboot(2) failed: %s; trying sysrq" % os.strerror(ctypes.get_errno()))
    try:
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("o" if action == "poweroff" else "b")
    except OSError as exc:
        log("sysrq %s failed: %s" % (action, exc))


def run_program(path: str, argv: List[str], timeout: float = 10.0) -> int:
    """fork+exec ``path`` and wait for it; returns its exit status (127 if exec failed).

    Only for boot-time helpers, before the event loop owns child reaping.
    """
    import time

    pid = os.fork()
    if pid == 0:  # child
        try:
            os.execv(path, argv)
        finally:
            os._exit(127)
    deadline = time.monotonic() + timeout
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return 124
        time.sleep(0.01)
