"""The template calls of `AsyncClient` (TemplateService): build, list, inspect, remove,
prune. Mixed into AsyncClient.

A build sends the Dockerfile's text and the build context as a tar, packed here with the
context's .dockerignore honoured: the daemon never reads a path a client names.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from arcbox_vm.client.convert import str_map
from arcbox_vm.errors import ArcboxError, TemplateBuildFailed
from arcbox_vm.templates.buildctx import pack_context
from arcbox_vm.templates.models import MAX_CONTEXT_BYTES, BuildProgress, TemplateInfo

CHUNK = 1 << 20


def _time(text: str) -> float:
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def template_from_pb(m: pb.TemplateInfo) -> TemplateInfo:
    return TemplateInfo(name=m.name, key=m.key, created_at=_time(m.created_at), base=m.base, size_bytes=m.size_bytes,
                        memory_mib=m.memory_mib, vcpus=m.vcpus, env=dict(m.env), working_dir=m.working_dir,
                        user=m.user, start=m.start, ready=m.ready, steps=tuple(m.steps),
                        build_seconds=m.build_seconds, in_use=m.in_use)


def progress_from_pb(m: pb.BuildTemplateEvent) -> BuildProgress:
    return BuildProgress(kind=m.kind, step=m.step, total=m.total, text=m.text, data=m.data,  # type: ignore[arg-type]
                         stream=m.stream, exit_code=m.exit_code if m.HasField("exit_code") else None,
                         cached=m.cached)


class TemplateCalls:
    """Provided by AsyncClient: `_open_channel()`, `_unary()`, `_stream()`, `target`."""

    _tpl_channel: Any = None
    _tpl_stub_: Any = None
    target: Any

    def _open_channel(self) -> Any:  # pragma: no cover - AsyncClient's
        raise NotImplementedError

    async def _unary(self, method: Any, request: Any, **kw: Any) -> Any:  # pragma: no cover - AsyncClient's
        raise NotImplementedError

    def _stream(self, call: Any, **kw: Any) -> AsyncIterator[Any]:  # pragma: no cover - AsyncClient's
        raise NotImplementedError

    @property
    def _tpl(self) -> pb_grpc.TemplateServiceStub:
        channel = self._open_channel()
        if self._tpl_stub_ is None or self._tpl_channel is not channel:
            self._tpl_channel, self._tpl_stub_ = channel, pb_grpc.TemplateServiceStub(channel)
        return self._tpl_stub_

    async def build_template(self, name: str, dockerfile: str, context: str | os.PathLike[str] | bytes | None = None,
                             *, disk_size_mib: int = 0, memory_mib: int = 0, vcpus: int = 0,
                             build_args: Mapping[str, str] | None = None, egress: Literal["none", "nat"] | None = None,
                             ready_timeout_s: float = 0, no_cache: bool = False,
                             network: Literal["tap", "none"] = "tap",
                             on_progress: Callable[[BuildProgress], None] | None = None) -> TemplateInfo:
        """Build template `name` in the daemon. `context`: a local directory (packed here as a
        tar, .dockerignore honoured) or the tar's bytes. `on_progress` gets every step,
        cached step and line of output. A failed build raises TemplateBuildFailed with
        the step, the exit code and the end of the output."""
        data = b""
        if context is not None:
            data = bytes(context) if isinstance(context, (bytes, bytearray)) else \
                pack_context(Path(context), MAX_CONTEXT_BYTES)
        header = pb.TemplateBuildHeader(name=name, dockerfile=dockerfile, disk_size_mib=disk_size_mib,
                                        memory_mib=memory_mib, vcpus=vcpus, build_args=str_map(build_args),
                                        egress=egress or "", ready_timeout_seconds=ready_timeout_s,
                                        no_cache=no_cache, has_context=context is not None, network=network)

        async def requests() -> AsyncIterator[pb.BuildTemplateRequest]:
            yield pb.BuildTemplateRequest(header=header)
            for i in range(0, len(data), CHUNK):
                yield pb.BuildTemplateRequest(context_chunk=data[i:i + CHUNK])

        call = self._tpl.BuildTemplate(requests(), metadata=self.target.metadata)
        failure: BuildProgress | None = None
        output = bytearray()
        try:
            async for m in self._stream(call, kind="sandbox"):
                ev = progress_from_pb(m)
                if ev.kind == "output":
                    output += ev.data
                    del output[:-8192]
                elif ev.kind == "error":
                    failure = ev
                if on_progress is not None:
                    on_progress(ev)
                if ev.kind == "done":
                    return template_from_pb(m.template)
        except ArcboxError as exc:
            if failure is not None:
                err = TemplateBuildFailed.__new__(TemplateBuildFailed)
                Exception.__init__(err, str(exc))
                err.step, err.exit_code, err.instruction = failure.step, failure.exit_code, ""
                err.output = output.decode(errors="replace")
                raise err from None
            raise
        raise ArcboxError("the daemon ended the build without a result")

    async def list_templates(self) -> list[TemplateInfo]:
        reply = await self._unary(self._tpl.ListTemplates, pb.ListTemplatesRequest())
        return [template_from_pb(t) for t in reply.templates]

    async def inspect_template(self, name: str) -> TemplateInfo:
        return template_from_pb(await self._unary(self._tpl.InspectTemplate, pb.InspectTemplateRequest(name=name)))

    async def remove_template(self, name: str) -> int:
        """Returns how many sandboxes made from it run on (they keep working)."""
        return (await self._unary(self._tpl.RemoveTemplate, pb.RemoveTemplateRequest(name=name))).in_use

    async def prune_templates(self) -> tuple[int, int]:
        reply = await self._unary(self._tpl.PruneTemplates, pb.PruneTemplatesRequest())
        return reply.layers, reply.bytes_freed
