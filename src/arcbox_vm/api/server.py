"""The sandbox.v1 servicer: validate, convert, call the manager. No business logic here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any, Callable

import grpc

from arcbox_vm import logctx
from arcbox_vm.api import convert, metadata
from arcbox_vm.api.registration import BadRequest
from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.status import abort_with
from arcbox_vm.errors import InvalidArgument, SandboxNotFound
from arcbox_vm.manager.sandbox_manager import SandboxManager

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # file and log chunks sent to clients


def _check(request: Any) -> None:
    if isinstance(request, BadRequest):
        raise InvalidArgument(request.reason)


def _need_id(request: Any) -> str:
    _check(request)
    if not request.id:
        raise InvalidArgument("id is required")
    logctx.sandbox_id.set(request.id)
    return request.id


def _need_exec_id(request: Any) -> str:
    if not request.exec_id:
        raise InvalidArgument("exec_id is required (ListExecs shows them)")
    return request.exec_id


def _exec_meta(stream: Any) -> tuple[tuple[str, str], ...]:
    return ((metadata.EXEC_ID, stream.exec_id),)


async def _relay(stream: Any, cls: type, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """A command's chunks as `cls` messages, after the exec id metadata (so a silent command
    is visible as started); the stream is closed however the call ends (kill for Run,
    detach for Attach) — use it under `contextlib.aclosing` so that holds when the call is
    cancelled while a message is being written."""
    await context.send_initial_metadata(_exec_meta(stream))
    try:
        async for chunk in stream:
            yield convert.output(chunk, cls, _timed_out(stream, chunk))
    finally:
        await stream.aclose()


def unary(fn: Callable) -> Callable:
    """Errors become status codes (see api/status.py)."""

    @functools.wraps(fn)
    async def wrapper(self: "SandboxServicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            if not isinstance(exc, (InvalidArgument, SandboxNotFound)):
                log.info("%s failed: %s", fn.__name__, exc)
            await abort_with(context, exc)

    return wrapper


def streaming(fn: Callable) -> Callable:
    @functools.wraps(fn)
    async def wrapper(self: "SandboxServicer", request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.info("%s failed: %s", fn.__name__, exc)
            await abort_with(context, exc)

    return wrapper


class SandboxServicer:
    def __init__(self, manager: SandboxManager, *, max_file_bytes: int = 0) -> None:
        self.mgr = manager
        self.max_file_bytes = max_file_bytes

    # -- lifecycle -------------------------------------------------------------------

    @unary
    async def Create(self, request: pb.CreateSandboxRequest, context: grpc.aio.ServicerContext) -> pb.CreateSandboxResponse:
        _check(request)
        if request.id:
            logctx.sandbox_id.set(request.id)
        spec = self.mgr.resolve_image_names(convert.spec_from_create(request))
        sid, ip = await self.mgr.create_sandbox(spec)
        logctx.sandbox_id.set(sid)
        log.info("created (ip %s)", ip or "none")
        return pb.CreateSandboxResponse(id=sid, ip_address=ip, state="starting")

    @unary
    async def Stop(self, request: pb.StopSandboxRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        await self.mgr.stop_sandbox(_need_id(request), request.timeout_seconds)
        return pb.Empty()

    @unary
    async def Remove(self, request: pb.RemoveSandboxRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        await self.mgr.remove_sandbox(_need_id(request), request.force)
        return pb.Empty()

    @unary
    async def Inspect(self, request: pb.InspectSandboxRequest, context: grpc.aio.ServicerContext) -> pb.SandboxInfo:
        return convert.info(self.mgr.inspect_sandbox(_need_id(request)))

    @unary
    async def UpdateNetwork(self, request: pb.UpdateNetworkRequest, context: grpc.aio.ServicerContext) -> pb.SandboxInfo:
        sandbox_id = _need_id(request)
        return convert.info(await self.mgr.update_network(sandbox_id, **convert.network_update(request)))

    @unary
    async def List(self, request: pb.ListSandboxesRequest, context: grpc.aio.ServicerContext) -> pb.ListSandboxesResponse:
        _check(request)
        try:
            items = self.mgr.list_sandboxes(request.state or None, dict(request.labels))
        except ValueError:
            raise InvalidArgument(f"unknown state {request.state!r}; use starting, ready, running, stopping, "
                                  "stopped or failed") from None
        return pb.ListSandboxesResponse(sandboxes=[convert.summary(s) for s in items])

    @streaming
    async def Events(self, request: pb.SandboxEventsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SandboxEvent]:
        _check(request)
        sub = self.mgr.subscribe_events(request.since if request.HasField("since") else None,
                                        sandbox_id=request.id, action=request.action)
        try:
            await context.send_initial_metadata(((metadata.EVENTS_SUBSCRIBED, "1"),))
            async for ev in sub:
                yield convert.event(ev)
        finally:
            sub.close()

    # -- commands --------------------------------------------------------------------

    @streaming
    async def Run(self, request: pb.RunRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RunOutput]:
        sid = _need_id(request)
        stream = await self.mgr.run_in_sandbox(sid, convert.exec_spec(request))
        async with contextlib.aclosing(_relay(stream, pb.RunOutput, context)) as messages:
            async for msg in messages:
                yield msg

    @streaming
    async def Exec(self, request_iterator: AsyncIterator[pb.ExecInput],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ExecOutput]:
        first = await anext(aiter(request_iterator), None)
        first_kind = None if first is None or isinstance(first, BadRequest) else first.WhichOneof("input")
        if first_kind not in ("init", "attach"):
            _check(first) if first is not None else None
            raise InvalidArgument("the first Exec message must be `init` (an ExecRequest) or `attach`")
        if first_kind == "attach":
            handle = await self.mgr.attach_exec(_need_id(first.attach), _need_exec_id(first.attach))
        else:
            handle = await self.mgr.exec_in_sandbox(_need_id(first.init), convert.exec_spec(first.init, stdin=True))
        await context.send_initial_metadata(_exec_meta(handle))  # the command runs: a silent one is visible too

        async def pump_input() -> None:
            eof_sent = False
            async for msg in request_iterator:
                if isinstance(msg, BadRequest):
                    break
                kind = msg.WhichOneof("input")
                if kind == "stdin" and not eof_sent:
                    await handle.send_stdin(msg.stdin)
                elif kind == "resize":
                    cols, rows = convert.tty_size(msg.resize, True)  # type: ignore[misc]
                    await handle.resize(cols, rows)
                elif kind == "eof" and msg.eof and not eof_sent:
                    await handle.close_stdin()
                    eof_sent = True
            if not eof_sent:  # the client half-closed (what that means is the handle's business)
                await handle.input_ended()

        pump = asyncio.create_task(pump_input())
        try:
            async for chunk in handle:
                yield convert.output(chunk, pb.ExecOutput, _timed_out(handle, chunk))
        finally:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            await handle.aclose()

    @unary
    async def ListExecs(self, request: pb.ListExecsRequest, context: grpc.aio.ServicerContext) -> pb.ListExecsResponse:
        return pb.ListExecsResponse(execs=[convert.exec_info(e) for e in self.mgr.list_execs(_need_id(request))])

    @unary
    async def Start(self, request: pb.StartRequest, context: grpc.aio.ServicerContext) -> pb.StartResponse:
        sid = _need_id(request)
        exec_id = await self.mgr.start_exec(sid, convert.exec_spec(request, stdin=request.stdin))
        return pb.StartResponse(exec_id=exec_id)

    @unary
    async def Signal(self, request: pb.SignalRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        sid = _need_id(request)
        await self.mgr.signal_exec(sid, _need_exec_id(request), request.signal or signal.SIGKILL)
        return pb.Empty()

    @streaming
    async def Attach(self, request: pb.AttachRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RunOutput]:
        handle = await self.mgr.attach_exec(_need_id(request), _need_exec_id(request))
        async with contextlib.aclosing(_relay(handle, pb.RunOutput, context)) as messages:
            async for msg in messages:
                yield msg

    # -- files -----------------------------------------------------------------------

    @unary
    async def UploadFile(self, request_iterator: AsyncIterator[pb.UploadRequest],
                         context: grpc.aio.ServicerContext) -> pb.UploadResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or isinstance(first, BadRequest) or first.WhichOneof("part") != "header":
            _check(first) if first is not None else None
            raise InvalidArgument("the first UploadFile message must be `header`")
        hdr = first.header
        sid = _need_id(hdr)
        if self.max_file_bytes and hdr.size > self.max_file_bytes:
            from arcbox_vm.errors import FileTooLarge

            raise FileTooLarge(f"{hdr.size} bytes exceed the daemon's file size limit of {self.max_file_bytes}")

        async def data() -> AsyncIterator[bytes]:
            async for msg in request_iterator:
                if isinstance(msg, BadRequest):
                    raise InvalidArgument(msg.reason)
                part = msg.WhichOneof("part")
                if part == "done" and msg.done:
                    return  # committed: the write completes
                if part != "data":
                    raise InvalidArgument("after the header, UploadFile messages must carry `data`, then `done`")
                yield msg.data
            # ended without `done`: the client failed mid-way; abort so no partial file appears
            raise InvalidArgument("the upload ended without its final `done` message; nothing was written")

        written = await self.mgr.write_file(
            sid, hdr.path, data(), mode=hdr.mode or 0o644, uid=max(hdr.uid, 0), gid=max(hdr.gid, 0),
            make_parents=hdr.make_parents, size=hdr.size or None)
        return pb.UploadResponse(path=hdr.path, size=written)

    @streaming
    async def DownloadFile(self, request: pb.DownloadRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DownloadChunk]:
        sid = _need_id(request)
        reader = await self.mgr.read_file(sid, request.path)
        try:
            first = True
            async for data in reader:
                for off in range(0, len(data), CHUNK):
                    yield pb.DownloadChunk(data=data[off:off + CHUNK], total_size=reader.size if first else 0)
                    first = False
            if first:
                yield pb.DownloadChunk(data=b"", total_size=reader.size)
        finally:
            await reader.aclose()

    @unary
    async def StatPath(self, request: pb.StatRequest, context: grpc.aio.ServicerContext) -> pb.FileStat:
        return convert.file_stat(await self.mgr.stat_path(_need_id(request), request.path))

    @unary
    async def ListDir(self, request: pb.ListDirRequest, context: grpc.aio.ServicerContext) -> pb.ListDirResponse:
        entries = await self.mgr.list_dir(_need_id(request), request.path)
        return pb.ListDirResponse(entries=[convert.file_stat(st) for st in entries])

    # -- resource use ----------------------------------------------------------------

    @unary
    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        _check(request)
        stats = await asyncio.to_thread(self.mgr.sandbox_stats, list(request.ids))  # file reads, off the loop
        return pb.StatsResponse(sandboxes=[convert.stats(st) for st in stats])

    # -- console ---------------------------------------------------------------------

    @streaming
    async def Logs(self, request: pb.LogsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.LogChunk]:
        output = self.mgr.console_output(_need_id(request), follow=request.follow)
        async with contextlib.aclosing(output):  # type: ignore[type-var]
            async for data in output:
                yield pb.LogChunk(data=data)


def _timed_out(stream: Any, chunk: Any) -> bool:
    return chunk.stream == "exit" and stream.timed_out
