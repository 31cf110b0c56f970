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

File transfers (``filewrite``, ``fileread``, ``filestat``) share the loop: a write session
writes each FILE_DATA frame as it is decoded (the channel is read 256 KiB at a time), read
sessions are pumped once per iteration within ``READ_BUDGET`` and their credit. Unlike exec sessions they do not
survive the channel: a lost connection or a shutdown aborts them (temporary files removed).
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import time

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import DecodeError, ErrorCode, Frame, MsgType, ProtocolError

from . import AGENT_VERSION, procs
from .log import log, log_exc
from .transport import READ_SIZE, Conn, Transport

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Deque, Dict, List, Optional, Set

    from .session import Session

MAX_SESSIONS = 256
HIGH_WATER = 256 * 1024  # queued output bytes above which sessions stop reading their pipes
INPUT_PAUSE = 8 << 20  # queued output bytes above which the channel is not read (host not reading)
CONN_READ_BUDGET = 256 * 1024  # channel bytes taken per wakeup, so one busy channel cannot starve the loop
SMALL_READ = 4096  # a virtio-serial port's buffer size
RETRY_MIN = 0.1
RETRY_MAX = 1.0
VERSION_RETRY = 10.0  # the host refused our protocol version: try again much later
FEATURES = ["exec", "tty", "stdin", "signal", "resize", "timeout", "user", "flow_control", "shutdown", "ping",
            protocol.FEATURE_FILES, protocol.FEATURE_ATTACH]
KEEP_FINISHED = 64  # finished detached sessions (exit status + spool) kept for a late ATTACH
SPOOL_TOTAL = 16 << 20  # output bytes all detached sessions together may spool
RECENT_CHANNELS = 1024  # finished channels remembered so late WINDOW/STDIN frames are ignored quietly
READ_BUDGET = 256 * 1024  # file bytes read per loop iteration, all read sessions together
MAX_FILE_SESSIONS = 64  # concurrent reads + writes

_R = selectors.EVENT_READ
_W = selectors.EVENT_WRITE


def _noop_handler(signum: int, frame: Any) -> None:
    """Signals are handled from the wakeup pipe in the loop, not here."""


class Shutdown(BaseException):
    """Raised to leave ``Agent.run`` (only when not PID 1).

    A BaseException so the per-handler ``except Exception`` guards let it through.
    """


class Agent:
    def __init__(self, transport: Transport, pid1: bool) -> None:
        self.transport = transport
        self.pid1 = pid1
        self.sel = selectors.DefaultSelector()
        self.conn: Optional[Conn] = None
        self.conn_events = 0
        self.decoder = protocol.FrameDecoder()
        self.sessions: Dict[int, Session] = {}  # channel -> Session (attached to the current connection)
        self.detached: Dict[int, Session] = {}  # channel -> session that outlived its connection (re-attachable)
        self.abandoned: Set[Session] = set()  # ended by protocol, waiting to be reaped
        self.spool_total = 0  # bytes spooled by detached sessions
        self.by_pid: Dict[int, Session] = {}
        self.files: Dict[int, Any] = {}  # channel -> WriteSession / ReadSession (current connection only)
        self._recent: Deque[int] = collections.deque()
        self._recent_set: Set[int] = set()
        self.next_connect = 0.0
        self.backoff = RETRY_MIN
        self.connect_failures = 0
        self.hello_acked = False
        self.got_frames = False
        self.stopping = False
        self._warm = False
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

    def _reap(self) -> None:
        now = time.monotonic()
        for pid, status in procs.reap():
            s = self.by_pid.pop(pid, None)
            if s is not None:
                s.on_exit(status, now)

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
        can_send = self.conn is not None and self.conn.out_bytes < HIGH_WATER
        if can_send and self.files:
            self._pump_files()
        for s in self._all_sessions():
            try:
                s.sync(can_send)
            except Exception:
                log_exc("session on channel %d: selector update failed; ending it" % s.channel)
                self._end_session(s, ErrorCode.INTERNAL, "agent error while serving the session")
        self._sync_conn()
        timeout = self._next_timeout(time.monotonic())
        for key, mask in self.sel.select(timeout):
            self._dispatch(key, mask)
        now = time.monotonic()
        self._run_timers(now)
        self._finish_sessions()

    def _all_sessions(self) -> List[Session]:
        return list(self.sessions.values()) + list(self.detached.values()) + list(self.abandoned)

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
        for s in self._all_sessions():
            if s.deadline is not None:
                when.append(s.deadline)
            if s.grace_at is not None:
                when.append(s.grace_at)
        if not when:
            return None
        return max(0.0, min(when) - now)

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

    def _finish_sessions(self) -> None:
        for ch, s in list(self.sessions.items()):
            if s.finished:
                del self.sessions[ch]
                self._remember(ch)
                s.close()
                body = s.exit_body()
                self._send_json(MsgType.EXIT, ch, body)
                log("channel %d: pid %d exited: %s" % (ch, s.pid, _describe_exit(body)))
        for s in list(self.abandoned):
            if s.finished:
                self.abandoned.discard(s)
                s.close()
        finished = [s for s in self.detached.values() if s.finished]
        for s in finished:
            if not s.closed:
                s.close()  # fds go now; status and spool stay for ATTACH
                log("channel %d: pid %d exited while detached: %s" % (s.channel, s.pid, _describe_exit(s.exit_body())))
        if len(finished) > KEEP_FINISHED:
            self._forget_finished(len(finished) - KEEP_FINISHED)

    def _forget_finished(self, n: int) -> int:
        """Drop the ``n`` oldest finished detached sessions; returns how many went."""
        done = sorted((s for s in self.detached.values() if s.finished), key=lambda s: s.exited_at or 0.0)
        for s in done[:n]:
            del self.detached[s.channel]
            s.abandon()  # releases its spool
            self._remember(s.channel)
            log("channel %d: forgot finished detached session (never re-attached)" % s.channel)
        return min(n, len(done))

    # ---- detached sessions' spool (called by sessions) -------------------------------

    def spool_room(self) -> int:
        return max(0, SPOOL_TOTAL - self.spool_total)

    def spool_changed(self, delta: int) -> None:
        self.spool_total += delta

    # ---- file transfers --------------------------------------------------------------

    def _files_pending(self) -> bool:
        """A read session could send now (so the loop must not sleep)."""
        if self.conn is None or self.conn.out_bytes >= HIGH_WATER:
            return False
        return any(fs.kind == "read" and fs.wants() for fs in self.files.values())

    def _pump_files(self) -> None:
        """Read sessions send up to READ_BUDGET bytes in all, round-robin, within credit."""
        budget = READ_BUDGET
        while budget > 0 and self.conn is not None and self.conn.out_bytes < HIGH_WATER:
            progress = False
            for fs in [fs for fs in self.files.values() if fs.kind == "read" and fs.wants()]:
                if budget <= 0:
                    break
                try:
                    budget -= fs.pump(budget)
                except ProtocolError as exc:
                    self._send_error(fs.channel, exc.code, exc.message)
                    continue
                except Exception as exc:
                    log_exc("channel %d: reading %s failed" % (fs.channel, fs.path))
                    self._send_error(fs.channel, ErrorCode.INTERNAL, "agent error reading %s: %s" % (fs.path, exc))
                    continue
                progress = True
                if fs.done:
                    self._end_file(fs)
                    log("channel %d: sent %s (%d bytes)" % (fs.channel, fs.path, fs.sent))
            if not progress:
                return

    def _end_file(self, fs: Any) -> None:
        """Forget a file session (finished or aborted); late frames on its channel are ignored."""
        if self.files.get(fs.channel) is fs:
            del self.files[fs.channel]
            self._remember(fs.channel)
        fs.abort()

    def _abort_files(self, why: str) -> None:
        for fs in list(self.files.values()):
            if not fs.done:
                log("channel %d: %s of %s aborted (%s)" % (fs.channel, fs.kind, fs.path, why))
            self._end_file(fs)

    def _on_file_request(self, t: MsgType, f: Frame) -> None:
        ch = f.channel
        if ch in self.sessions or ch in self.files or ch in self.detached:
            raise ProtocolError(ErrorCode.CHANNEL_IN_USE, "channel %d is already in use" % ch, ch)
        from . import fileinfo, fileread, filestat, filewrite

        try:
            req = protocol.validate_file_request(t, f.json())
            if t == MsgType.FILE_STAT:
                self._send_json(MsgType.FILE_STAT_RESULT, ch, filestat.stat_path(req))
                self._remember(ch)
                return
            if t == MsgType.FILE_LIST:
                self._send_json(MsgType.FILE_LIST_RESULT, ch, filestat.list_dir(req))
                self._remember(ch)
                return
            if len(self.files) >= MAX_FILE_SESSIONS:
                raise ProtocolError(ErrorCode.TOO_MANY, "too many file transfers (limit %d)" % MAX_FILE_SESSIONS)
            if t == MsgType.FILE_WRITE:
                fs: Any = filewrite.WriteSession(ch, req, self)
                reply, body = MsgType.FILE_READY, {"path": fileinfo.safe_text(fs.target)}
            else:
                fs = fileread.ReadSession(ch, req, self)
                reply, body = MsgType.FILE_INFO, fs.info
        except ProtocolError as exc:
            self._remember(ch)  # data the host pipelined after the request is dropped quietly
            raise ProtocolError(exc.code, exc.message, ch) from None
        self.files[ch] = fs
        self._recent_set.discard(ch)
        self._send_json(reply, ch, body)

    def _on_file_frame(self, fs: Any, t: MsgType, f: Frame) -> None:
        ch = f.channel
        if t == MsgType.ERROR:  # the host gave up: abort, never answer
            body = _json_or_empty(f)
            log("channel %d: host cancelled the %s of %s (%s)" % (ch, fs.kind, fs.path, body.get("code", "?")))
            self._end_file(fs)
            return
        if fs.kind == "write":
            if t == MsgType.FILE_DATA:
                fs.on_data(f.payload)
            elif t == MsgType.FILE_END:
                body = fs.finish()
                self._end_file(fs)
                self._send_json(MsgType.FILE_DONE, ch, body)
                log("channel %d: wrote %s (%d bytes)" % (ch, fs.target, fs.written))
            else:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "%s is not valid on a file write channel" % t.name, ch)
        elif t == MsgType.WINDOW:
            fs.on_window(protocol.decode_window(f.payload))
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "%s is not valid on a file read channel" % t.name, ch)

    # ---- the channel -----------------------------------------------------------------

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
        self.decoder = protocol.FrameDecoder()
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

        Several reads per wakeup: a virtio-serial port hands out one 4 KiB buffer per
        read(2), and one loop iteration per 4 KiB would cap uploads at a few MiB/s. Once a
        read came back short, the next ones ask for SMALL_READ only: allocating a 256 KiB
        buffer for every 4 KiB costs more than the read itself under emulation.
        """
        conn = self.conn
        assert conn is not None
        parts: List[bytes] = []
        total = 0
        size = READ_SIZE
        end: Optional[str] = None
        while total < CONN_READ_BUDGET:
            try:
                data = os.read(conn.fd, size)
            except BlockingIOError:
                break
            except OSError as exc:
                end = "read failed: %s" % exc
                break
            if not data:
                end = "EOF"
                break
            parts.append(data)
            total += len(data)
            if len(data) <= SMALL_READ:
                size = SMALL_READ
        if parts:
            self._handle_input(parts[0] if len(parts) == 1 else b"".join(parts))
        if end is not None and self.conn is conn:
            self.disconnect(end)

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

    def send_frame(self, type: int, channel: int, payload: bytes = b"") -> None:
        """Queue a frame (dropped when there is no channel); used by sessions too."""
        if self.conn is not None:
            self.conn.send_frame(type, channel, payload)

    def _send_json(self, type: int, channel: int, body: Dict[str, Any]) -> None:
        if self.conn is not None:
            self.conn.send(protocol.encode_json(type, channel, body))

    send_json = _send_json  # for sessions

    def _send_error(self, channel: int, code: str, message: str) -> None:
        """ERROR on ``channel``; on a live session's channel that ends the session."""
        self._send_json(MsgType.ERROR, channel, {"code": code, "message": message})
        fs = self.files.get(channel) if channel and code != ErrorCode.CHANNEL_IN_USE else None
        if fs is not None:
            log("channel %d: %s of %s ended by error %s: %s" % (channel, fs.kind, fs.path, code, message))
            self._end_file(fs)
        s = self.sessions.get(channel) if channel else None
        if s is not None and code != ErrorCode.CHANNEL_IN_USE:
            log("channel %d: ended by error %s: %s" % (channel, code, message))
            self._abandon(s)

    def _end_session(self, s: Session, code: str, message: str) -> None:
        if self.sessions.get(s.channel) is s:
            self._send_error(s.channel, code, message)
        else:
            self._abandon(s)

    def _abandon(self, s: Session) -> None:
        if self.sessions.get(s.channel) is s:
            del self.sessions[s.channel]
            self._remember(s.channel)
        if self.detached.get(s.channel) is s:
            del self.detached[s.channel]
            self._remember(s.channel)
        s.abandon()
        self.abandoned.add(s)

    def _remember(self, channel: int) -> None:
        if channel in self._recent_set:
            return
        self._recent.append(channel)
        self._recent_set.add(channel)
        if len(self._recent) > RECENT_CHANNELS:
            self._recent_set.discard(self._recent.popleft())

    # ---- frames ----------------------------------------------------------------------

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
            body = _json_or_empty(f)
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

            from . import fileread, filestat, filewrite, session, spawn  # noqa: F401
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
        fs = self.files.get(ch)
        if fs is not None:
            self._on_file_frame(fs, t, f)
            return
        s = self.sessions.get(ch)
        if t == MsgType.ERROR:
            if s is not None:  # the host gave up on this session
                body = _json_or_empty(f)
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

    def _on_attach(self, f: Frame) -> None:
        ch = f.channel
        if ch in self.sessions or ch in self.files:
            raise ProtocolError(ErrorCode.CHANNEL_IN_USE, "channel %d is attached already" % ch, ch)
        s = self.detached.pop(ch, None)
        if s is None:
            raise ProtocolError(ErrorCode.NO_SUCH_CHANNEL, "no detached session on channel %d" % ch, ch)
        self.sessions[ch] = s
        s.attach()
        log("channel %d: re-attached to pid %d%s" % (ch, s.pid, " (exited)" if s.status is not None else ""))

    def _on_exec(self, f: Frame) -> None:
        ch = f.channel
        if ch in self.sessions or ch in self.files or ch in self.detached:
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
        log("channel %d: started pid %d: %s%s" % (ch, child.pid, req["argv"][0], " (tty)" if req["tty"] else ""))

    # ---- shutdown --------------------------------------------------------------------

    def begin_shutdown(self, action: str, reason: str) -> None:
        """PID 1: stop everything and reboot/power off (never returns). Else: end sessions, raise Shutdown."""
        if self.stopping:
            return
        self.stopping = True
        log("shutting down (%s)" % reason)
        self._abort_files("shutdown")
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


def _json_or_empty(f: Frame) -> Dict[str, Any]:
    try:
        return f.json()
    except ProtocolError:
        return {}


def _describe_exit(body: Dict[str, Any]) -> str:
    text = "code %s" % body["exit_code"]
    if body.get("signal"):
        text += " (signal %s)" % body["signal"]
    if body.get("timed_out"):
        text += " after timeout"
    return text
