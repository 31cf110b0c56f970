"""Exec sessions: one command running in the guest, on its own channel.

Output credit is granted back to the guest only as the consumer takes chunks out, so a
slow reader stops the guest's pipes instead of growing host memory; stdin is sent only
against the credit the guest grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host.channels import ChannelHost
from arcbox_vm.errors import AgentDisconnected, AgentError, ExecError
from arcbox_vm.models import OutputChunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExitStatus:
    """How a guest command ended. exit_code is 128+signal when killed by a signal."""

    exit_code: int
    signal: int | None = None
    timed_out: bool = False


class ExecChannel:
    """One command running in the guest, on its own channel.

    Iterate it (`async for chunk in session`) to get `OutputChunk`s; the last one has
    stream "exit". Writing stdin respects the credit the guest grants.
    """

    def __init__(self, host: ChannelHost, channel: int, request: dict[str, Any]) -> None:
        self._host = host
        self.channel = channel
        self.request = request
        self.pid: int | None = None
        self.exit_status: ExitStatus | None = None
        self._started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue: asyncio.Queue[OutputChunk | BaseException] = asyncio.Queue()
        self._stdin_credit = p.INITIAL_WINDOW
        self._credit_event = asyncio.Event()
        self._consumed = 0  # output bytes taken by the consumer, not yet granted back
        self._done = False

    # -- frames from the guest (called by the connection's reader) --------------------

    def _on_frame(self, frame: p.Frame) -> None:
        t = frame.type
        if t in (p.MsgType.STDOUT, p.MsgType.STDERR):
            stream = "stdout" if t == p.MsgType.STDOUT else "stderr"
            self._queue.put_nowait(OutputChunk(stream, frame.payload))
        elif t == p.MsgType.STARTED:
            body = frame.json()
            if body.get("attached"):  # a re-attached session starts with the stdin credit left
                self._stdin_credit = int(body.get("stdin_window", p.INITIAL_WINDOW))
            if not self._started.done():
                self._started.set_result(int(body.get("pid", 0)))
        elif t == p.MsgType.EXIT:
            body = frame.json()
            status = ExitStatus(int(body.get("exit_code", -1)), body.get("signal"), bool(body.get("timed_out")))
            self.exit_status = status
            self._queue.put_nowait(OutputChunk("exit", b"", status.exit_code))
            self._finish()
        elif t == p.MsgType.WINDOW:
            self._stdin_credit += p.decode_window(frame.payload)
            self._credit_event.set()
        elif t == p.MsgType.ERROR:
            body = frame.json()
            code = str(body.get("code", p.ErrorCode.INTERNAL))
            err = ExecError(str(body.get("message", "the guest agent reported an error")), code=code)
            if not self._started.done():
                self._started.set_exception(err)
            else:
                self._queue.put_nowait(err)
            self._finish()
        elif t == p.MsgType.PONG:
            pass
        else:
            log.warning("unexpected %r on exec channel %d", frame, self.channel)

    def _on_disconnect(self, exc: BaseException) -> None:
        if self._done:
            return
        if not self._started.done():
            self._started.set_exception(exc)
        else:
            self._queue.put_nowait(exc)
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._credit_event.set()
        self._host.release_channel(self)

    # -- consumer side ---------------------------------------------------------------

    async def wait_started(self) -> int:
        self.pid = await self._started
        return self.pid

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[OutputChunk]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.stream != "exit" and item.data:
                await self._grant(len(item.data))
            yield item
            if item.stream == "exit":
                return

    async def _grant(self, n: int) -> None:
        self._consumed += n
        if self._consumed >= p.INITIAL_WINDOW // 4 and not self._done:
            inc, self._consumed = self._consumed, 0
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
