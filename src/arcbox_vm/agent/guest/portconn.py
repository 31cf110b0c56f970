"""One forwarded TCP connection in the guest: a socket to 127.0.0.1:PORT and its channel.

Driven by the agent's loop like an exec session, never blocking:

- connect: non-blocking, at most ``CONNECT_TIMEOUT`` seconds; PORT_CONNECTED once the
  socket is connected, else an error (``refused`` when nothing listens on the port).
- guest->host: the socket is read only while the host has granted credit and the channel's
  output queue is below HIGH_WATER (checked before every read, so many connections ready at
  once cannot pile up more than one chunk past it): at most PORT_WINDOW bytes in flight.
- host->guest: PORT_DATA is buffered only within the PORT_WINDOW of credit granted to the
  host (more is a protocol error), written as the socket takes it, and granted back with
  WINDOW as it is written. So the agent never holds more than PORT_WINDOW per connection.
- EOF: the socket's EOF is sent as PORT_EOF; the host's PORT_EOF shuts down writing once
  the buffer is written. With both done the connection is ``finished``.
- failure: a reset socket (or any socket error) makes the connection ``reset`` (the
  agent then sends PORT_CLOSE); an error before PORT_CONNECTED, or a bug, sets ``error``
  (the agent sends ERROR). The agent settles finished, reset and failed connections after
  each loop iteration (``ports.PortForwards``).
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import struct

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import ErrorCode, MsgType, ProtocolError

from .log import log_exc

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Optional, Tuple

CONNECT_TIMEOUT = 10.0  # seconds a connect to the guest port may take
READ_CHUNK = 64 * 1024  # bytes per read from the socket (one PORT_DATA frame)
WRITE_CHUNK = 64 * 1024  # bytes per send(2) to the socket
GRANT_BATCH = 32 * 1024  # credit is returned in batches of at least this (or when the buffer is empty)
GUEST_ADDR = "127.0.0.1"

_R = selectors.EVENT_READ
_W = selectors.EVENT_WRITE


class PortConn:
    """The guest end of one port channel. ``sink`` queues frames (the agent)."""

    def __init__(self, channel: int, port: int, sel: selectors.BaseSelector, sink: Any, now: float) -> None:
        self.channel = channel
        self.port = port
        self.sel = sel
        self.sink = sink
        self.connecting = True
        self.deadline: Optional[float] = now + CONNECT_TIMEOUT
        self.credit = protocol.PORT_WINDOW  # bytes we may still send to the host
        self.wbuf = bytearray()  # from the host, not yet written to the socket
        self.unacked = 0  # written to the socket, not yet granted back
        self.read_eof = False  # the socket read EOF; PORT_EOF sent
        self.peer_eof = False  # the host sent PORT_EOF
        self.write_shut = False  # shutdown(SHUT_WR) done
        self.reset = False  # the socket failed: PORT_CLOSE goes to the host
        self.error: Optional[Tuple[str, str]] = None  # (code, message): ERROR goes to the host
        self.sent = 0
        self.received = 0
        self._events = 0
        self.sock: Optional[socket.socket] = None
        try:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:
            raise connect_error(port, exc.errno or errno.EIO) from None
        self.fd = self.sock.fileno()
        try:
            err = self.sock.connect_ex((GUEST_ADDR, port))
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            return
        if err:
            self.close()
            raise connect_error(port, err)
        self._connected()

    # ---- state -----------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Both directions ended cleanly: the channel can be forgotten."""
        return self.read_eof and self.write_shut

    @property
    def settled(self) -> bool:
        return self.finished or self.reset or self.error is not None

    def _connected(self) -> None:
        self.connecting = False
        self.deadline = None
        self.sink.send_json(MsgType.PORT_CONNECTED, self.channel, {})

    def _fail(self, code: str, message: str) -> None:
        if self.error is None:
            self.error = (code, message)

    # ---- selector interest ---------------------------------------------------------

    def sync(self, can_send: bool) -> None:
        """Register the socket for exactly what can make progress now."""
        if self.sock is None:
            return
        want = 0
        if self.settled:
            want = 0
        elif self.connecting:
            want = _W
        else:
            if not self.read_eof and self.credit > 0 and can_send:
                want |= _R
            if self.wbuf:
                want |= _W
        if want == self._events:
            return
        if not want:
            self.sel.unregister(self.fd)
        elif not self._events:
            self.sel.register(self.fd, want, self.on_ready)
        else:
            self.sel.modify(self.fd, want, self.on_ready)
        self._events = want

    def on_ready(self, mask: int) -> None:
        """Selector callback; never raises (a bug fails this connection only)."""
        try:
            if self.connecting:
                if mask & (_W | _R):
                    self._finish_connect()
                return
            if mask & _W:
                self._write()
            if mask & _R and not self.settled:
                self._read()
        except Exception as exc:
            log_exc("channel %d: forwarding to port %d failed" % (self.channel, self.port))
            self._fail(ErrorCode.INTERNAL, "agent error forwarding to port %d: %s" % (self.port, exc))

    def on_timer(self, now: float) -> None:
        if self.connecting and self.deadline is not None and now >= self.deadline:
            self.deadline = None
            self._fail(ErrorCode.IO, "connecting to %s:%d in the guest timed out after %.0f s"
                       % (GUEST_ADDR, self.port, CONNECT_TIMEOUT))

    # ---- socket ------------------------------------------------------------------------

    def _finish_connect(self) -> None:
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            exc = connect_error(self.port, err)
            self._fail(exc.code, exc.message)
            return
        self._connected()
        self._write()  # data or EOF the host sent while we were connecting

    def _read(self) -> None:
        assert self.sock is not None
        n = min(READ_CHUNK, self.credit)
        if n <= 0 or not self.sink.can_queue():
            return  # no credit, or the channel's output queue is full: the next sync stops reading
        try:
            data = self.sock.recv(n)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ECONNRESET and friends: the program in the guest dropped the connection
            self.reset = True
            return
        if not data:
            self.read_eof = True
            self.sink.send_frame(MsgType.PORT_EOF, self.channel)
            return
        self.credit -= len(data)
        self.sent += len(data)
        self.sink.send_frame(MsgType.PORT_DATA, self.channel, data)

    def _write(self) -> None:
        assert self.sock is not None
        if self.wbuf:
            try:
                n = self.sock.send(memoryview(self.wbuf)[:WRITE_CHUNK])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EPIPE / ECONNRESET: nobody reads this any more
                self.reset = True
                return
            del self.wbuf[:n]
            self.unacked += n
            if self.unacked >= GRANT_BATCH or not self.wbuf:
                self.sink.send_frame(MsgType.WINDOW, self.channel, protocol.WINDOW_STRUCT.pack(self.unacked))
                self.unacked = 0
        if not self.wbuf and self.peer_eof and not self.write_shut and not self.connecting:
            self.write_shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # not connected any more: reading tells

    # ---- frames from the host ----------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        if self.peer_eof:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "PORT_DATA after PORT_EOF", self.channel)
        if len(self.wbuf) + self.unacked + len(data) > protocol.PORT_WINDOW:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "PORT_DATA beyond the granted window", self.channel)
        self.received += len(data)
        self.wbuf += data
        if not self.connecting:
            self._write()

    def on_peer_eof(self) -> None:
        self.peer_eof = True
        if not self.connecting:
            self._write()

    def on_window(self, increment: int) -> None:
        self.credit += increment
        if self.credit > protocol.PORT_WINDOW:
            self.credit = protocol.PORT_WINDOW  # the host returned more than we sent: ignore the excess

    # ---- end ---------------------------------------------------------------------------

    def close(self, hard: bool = False) -> None:
        """Release the socket; ``hard`` resets the connection (the program sees ECONNRESET)."""
        sock, self.sock = self.sock, None
        self.wbuf = bytearray()
        if sock is None:
            return
        if self._events:
            try:
                self.sel.unregister(self.fd)
            except (KeyError, ValueError):
                pass
            self._events = 0
        if hard:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        try:
            sock.close()
        except OSError:
            pass


def connect_error(port: int, err: int) -> ProtocolError:
    """The ERROR for a failed connect to the guest port."""
    where = "%s:%d in the guest" % (GUEST_ADDR, port)
    if err == errno.ECONNREFUSED:
        return ProtocolError(ErrorCode.REFUSED, "nothing listens on %s (connection refused)" % where)
    if err in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        return ProtocolError(ErrorCode.TOO_MANY, "cannot connect to %s: %s" % (where, os.strerror(err)))
    return ProtocolError(ErrorCode.IO, "cannot connect to %s: %s" % (where, os.strerror(err)))
