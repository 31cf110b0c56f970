"""The commands each sandbox runs through envd, by guest pid, and their event streams.

A command started by Start lives on its own: the stream that started it, and any
Connect stream, are only subscribers (as in E2B: a client that disconnects leaves the
command running; `kill` stops it). A pump reads the command's output the whole time and
hands each event to every subscriber's bounded queue — a subscriber that does not keep
up slows the command down (the guest blocks on its pipe), nothing is dropped; with no
subscriber the output is discarded, as envd does. Bounded: `max_processes` per sandbox,
`QUEUE_EVENTS` events (each at most one output frame, 64 KiB) per subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal as _signal
from collections.abc import AsyncIterator
from typing import Any

from arcbox_vm.e2b.proto import Oneof, process_pb
from arcbox_vm.errors import ExecError, InvalidArgument, ResourceExhausted
from arcbox_vm.models import ExecSpec, OutputChunk

log = logging.getLogger("arcbox_vm.e2b.envd")

QUEUE_EVENTS = 64
PE = process_pb.ProcessEvent
_END = object()  # end of a subscription


def data_event(chunk: OutputChunk, pty: bool) -> Any:
    field = "pty" if pty else chunk.stream
    return PE(event=Oneof("data", PE.DataEvent(output=Oneof(field, chunk.data))))


def end_event(chunk: OutputChunk, exit_signal: int | None) -> Any:
    if chunk.stream == "error":
        msg = chunk.data.decode(errors="replace")
        return PE(event=Oneof("end", PE.EndEvent(exit_code=-1, exited=False, status="error", error=msg)))
    if exit_signal:
        try:
            name = _signal.Signals(exit_signal).name.removeprefix("SIG").lower()
        except ValueError:
            name = str(exit_signal)
        name = {"kill": "killed", "term": "terminated"}.get(name, name)
        return PE(event=Oneof("end", PE.EndEvent(exit_code=-1, exited=False, status=f"signal: {name}")))
    code = chunk.exit_code
    return PE(event=Oneof("end", PE.EndEvent(exit_code=code, exited=True, status=f"exit status {code}")))


class Proc:
    """One command: its manager stream, its subscribers, and the pump between them."""

    def __init__(self, table: "ProcessTable", sandbox_id: str, stream: Any, config: Any, tag: str | None,
                 pty: bool) -> None:
        self.table = table
        self.sandbox_id = sandbox_id
        self.stream = stream  # ExecStream (no stdin) or ExecHandle
        self.pid: int = int(stream.pid or 0)
        self.config = config  # process_pb.ProcessConfig as started
        self.tag = tag
        self.pty = pty
        self.subscribers: list[asyncio.Queue] = []
        self.ended = False
        self._pump: asyncio.Task | None = None

    def start_pump(self) -> None:
        self._pump = asyncio.create_task(self._run(), name=f"e2b-proc-{self.sandbox_id}-{self.pid}")

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(QUEUE_EVENTS)
        self.subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        with contextlib.suppress(ValueError):
            self.subscribers.remove(q)
        while not q.empty():  # a pump blocked on this full queue goes on
            q.get_nowait()

    async def _publish(self, event: Any) -> None:
        for q in list(self.subscribers):
            if q in self.subscribers:  # it may have left while we waited on another
                await q.put(event)

    async def _run(self) -> None:
        final: Any = None
        try:
            async for chunk in self.stream:
                if chunk.stream in ("stdout", "stderr"):
                    if chunk.data:
                        await self._publish(data_event(chunk, self.pty))
                    continue
                final = end_event(chunk, getattr(self.stream, "exit_signal", None))
                break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the command's end, whatever ended it
            final = end_event(OutputChunk("error", str(exc).encode(), -1), None)
        finally:
            self.ended = True
            self.table.discard(self)
        if final is None:
            final = end_event(OutputChunk("error", b"the command's stream ended without an exit status", -1), None)
        await self._publish(final)
        for q in list(self.subscribers):
            await q.put(_END)

    async def events(self, q: asyncio.Queue, keepalive_s: float) -> AsyncIterator[Any]:
        """The subscription's events, a keepalive event after `keepalive_s` of silence."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(q.get(), keepalive_s)
                except asyncio.TimeoutError:
                    yield PE(event=Oneof("keepalive", PE.KeepAlive()))
                    continue
                if event is _END:
                    return
                yield event
        finally:
            self.unsubscribe(q)

    async def signal(self, signum: int) -> None:
        await self.stream.signal(signum)

    def _interactive(self) -> Any:
        if not hasattr(self.stream, "send_stdin"):
            raise InvalidArgument(f"process {self.pid} was started without stdin (stdin=False)")
        return self.stream

    async def send_input(self, data: bytes) -> None:
        await self._interactive().send_stdin(data)

    async def close_stdin(self) -> None:
        await self._interactive().close_stdin()

    async def resize(self, cols: int, rows: int) -> None:
        if not self.pty:
            raise InvalidArgument(f"process {self.pid} has no PTY")
        await self._interactive().resize(cols, rows)

    def info(self) -> Any:
        return process_pb.ProcessInfo(config=self.config, pid=self.pid, tag=self.tag)


class ProcessTable:
    """Every sandbox's running commands, by pid."""

    def __init__(self, manager: Any, max_processes: int) -> None:
        self._mgr = manager
        self._max = max_processes
        self._procs: dict[str, dict[int, Proc]] = {}

    async def start(self, sandbox_id: str, spec: ExecSpec, config: Any, tag: str | None) -> Proc:
        procs = self._procs.setdefault(sandbox_id, {})
        if len(procs) >= self._max:
            raise ResourceExhausted(f"the sandbox already runs {len(procs)} processes through envd "
                                    f"(e2b.max_processes); kill some first")
        if spec.stdin or spec.tty:
            stream = await self._mgr.exec_in_sandbox(sandbox_id, spec)
        else:
            stream = await self._mgr.run_in_sandbox(sandbox_id, spec)
        proc = Proc(self, sandbox_id, stream, config, tag, spec.tty)
        if not proc.pid:
            await stream.aclose()
            raise ExecError("the guest agent did not say which pid the command got")
        procs[proc.pid] = proc
        return proc

    def discard(self, proc: Proc) -> None:
        procs = self._procs.get(proc.sandbox_id)
        if procs is not None and procs.get(proc.pid) is proc:
            del procs[proc.pid]
            if not procs:
                del self._procs[proc.sandbox_id]

    def find(self, sandbox_id: str, selector: Any) -> Proc | None:
        """By ProcessSelector: pid or tag."""
        procs = self._procs.get(sandbox_id, {})
        which = selector.selector if selector is not None else None
        if which is None:
            raise InvalidArgument("a process selector (pid or tag) is required")
        if which.field == "pid":
            return procs.get(int(which.value))
        for p in procs.values():
            if p.tag == which.value:
                return p
        return None

    def list(self, sandbox_id: str) -> list[Proc]:
        return [p for p in self._procs.get(sandbox_id, {}).values() if not p.ended]

    async def close(self) -> None:
        for procs in list(self._procs.values()):
            for p in list(procs.values()):
                if p._pump is not None:
                    p._pump.cancel()
        self._procs.clear()
