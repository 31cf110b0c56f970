"""process.Process: Start, Connect, List, SendSignal, SendInput, StreamInput, CloseStdin, Update."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from arcbox_vm.e2b.envd.caller import Caller, caller, guest_path
from arcbox_vm.e2b.envd.errors import connect_error
from arcbox_vm.e2b.envd.processes import Proc, ProcessTable
from arcbox_vm.e2b.envd.users import GuestUsers
from arcbox_vm.e2b.proto import Oneof, process_pb
from arcbox_vm.errors import ArcboxError
from arcbox_vm.models import ExecSpec

KEEPALIVE_HEADER = "keepalive-ping-interval"
DEFAULT_KEEPALIVE_S = 30.0
MAX_INPUT = 1 << 20  # bytes of one SendInput / StreamInput message


def keepalive_s(ctx: Any) -> float:
    """The client's Keepalive-Ping-Interval (seconds), bounded to 1..300."""
    try:
        value = float(ctx.request_headers.get(KEEPALIVE_HEADER, DEFAULT_KEEPALIVE_S))
    except ValueError:
        value = DEFAULT_KEEPALIVE_S
    return min(300.0, max(1.0, value))


class ProcessService:
    def __init__(self, table: ProcessTable, users: GuestUsers, default_user: str) -> None:
        self.table = table
        self.users = users
        self.default_user = default_user

    def _caller(self, ctx: Any) -> Caller:
        try:
            return caller(ctx.request_headers, self.default_user)
        except ArcboxError as exc:
            raise connect_error(exc) from None

    def _find(self, who: Caller, selector: Any) -> Proc:
        try:
            proc = self.table.find(who.sandbox_id, selector)
        except ArcboxError as exc:
            raise connect_error(exc, who.sandbox_id) from None
        if proc is None or proc.ended:
            raise ConnectError(Code.NOT_FOUND, "process not found")
        return proc

    async def _spec(self, who: Caller, request: Any) -> ExecSpec:
        cfg = request.process
        if cfg is None or not cfg.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        cwd = cfg.cwd if cfg.has_field("cwd") else ""
        if cwd and not cwd.startswith("/"):
            cwd = guest_path(cwd, (await self.users.account(who.sandbox_id, who.user)).home)
        pty = request.pty if request.has_field("pty") else None
        size = None
        if pty is not None and pty.size is not None:
            size = (pty.size.cols or 80, pty.size.rows or 24)
        stdin = request.stdin if request.has_field("stdin") else True  # envd's default, for old SDKs
        try:
            return ExecSpec(cmd=(cfg.cmd, *cfg.args), env=dict(cfg.envs), working_dir=cwd, user=who.user,
                            tty=pty is not None, tty_size=size, stdin=bool(stdin) or pty is not None)
        except (TypeError, ValueError) as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from None

    async def start(self, request: Any, ctx: Any) -> AsyncIterator[Any]:
        who = self._caller(ctx)
        try:
            spec = await self._spec(who, request)
            proc = await self.table.start(who.sandbox_id, spec, request.process,
                                          request.tag if request.has_field("tag") else None)
        except ArcboxError as exc:
            raise connect_error(exc, who.sandbox_id) from None
        q = proc.subscribe()
        proc.start_pump()
        try:
            yield process_pb.StartResponse(event=process_pb.ProcessEvent(
                event=Oneof("start", process_pb.ProcessEvent.StartEvent(pid=proc.pid))))
            async for event in proc.events(q, keepalive_s(ctx)):
                yield process_pb.StartResponse(event=event)
        finally:
            proc.unsubscribe(q)

    async def connect(self, request: Any, ctx: Any) -> AsyncIterator[Any]:
        who = self._caller(ctx)
        proc = self._find(who, request.process)
        q = proc.subscribe()
        try:
            yield process_pb.ConnectResponse(event=process_pb.ProcessEvent(
                event=Oneof("start", process_pb.ProcessEvent.StartEvent(pid=proc.pid))))
            async for event in proc.events(q, keepalive_s(ctx)):
                yield process_pb.ConnectResponse(event=event)
        finally:
            proc.unsubscribe(q)

    async def list(self, request: Any, ctx: Any) -> Any:
        who = self._caller(ctx)
        return process_pb.ListResponse(processes=[p.info() for p in self.table.list(who.sandbox_id)])

    async def _call(self, who: Caller, coro: Any) -> None:
        try:
            await coro
        except ArcboxError as exc:
            raise connect_error(exc, who.sandbox_id) from None

    async def send_signal(self, request: Any, ctx: Any) -> Any:
        who = self._caller(ctx)
        proc = self._find(who, request.process)
        signum = int(request.signal) or 15
        if signum not in (9, 15):
            raise ConnectError(Code.INVALID_ARGUMENT, "signal must be SIGTERM or SIGKILL")
        await self._call(who, proc.signal(signum))
        return process_pb.SendSignalResponse()

    @staticmethod
    def _input_bytes(inp: Any) -> bytes:
        which = inp.input if inp is not None else None
        data = bytes(which.value) if which is not None else b""
        if len(data) > MAX_INPUT:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"input messages are limited to {MAX_INPUT} bytes")
        return data

    async def send_input(self, request: Any, ctx: Any) -> Any:
        who = self._caller(ctx)
        proc = self._find(who, request.process)
        data = self._input_bytes(request.input)
        if data:
            await self._call(who, proc.send_input(data))
        return process_pb.SendInputResponse()

    async def stream_input(self, requests: AsyncIterator[Any], ctx: Any) -> Any:
        who = self._caller(ctx)
        proc: Proc | None = None
        async for request in requests:
            event = request.event
            if event is None or event.field == "keepalive":
                continue
            if event.field == "start":
                proc = self._find(who, event.value.process)
            elif event.field == "data":
                if proc is None:
                    raise ConnectError(Code.FAILED_PRECONDITION, "the stream must start with a start event")
                data = self._input_bytes(event.value.input)
                if data:
                    await self._call(who, proc.send_input(data))
        return process_pb.StreamInputResponse()

    async def close_stdin(self, request: Any, ctx: Any) -> Any:
        who = self._caller(ctx)
        proc = self._find(who, request.process)
        await self._call(who, proc.close_stdin())
        return process_pb.CloseStdinResponse()

    async def update(self, request: Any, ctx: Any) -> Any:
        who = self._caller(ctx)
        proc = self._find(who, request.process)
        pty = request.pty if request.has_field("pty") else None
        if pty is not None and pty.size is not None:
            cols, rows = pty.size.cols, pty.size.rows
            if not (0 < cols < 65536 and 0 < rows < 65536):
                raise ConnectError(Code.INVALID_ARGUMENT, "pty size must be 1..65535 columns and rows")
            await self._call(who, proc.resize(cols, rows))
        return process_pb.UpdateResponse()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.table.close()
