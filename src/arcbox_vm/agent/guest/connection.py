"""The agent's part that runs the channel to the host (a mixin of ``Agent``).

The agent dials the host (``transport`` opens the channel) and keeps redialing with
backoff while there is none; every connection starts with HELLO, which lists the
sessions that kept running detached. Reads take up to ``CONN_READ_BUDGET`` per wakeup and
hand the bytes to the frame handling; writes are queued on the ``Conn`` and flushed as
the channel takes them. Losing the channel never ends an exec session: they are moved to
the detached table (``sessiontable``); file transfers are aborted, forwarded connections reset.

The output queue is the loop's congestion signal: above ``HIGH_WATER`` sessions and file
reads stop producing, above ``INPUT_PAUSE`` the channel is not even read (the host is not
reading what we send, so taking more requests would only grow the queue).
"""

from __future__ import annotations

import os
import selectors
import time

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import MsgType

from . import AGENT_VERSION
from .log import log, log_exc

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Dict, Optional

    from .transport import Conn, Transport

HIGH_WATER = 256 * 1024  # queued output bytes above which sessions stop reading their pipes
INPUT_PAUSE = 8 << 20  # queued output bytes above which the channel is not read (host not reading)
CONN_READ_BUDGET = 1 << 20  # channel bytes taken per wakeup, so one busy channel cannot starve the loop
RETRY_MIN = 0.1
RETRY_MAX = 1.0
FEATURES = ["exec", "tty", "stdin", "signal", "resize", "timeout", "user", "flow_control", "shutdown", "ping",
            protocol.FEATURE_FILES, protocol.FEATURE_ATTACH, protocol.FEATURE_PORTS, protocol.FEATURE_REINIT]

# FILE_DATA is written to its file as soon as it is decoded, so its payload may stay a view
# into the connection's receive buffer (no copy); every other payload is copied, because
# handlers keep some (PONG echoes, port data, stdin) beyond the next read.
VIEW_TYPES = frozenset({MsgType.FILE_DATA})

_R = selectors.EVENT_READ
_W = selectors.EVENT_WRITE


class HostConnection:
    """Dial, HELLO, read, write and lose the channel to the host."""

    def _init_connection(self, transport: Transport) -> None:
        self.transport = transport
        self.conn: Optional[Conn] = None
        self.conn_events = 0
        self.decoder = protocol.FrameDecoder(views=VIEW_TYPES)
        self.next_connect = 0.0
        self.backoff = RETRY_MIN
        self.connect_failures = 0
        self.hello_acked = False
        self.got_frames = False

    def _connect(self) -> None:
        try:
            conn = self.transport.open()
        except OSError as exc:
            self.connect_failures += 1
            n = self.connect_failures
            if n == 1 or n in (10, 100) or n % 1000 == 0:
                log("cannot open the channel %s (attempt %d): %s" % (self.transport.name, n, exc))
            self.next_connect = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, RETRY_MAX)
            return
        self.conn = conn
        self.conn_events = 0
        self.decoder = protocol.FrameDecoder(views=VIEW_TYPES)
        self.hello_acked = False
        self.got_frames = False
        if self.connect_failures < 2:
            log("channel %s open; sending HELLO" % conn.name)
        self._send_json(MsgType.HELLO, protocol.CONTROL_CHANNEL, self.hello_body())

    def hello_body(self) -> Dict[str, Any]:
        uts = os.uname()
        return {
            "proto": protocol.PROTOCOL_VERSION,
            "agent_version": AGENT_VERSION,
            "kernel": uts.release,
            "hostname": uts.nodename,
            "pid": os.getpid(),
            "features": list(FEATURES),
            "sessions": len(self.by_pid),
            "detached": [s.describe() for s in sorted(self.detached.values(), key=lambda s: s.channel)],
        }

    def _sync_conn(self) -> None:
        conn = self.conn
        if conn is None:
            return
        want = (_W if conn.out_bytes else 0) | (_R if conn.out_bytes < INPUT_PAUSE else 0)
        if want == self.conn_events:
            return
        if self.conn_events == 0:
            self.sel.register(conn.fd, want, self._on_conn)
        elif want == 0:
            self.sel.unregister(conn.fd)
        else:
            self.sel.modify(conn.fd, want, self._on_conn)
        self.conn_events = want

    def _on_conn(self, mask: int) -> None:
        try:
            if mask & _W:
                self._flush()
            if mask & _R and self.conn is not None:
                self._read_conn()
        except Exception:
            log_exc("error while serving the channel; reconnecting")
            self.disconnect("internal error")

    def _flush(self) -> None:
        assert self.conn is not None
        try:
            self.conn.flush()
        except OSError as exc:
            self.disconnect("write failed: %s" % exc)

    def _read_conn(self) -> None:
        """Take up to CONN_READ_BUDGET bytes off the channel and handle the frames in them.

        Each read is one readv of page-sized slices of the connection's receive buffer
        (``Conn.read_into``): a virtio-serial port hands out one 4 KiB buffer per read(2),
        so one syscall takes many of them, and the frames are decoded straight out of
        that buffer (the decoder copies each payload once and keeps only an unfinished
        tail). Several reads per wakeup, up to the budget, so one busy channel cannot
        starve the loop yet an upload is not one loop iteration per read.
        """
        conn = self.conn
        assert conn is not None
        total = 0
        end: Optional[str] = None
        while total < CONN_READ_BUDGET and self.conn is conn:
            try:
                data = conn.read_into()
            except BlockingIOError:
                break
            except OSError as exc:
                end = "read failed: %s" % exc
                break
            if not data:
                end = "EOF"
                break
            total += len(data)
            self._handle_input(data)
        if end is not None and self.conn is conn:
            self.disconnect(end)

    def disconnect(self, reason: str, retry_in: Optional[float] = None) -> None:
        conn = self.conn
        if conn is None:
            return
        if self.conn_events:
            try:
                self.sel.unregister(conn.fd)
            except (KeyError, ValueError):
                pass
        self.conn_events = 0
        conn.close()
        self.conn = None
        self._abort_files("channel lost")
        self._abort_ports("channel lost")
        live = self.got_frames
        for s in self.sessions.values():
            s.detach()
            self.detached[s.channel] = s
        n = len(self.sessions)
        self.sessions.clear()
        if live:
            self.backoff = RETRY_MIN
            self.connect_failures = 0
        else:
            # opened but dead (e.g. a virtio port with no host attached reads EOF at once):
            # counts as a failed attempt, so the retry backs off and logging stays quiet
            self.connect_failures += 1
        if live or n:
            log("channel lost (%s); %d session(s) keep running detached" % (reason, n))
        self.next_connect = time.monotonic() + (retry_in if retry_in is not None else self.backoff)
        if retry_in is None:
            self.backoff = min(self.backoff * 2, RETRY_MAX)

    def hello_again(self) -> None:
        """HELLO_AGAIN: another host is behind the same stream (this VM was restored from a
        snapshot). The first request since the last HELLO_ACK ends the old connection's
        business as a lost channel would — sessions detached, transfers aborted, output
        still queued for the old host dropped — and every request gets a fresh HELLO."""
        conn = self.conn
        if conn is None:
            return
        if self.hello_acked:
            self._abort_files("the host changed")
            for s in self.sessions.values():
                s.detach()
                self.detached[s.channel] = s
            n = len(self.sessions)
            self.sessions.clear()
            conn.close_queue()
            self.decoder = protocol.FrameDecoder(views=VIEW_TYPES)
            self.hello_acked = False
            log("a new host is behind the channel (restored VM); %d session(s) keep running detached" % n)
        self._send_json(MsgType.HELLO, protocol.CONTROL_CHANNEL, self.hello_body())

    def send_frame(self, type: int, channel: int, payload: bytes = b"") -> None:
        """Queue a frame (dropped when there is no channel); used by sessions too."""
        if self.conn is not None:
            self.conn.send_frame(type, channel, payload)

    def _send_json(self, type: int, channel: int, body: Dict[str, Any]) -> None:
        if self.conn is not None:
            self.conn.send(protocol.encode_json(type, channel, body))

    send_json = _send_json  # for sessions
