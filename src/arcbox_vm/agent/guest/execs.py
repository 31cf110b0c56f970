"""The agent's part that starts exec sessions and serves their channels (a mixin of ``Agent``).

EXEC validates the request, resolves the user, spawns the child (``spawn``) and binds a
``Session`` to the channel; ATTACH rebinds a session that kept running detached to the
new connection. The frames the host sends on an exec channel (STDIN, STDIN_EOF, WINDOW,
RESIZE, SIGNAL, ERROR) are checked here before the session acts on them, so a session
only ever sees well-formed requests.

The exec machinery (``spawn``, ``session``) is imported on first use, or at HELLO_ACK
(``FrameHandling._warm_up``), never before HELLO: boot time under emulation counts.
"""

from __future__ import annotations

import time

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import ErrorCode, MsgType, ProtocolError

from .frames import json_or_empty
from .log import log, log_later

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from arcbox_vm.agent.protocol import Frame

MAX_SESSIONS = 256  # attached + detached + abandoned; finished detached ones are forgotten to make room

# frame types the host may send on an open exec or file channel (anything else there is BAD_REQUEST)
_HOST_CHANNEL_TYPES = frozenset(
    {
        MsgType.STDIN,
        MsgType.STDIN_EOF,
        MsgType.WINDOW,
        MsgType.RESIZE,
        MsgType.SIGNAL,
        MsgType.FILE_DATA,
        MsgType.FILE_END,
    }
)


def _u16(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 0xFFFF


class ExecHandling:
    """EXEC, ATTACH and the frames on an exec channel."""

    def _on_attach(self, f: Frame) -> None:
        ch = f.channel
        if ch in self.sessions or ch in self.files or ch in self.ports:
            raise ProtocolError(ErrorCode.CHANNEL_IN_USE, "channel %d is attached already" % ch, ch)
        s = self.detached.pop(ch, None)
        if s is None:
            raise ProtocolError(ErrorCode.NO_SUCH_CHANNEL, "no detached session on channel %d" % ch, ch)
        self.sessions[ch] = s
        s.attach()
        log("channel %d: re-attached to pid %d%s" % (ch, s.pid, " (exited)" if s.status is not None else ""))

    def _on_exec(self, f: Frame) -> None:
        ch = f.channel
        if ch in self.sessions or ch in self.files or ch in self.detached or ch in self.ports:
            raise ProtocolError(ErrorCode.CHANNEL_IN_USE, "channel %d already has a running session" % ch, ch)
        live = len(self.sessions) + len(self.detached) + len(self.abandoned)
        if live >= MAX_SESSIONS and not self._forget_finished(live - MAX_SESSIONS + 1):
            raise ProtocolError(ErrorCode.TOO_MANY, "too many sessions (limit %d)" % MAX_SESSIONS, ch)
        try:
            req = protocol.validate_exec_request(f.json())
        except ProtocolError as exc:
            raise ProtocolError(exc.code, exc.message, ch) from None
        from . import spawn
        from .session import Session

        try:
            ident = spawn.resolve_user(req["user"])
            env = spawn.build_env(ident, req["env"], req["tty"])
            cwd = req["cwd"] or spawn.default_cwd(ident)
            child = spawn.spawn(req["argv"], env, cwd, ident, req["tty"], req["rows"], req["cols"], req["stdin"])
        except spawn.SpawnError as exc:
            log("channel %d: cannot start %r: %s" % (ch, req["argv"][0], exc.message))
            raise ProtocolError(exc.code, exc.message, ch) from None
        s = Session(ch, child, req, self.sel, self, time.monotonic())
        self.sessions[ch] = s
        self.by_pid[child.pid] = s
        if ch in self._recent_set:
            self._recent_set.discard(ch)
        self._send_json(MsgType.STARTED, ch, {"pid": child.pid})
        log_later("channel %d: started pid %d: %s%s" % (ch, child.pid, req["argv"][0], " (tty)" if req["tty"] else ""))

    def _on_session_frame(self, t: MsgType, f: Frame) -> None:
        """A frame for the exec session on ``f.channel`` (file channels are handled before)."""
        ch = f.channel
        s = self.sessions.get(ch)
        if t == MsgType.ERROR:
            if s is not None:  # the host gave up on this session
                body = json_or_empty(f)
                log("channel %d: host ended the session (%s)" % (ch, body.get("code", "?")))
                self._abandon(s)
            return  # never answer an ERROR with an ERROR
        if t not in _HOST_CHANNEL_TYPES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "%s is not valid from the host" % t.name, ch)
        if s is None:
            if ch in self._recent_set:
                return  # raced with EXIT / FILE_DONE / an error: the host will see it and stop
            raise ProtocolError(ErrorCode.NO_SUCH_CHANNEL, "no session on channel %d" % ch, ch)
        if t in (MsgType.FILE_DATA, MsgType.FILE_END):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "%s is not valid on an exec channel" % t.name, ch)
        if t == MsgType.STDIN:
            s.on_stdin(f.payload)
        elif t == MsgType.STDIN_EOF:
            s.on_stdin_eof()
        elif t == MsgType.WINDOW:
            s.on_window(protocol.decode_window(f.payload))
        elif t == MsgType.RESIZE:
            body = f.json()
            rows, cols = body.get("rows"), body.get("cols")
            if not (_u16(rows) and _u16(cols)):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "RESIZE needs integer rows and cols in 1..65535", ch)
            s.resize(int(rows), int(cols))  # type: ignore[arg-type]
        elif t == MsgType.SIGNAL:
            sig = f.json().get("signal")
            if not isinstance(sig, int) or isinstance(sig, bool) or not 1 <= sig <= 64:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "SIGNAL needs an integer signal in 1..64", ch)
            s.send_signal(sig)
