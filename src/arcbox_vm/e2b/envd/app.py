"""The in-sandbox API's front door: one ASGI app for every sandbox.

Each request names its sandbox (`E2b-Sandbox-Id`) and port (`E2b-Sandbox-Port`, envd's
by default) — or, without those headers, its Host is a `get_host(port)` name,
`PORT-SANDBOXID.DOMAIN`. Unknown, stopped or non-E2B sandboxes get the proxy's 502 "...
was not found"; a wrong or missing token (secured sandboxes) 401: `X-Access-Token` for
envd, for other ports that or the sandbox's trafficAccessToken (`E2b-Traffic-Access-Token`).
envd's port: /health, /files, and the two Connect services (connectrpc's ASGI
applications with envd's generated classes, JSON codec, no compression, request messages
bounded). Any other port: the request is proxied to that TCP port in the guest (ports.py).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from starlette.requests import Request

from arcbox_vm.config.e2b import ENVD_PORT
from arcbox_vm.e2b import sandboxes
from arcbox_vm.e2b.context import E2bContext
from arcbox_vm.e2b.envd import ports
from arcbox_vm.e2b.envd.caller import PORT_HEADER, SANDBOX_HEADER, TOKEN_HEADER, TRAFFIC_TOKEN_HEADER
from arcbox_vm.e2b.envd.errors import not_found_message, paused_message
from arcbox_vm.e2b.envd.files_http import FilesApi
from arcbox_vm.e2b.envd.fs_service import FilesystemService
from arcbox_vm.e2b.envd.process_service import ProcessService
from arcbox_vm.e2b.envd.processes import ProcessTable
from arcbox_vm.e2b.envd.users import GuestUsers
from arcbox_vm.e2b.envd.watch import Watchers
from arcbox_vm.e2b.proto import filesystem_connect, process_connect
from arcbox_vm.errors import SandboxNotFound

log = logging.getLogger("arcbox_vm.e2b.envd")

# What `Sandbox.get_host(port)` gives: PORT-SANDBOXID.DOMAIN (a port may follow the domain).
HOST_RE = re.compile(r"^(\d{1,5})-([A-Za-z0-9][A-Za-z0-9-]{0,62})\.")


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
        port = headers.get(PORT_HEADER, "")
        if not sid and (m := HOST_RE.match(headers.get("host", ""))):
            port, sid = m.group(1), m.group(2)
        if not sid:
            await _reply(send, 400, f"the {SANDBOX_HEADER} header (or a Host of the form PORT-SANDBOXID.DOMAIN, "
                                    "what get_host(port) gives) is required")
            return
        port = port or str(ENVD_PORT)
        if not port.isdigit() or not 0 < int(port) < 65536:
            await _reply(send, 400, f"bad {PORT_HEADER}: {port[:20]!r}")
            return
        try:
            info = sandboxes.get_visible(self.ctx.manager, sid)
        except SandboxNotFound:
            await _reply(send, 502, not_found_message(sid))
            return
        if info.state not in sandboxes.LIVE:
            await _reply(send, 502, paused_message(sid))
            return
        envd = int(port) == ENVD_PORT
        if self.ctx.config.secure and not self._authorized(sid, headers, envd):
            what = "X-Access-Token" if envd else "E2b-Traffic-Access-Token (trafficAccessToken) or X-Access-Token"
            await _reply(send, 401, f"missing or wrong access token ({what})")
            return
        if not envd:
            await ports.serve_port(self.ctx.manager, scope, receive, send, sid, int(port))
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

    def _authorized(self, sid: str, headers: dict[str, str], envd: bool) -> bool:
        tokens = self.ctx.tokens
        if tokens.check(sid, headers.get(TOKEN_HEADER)):
            return True
        return not envd and tokens.check_traffic(sid, headers.get(TRAFFIC_TOKEN_HEADER))
