"""FILE_READ: one streamed download per channel.

The session never sends on its own: the agent's loop pumps it (``FileTransfers``), at
most ``transfers.READ_BUDGET`` bytes per loop iteration across all reads, never beyond
the host's credit, and not at all while the channel's output queue is congested. So the
agent never reads ahead of what the host can take: a slow host stops the read instead of
growing a queue.

The file is opened as the request's user (``fscreds``); only regular files are read.
"""

from __future__ import annotations

import os
import stat

from arcbox_vm.agent import protocol
from arcbox_vm.agent.protocol import ErrorCode, MsgType, ProtocolError

from .fileinfo import failure, kind_text, stat_body
from .fscreds import Creds
from .transport import frame_slots

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, Dict


READ_CHUNK = 1 << 20  # file bytes per read(2): one readv fills up to 16 DATA_CHUNK frames of one buffer


class ReadSession:
    """FILE_READ on one channel: FILE_INFO, then FILE_DATA as credit allows, then FILE_END."""

    kind = "read"

    def __init__(self, channel: int, req: Dict[str, Any], sink: Any) -> None:
        self.channel = channel
        self.sink = sink
        self.path = req["path"]
        self.creds = Creds(req["uid"], req["gid"])
        self.credit = protocol.INITIAL_WINDOW
        self.sent = 0
        self.done = False
        self.fd = -1
        try:
            with self.creds:
                # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
                self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            st = os.fstat(self.fd)
        except OSError as exc:
            self.abort()
            raise failure(exc, "read", self.path, self.creds) from None
        if stat.S_ISDIR(st.st_mode):
            self.abort()
            raise ProtocolError(ErrorCode.IS_A_DIRECTORY, "cannot read %s: it is a directory (list it instead)" % self.path)
        if not stat.S_ISREG(st.st_mode):
            self.abort()
            raise ProtocolError(
                ErrorCode.NOT_REGULAR,
                "cannot read %s: it is not a regular file (%s)" % (self.path, kind_text(st.st_mode)),
            )
        self.info = stat_body(self.path, st)

    def wants(self) -> bool:
        return not self.done and self.credit > 0

    def pump(self, budget: int) -> int:
        """Send one FILE_DATA of at most ``budget`` bytes (or FILE_END at EOF). Returns bytes sent."""
        n = min(READ_CHUNK, self.credit, budget)
        if n <= 0:
            return 0
        conn = getattr(self.sink, "conn", None)
        buf = conn.frame_buffer() if conn is not None else None
        try:
            if buf is not None:  # straight into a pooled frame buffer: no allocation, no copy
                got = os.readv(self.fd, frame_slots(buf, protocol.DATA_CHUNK, n))
            else:
                data = os.read(self.fd, n)
                got = len(data)
        except OSError as exc:
            if buf is not None:
                conn.give_back(buf)
            raise failure(exc, "read", self.path, self.creds) from None
        if not got:
            if buf is not None:
                conn.give_back(buf)
            self.sink.send_frame(MsgType.FILE_END, self.channel)
            self.done = True
            self.abort()
            return 0
        if buf is not None:
            conn.send_frames(buf, MsgType.FILE_DATA, self.channel, got, protocol.DATA_CHUNK)
        else:
            self.sink.send_frame(MsgType.FILE_DATA, self.channel, data)
        self.credit -= got
        self.sent += got
        return got

    def on_window(self, increment: int) -> None:
        self.credit += increment

    def abort(self) -> None:
        self.done = True
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
