"""Background commands: run without a client, attach and detach at will.

A command started with `start_exec` (or taken over with `attach_exec`) is *held* by the
manager: a pump task reads its output the whole time, so the command never blocks on a
full pipe, and keeps the newest `TAIL_BYTES` of it while no client is attached (older
output is dropped and counted — like a terminal's scrollback). A client attaches with
`attach_exec`: it gets the kept output, then the live output and the exit. Leaving (closing
the attachment, a dropped gRPC stream) detaches again and never kills the command; kill it
with `signal_exec`.

One client at a time: a second attach while one is attached is refused (ExecNotAttachable
"attached"). A finished command stays held (output tail + exit) until a client has read
its end, or until more than `KEEP_FINISHED` finished ones pile up in the sandbox.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from arcbox_vm.errors import ExecNotAttachable
from arcbox_vm.manager.exec_stream import ExecHandle, collect_chunks
from arcbox_vm.models import OutputChunk

log = logging.getLogger(__name__)

TAIL_BYTES = 1 << 20  # output kept per command while no client is attached
KEEP_FINISHED = 64  # finished, unread background commands kept per sandbox
MAX_RUNNING = 64  # background commands running at once per sandbox (bounds the daemon's memory)


class HeldExec:
    """One background command: its manager-side stream, a pump, a bounded output tail."""

    def __init__(self, sandbox_id: str, handle: ExecHandle, on_forget: Callable[["HeldExec"], None],
                 kept: list[OutputChunk] | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.handle = handle
        self.exec_id = handle.exec_id
        self._on_forget = on_forget
        self._tail: collections.deque[OutputChunk] = collections.deque(kept or ())
        self._tail_bytes = sum(len(c.data) for c in self._tail)
        self.dropped = 0  # bytes of output nobody was attached to read, beyond the tail
        self.final: OutputChunk | None = None  # the "exit" / "error" chunk once the command ended
        self.attachment: ExecAttachment | None = None
        self._more = asyncio.Event()
        self._drained = asyncio.Event()  # the attached client took output off the tail
        self._pump = asyncio.create_task(self._run(), name=f"held-exec-{sandbox_id}-{self.exec_id}")

    @property
    def finished(self) -> bool:
        return self.final is not None

    async def _run(self) -> None:
        try:
            async for chunk in self.handle:
                if chunk.stream in ("exit", "error"):
                    self.final = chunk
                    break
                self._tail.append(chunk)
                self._tail_bytes += len(chunk.data)
                self._more.set()
                # an attached client sets the pace (the guest blocks, nothing is lost) ...
                while self.attachment is not None and self._tail_bytes > TAIL_BYTES:
                    self._drained.clear()
                    await self._drained.wait()
                # ... without one, the oldest output goes (exactly TAIL_BYTES stay)
                while self.attachment is None and self._tail_bytes > TAIL_BYTES:
                    old, excess = self._tail[0], self._tail_bytes - TAIL_BYTES
                    if len(old.data) <= excess:
                        self._tail.popleft()
                        cut = len(old.data)
                    else:
                        self._tail[0] = OutputChunk(old.stream, old.data[excess:])
                        cut = excess
                    self._tail_bytes -= cut
                    self.dropped += cut
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the end of the command, whatever it was
            self.final = OutputChunk("error", str(exc).encode(), -1)
        if self.final is None:
            self.final = OutputChunk("error", b"the command's stream ended without an exit status", -1)
        self._more.set()

    def attach(self) -> "ExecAttachment":
        if self.attachment is not None:
            raise ExecNotAttachable(self.sandbox_id, self.exec_id, "attached")
        self.attachment = ExecAttachment(self)
        return self.attachment

    async def next_chunk(self) -> OutputChunk | None:
        """The next chunk for the attached client: kept output first, then live; None after the end."""
        while True:
            if self._tail:
                chunk = self._tail.popleft()
                self._tail_bytes -= len(chunk.data)
                self._drained.set()
                return chunk
            if self.final is not None:
                return None
            self._more.clear()
            await self._more.wait()

    def unread(self) -> list[OutputChunk]:
        """The kept output no client has read yet (for held_tail.save)."""
        return list(self._tail)

    def forget(self) -> None:
        """Stop holding it (its end was read, or the sandbox went): the pump stops."""
        if not self._pump.done():
            self._pump.cancel()
        self._on_forget(self)


class ExecAttachment:
    """What `attach_exec` returns: the ExecHandle interface, but leaving detaches."""

    def __init__(self, held: HeldExec) -> None:
        self._held = held
        self._done = False

    @property
    def exec_id(self) -> str:
        return self._held.exec_id

    @property
    def pid(self) -> int | None:
        return self._held.handle.pid

    @property
    def dropped_bytes(self) -> int:
        """Output the command wrote while no client was attached that did not fit the kept tail."""
        return self._held.dropped

    @property
    def timed_out(self) -> bool:
        return self._held.handle.timed_out

    def __aiter__(self) -> "ExecAttachment":
        return self

    async def __anext__(self) -> OutputChunk:
        if self._done:
            raise StopAsyncIteration
        chunk = await self._held.next_chunk()
        if chunk is None:
            final = self._held.final
            assert final is not None
            self._done = True
            self._held.attachment = None
            self._held.forget()  # its end was delivered
            return final
        return chunk

    async def send_stdin(self, data: bytes) -> None:
        await self._held.handle.send_stdin(data)

    async def resize(self, cols: int, rows: int) -> None:
        await self._held.handle.resize(cols, rows)

    async def close_stdin(self) -> None:
        await self._held.handle.close_stdin()

    eof = close_stdin

    async def input_ended(self) -> None:
        """The client stopped sending: for an attachment that is leaving, not end-of-file —
        the command keeps its stdin for the next client."""

    async def aclose(self) -> None:
        """Detach: the command keeps running, held, for the next attach."""
        if not self._done:
            self._done = True
            if self._held.attachment is self:
                self._held.attachment = None
                self._held._drained.set()  # the pump may be waiting for this client

    async def collect(self) -> tuple[bytes, bytes, int]:
        """Read to the end: (stdout, stderr, exit code); an "error" end raises AgentError."""
        return await collect_chunks(self)


def evict_finished(held: dict[int, HeldExec]) -> None:
    """Forget the oldest finished, unread background commands beyond KEEP_FINISHED."""
    done = [h for h in held.values() if h.finished and h.attachment is None]
    for h in done[: max(0, len(done) - KEEP_FINISHED)]:
        log.info("forgetting finished background command %s (never attached)", h.exec_id)
        h.forget()
