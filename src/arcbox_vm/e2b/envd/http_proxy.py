"""One HTTP/1.1 request, from an ASGI scope, proxied over a byte stream to a server in the
guest (`PortStream`, see manager/ports.py). h11 writes the request and parses the
response on the stream's side; uvicorn (h11 too) speaks to the client.

- One request per stream: the guest server gets `Connection: close`, the stream is closed
  when the response is done (or failed).
- Headers pass through both ways but the hop-by-hop ones (RFC 9110 7.6.1: Connection and
  what it names, Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-*) and, to the
  guest, what only this server reads (E2b-Sandbox-Id/-Port, the access tokens, Expect).
  The body's framing is redone on each side (chunked in, chunked out where needed).
- Bodies stream both ways with bounded buffers: the request body is written as uvicorn
  hands it over (its read buffer is bounded), only against the guest's credit; response
  bytes are asked for from the guest only after the previous ones were handed to uvicorn
  (which waits for its socket to drain), h11 buffers at most a response head (MAX_HEAD).
- The client going away ends the proxying (the stream is reset). A guest server that fails
  before its response head: BadGateway (the caller answers 502); after it: the client's
  connection is dropped (the response cannot be completed).
- No WebSocket or other upgrade (`is_websocket`; other Upgrade headers are dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import h11

from arcbox_vm.e2b.envd.caller import PORT_HEADER, SANDBOX_HEADER, TOKEN_HEADER, TRAFFIC_TOKEN_HEADER
from arcbox_vm.errors import AgentError

log = logging.getLogger("arcbox_vm.e2b.envd")

MAX_HEAD = 64 * 1024  # the largest response head taken from the guest server
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
                        b"trailer", b"upgrade", b"proxy-authenticate", b"proxy-authorization"})
NOT_TO_GUEST = frozenset({SANDBOX_HEADER.encode(), PORT_HEADER.encode(), TOKEN_HEADER.encode(),
                          TRAFFIC_TOKEN_HEADER.encode(), b"expect"})
NOT_TO_CLIENT = frozenset({b"date"})  # uvicorn sends its own
_STREAM_ERRORS = (AgentError, ConnectionError)


class BadGateway(Exception):
    """The guest server failed before a response head reached the client."""


class ResponseAborted(Exception):
    """The guest server failed in the middle of a response: the client's connection is dropped."""


class QuietAborts(logging.Filter):
    """For uvicorn's logger: it logs what ends a started response as an error with its
    traceback; a guest server breaking off its response is worth one line at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ResponseAborted):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "a proxied response from a guest port broke off: %s", (exc,)
            record.exc_info = record.exc_text = None
        return True


QUIET_ABORTS = QuietAborts()


def _connection_tokens(headers: Any) -> set[bytes]:
    return {t.strip().lower() for k, v in headers if k.lower() == b"connection" for t in v.split(b",")}


def is_websocket(scope: Any) -> bool:
    return any(k.lower() == b"upgrade" and b"websocket" in v.lower() for k, v in scope.get("headers", ()))


def request_event(scope: Any, port: int) -> h11.Request:
    raw = [(k.lower(), v) for k, v in scope.get("headers", ())]
    drop = HOP_BY_HOP | NOT_TO_GUEST | _connection_tokens(raw)
    headers = [(k, v) for k, v in raw if k not in drop]
    if any(k == b"transfer-encoding" for k, _ in raw):  # uvicorn de-chunked it: chunk it again
        headers = [(k, v) for k, v in headers if k != b"content-length"] + [(b"transfer-encoding", b"chunked")]
    if not any(k == b"host" for k, _ in headers):  # an HTTP/1.0 client
        headers.insert(0, (b"host", f"127.0.0.1:{port}".encode()))
    headers.append((b"connection", b"close"))
    target = scope.get("raw_path") or scope.get("path", "/").encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    return h11.Request(method=scope["method"], target=target, headers=headers)


def response_headers(event: h11.Response) -> list[tuple[bytes, bytes]]:
    raw = list(event.headers)
    drop = HOP_BY_HOP | NOT_TO_CLIENT | _connection_tokens(raw)
    return [(k, v) for k, v in raw if k not in drop]


class _Response:
    """The client's side: what was sent to it so far."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self.started = False
        self.complete = False

    def failure(self, message: str) -> Exception:
        return ResponseAborted(message) if self.started else BadGateway(message)

    async def start(self, event: h11.Response) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": event.status_code,
                          "headers": response_headers(event)})

    async def body(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})
        await asyncio.sleep(0)  # let a lost client connection be noticed before the next chunk

    async def end(self) -> None:
        self.complete = True
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


_GONE = "gone"  # the client went away


async def _upload(conn: h11.Connection, receive: Any, stream: Any, response: _Response) -> str | None:
    """Write the request body to the guest, then watch for the client leaving.
    Returns _GONE when it left before the response was complete, None else."""
    sending = True
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None if response.complete else _GONE
        if not sending:
            continue
        body, more = msg.get("body", b""), msg.get("more_body", False)
        try:
            if body:
                await stream.write(conn.send(h11.Data(data=body)))
            if not more:
                await stream.write(conn.send(h11.EndOfMessage()))
                sending = False
        except (*_STREAM_ERRORS, h11.LocalProtocolError) as exc:
            # the guest takes no more of it (it answered early, or reset): its response decides
            log.debug("the rest of a request body to guest port %d was not delivered: %s", stream.port, exc)
            return None


async def _download(conn: h11.Connection, stream: Any, response: _Response) -> None:
    """Parse the guest's response and hand it to the client as it comes."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise response.failure(f"the server there sent an invalid or incomplete HTTP/1.1 response "
                                   f"({exc})") from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.read()
            except _STREAM_ERRORS as exc:
                raise response.failure(f"the connection was reset ({exc})") from None
            if not data and not response.started:
                raise response.failure("the server there closed the connection without answering")
            conn.receive_data(data)
        elif isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                raise response.failure("the server there switched protocols, which this proxy does not support")
        elif isinstance(event, h11.Response):
            if event.status_code > 599:
                raise response.failure(f"the server there answered status {event.status_code}")
            await response.start(event)
        elif isinstance(event, h11.Data):
            await response.body(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            await response.end()
            return
        else:  # ConnectionClosed
            raise response.failure("the server there closed the connection without answering")


async def proxy(scope: Any, receive: Any, send: Any, stream: Any, port: int) -> None:
    """Send the request of `scope` over `stream`, answer with the response read back.
    BadGateway when nothing was answered yet; ResponseAborted (propagates: the server
    drops the client's connection) when a response broke off."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    try:
        head = conn.send(request_event(scope, port))
    except h11.LocalProtocolError as exc:
        raise BadGateway(f"the request cannot be forwarded ({exc})") from None
    try:
        await stream.write(head)
    except _STREAM_ERRORS as exc:
        raise BadGateway(f"the connection was reset ({exc})") from None
    response = _Response(send)
    up = asyncio.ensure_future(_upload(conn, receive, stream, response))
    down = asyncio.ensure_future(_download(conn, stream, response))
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if down not in done and up.result() == _GONE:
            log.debug("the client left before the response from guest port %d was complete", port)
            return
        await down
    finally:
        for task in (up, down):
            task.cancel()
        for task in (up, down):
            with contextlib.suppress(BaseException):
                await task
