"""The sandbox.v1 TemplateService servicer: validate, convert, call the manager.

A build's context arrives as tar chunks after the header (clients never name host
paths); it is held in memory up to `[templates] max_context_mib` and handed to the
manager as bytes, which unpacks it safely (`arcbox_vm.templates.buildctx`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from arcbox_vm.api.registration import BadRequest
from arcbox_vm.api.server import _check, unary
from arcbox_vm.api.snapshot_server import rfc3339
from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.status import abort_with
from arcbox_vm.errors import InvalidArgument, ResourceExhausted
from arcbox_vm.manager.sandbox_manager import SandboxManager
from arcbox_vm.templates.models import BuildProgress, TemplateBuildSpec, TemplateInfo

log = logging.getLogger(__name__)


def template_to_pb(t: TemplateInfo) -> pb.TemplateInfo:
    return pb.TemplateInfo(name=t.name, key=t.key, created_at=rfc3339(t.created_at), base=t.base,
                           size_bytes=t.size_bytes, memory_mib=t.memory_mib, vcpus=t.vcpus, env=t.env,
                           working_dir=t.working_dir, user=t.user, start=t.start, ready=t.ready, steps=list(t.steps),
                           build_seconds=t.build_seconds, in_use=t.in_use)


def _event(ev: BuildProgress) -> pb.BuildTemplateEvent:
    msg = pb.BuildTemplateEvent(kind=ev.kind, step=ev.step, total=ev.total, text=ev.text, data=ev.data,
                                stream=ev.stream, cached=ev.cached)
    if ev.exit_code is not None:
        msg.exit_code = ev.exit_code
    return msg


def _spec(h: pb.TemplateBuildHeader, context: bytes | None) -> TemplateBuildSpec:
    if h.egress not in ("", "none", "nat"):
        raise InvalidArgument(f"egress must be 'none' or 'nat', got {h.egress!r}")
    try:
        return TemplateBuildSpec(name=h.name, dockerfile=h.dockerfile, context=context, disk_size_mib=h.disk_size_mib,
                                 memory_mib=h.memory_mib, vcpus=h.vcpus, build_args=dict(h.build_args),
                                 egress=h.egress or None, ready_timeout_s=h.ready_timeout_seconds or 120.0,  # type: ignore[arg-type]
                                 no_cache=h.no_cache, network=h.network or "tap")  # type: ignore[arg-type]
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


class TemplateServicer:
    def __init__(self, manager: SandboxManager) -> None:
        self.mgr = manager
        self.max_context = manager.config.templates.max_context_mib << 20

    async def _read(self, requests: AsyncIterator[Any]) -> TemplateBuildSpec:
        header: pb.TemplateBuildHeader | None = None
        chunks: list[bytes] = []
        size = 0
        async for req in requests:
            if isinstance(req, BadRequest):
                raise InvalidArgument(req.reason)
            which = req.WhichOneof("body")
            if which == "header":
                if header is not None:
                    raise InvalidArgument("the build header comes once, first")
                header = req.header
            elif which == "context_chunk":
                if header is None:
                    raise InvalidArgument("the build header comes first, then the context")
                size += len(req.context_chunk)
                if size > self.max_context:
                    raise ResourceExhausted(f"the build context is larger than the daemon's limit "
                                            f"({self.max_context >> 20} MiB, [templates] max_context_mib)")
                chunks.append(req.context_chunk)
        if header is None:
            raise InvalidArgument("a build starts with a header (name, dockerfile)")
        return _spec(header, b"".join(chunks) if header.has_context else None)

    async def BuildTemplate(self, requests: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.BuildTemplateEvent]:
        task: asyncio.Task | None = None
        try:
            spec = await self._read(requests)
            log.info("building template %s", spec.name)
            queue: asyncio.Queue[BuildProgress] = asyncio.Queue()
            task = asyncio.create_task(self.mgr.build_template(spec, on_progress=queue.put_nowait))
            cached = False
            while not (task.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                ev = getter.result()
                if ev.kind == "done":
                    cached = ev.cached
                    continue
                yield _event(ev)
            info = task.result()
            yield pb.BuildTemplateEvent(kind="done", step=len(info.steps), total=len(info.steps), text=info.name,
                                        cached=cached, template=template_to_pb(info))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            log.info("BuildTemplate failed: %s", exc)
            await abort_with(context, exc)
        finally:
            if task is not None and not task.done():
                task.cancel()  # the client went away: the build stops and cleans up
                with contextlib.suppress(BaseException):
                    await task

    @unary
    async def ListTemplates(self, request: pb.ListTemplatesRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListTemplatesResponse:
        _check(request)
        return pb.ListTemplatesResponse(templates=[template_to_pb(t) for t in self.mgr.list_templates()])

    @unary
    async def InspectTemplate(self, request: pb.InspectTemplateRequest,
                              context: grpc.aio.ServicerContext) -> pb.TemplateInfo:
        _check(request)
        return template_to_pb(self.mgr.inspect_template(request.name))

    @unary
    async def RemoveTemplate(self, request: pb.RemoveTemplateRequest,
                             context: grpc.aio.ServicerContext) -> pb.RemoveTemplateResponse:
        _check(request)
        return pb.RemoveTemplateResponse(in_use=self.mgr.remove_template(request.name))

    @unary
    async def PruneTemplates(self, request: pb.PruneTemplatesRequest,
                             context: grpc.aio.ServicerContext) -> pb.PruneTemplatesResponse:
        _check(request)
        layers, freed = self.mgr.prune_templates()
        return pb.PruneTemplatesResponse(layers=layers, bytes_freed=freed)
