"""The agent's event loop: one thread, one selector, the channel plus every exec session.

Single-threaded on purpose: fork+exec from the loop is safe, there are no locks, and
reaping cannot race (only this loop calls waitpid). Signals arrive through
``signal.set_wakeup_fd`` as bytes on a pipe the selector watches; the Python-level
handlers do nothing, so no code ever runs at an awkward moment.

Robustness rules:
- bad input never kills the agent: decode errors, unknown types and malformed JSON
  get an ERROR frame (and the stream goes on);
- an ERROR on channel N ends session N (either direction), as the protocol says;
- a lost channel leaves exec sessions running (detached, output spooled up to a bound);
  the agent redials with backoff and says HELLO again, listing them, and the host may
  ATTACH to each (see the protocol module); finished detached sessions are kept for that
  (the oldest are forgotten beyond KEEP_FINISHED);
- an unexpected exception in one handler is logged, and only what it touched (one
  session, or the channel) is dropped.

File transfers share the loop: a write session writes each FILE_DATA frame as it is
decoded (the channel is read 256 KiB at a time), read sessions are pumped once per
iteration within ``READ_BUDGET`` and their credit. Unlike exec sessions they do not
survive the channel: a lost connection or a shutdown aborts them (temporary files removed).

``Agent`` is one object (one loop, one state), written as parts with one job each; this
module holds the loop itself and combines them:

- ``connection``   the channel to the host: dialing with backoff, HELLO, reading, writing, losing it
- ``frames``       each frame from the host: decode errors, routing by channel, channel 0
- ``execs``        EXEC, ATTACH and the frames on an exec channel (stdin, credit, resize, signal)
- ``sessiontable`` the exec sessions (attached, detached, abandoned), their end, the detached spool
- ``transfers``    file requests in the loop: FILE_* routing, pumping reads, aborting on loss
- ``ports``        PORT_CONNECT and forwarded TCP connections (``portconn``), reset on loss
- ``shutdown``     SHUTDOWN / SIGTERM: ending sessions and rebooting or powering off

Each part sets up its own state in an ``_init_*`` method called from ``Agent.__init__``.
"""

from __future__ import annotations

import os
import selectors
import signal
import time

from arcbox_vm.agent.protocol import ErrorCode

from .connection import HIGH_WATER, HostConnection
from .execs import ExecHandling
from .frames import FrameHandling
from .log import flush_later, later_due, log, log_exc
from .ports import PortForwards
from .sessiontable import SessionTable
from .shutdown import Shutdown, ShutdownHandling
from .transfers import FileTransfers

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Optional

    from .transport import Transport

_R = selectors.EVENT_READ

# Longest single wait of the loop. epoll takes at most 2^31-1 ms (~24.8 days) and select(2)
# a time_t: a later deadline (a long exec timeout) must mean "wake up, nothing to do yet",
# never a timeout the selector refuses with OverflowError on every iteration.
MAX_WAIT = 86400.0


def _noop_handler(signum: int, frame: Any) -> None:
    """Signals are handled from the wakeup pipe in the loop, not here."""


class Agent(HostConnection, FrameHandling, ExecHandling, SessionTable, FileTransfers, PortForwards, ShutdownHandling):
    """The guest agent: serves the host over one channel, redialing it, until shut down."""

    def __init__(self, transport: Transport, pid1: bool) -> None:
        self.pid1 = pid1
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self._init_connection(transport)
        self._init_sessions()
        self._init_files()
        self._init_ports()
        self._init_frames()
        self._setup_signals()

    # ---- signals ---------------------------------------------------------------------

    def _setup_signals(self) -> None:
        self._sig_r, self._sig_w = os.pipe()
        os.set_blocking(self._sig_r, False)
        os.set_blocking(self._sig_w, False)
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _noop_handler)
        self.sel.register(self._sig_r, _R, self._on_signals)

    def _on_signals(self, mask: int) -> None:
        try:
            data = os.read(self._sig_r, 4096)
        except BlockingIOError:
            data = b""
        self._reap()  # cheap, and covers a wakeup byte lost to a full pipe
        if signal.SIGTERM in data or signal.SIGINT in data:
            name = "SIGTERM" if signal.SIGTERM in data else "SIGINT (Ctrl-Alt-Del)"
            self.begin_shutdown("reboot", "received %s" % name)

    # ---- main loop -------------------------------------------------------------------

    def run(self) -> None:
        """Serve forever (PID 1) or until shutdown (otherwise). Never raises except Shutdown."""
        errors = 0
        while True:
            try:
                self._iteration()
                errors = 0
            except Shutdown:
                raise
            except Exception:
                errors += 1
                if errors <= 5 or errors % 100 == 0:
                    log_exc("unexpected error in the event loop (#%d); continuing" % errors)
                time.sleep(min(0.05 * errors, 1.0))  # never spin on a persistent error

    def _iteration(self) -> None:
        now = time.monotonic()
        if self.conn is None and not self.stopping and now >= self.next_connect:
            self._connect()
        if self.conn is not None and self.conn.out_bytes:
            self._flush()
        due = later_due()
        if due is not None and (not self.sessions or now >= due):
            flush_later()  # held-back log lines: no command is running (or they are due)
        can_send = self.conn is not None and self.conn.out_bytes < HIGH_WATER
        if can_send and self.files:
            self._pump_files()
        for s in self._all_sessions():
            try:
                s.sync(can_send)
            except Exception:
                log_exc("session on channel %d: selector update failed; ending it" % s.channel)
                self._end_session(s, ErrorCode.INTERNAL, "agent error while serving the session")
        if self.ports:
            self._sync_ports(can_send)
        self._sync_conn()
        timeout = self._next_timeout(time.monotonic())
        for key, mask in self.sel.select(timeout):
            self._dispatch(key, mask)
        now = time.monotonic()
        self._run_timers(now)
        self._finish_sessions()
        if self.ports:
            self._port_timers(now)
            self._settle_ports()

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        data = key.data
        if callable(data):
            data(mask)
            return
        # a Session
        try:
            data.on_event(key.fd, mask)
        except Exception:
            log_exc("session on channel %d failed; ending it" % data.channel)
            self._end_session(data, ErrorCode.INTERNAL, "agent error while serving the session")

    def _next_timeout(self, now: float) -> Optional[float]:
        if self._files_pending():
            return 0.0
        when = []
        if self.conn is None and not self.stopping:
            when.append(self.next_connect)
        due = later_due()
        if due is not None:
            when.append(due)
        for s in self._all_sessions():
            if s.deadline is not None:
                when.append(s.deadline)
            if s.grace_at is not None:
                when.append(s.grace_at)
        when.extend(self._port_deadlines())
        if not when:
            return None
        return min(MAX_WAIT, max(0.0, min(when) - now))

    def _run_timers(self, now: float) -> None:
        for s in self._all_sessions():
            try:
                if s.deadline is not None and now >= s.deadline:
                    log("channel %d: timeout; killing pid %d and its session" % (s.channel, s.pid))
                    s.on_timeout()
                if s.grace_at is not None and now >= s.grace_at:
                    s.drain()
            except Exception:
                log_exc("session on channel %d: timer failed; ending it" % s.channel)
                self._end_session(s, ErrorCode.INTERNAL, "agent error while serving the session")
