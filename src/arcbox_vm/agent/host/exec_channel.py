"""Exec sessions: one command running in the guest, on its own channel.

Output credit is granted back to the guest only as the consumer takes chunks out, so a
slow reader stops the guest's pipes instead of growing host memory; stdin is sent only
against the credit the guest grants.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host import limits
from arcbox_vm.agent.host.channels import ChannelHost
from arcbox_vm.agent.host.limits import ProtocolViolation
from arcbox_vm.errors import AgentDisconnected, AgentError, ExecError
from arcbox_vm.models import OutputChunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExitStatus:
    """How a guest command ended. exit_code is 128+signal when killed by a signal."""

    exit_code: int
    signal: int | None = None
    timed_out: bool = False


class _Output:
    """A command's queued output, compact whatever the guest's frame sizes. Small frames:
    the bytes in one buffer, and per run of same-stream frames one signed length (> 0
    stdout, < 0 stderr), so a window's worth of 1-byte frames costs about a window plus 8
    bytes a run, not an object per frame. A big frame (JOIN_BELOW or more) is queued as it
    came, as (stderr?, payload), and handed to the consumer without a copy: at most
    window / JOIN_BELOW of those exist at once."""

    RUN_MAX = 256 * 1024  # a run (one chunk to the consumer) is at most this long, unless one frame is longer
    JOIN_BELOW = 16 * 1024  # frames at least this big are not copied into the buffer

    def __init__(self) -> None:
        self.data = bytearray()
        self.runs: collections.deque[int | tuple[bool, bytes]] = collections.deque()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.runs)

    def push(self, stderr: bool, payload: bytes) -> None:
        n = len(payload)
        self.nbytes += n
        runs = self.runs
        if n >= self.JOIN_BELOW:
            runs.append((stderr, payload))
            return
        last = runs[-1] if runs else None
        if type(last) is int and (last < 0) == stderr and abs(last) + n <= self.RUN_MAX:
            runs[-1] = last - n if stderr else last + n
        else:
            runs.append(-n if stderr else n)
        self.data += payload

    def pop(self) -> OutputChunk:
        run = self.runs.popleft()
        if type(run) is tuple:
            stderr, chunk = run
        else:
            stderr, n = run < 0, abs(run)
            with memoryview(self.data) as view:
                chunk = bytes(view[:n])
            del self.data[:n]
        self.nbytes -= len(chunk)
        return OutputChunk("stderr" if stderr else "stdout", chunk)

    def clear(self) -> None:
        self.runs.clear()
        self.data = bytearray()
        self.nbytes = 0


class ExecChannel:
    """One command running in the guest, on its own channel.

    Iterate it (`async for chunk in session`) to get `OutputChunk`s; the last one has
    stream "exit". Writing stdin respects the credit the guest grants.

    Everything from the guest is checked: output beyond the credit granted, a STARTED
    without a real pid, an EXIT that is no wait status end the session with
    ProtocolViolation (the connection tells the guest, which kills the command).
    """

    def __init__(self, host: ChannelHost, channel: int, request: dict[str, Any]) -> None:
        self._host = host
        self.channel = channel
        self.request = request
        self.pid: int | None = None
        self.exit_status: ExitStatus | None = None
        self._started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._out = _Output()  # output not yet taken by the consumer
        self._end: OutputChunk | BaseException | None = None  # the exit chunk or the error, after the output
        self._wake = asyncio.Event()
        self._stdin_credit = p.INITIAL_WINDOW
        self._credit_event = asyncio.Event()
        self._granted = p.INITIAL_WINDOW  # output credit given to the guest, in total
        self._received = 0  # output bytes received, in total
        self._consumed = 0  # output bytes taken by the consumer, not yet granted back
        self._done = False

    # -- frames from the guest (called by the connection's reader) --------------------

    def _on_frame(self, frame: p.Frame) -> None:
        t = frame.type
        if t in (p.MsgType.STDOUT, p.MsgType.STDERR):
            n = len(frame.payload)
            self._received += n
            if self._received > self._granted:
                raise ProtocolViolation(
                    f"the guest agent sent {self._received - self._granted} bytes of output beyond the "
                    f"{self._granted} bytes of credit the host granted on channel {self.channel}; "
                    "the command's stream was ended")
            if n:  # an empty frame carries nothing (and must cost nothing)
                self._out.push(t == p.MsgType.STDERR, frame.payload)
                self._wake.set()
        elif t == p.MsgType.STARTED:
            if self._started.done():
                raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, "STARTED twice")
            body = frame.json()
            pid = limits.guest_int(body, "pid", 1, limits.MAX_PID)
            if limits.guest_bool(body, "attached"):  # a re-attached session starts with the stdin credit left
                self._stdin_credit = limits.guest_int(body, "stdin_window", 0, p.INITIAL_WINDOW, p.INITIAL_WINDOW)
            self._started.set_result(pid)
        elif t == p.MsgType.EXIT:
            code, sig, timed_out = limits.exit_status(frame.json())
            status = ExitStatus(code, sig, timed_out)
            self.exit_status = status
            self._end = OutputChunk("exit", b"", status.exit_code)
            if not self._started.done():
                self._started.set_exception(ProtocolViolation("the guest agent sent EXIT before STARTED"))
                self._started.exception()
            self._finish()
        elif t == p.MsgType.WINDOW:
            self._stdin_credit += p.decode_window(frame.payload)
            self._credit_event.set()
        elif t == p.MsgType.ERROR:
            try:
                code, msg = limits.error_body(frame.json())
            except p.ProtocolError:
                code, msg = p.ErrorCode.INTERNAL, ""
            self._fail(ExecError(msg or "the guest agent reported an error", code=code))
        elif t == p.MsgType.PONG:
            pass
        else:
            raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, f"{frame!r} is not valid on an exec channel")

    def _on_disconnect(self, exc: BaseException) -> None:
        if isinstance(exc, ProtocolViolation):
            self._out.clear()  # the guest's output is worthless now; free it at once
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._done:
            return
        if not self._started.done():
            self._started.set_exception(exc)
            self._started.exception()  # retrieved: `exec` may have been cancelled already
        else:
            self._end = exc
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._wake.set()
        self._credit_event.set()
        self._host.release_channel(self)

    # -- consumer side ---------------------------------------------------------------

    async def wait_started(self) -> int:
        self.pid = await self._started
        return self.pid

    @property
    def queued_bytes(self) -> int:
        """Output received and not yet taken by the consumer (at most the credit window)."""
        return self._out.nbytes

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[OutputChunk]:
        while True:
            if self._out:
                chunk = self._out.pop()
                await self._grant(len(chunk.data))
                yield chunk
                continue
            end = self._end
            if end is not None:
                if isinstance(end, BaseException):
                    raise end
                yield end
                return
            self._wake.clear()
            await self._wake.wait()

    async def _grant(self, n: int) -> None:
        self._consumed += n
        if self._consumed >= p.INITIAL_WINDOW // 4 and not self._done:
            inc, self._consumed = self._consumed, 0
            self._granted += inc  # before sending: the guest may spend it as soon as it arrives
            with contextlib.suppress(AgentDisconnected):
                await self._host.send_frame(p.encode_window(self.channel, inc))

    async def collect(self) -> tuple[bytes, bytes, ExitStatus]:
        """Run to completion, returning (stdout, stderr, status). For small outputs."""
        out, err = bytearray(), bytearray()
        async for chunk in self:
            if chunk.stream == "stdout":
                out += chunk.data
            elif chunk.stream == "stderr":
                err += chunk.data
        assert self.exit_status is not None
        return bytes(out), bytes(err), self.exit_status

    async def write_stdin(self, data: bytes) -> None:
        """Send stdin bytes, waiting for guest credit when the window is used up."""
        view = memoryview(data)
        while view:
            while self._stdin_credit <= 0 and not self._done:
                self._credit_event.clear()
                await self._credit_event.wait()
            if self._done:
                if isinstance(self._end, BaseException):
                    raise self._end  # e.g. the connection was lost
                raise AgentError("the command has already exited; stdin was not delivered", code="closed")
            n = min(len(view), self._stdin_credit, p.DATA_CHUNK)
            self._stdin_credit -= n
            await self._host.send_frame(p.encode_frame(p.MsgType.STDIN, self.channel, bytes(view[:n])))
            view = view[n:]

    async def close_stdin(self) -> None:
        if not self._done:
            await self._host.send_frame(p.encode_frame(p.MsgType.STDIN_EOF, self.channel))

    async def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size: width (columns) first, like `tty_size=(cols, rows)`."""
        if not self._done:
            await self._host.send_frame(p.encode_json(p.MsgType.RESIZE, self.channel, {"rows": rows, "cols": cols}))

    async def signal(self, signum: int) -> None:
        if not self._done:
            await self._host.send_frame(p.encode_json(p.MsgType.SIGNAL, self.channel, {"signal": int(signum)}))

    @property
    def done(self) -> bool:
        return self._done
