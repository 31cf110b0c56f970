"""The agent's part that serves file requests (a mixin of ``Agent``).

FILE_WRITE and FILE_READ open a session on their channel (``filewrite``, ``fileread``);
FILE_STAT and FILE_LIST are answered at once (``filestat``). Reads are pumped by the
loop, round-robin, at most ``READ_BUDGET`` bytes per iteration and never while the
channel's output queue is above ``HIGH_WATER``, so a download cannot starve exec output
or grow a queue. File sessions belong to the connection: losing it or shutting down
aborts them (a write's temporary file is removed).

The file modules are imported on the first request, or at HELLO_ACK, never before HELLO.
"""

from __future__ import annotations

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import ErrorCode, MsgType, ProtocolError

from .connection import HIGH_WATER
from .frames import json_or_empty
from .log import log, log_exc

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Dict

    from arcbox_vm.agent.protocol import Frame

READ_BUDGET = 1 << 20  # file bytes read per loop iteration, all read sessions together
MAX_FILE_SESSIONS = 64  # concurrent reads + writes


class FileTransfers:
    """FILE_* requests and the file sessions of the current connection."""

    def _init_files(self) -> None:
        self.files: Dict[int, Any] = {}  # channel -> WriteSession / ReadSession (current connection only)

    def _on_file_request(self, t: MsgType, f: Frame) -> None:
        ch = f.channel
        if ch in self.sessions or ch in self.files or ch in self.detached or ch in self.ports:
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
            body = json_or_empty(f)
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
        """The channel is lost or the agent shuts down: every file session ends (temp files removed)."""
        for fs in list(self.files.values()):
            if not fs.done:
                log("channel %d: %s of %s aborted (%s)" % (fs.channel, fs.kind, fs.path, why))
            self._end_file(fs)
