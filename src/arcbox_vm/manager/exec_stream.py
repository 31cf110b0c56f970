"""What `run_in_sandbox` / `exec_in_sandbox` hand back: an async iterator of OutputChunk.

It always ends with exactly one "exit" or "error" chunk, and it always tells the manager
when the command is over — also when the caller stops reading and drops it (the command
is then killed), so a sandbox never stays RUNNING because a client went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable

from arcbox_vm.agent.host import ExecChannel
from arcbox_vm.errors import AgentError
from arcbox_vm.models import OutputChunk


async def collect_chunks(chunks: AsyncIterator[OutputChunk]) -> tuple[bytes, bytes, int]:
    """(stdout, stderr, exit code) of a command's chunks; an "error" end raises AgentError."""
    out, err = bytearray(), bytearray()
    code = -1
    async for chunk in chunks:
        if chunk.stream == "stdout":
            out += chunk.data
        elif chunk.stream == "stderr":
            err += chunk.data
        elif chunk.stream == "exit":
            code = chunk.exit_code
        elif chunk.stream == "error":
            raise AgentError(chunk.data.decode(errors="replace"))
    return bytes(out), bytes(err), code


class ExecStream:
    def __init__(self, session: ExecChannel, on_done: Callable[[int | None], None],
                 keep_running: Callable[[], bool] = lambda: False) -> None:
        self._session = session
        self._keep_running = keep_running  # true: dropping the stream leaves the command running
        self._it = session.__aiter__()
        self._on_done = on_done
        self._finished = False
        self._loop = asyncio.get_running_loop()

    @property
    def pid(self) -> int | None:
        return self._session.pid

    @property
    def exec_id(self) -> str:
        """The command's id in its sandbox: `list_execs` shows it, `attach_exec` takes it
        over after a daemon restart."""
        return str(self._session.channel)

    @property
    def timed_out(self) -> bool:
        """True once the command ended because its timeout killed it."""
        status = self._session.exit_status
        return bool(status is not None and status.timed_out)

    @property
    def exit_signal(self) -> int | None:
        """The signal that ended the command, once it ended (None: it exited by itself)."""
        status = self._session.exit_status
        return status.signal if status is not None else None

    def _finish(self, exit_code: int | None) -> None:
        if not self._finished:
            self._finished = True
            self._on_done(exit_code)

    def __aiter__(self) -> "ExecStream":
        return self

    async def __anext__(self) -> OutputChunk:
        if self._finished:
            raise StopAsyncIteration
        try:
            chunk = await self._it.__anext__()
        except StopAsyncIteration:
            self._finish(None)
            raise
        except AgentError as exc:
            self._finish(None)
            return OutputChunk("error", str(exc).encode(), -1)
        except BaseException:
            await self.aclose()
            raise
        if chunk.stream == "exit":
            self._finish(chunk.exit_code)
        return chunk

    async def signal(self, signum: int) -> None:
        """Send a signal to the command's process group."""
        if not self._session.done:
            await self._session.signal(signum)

    async def aclose(self) -> None:
        """Stop reading: kills the command if it still runs (unless the manager is shutting
        down leaving VMs running: then it stays, detached, for the next one to attach)."""
        if self._finished:
            return
        if not self._session.done and not self._keep_running():
            with contextlib.suppress(Exception):
                await self._session.signal(signal.SIGKILL)
        self._finish(None)

    async def collect(self) -> tuple[bytes, bytes, int]:
        """Read to the end: (stdout, stderr, exit code); an "error" end raises AgentError."""
        return await collect_chunks(self)

    def __del__(self) -> None:
        if not self._finished and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.aclose()))


class ExecHandle(ExecStream):
    """An interactive exec: also send stdin, resize the TTY, close stdin."""

    async def send_stdin(self, data: bytes) -> None:
        await self._session.write_stdin(data)

    async def resize(self, cols: int, rows: int) -> None:
        await self._session.resize(cols, rows)

    async def close_stdin(self) -> None:
        await self._session.close_stdin()

    eof = close_stdin

    async def input_ended(self) -> None:
        """The client stopped sending (it half-closed its stream): for an exec that is
        end-of-file on the command's stdin."""
        with contextlib.suppress(Exception):
            await self.close_stdin()
