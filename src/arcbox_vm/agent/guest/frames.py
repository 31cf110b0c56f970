"""The agent's part that handles each frame from the host (a mixin of ``Agent``).

Every frame the decoder yields comes through ``_handle_input``, which is where the
robustness rule lives: a decode error, an unknown type, bad JSON or even a bug in a
handler is answered with an ERROR on that frame's channel and the stream goes on. Frames
are then routed by channel: channel 0 (control) is handled here (HELLO_ACK, ERROR,
SHUTDOWN; PING on any channel), other channels go to the exec (``execs``), file
(``transfers``) or port forwarding (``ports``) handling.

Channels that just finished are remembered (``RECENT_CHANNELS``), so the host's frames
that crossed our EXIT / FILE_DONE / ERROR on the wire are dropped quietly instead of
being answered with NO_SUCH_CHANNEL.
"""

from __future__ import annotations

import collections

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import DecodeError, ErrorCode, Frame, MsgType, ProtocolError

from .connection import RETRY_MIN
from .log import log, log_exc

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Deque, Dict, Set

VERSION_RETRY = 10.0  # the host refused our protocol version: try again much later
RECENT_CHANNELS = 1024  # finished channels remembered so late WINDOW/STDIN frames are ignored quietly


class FrameHandling:
    """Decode, route and answer frames; channel 0 (control) itself."""

    def _init_frames(self) -> None:
        self._recent: Deque[int] = collections.deque()
        self._recent_set: Set[int] = set()
        self._warm = False

    def _handle_input(self, data: bytes) -> None:
        for item in self.decoder.feed(data):
            if self.conn is None:
                break  # a frame made us disconnect (e.g. version refused)
            if isinstance(item, DecodeError):
                self._send_error(item.channel, item.code, item.message)
                continue
            self.got_frames = True
            try:
                self._on_frame(item)
            except ProtocolError as exc:
                self._send_error(item.channel, exc.code, exc.message)
            except Exception as exc:  # a bug: answer this frame, keep the channel
                log_exc("error handling %r" % (item,))
                self._send_error(item.channel, ErrorCode.INTERNAL, "agent error handling %r: %s" % (item, exc))

    def _on_frame(self, f: Frame) -> None:
        try:
            t = MsgType(f.type)
        except ValueError:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "unknown frame type 0x%02x" % f.type, f.channel) from None
        if t == MsgType.PING:
            self.send_frame(MsgType.PONG, f.channel, f.payload)
        elif t == MsgType.PONG:
            pass
        elif f.channel == protocol.CONTROL_CHANNEL:
            self._on_control(t, f)
        else:
            self._on_channel(t, f)

    def _on_control(self, t: MsgType, f: Frame) -> None:
        if t == MsgType.HELLO_ACK:
            self.hello_acked = True
            self.backoff = RETRY_MIN
            self.connect_failures = 0
            log("host acknowledged HELLO (%d running session(s) detached)" % len(self.detached))
            self._warm_up()
        elif t == MsgType.ERROR:
            body = json_or_empty(f)
            code = str(body.get("code", ""))
            log("host reported error %s: %s" % (code, body.get("message", "")))
            if code == ErrorCode.VERSION:
                self.disconnect("host refused protocol %d" % protocol.PROTOCOL_VERSION, retry_in=VERSION_RETRY)
        elif t == MsgType.SHUTDOWN:
            body = f.json()
            action = body.get("action", "reboot")
            if action not in ("reboot", "poweroff"):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "SHUTDOWN action must be 'reboot' or 'poweroff'")
            self.send_frame(MsgType.SHUTDOWN_ACK, 0)
            self.begin_shutdown(action, "host requested %s" % action)
        elif t == MsgType.HELLO_AGAIN:
            self.hello_again()
        elif t == MsgType.REINIT:
            body = f.json()
            if not self.pid1:  # an agent on an ordinary host (tests) must not touch its clock or network
                self._send_json(MsgType.REINIT_DONE, 0, {"errors": [], "skipped": "not PID 1"})
                return
            from .reinit import apply

            self._send_json(MsgType.REINIT_DONE, 0, {"errors": apply(body)})
        elif t == MsgType.WINDOW:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "WINDOW needs an exec channel, not channel 0")
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "%s is not valid on channel 0 from the host" % t.name)

    def _warm_up(self) -> None:
        """Import the exec machinery now rather than inside the first EXEC.

        Deferred past HELLO so the host learns the guest is up as early as possible;
        done at HELLO_ACK because the host usually needs a moment before its first EXEC.
        """
        if self._warm:
            return
        self._warm = True
        try:
            import fcntl  # noqa: F401
            import pwd  # noqa: F401
            import termios  # noqa: F401

            from . import fileread, filestat, filewrite, portconn, session, spawn  # noqa: F401
        except Exception:
            log_exc("warm-up imports failed")

    def _on_channel(self, t: MsgType, f: Frame) -> None:
        ch = f.channel
        if t == MsgType.EXEC:
            self._on_exec(f)
            return
        if t == MsgType.ATTACH:
            self._on_attach(f)
            return
        if t in protocol.FILE_REQUEST_TYPES:
            self._on_file_request(t, f)
            return
        if t == MsgType.PORT_CONNECT:
            self._on_port_connect(f)
            return
        if self._on_port_frame(t, f):
            return
        fs = self.files.get(ch)
        if fs is not None:
            self._on_file_frame(fs, t, f)
            return
        self._on_session_frame(t, f)

    def _send_error(self, channel: int, code: str, message: str) -> None:
        """ERROR on ``channel``; on a live session's channel that ends the session."""
        self._send_json(MsgType.ERROR, channel, {"code": code, "message": message})
        fs = self.files.get(channel) if channel and code != ErrorCode.CHANNEL_IN_USE else None
        if fs is not None:
            log("channel %d: %s of %s ended by error %s: %s" % (channel, fs.kind, fs.path, code, message))
            self._end_file(fs)
        pc = self.ports.get(channel) if channel and code != ErrorCode.CHANNEL_IN_USE else None
        if pc is not None:
            self._end_port(pc, hard=True)
        s = self.sessions.get(channel) if channel else None
        if s is not None and code != ErrorCode.CHANNEL_IN_USE:
            log("channel %d: ended by error %s: %s" % (channel, code, message))
            self._abandon(s)

    def _remember(self, channel: int) -> None:
        """A channel just finished: late frames on it are dropped quietly (see ``RECENT_CHANNELS``)."""
        if channel in self._recent_set:
            return
        self._recent.append(channel)
        self._recent_set.add(channel)
        if len(self._recent) > RECENT_CHANNELS:
            self._recent_set.discard(self._recent.popleft())


def json_or_empty(f: Frame) -> Dict[str, Any]:
    """A frame's JSON body, or {} if it is not valid JSON (to log what the host sent)."""
    try:
        return f.json()
    except ProtocolError:
        return {}
