"""`E2b-Sandbox-Port` other than envd's: one HTTP request proxied to that TCP port in the
guest, over a stream the manager opens through the guest agent (`connect_port`: no guest
network needed, counted against `[limits] max_port_connections`).

The guest side is 127.0.0.1:PORT inside the VM (a server bound to 0.0.0.0 is reached
too). Errors before any response: nothing listening there → 502 "... port is not open"
(what the SDK reads as SandboxUnreachableException); sandbox unknown or gone → 502 "...
was not found", as for envd; not ready yet → 502; too many connections → 503 with
Retry-After. WebSocket and other upgrades are not proxied (501).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from arcbox_vm.e2b.envd import http_proxy
from arcbox_vm.e2b.envd.errors import not_found_message
from arcbox_vm.errors import AgentError, InvalidState, ResourceExhausted, SandboxNotFound

log = logging.getLogger("arcbox_vm.e2b.envd")

RETRY_AFTER_S = 1


async def reply(send: Any, status: int, message: str, sandbox_id: str, port: int,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """E2B's proxy errors: {"code", "message", "sandboxId", "port"}."""
    body = json.dumps({"code": status, "message": message, "sandboxId": sandbox_id, "port": port}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def port_not_open(sandbox_id: str, port: int) -> str:
    """E2B's words (the SDK looks for "port is not open"), then ours."""
    return (f"The sandbox {sandbox_id} is running but port is not open: nothing listens on port {port} in it "
            "(on 127.0.0.1 or 0.0.0.0)")


async def open_guest_port(manager: Any, sandbox_id: str, port: int) -> Any:
    """A `PortStream` (read/write/write_eof/close) to TCP `port` inside the sandbox."""
    return await manager.connect_port(sandbox_id, port)


async def serve_port(manager: Any, scope: Any, receive: Any, send: Any, sandbox_id: str, port: int) -> None:
    """Answer one request to `port` of the sandbox by proxying it there."""
    if http_proxy.is_websocket(scope):
        await reply(send, 501, f"WebSocket and other protocol upgrades are not proxied to port {port} by this "
                               "server (plain HTTP/1.1 requests only)", sandbox_id, port)
        return
    try:
        stream = await open_guest_port(manager, sandbox_id, port)
    except SandboxNotFound:
        await reply(send, 502, not_found_message(sandbox_id), sandbox_id, port)
        return
    except InvalidState as exc:
        await reply(send, 502, f"The sandbox {sandbox_id} cannot be reached: {exc}", sandbox_id, port)
        return
    except ResourceExhausted as exc:
        await reply(send, 503, str(exc), sandbox_id, port,
                    headers=[(b"retry-after", str(RETRY_AFTER_S).encode())])
        return
    except AgentError as exc:
        msg = port_not_open(sandbox_id, port) if exc.code == "refused" else \
            f"The sandbox {sandbox_id}'s port {port} cannot be reached: {exc}"
        await reply(send, 502, msg, sandbox_id, port)
        return
    try:
        await http_proxy.proxy(scope, receive, send, stream, port)
    except http_proxy.BadGateway as exc:  # nothing was sent to the client yet
        await reply(send, 502, f"The sandbox {sandbox_id}'s port {port}: {exc}", sandbox_id, port)
    finally:
        stream.close()
