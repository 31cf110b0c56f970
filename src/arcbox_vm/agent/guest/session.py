"""One exec session: its fds, output credit, stdin buffer, timeout and exit.

A Session is driven by the agent's event loop and never blocks. Its memory is bounded by
the protocol's flow control in both directions:

- output: the child's pipes (or pty master) are only polled while the host has granted
  credit (and the channel is not congested); with no credit they are unregistered, the
  pipe fills, and the child blocks in write(2). The agent never holds more than the
  credit the host granted.
- stdin: the host may send at most the window the agent granted; bytes are granted back
  (WINDOW) only once written to the child, so the buffer never exceeds INITIAL_WINDOW.

Detached (the channel to the host was lost): the session keeps reading output into a
spool of at most INITIAL_WINDOW bytes (bounded also by the agent-wide ``SPOOL_TOTAL``),
then stops reading, so the child blocks rather than output being dropped. ``attach``
rebinds it to a new connection: the spool goes out first, within the fresh output window.

EXIT is sent once the child has been reaped and its output reached EOF. A background
grandchild can keep the pipes open forever, so ~1 s after the child exits the session
drains what is readable and closes them (see ``drain``).
"""

from __future__ import annotations

import os
import selectors
import signal

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import ErrorCode, MsgType, ProtocolError

from . import procs
from .spawn import Child, set_winsize
from .transport import frame_slots

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Dict, Optional

OUT_READ = 1 << 20  # bytes per read of the child's output (a full pipe: see spawn.STDOUT_PIPE_SIZE)
OUT_FRAME = 256 * 1024  # bytes per STDOUT/STDERR frame: one read fills up to four
EXIT_GRACE = 1.0  # seconds to wait for output EOF after the child exited
DRAIN_CAP = 1 << 20  # bytes read after the grace period before pipes are closed anyway
STDIN_WRITE = 64 * 1024  # bytes per write(2) to the child
GRANT_BATCH = 32 * 1024  # return stdin credit in batches of at least this (or when idle)
MAX_TIMEOUT = 366 * 86400.0  # longer exec timeouts count as this (the host sends at most a day)

_R = selectors.EVENT_READ
_W = selectors.EVENT_WRITE


class Session:
    """State of one EXEC channel. ``sink`` queues frames (the agent)."""

    def __init__(
        self, channel: int, child: Child, request: Dict[str, Any], sel: selectors.BaseSelector, sink: Any, now: float
    ) -> None:
        self.channel = channel
        self.pid = child.pid
        self.argv0 = request["argv"][0]
        self.tty = bool(request["tty"])
        self.sel = sel
        self.sink = sink
        self.attached = True  # False: no host to send to (lost connection or abandoned)
        self.abandoned = False  # ended by protocol: output is discarded, never re-attached
        self.spool: list = []  # (MsgType, bytes) read while detached, sent on attach
        self.spooled = 0
        self.closed = False
        self.credit = protocol.INITIAL_WINDOW  # output bytes we may still send
        self.out_fds: Dict[int, int] = {}  # fd -> STDOUT/STDERR
        self.master: Optional[int] = child.master
        if child.master is not None:
            self.out_fds[child.master] = MsgType.STDOUT
            self.in_fd: Optional[int] = child.master
            self.accept_input = True  # a terminal is always interactive
        else:
            assert child.stdout is not None and child.stderr is not None
            self.out_fds[child.stdout] = MsgType.STDOUT
            self.out_fds[child.stderr] = MsgType.STDERR
            self.in_fd = child.stdin
            self.accept_input = child.stdin is not None
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.stdin_unacked = 0  # written to the child, not yet granted back
        self.status: Optional[int] = None
        self.exited_at: Optional[float] = None
        self.grace_at: Optional[float] = None
        self.draining = False
        self.reap_tried = False  # the agent tried reaping it when its output reached EOF
        self.drained_bytes = 0
        timeout = min(float(request.get("timeout") or 0), MAX_TIMEOUT)
        self.deadline: Optional[float] = now + timeout if timeout > 0 else None
        self.timed_out = False
        self._reg: Dict[int, int] = {}  # fd -> events currently registered

    # ---- selector interest ---------------------------------------------------------

    def sync(self, can_send: bool) -> None:
        """Register exactly the fds that can make progress now."""
        want: Dict[int, int] = {}
        if self.abandoned:
            readable = True
        elif self.attached:
            readable = self.credit > 0 and can_send
        else:
            readable = self._limit() > 0
        if readable:
            for fd in self.out_fds:
                want[fd] = _R
        if self.in_fd is not None and self.stdin_buf:
            want[self.in_fd] = want.get(self.in_fd, 0) | _W
        for fd in [fd for fd in self._reg if fd not in want]:
            self.sel.unregister(fd)
            del self._reg[fd]
        for fd, ev in want.items():
            cur = self._reg.get(fd)
            if cur is None:
                self.sel.register(fd, ev, self)
            elif cur != ev:
                self.sel.modify(fd, ev, self)
            self._reg[fd] = ev

    def on_event(self, fd: int, mask: int) -> None:
        if mask & _W and fd == self.in_fd:
            self._write_stdin()
        if mask & _R and fd in self.out_fds:
            self._read_out(fd)

    # ---- output ----------------------------------------------------------------------

    def _limit(self) -> int:
        if self.abandoned:
            return OUT_READ
        if not self.attached:
            room = min(protocol.INITIAL_WINDOW - self.spooled, self.sink.spool_room())
            return max(0, min(OUT_READ, room))
        return min(OUT_READ, self.credit)

    def _read_out(self, fd: int) -> int:
        """One read from an output fd; returns bytes read, -1 at EOF, 0 if nothing/no credit."""
        limit = self._limit()
        if limit <= 0:
            return 0
        conn = getattr(self.sink, "conn", None) if self.attached else None
        if conn is not None:
            return self._read_frame(conn, fd, limit)
        try:
            data = os.read(fd, limit)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""  # EIO: a pty whose slave side is fully closed, i.e. EOF
        if not data:
            self._close_fd(fd)
            return -1
        if self.attached:
            self.sink.send_frame(self.out_fds[fd], self.channel, data)
            self.credit -= len(data)
        elif not self.abandoned:
            self.spool.append((self.out_fds[fd], data))
            self.spooled += len(data)
            self.sink.spool_changed(len(data))
        return len(data)

    def _read_frame(self, conn: Any, fd: int, limit: int) -> int:
        """Attached: read straight into a pooled frame buffer, up to four frames' payloads
        with a header's room before each, and queue them as one buffer
        (``transport.FrameBuf``): no allocation, no copy in Python (each costs about as
        much as the channel itself under emulation), one loop pass per full pipe."""
        buf = conn.frame_buffer()
        try:
            n = os.readv(fd, frame_slots(buf, OUT_FRAME, limit))
        except BlockingIOError:
            n = -1
        except OSError:
            n = 0  # EIO: a pty whose slave side is fully closed, i.e. EOF
        if n <= 0:
            conn.give_back(buf)
            if n < 0:
                return 0
            self._close_fd(fd)
            return -1
        conn.send_frames(buf, self.out_fds[fd], self.channel, n, OUT_FRAME)
        self.credit -= n
        return n

    def on_window(self, increment: int) -> None:
        self.credit += increment
        if self.draining:
            self.drain()

    def drain(self) -> None:
        """After the exit grace period: read what is pending, then close the output fds.

        A fd with nothing readable is held only by some background process: close it. With
        no credit left, wait for WINDOW (``on_window`` calls back). At most DRAIN_CAP bytes
        are read here so a chatty grandchild cannot postpone EXIT forever.
        """
        self.draining = True
        self.grace_at = None
        for fd in list(self.out_fds):
            while fd in self.out_fds:
                if self.drained_bytes >= DRAIN_CAP:
                    self._close_fd(fd)
                    break
                n = self._read_out(fd)
                if n == 0:
                    if self._limit() <= 0:
                        break  # no credit (or spool full): wait for WINDOW / ATTACH
                    self._close_fd(fd)  # nothing pending
                    break
                if n > 0:
                    self.drained_bytes += n

    # ---- stdin -----------------------------------------------------------------------

    def on_stdin(self, data: bytes) -> None:
        if not self.accept_input or self.in_fd is None or self.stdin_eof:
            self._grant(len(data), force=True)  # dropped; keep the host's credit whole
            return
        if len(self.stdin_buf) + self.stdin_unacked + len(data) > protocol.INITIAL_WINDOW:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "STDIN beyond the granted window", self.channel)
        self.stdin_buf += data
        self._write_stdin()

    def on_stdin_eof(self) -> None:
        self.stdin_eof = True
        if not self.stdin_buf:
            self._close_input()

    def _write_stdin(self) -> None:
        fd = self.in_fd
        if fd is None or not self.stdin_buf:
            return
        try:
            n = os.write(fd, bytes(self.stdin_buf[:STDIN_WRITE]))
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the child closed its stdin; EIO: the pty is gone
            dropped = len(self.stdin_buf)
            self.stdin_buf.clear()
            self._grant(dropped, force=True)
            self._close_input()
            return
        del self.stdin_buf[:n]
        self._grant(n)
        if not self.stdin_buf and self.stdin_eof:
            self._close_input()

    def _grant(self, n: int, force: bool = False) -> None:
        self.stdin_unacked += n
        if self.stdin_unacked and (force or self.stdin_unacked >= GRANT_BATCH or not self.stdin_buf):
            if self.attached:  # a detached session's grants are void: the next host starts a fresh window
                self.sink.send_frame(MsgType.WINDOW, self.channel, protocol.WINDOW_STRUCT.pack(self.stdin_unacked))
            self.stdin_unacked = 0

    def _close_input(self) -> None:
        if self.in_fd is None:
            return
        if self.in_fd == self.master:
            self.in_fd = None  # the master also carries output: keep it open
            self.stdin_buf.clear()
        else:
            self._close_fd(self.in_fd)

    # ---- control ---------------------------------------------------------------------

    def resize(self, rows: int, cols: int) -> None:
        if self.master is not None:
            try:
                set_winsize(self.master, rows, cols)  # the kernel sends SIGWINCH
            except OSError:
                pass

    def send_signal(self, sig: int) -> None:
        if self.status is None or self.out_fds:
            try:
                os.killpg(self.pid, sig)
            except OSError:
                pass

    def on_timeout(self) -> None:
        self.deadline = None
        self.timed_out = True
        procs.kill_session(self.pid, signal.SIGKILL)

    def on_exit(self, status: int, now: float) -> None:
        self.status = status
        self.exited_at = now
        self.deadline = None
        if self.out_fds:
            self.grace_at = now + EXIT_GRACE

    def detach(self) -> None:
        """The host is gone: keep running, spool output (bounded) until ATTACH."""
        self.attached = False
        self.stdin_unacked = 0
        self.credit = 0
        if self.draining:
            self.drain()

    def describe(self) -> Dict[str, Any]:
        """This detached session as HELLO lists it."""
        return {"channel": self.channel, "pid": self.pid, "argv0": self.argv0, "tty": self.tty,
                "exited": self.status is not None}

    def attach(self) -> Dict[str, Any]:
        """Rebind to the current connection: STARTED body; the spool goes out at once.

        The spool is at most INITIAL_WINDOW bytes, so it fits the new host's fresh window.
        """
        self.attached = True
        self.credit = protocol.INITIAL_WINDOW
        body = {"pid": self.pid, "attached": True,
                "stdin_window": max(0, protocol.INITIAL_WINDOW - len(self.stdin_buf)),
                "stdin_open": self.accept_input and self.in_fd is not None and not self.stdin_eof}
        self.sink.send_json(MsgType.STARTED, self.channel, body)
        for kind, data in self.spool:
            self.sink.send_frame(kind, self.channel, data)
            self.credit -= len(data)
        self.sink.spool_changed(-self.spooled)
        self.spool = []
        self.spooled = 0
        if self.draining:
            self.drain()
        return body

    def abandon(self) -> None:
        """The session ended by protocol (ERROR either way): kill it, stop reporting."""
        self.attached = False
        self.abandoned = True
        if self.spooled:
            self.sink.spool_changed(-self.spooled)
        self.spool = []
        self.spooled = 0
        self.deadline = None
        if self.status is None or self.out_fds:
            procs.kill_session(self.pid, signal.SIGKILL)
        self.stdin_buf.clear()
        self._close_input()

    # ---- end -------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.status is not None and not self.out_fds

    def exit_body(self) -> Dict[str, Any]:
        assert self.status is not None
        code, sig = procs.decode_status(self.status)
        return {"exit_code": code, "signal": sig, "timed_out": self.timed_out}

    def close(self) -> None:
        """Release every fd (the child is reaped by now)."""
        self.closed = True
        for fd in list(self.out_fds):
            self._close_fd(fd)
        if self.in_fd is not None:
            self._close_fd(self.in_fd)
        if self.master is not None:
            self._close_fd(self.master)

    def _close_fd(self, fd: int) -> None:
        if fd in self._reg:
            self.sel.unregister(fd)
            del self._reg[fd]
        self.out_fds.pop(fd, None)
        if fd == self.in_fd:
            self.in_fd = None
        if fd == self.master:
            self.master = None
            self.in_fd = None
        try:
            os.close(fd)
        except OSError:
            pass
