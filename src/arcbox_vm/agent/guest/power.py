"""The PID-1 shutdown sequence: TERM everyone, wait, KILL the rest, sync, reboot.

Used for SIGTERM, SIGINT (Ctrl-Alt-Del, once /proc/sys/kernel/ctrl-alt-del is 0) and the
SHUTDOWN frame. "reboot" (RB_AUTOBOOT) is the default because both VMMs exit when the
guest reboots (QEMU runs with -no-reboot, Firecracker with reboot=k); "poweroff" uses
RB_POWER_OFF. PID 1 must never return from here: if the kernel refuses, it parks.
"""

from __future__ import annotations

import os
import signal
import time

from . import libc
from .log import log

TERM_GRACE = 2.0
KILL_GRACE = 1.0


def wait_for_children(limit: float) -> bool:
    """Reap until no child is left (True) or ``limit`` seconds pass (False)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            while True:
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def shutdown(action: str) -> None:
    """Stop every process and reboot or power off the VM. Only for PID 1; never returns."""
    try:
        os.kill(-1, signal.SIGTERM)
    except OSError:
        pass
    if not wait_for_children(TERM_GRACE):
        log("processes still running after %.0f s; sending SIGKILL" % TERM_GRACE)
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        wait_for_children(KILL_GRACE)
    os.sync()
    try:
        libc.mount("", "/", "", libc.MS_REMOUNT | libc.MS_RDONLY, "")
    except OSError:
        pass  # best effort: sync already made the data durable
    log("%s now" % ("powering off" if action == "poweroff" else "rebooting"))
    libc.reboot(action)
    log("the kernel refused to %s; parking" % action)
    while True:  # PID 1 exiting would panic the kernel
        time.sleep(3600)
