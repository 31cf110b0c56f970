"""`AsyncExecSession`: one interactive command over the bidirectional Exec stream.

    session = await sandbox.exec(["sh"], tty=True, tty_size=(120, 40))
    await session.write(b"echo hi\\n")
    async for out in session:            # Output("stdout"/"stderr", data)
        ...
    result = await session.wait()        # RunResult (output not read yet is in it)

The session is its own iterator (no async generator) on purpose: leaving an `async for`
early, or dropping a sync iterator over it, must not close the stream — `wait()` still
needs to read the exit status afterwards.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import grpc

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.metadata import EXEC_ID as EXEC_ID_METADATA
from arcbox_vm.client.collect import OutputCollector
from arcbox_vm.client.convert import output_from_pb, tty_size_to_pb
from arcbox_vm.client.types import Output, OutputCallback, RunResult
from arcbox_vm.errors import AgentError

__all__ = ["AsyncExecSession"]


class AsyncExecSession:
    """Made by `AsyncClient.exec`; not constructed directly."""

    def __init__(self, call: Any, map_error: Callable[[grpc.RpcError], Exception]) -> None:
        self._call = call
        self._map_error = map_error
        self._final: Output | None = None
        self._eof = False
        self._stdin_closed = False
        self._killed = False

    async def exec_id(self) -> str:
        """The command's id in its sandbox (for `attach` after a daemon restart); waits
        until the daemon has started the command."""
        try:
            meta = await self._call.initial_metadata()
        except grpc.aio.AioRpcError as exc:
            raise self._map_error(exc) from None
        return dict(meta or ()).get(EXEC_ID_METADATA, "")

    # -- input ----------------------------------------------------------------------

    async def _send(self, message: pb.ExecInput) -> None:
        if self._killed or self.finished:
            raise AgentError("the command has ended; its stdin and terminal are gone", code="closed")
        try:
            await self._call.write(message)
        except asyncio.InvalidStateError:
            raise AgentError("the command has ended; its stdin and terminal are gone", code="closed") from None
        except grpc.aio.AioRpcError as exc:
            raise self._map_error(exc) from None

    async def write(self, data: bytes | str) -> None:
        """Send to the command's stdin (str is UTF-8 encoded)."""
        if isinstance(data, str):
            data = data.encode()
        if data:
            await self._send(pb.ExecInput(stdin=bytes(data)))

    async def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size (tty=True sessions): columns first, as tty_size everywhere."""
        await self._send(pb.ExecInput(resize=tty_size_to_pb((cols, rows))))

    async def close_stdin(self) -> None:
        """Send end-of-file to the command's stdin (once; later calls do nothing)."""
        if not self._stdin_closed:
            self._stdin_closed = True
            await self._send(pb.ExecInput(eof=True))

    # -- output ---------------------------------------------------------------------

    @property
    def final(self) -> Output | None:
        """The last message ("exit" or "error") once it arrived."""
        return self._final

    @property
    def finished(self) -> bool:
        """The final message (exit or error) arrived, or the stream ended."""
        return self._final is not None or self._eof

    def __aiter__(self) -> "AsyncExecSession":
        return self

    async def __anext__(self) -> Output:
        """The next stdout/stderr chunk; stops at the command's end (then call `wait()`)."""
        while not self.finished and not self._killed:
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                self._eof = True
                raise self._map_error(exc) from None
            if message is grpc.aio.EOF:
                self._eof = True
                break
            out = output_from_pb(message)
            if out.stream in ("stdout", "stderr"):
                if out.data:
                    return out
            else:
                self._final = out
            if out.done and self._final is None:
                self._eof = True
        raise StopAsyncIteration

    async def wait(self, on_stdout: OutputCallback | None = None,
                   on_stderr: OutputCallback | None = None) -> RunResult:
        """Read to the end; the result holds output nobody iterated yet (or hands it to the
        callbacks). CommandError if the command ended without an exit status."""
        collector = OutputCollector(on_stdout, on_stderr)
        async for out in self:
            pending = collector.feed(out)
            if inspect.isawaitable(pending):
                await pending
        if self._final is not None:
            collector.feed(self._final)
        return collector.result()

    # -- teardown -------------------------------------------------------------------

    async def kill(self) -> None:
        """Abandon the stream: the daemon kills the command when it is cancelled — except
        for an attached background command, which is only detached (see AsyncClient.attach)."""
        if not self.finished and not self._killed:
            self._killed = True
            self._call.cancel()

    async def __aenter__(self) -> "AsyncExecSession":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()
