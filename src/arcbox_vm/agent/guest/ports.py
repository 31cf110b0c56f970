"""The agent's part that forwards TCP connections to guest ports (a mixin of ``Agent``).

PORT_CONNECT opens a ``PortConn`` on its channel (``portconn``): a socket to
127.0.0.1:PORT in the guest. The frames the host sends on that channel (PORT_DATA,
PORT_EOF, WINDOW, PORT_CLOSE, ERROR) are routed here; after every loop iteration the
connections that finished, were reset or failed are settled: a finished one is forgotten
quietly, a reset one gets PORT_CLOSE, a failed one ERROR. Forwarded connections belong to
the connection to the host: losing it or shutting down closes them all.

Bounds: at most ``MAX_PORT_CONNECTIONS`` at once, and per connection at most PORT_WINDOW
bytes buffered (the protocol's credit; see ``portconn``).

``portconn`` (and with it ``socket``) is imported on the first PORT_CONNECT, or at
HELLO_ACK, never before HELLO.
"""

from __future__ import annotations

import time

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import ErrorCode, MsgType, ProtocolError

from .connection import HIGH_WATER
from .frames import json_or_empty
from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Dict, List

    from arcbox_vm.agent.protocol import Frame

    from .portconn import PortConn

MAX_PORT_CONNECTIONS = 1024  # forwarded connections open at once
PORT_FRAME_TYPES = frozenset({MsgType.PORT_DATA, MsgType.PORT_EOF, MsgType.PORT_CLOSE})


class PortForwards:
    """PORT_CONNECT and the forwarded connections of the current connection to the host."""

    def _init_ports(self) -> None:
        self.ports: Dict[int, PortConn] = {}  # channel -> PortConn (current connection only)

    def _on_port_connect(self, f: Frame) -> None:
        ch = f.channel
        if ch in self.sessions or ch in self.files or ch in self.detached or ch in self.ports:
            raise ProtocolError(ErrorCode.CHANNEL_IN_USE, "channel %d is already in use" % ch, ch)
        from .portconn import PortConn

        try:
            port = protocol.validate_port_request(f.json())
            if len(self.ports) >= MAX_PORT_CONNECTIONS:
                raise ProtocolError(ErrorCode.TOO_MANY, "too many forwarded connections (limit %d)"
                                    % MAX_PORT_CONNECTIONS)
            pc = PortConn(ch, port, self.sel, self, time.monotonic())
        except ProtocolError as exc:
            self._remember(ch)  # data the host pipelined after the request is dropped quietly
            raise ProtocolError(exc.code, exc.message, ch) from None
        self.ports[ch] = pc
        self._recent_set.discard(ch)

    def _on_port_frame(self, t: MsgType, f: Frame) -> bool:
        """Handle ``f`` if it belongs to port forwarding; False leaves it to the exec handling."""
        ch = f.channel
        pc = self.ports.get(ch)
        if pc is None:
            if t not in PORT_FRAME_TYPES:
                return False
            if t == MsgType.PORT_CLOSE or ch in self._recent_set:
                return True  # raced with our end of the connection: the host will see it
            raise ProtocolError(ErrorCode.NO_SUCH_CHANNEL, "no forwarded connection on channel %d" % ch, ch)
        if t == MsgType.PORT_DATA:
            pc.on_data(f.payload)
        elif t == MsgType.PORT_EOF:
            pc.on_peer_eof()
        elif t == MsgType.WINDOW:
            pc.on_window(protocol.decode_window(f.payload))
        elif t in (MsgType.PORT_CLOSE, MsgType.ERROR):  # the host dropped it: reset, never answer
            if t == MsgType.ERROR:
                log("channel %d: host ended the connection to port %d (%s)"
                    % (ch, pc.port, json_or_empty(f).get("code", "?")))
            self._end_port(pc, hard=True)
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "%s is not valid on a port channel" % t.name, ch)
        return True

    def can_queue(self) -> bool:
        """The channel takes more output now (for the connections, before each read)."""
        return self.conn is not None and self.conn.out_bytes < HIGH_WATER

    def _sync_ports(self, can_send: bool) -> None:
        for pc in list(self.ports.values()):
            try:
                pc.sync(can_send)
            except Exception as exc:
                pc.error = (ErrorCode.INTERNAL, "agent error forwarding to port %d: %s" % (pc.port, exc))

    def _port_deadlines(self) -> List[float]:
        """When the loop must wake up for the connections: connect deadlines; now (0) if one is
        waiting to be settled."""
        if any(pc.settled for pc in self.ports.values()):
            return [0.0]
        return [pc.deadline for pc in self.ports.values() if pc.deadline is not None]

    def _port_timers(self, now: float) -> None:
        for pc in self.ports.values():
            pc.on_timer(now)

    def _settle_ports(self) -> None:
        """After each loop iteration: forget finished connections, report reset and failed ones."""
        for pc in [pc for pc in self.ports.values() if pc.settled]:
            if pc.error is not None:
                code, message = pc.error
                log("channel %d: port %d: %s" % (pc.channel, pc.port, message))
                self._send_error(pc.channel, code, message)  # ends it (see FrameHandling._send_error)
            elif pc.reset:
                self.send_frame(MsgType.PORT_CLOSE, pc.channel)
                self._end_port(pc, hard=True)
            else:
                self._end_port(pc)

    def _end_port(self, pc: PortConn, hard: bool = False) -> None:
        """Forget a forwarded connection; late frames on its channel are ignored."""
        if self.ports.get(pc.channel) is pc:
            del self.ports[pc.channel]
            self._remember(pc.channel)
        pc.close(hard=hard)

    def _abort_ports(self, why: str) -> None:
        """The channel is lost or the agent shuts down: every forwarded connection is reset."""
        if self.ports:
            log("%d forwarded connection(s) closed (%s)" % (len(self.ports), why))
        for pc in list(self.ports.values()):
            self._end_port(pc, hard=True)
