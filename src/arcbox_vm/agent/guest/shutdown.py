"""The agent's part that shuts down (a mixin of ``Agent``).

A SHUTDOWN from the host or SIGTERM/SIGINT (Ctrl-Alt-Del) ends the agent. As PID 1 it
reboots or powers off the VM (``power``: TERM, KILL, sync, reboot(2)) and never returns;
run as an ordinary process (as the unit tests run it) it ends its sessions (TERM, then
KILL after a second) and leaves ``Agent.run`` by raising ``Shutdown``.
"""

from __future__ import annotations

import signal
import time

from . import procs
from .log import log


class Shutdown(BaseException):
    """Raised to leave ``Agent.run`` (only when not PID 1).

    A BaseException so the per-handler ``except Exception`` guards let it through.
    """


class ShutdownHandling:
    """``begin_shutdown`` and the last flush of the channel before it goes away."""

    def begin_shutdown(self, action: str, reason: str) -> None:
        """PID 1: stop everything and reboot/power off (never returns). Else: end sessions, raise Shutdown."""
        if self.stopping:
            return
        self.stopping = True
        log("shutting down (%s)" % reason)
        self._abort_files("shutdown")
        self._abort_ports("shutdown")
        self._flush_briefly(1.0)
        if self.pid1:
            from . import power

            if self.conn is not None:
                self.conn.close()
                self.conn = None
            power.shutdown(action)  # does not return
        for s in self._all_sessions():
            procs.kill_session(s.pid, signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while self.by_pid and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)
        for s in self._all_sessions():
            procs.kill_session(s.pid, signal.SIGKILL)
        self._reap()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        raise Shutdown(reason)

    def _flush_briefly(self, limit: float) -> None:
        """Push queued frames (e.g. SHUTDOWN_ACK) out before the channel goes away."""
        import select

        deadline = time.monotonic() + limit
        while self.conn is not None and self.conn.out_bytes and time.monotonic() < deadline:
            try:
                if self.conn.flush():
                    return
            except OSError:
                return
            select.select([], [self.conn.fd], [], max(0.0, deadline - time.monotonic()))
