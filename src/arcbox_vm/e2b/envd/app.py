"""The in-sandbox API's front door: one ASGI app for every sandbox.

Each request names its sandbox (`E2b-Sandbox-Id`) and port (`E2b-Sandbox-Port`, envd's
by default). Unknown, stopped or non-E2B sandboxes get the proxy's 502 "... was not
found"; a wrong or missing `X-Access-Token` (secured sandboxes) 401. Then: /health,
/files, and the two Connect services (connectrpc's ASGI applications with envd's
generated classes, JSON codec, no compression, request messages bounded).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import Request

from arcbox_vm.config.e2b import ENVD_PORT
from arcbox_vm.e2b import sandboxes
from arcbox_vm.e2b.context import E2bContext
from arcbox_vm.e2b.envd import ports
from arcbox_vm.e2b.envd.caller import PORT_HEADER, SANDBOX_HEADER, TOKEN_HEADER
from arcbox_vm.e2b.envd.errors import not_found_message
from arcbox_vm.e2b.envd.files_http import FilesApi
from arcbox_vm.e2b.envd.fs_service import FilesystemService
from arcbox_vm.e2b.envd.process_service import ProcessService
from arcbox_vm.e2b.envd.processes import ProcessTable
from arcbox_vm.e2b.envd.users import GuestUsers
from arcbox_vm.e2b.envd.watch import Watchers
from arcbox_vm.e2b.proto import filesystem_connect, process_connect
from arcbox_vm.errors import SandboxNotFound

log = logging.getLogger("arcbox_vm.e2b.envd")


async def _reply(send: Any, status: int, message: str = "", headers: list | None = None) -> None:
    body = json.dumps({"code": status, "message": message}).encode() if message else b""
    hdrs = [(b"content-type", b"application/json")] if body else []
    await send({"type": "http.response.start", "status": status,
                "headers": hdrs + (headers or []) + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class EnvdApp:
    def __init__(self, ctx: E2bContext) -> None:
        cfg = ctx.config
        self.ctx = ctx
        self.users = GuestUsers(ctx.manager)
        self.processes = ProcessService(ProcessTable(ctx.manager, cfg.max_processes), self.users, cfg.default_user)
        self.watchers = Watchers(ctx.manager, self.users, interval=cfg.watch_interval_s,
                                 max_entries=cfg.watch_max_entries, max_depth=cfg.watch_max_depth,
                                 max_watchers=cfg.max_watchers)
        self.filesystem = FilesystemService(ctx.manager, self.users, self.watchers, cfg.default_user,
                                            cfg.watch_max_entries)
        limit = cfg.max_request_mib << 20
        self.routes = {
            "/process.Process/": process_connect.ProcessASGIApplication(
                self.processes, read_max_bytes=limit, compressions=()),  # type: ignore[arg-type]
            "/filesystem.Filesystem/": filesystem_connect.FilesystemASGIApplication(
                self.filesystem, read_max_bytes=limit, compressions=()),  # type: ignore[arg-type]
        }
        self.files = FilesApi(ctx.manager, self.users, cfg.default_user)

    async def close(self) -> None:
        await self.watchers.close()
        await self.processes.close()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        sid = headers.get(SANDBOX_HEADER, "")
        if not sid:
            await _reply(send, 400, f"the {SANDBOX_HEADER} header is required")
            return
        try:
            sandboxes.get_live(self.ctx.manager, sid)
        except SandboxNotFound:
            await _reply(send, 502, not_found_message(sid))
            return
        if self.ctx.config.secure and not self.ctx.tokens.check(sid, headers.get(TOKEN_HEADER)):
            await _reply(send, 401, "missing or wrong access token (X-Access-Token)")
            return
        port = headers.get(PORT_HEADER, str(ENVD_PORT))
        if port != str(ENVD_PORT):
            await self._other_port(scope, receive, send, sid, port)
            return
        path = scope.get("path", "")
        if path == "/health":
            await _reply(send, 204)
            return
        if path == "/files":
            response = await self.files(Request(scope, receive))
            await response(scope, receive, send)
            return
        for prefix, app in self.routes.items():
            if path.startswith(prefix):
                await app(scope, receive, send)
                return
        await _reply(send, 404, f"no such endpoint: {path}")

    async def _other_port(self, scope: Any, receive: Any, send: Any, sid: str, port: str) -> None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            await _reply(send, 400, f"bad {PORT_HEADER}: {port[:20]!r}")
            return
        try:
            await ports.open_guest_port(self.ctx.manager, sid, int(port))
        except ports.PortForwardingUnavailable as exc:
            await _reply(send, 502, f"{exc} (port is not open)")
            return
        # TODO(port-forward): proxy the HTTP request over the stream open_guest_port returns.
        await _reply(send, 502, f"the sandbox {sid}'s port {port} is not open (proxying is not implemented yet)")
