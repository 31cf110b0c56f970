"""Async client for Firecracker's HTTP/1.1 API on its Unix socket.

Firecracker answers 204 to every successful PUT/PATCH and 200 + JSON to GETs. Errors come in
two shapes, and both are understood here:

* VMM layer (and routing/parsing): ``{"fault_message": "..."}`` (HTTP 400, or 413 for MMDS);
* HTTP layer (micro_http, e.g. a body over the payload limit): ``{"error": "..."}``;

and anything else (non-JSON, empty body) is reported verbatim. Every failure raises
`FirecrackerApiError` carrying method, path, status and the message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from arcbox_vm.errors import FirecrackerApiError, VmmError

from .bodies import ApiRequest

DEFAULT_REQUEST_TIMEOUT = 30.0
_MAX_MESSAGE = 2000


def parse_error_body(content: bytes) -> str:
    """The human-readable message of a Firecracker error response, whatever its shape."""
    text = content.decode("utf-8", errors="replace").strip()
    if not text:
        return "(empty response body)"
    try:
        data = json.loads(text)
    except ValueError:
        return text[:_MAX_MESSAGE]
    if isinstance(data, dict):
        for key in ("fault_message", "error"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return value[:_MAX_MESSAGE]
            if value is not None and value != "":
                return json.dumps(value)[:_MAX_MESSAGE]
    return text[:_MAX_MESSAGE]


class FirecrackerApi:
    """One keep-alive HTTP connection pool to a Firecracker API socket."""

    def __init__(self, socket_path: Path | str, *, timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self.socket_path = Path(socket_path)
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.socket_path)),
            base_url="http://localhost",
            timeout=timeout,
            headers={"Accept": "application/json"},
        )

    async def __aenter__(self) -> FirecrackerApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, request: ApiRequest) -> Any:
        return await self.request(request.method, request.path, request.body)

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request; returns the decoded JSON (GET) or None (204). Raises on error."""
        content = None
        headers = {}
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        try:
            response = await self._client.request(method, path, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            raise VmmError(
                f"Firecracker {method} {path} timed out after {self._client.timeout.read}s "
                f"(API socket {self.socket_path}); the VMM is stuck or overloaded"
            ) from exc
        except httpx.TransportError as exc:
            raise VmmError(
                f"Firecracker {method} {path} could not be sent over {self.socket_path}: {exc or type(exc).__name__}; "
                "the Firecracker process has probably exited (see its log)"
            ) from exc
        if response.status_code >= 300:
            raise FirecrackerApiError(method, path, response.status_code, parse_error_body(response.content))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text
