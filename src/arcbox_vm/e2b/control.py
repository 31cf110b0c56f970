"""The control plane (E2B_API_URL): REST + JSON, `X-API-KEY`, errors `{"code", "message"}`.

POST /v2/sandboxes, POST /v2/sandboxes/{id}/connect (and the v1 path), GET /v2/sandboxes
(metadata/state filters, `x-next-token` paging), GET/DELETE /sandboxes/{id},
POST /sandboxes/{id}/timeout, POST /sandboxes/{id}/pause, GET /sandboxes/{id}/metrics,
PUT /sandboxes/{id}/network (`update_network`). Create's `allow_internet_access` and
`network` become the sandbox's egress policy (network.py).

Pause is the manager's pause to disk (E2B's pause frees the sandbox's CPU and memory; it
keeps its id, disk and network); 409 when already paused (the SDK's `pause()` is then
False). Connect resumes a paused sandbox (201) and gives it `timeout` (default 300 s)
from then; a running one answers 200, its timeout only ever extended. `autoPause` at
create makes the timeout pause the sandbox instead of removing it (`on_ttl="pause"`).
envd refuses a paused sandbox as the proxy does a gone one (502 "... was not found").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from arcbox_vm.e2b import network, sandboxes, views
from arcbox_vm.e2b.context import E2bContext
from arcbox_vm.errors import (
    ArcboxError,
    BootFailed,
    ConfigError,
    SnapshotsUnsupported,
    InvalidArgument,
    InvalidState,
    ResourceExhausted,
    SandboxAlreadyExists,
    SandboxNotFound,
    TemplateNotFound,
)
from arcbox_vm.models import SandboxSpec, SandboxState
from arcbox_vm.templates.models import TemplateInfo

log = logging.getLogger("arcbox_vm.e2b.control")

DEFAULT_TIMEOUT_S = 300  # E2B's default sandbox timeout
MAX_PAGE = 1000
BOOT_WAIT_S = 180.0


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def _status_of(exc: ArcboxError) -> int:
    if isinstance(exc, SandboxNotFound):
        return 404
    if isinstance(exc, SandboxAlreadyExists):
        return 409
    if isinstance(exc, SnapshotsUnsupported):
        return 501
    if isinstance(exc, (InvalidArgument, ConfigError)):
        return 400
    if isinstance(exc, InvalidState):
        return 409
    if isinstance(exc, ResourceExhausted):
        return 429
    return 500


async def _json(request: Request, limit: int) -> dict[str, Any]:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
    if not body:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ApiError(400, f"{what} must be an object of string values")
    return dict(value)


def _flag(value: Any, what: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{what} must be true or false")
    return value


def _timeout(value: Any, ctx: E2bContext, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(400, "timeout must be a non-negative integer (seconds)")
    if value > ctx.config.max_timeout_s:
        raise ApiError(400, f"timeout must be at most {ctx.config.max_timeout_s} seconds (e2b.max_timeout_s)")
    return value


class ControlPlane:
    def __init__(self, ctx: E2bContext) -> None:
        self.ctx = ctx
        self.mgr = ctx.manager
        self._limit = ctx.config.max_request_mib << 20

    # -- helpers -------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if not self.ctx.api_keys.check(request.headers.get("x-api-key")):
            raise ApiError(401, "missing or wrong API key (X-API-KEY)")

    def _spec(self, body: dict[str, Any]) -> SandboxSpec:
        template = body.get("templateID") or sandboxes.BASE_TEMPLATE
        if not isinstance(template, str):
            raise ApiError(400, "templateID must be a string")
        net = network.egress_spec(body.get("allow_internet_access"), body.get("network"),
                                  mode=self.ctx.network_mode, secure=self.ctx.config.secure)
        labels = sandboxes.creation_labels(template, _str_map(body.get("metadata"), "metadata"))
        on_ttl = "pause" if _flag(body.get("autoPause"), "autoPause") else "remove"
        resume = body.get("autoResume")
        if isinstance(resume, dict) and resume.get("enabled") is True:
            raise ApiError(400, "autoResume is not supported by this server: connect to a paused sandbox "
                                "(Sandbox.connect) to resume it")
        spec = SandboxSpec(id=sandboxes.new_id(), labels=labels, env=_str_map(body.get("envVars"), "envVars"),
                           ttl_seconds=_timeout(body.get("timeout"), self.ctx, DEFAULT_TIMEOUT_S) or 0,
                           on_ttl=on_ttl, user=self.ctx.config.default_user, network=net)
        if template != sandboxes.BASE_TEMPLATE and (built := self._built_template(template)) is not None:
            # one of our templates (`arcbox-vm template build`): a restore, its service already running;
            # its USER wins over the E2B default user when it set one
            return spec.model_copy(update={"template": template, "user": built.user or spec.user})
        if template != sandboxes.BASE_TEMPLATE:  # another template: a root filesystem in [images] dir
            try:
                spec = self.mgr.resolve_image_names(spec.model_copy(update={"rootfs": template}))
            except InvalidArgument:
                raise ApiError(404, f"template {template!r} not found (templates other than 'base' are root "
                                    "filesystem images in the daemon's images directory)") from None
        return spec

    def _built_template(self, name: str) -> TemplateInfo | None:
        try:
            return self.mgr.inspect_template(name)
        except (TemplateNotFound, InvalidArgument):  # not a template name: maybe an image's
            return None

    # -- handlers ------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        spec = self._spec(await _json(request, self._limit))
        assert spec.id is not None
        sid, _ = await self.mgr.create_sandbox(spec)
        try:
            await self.mgr.wait_ready(sid, timeout=BOOT_WAIT_S)
        except (BootFailed, asyncio.TimeoutError) as exc:
            with contextlib.suppress(ArcboxError):
                await self.mgr.remove_sandbox(sid, force=True)
            raise ApiError(500, f"the sandbox failed to start: {exc or 'timed out'}") from None
        except BaseException:
            with contextlib.suppress(ArcboxError):
                await self.mgr.remove_sandbox(sid, force=True)
            raise
        info = self.mgr.inspect_sandbox(sid)
        log.info("e2b: created sandbox %s (template %s)", sid, sandboxes.template_of(info.labels))
        return JSONResponse(views.sandbox(info, self.ctx.access_token(sid), self.ctx.traffic_token(sid)),
                            status_code=201)

    async def connect(self, request: Request) -> Response:
        sid = request.path_params["sandbox_id"]
        body = await _json(request, self._limit)
        info = sandboxes.get_visible(self.mgr, sid)
        timeout = _timeout(body.get("timeout"), self.ctx, None)
        if sandboxes.is_paused(info):
            try:
                await self.mgr.resume_sandbox(sid)
            except InvalidState:  # resumed meanwhile by another connect; else stopped or removed
                if sandboxes.get_visible(self.mgr, sid).state not in sandboxes.LIVE:
                    raise
            else:
                log.info("e2b: resumed sandbox %s", sid)
                # E2B: a resumed sandbox runs `timeout` seconds from now (the SDK's default if none)
                self.mgr.set_ttl(sid, timeout or DEFAULT_TIMEOUT_S)
                await self.mgr.wait_ready(sid, timeout=BOOT_WAIT_S)
                info = self.mgr.inspect_sandbox(sid)
                return JSONResponse(views.sandbox(info, self.ctx.access_token(sid), self.ctx.traffic_token(sid)),
                                    status_code=201)
        if timeout:  # a running sandbox's timeout is only ever extended by connect
            end = views.end_at(info)
            remaining = end - time.time() if end else None
            if remaining is not None and timeout > remaining:
                self.mgr.set_ttl(sid, timeout)
        await self.mgr.wait_ready(sid, timeout=BOOT_WAIT_S)
        info = self.mgr.inspect_sandbox(sid)
        return JSONResponse(views.sandbox(info, self.ctx.access_token(sid), self.ctx.traffic_token(sid)),
                            status_code=200)

    async def get(self, request: Request) -> Response:
        sid = request.path_params["sandbox_id"]
        info = sandboxes.get_visible(self.mgr, sid)
        return JSONResponse(views.detail(info, self.ctx.workdir(sid)))

    async def kill(self, request: Request) -> Response:
        sid = request.path_params["sandbox_id"]
        sandboxes.get_any(self.mgr, sid)
        await self.mgr.remove_sandbox(sid, force=True)
        log.info("e2b: killed sandbox %s", sid)
        return Response(status_code=204)

    async def set_timeout(self, request: Request) -> Response:
        sid = request.path_params["sandbox_id"]
        body = await _json(request, self._limit)
        sandboxes.get_visible(self.mgr, sid)  # paused: its timeout counts once it runs again
        timeout = _timeout(body.get("timeout"), self.ctx, None)
        if timeout is None:
            raise ApiError(400, "timeout (seconds) is required")
        self.mgr.set_ttl(sid, max(1, timeout))  # E2B: the sandbox ends `timeout` seconds from now
        return Response(status_code=204)

    async def pause(self, request: Request) -> Response:
        """Pause to disk: E2B's pause frees the sandbox's resources; 409 if already paused."""
        sid = request.path_params["sandbox_id"]
        await _json(request, self._limit)  # {memory, require_healthy_guest}: always a full snapshot here
        if sandboxes.is_paused(sandboxes.get_visible(self.mgr, sid)):
            raise ApiError(409, f"the sandbox {sid} is already paused")
        await self.mgr.wait_ready(sid, timeout=BOOT_WAIT_S)  # a starting one is paused once it is up
        await self.mgr.pause_sandbox(sid, to_disk=True)
        log.info("e2b: paused sandbox %s", sid)
        return Response(status_code=204)

    async def update_network(self, request: Request) -> Response:
        """Replace the egress policy (E2B: omitted fields are cleared)."""
        sid = request.path_params["sandbox_id"]
        body = await _json(request, self._limit)
        info = sandboxes.get_visible(self.mgr, sid)
        if info.network is None:
            raise ApiError(409, f"the sandbox {sid} has no network ([e2b] network = \"none\"): it reaches nothing "
                                "outside, and that cannot be changed")
        net = network.egress_spec(body.get("allow_internet_access"), body, mode="tap", secure=self.ctx.config.secure,
                                  default_egress=self.ctx.default_egress)
        await self.mgr.update_network(sid, egress=net.egress, allow_out=net.allow_out, deny_out=net.deny_out)
        return Response(status_code=204)

    async def metrics(self, request: Request) -> Response:
        sid = request.path_params["sandbox_id"]
        info = sandboxes.get_visible(self.mgr, sid)
        return JSONResponse([views.metric(info, self.ctx.workdir(sid))])

    async def list(self, request: Request) -> Response:
        q = request.query_params
        meta = _metadata_filter(q.get("metadata", ""))
        states = {s for s in q.get("state", "").split(",") if s}
        if states - {"running", "paused"}:
            raise ApiError(400, "state must be running and/or paused")
        limit = _int_param(q.get("limit"), "limit", MAX_PAGE) or MAX_PAGE
        template = q.get("template", "")
        wanted = set(sandboxes.VISIBLE)
        if states:
            wanted = ((set(sandboxes.LIVE) if "running" in states else set())
                      | ({SandboxState.PAUSED} if "paused" in states else set()))
        found = []
        for s in self.mgr.list_sandboxes(labels=meta or None):
            if not sandboxes.is_e2b(s.labels) or s.state not in wanted:
                continue
            if template and sandboxes.template_of(s.labels) != template:
                continue
            found.append(s)
        desc = q.get("order", "asc") == "desc"
        found.sort(key=lambda s: (s.created_at, s.id), reverse=desc)
        start = _int_param(q.get("nextToken"), "nextToken", 1 << 31) or 0
        page = found[start:start + limit]
        out = []
        for s in page:
            with contextlib.suppress(SandboxNotFound):
                out.append(views.detail(self.mgr.inspect_sandbox(s.id), self.ctx.workdir(s.id)))
        headers = {"x-next-token": str(start + limit)} if start + limit < len(found) else {}
        return JSONResponse(out, headers=headers)


def _int_param(value: str | None, name: str, hi: int) -> int | None:
    if value in (None, ""):
        return None
    assert value is not None
    if not value.isdigit() or int(value) > hi:
        raise ApiError(400, f"{name} must be an integer in 0..{hi}")
    return int(value)


def _metadata_filter(text: str) -> dict[str, str]:
    """`metadata=` as the SDK sends it: a URL-encoded query of URL-quoted keys and values."""
    if len(text) > 8192:
        raise ApiError(400, "the metadata filter is too long")
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in urllib.parse.parse_qsl(text)}


def build_app(ctx: E2bContext) -> Starlette:
    cp = ControlPlane(ctx)

    def wrap(handler):  # noqa: ANN001, ANN202
        async def endpoint(request: Request) -> Response:
            try:
                cp._auth(request)
                return await handler(request)
            except ApiError as exc:
                return error(exc.status, exc.message)
            except ArcboxError as exc:
                return error(_status_of(exc), str(exc))
        return endpoint

    routes = [
        Route("/v2/sandboxes", wrap(cp.create), methods=["POST"]),
        Route("/sandboxes", wrap(cp.create), methods=["POST"]),
        Route("/v2/sandboxes", wrap(cp.list), methods=["GET"]),
        Route("/sandboxes", wrap(cp.list), methods=["GET"]),
        Route("/v2/sandboxes/{sandbox_id}/connect", wrap(cp.connect), methods=["POST"]),
        Route("/sandboxes/{sandbox_id}/connect", wrap(cp.connect), methods=["POST"]),
        Route("/sandboxes/{sandbox_id}", wrap(cp.get), methods=["GET"]),
        Route("/sandboxes/{sandbox_id}", wrap(cp.kill), methods=["DELETE"]),
        Route("/sandboxes/{sandbox_id}/timeout", wrap(cp.set_timeout), methods=["POST"]),
        Route("/sandboxes/{sandbox_id}/pause", wrap(cp.pause), methods=["POST"]),
        Route("/sandboxes/{sandbox_id}/metrics", wrap(cp.metrics), methods=["GET"]),
        Route("/sandboxes/{sandbox_id}/network", wrap(cp.update_network), methods=["PUT"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, f"no such endpoint: {request.method} {request.url.path}")

    async def bad_method(request: Request, exc: Exception) -> Response:
        return error(405, f"method {request.method} is not allowed on {request.url.path}")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
