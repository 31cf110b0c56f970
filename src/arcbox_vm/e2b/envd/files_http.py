"""GET/POST /files: raw download, and upload as multipart (field `file`, filename = the
path) or application/octet-stream (?path=, optionally gzip), as the `username` user.

Uploads stream: the body is parsed as it arrives and handed to the guest through the
agent's flow-controlled file transfer, with at most `QUEUE_ITEMS` pieces in between, so
a large upload never sits in the daemon's memory; `daemon.max_file_mib` bounds each file.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import zlib
from collections.abc import AsyncIterator
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from arcbox_vm.e2b.envd.caller import Caller, caller, guest_path
from arcbox_vm.e2b.envd.errors import http_status, not_found_message
from arcbox_vm.e2b.envd.users import GuestUsers
from arcbox_vm.errors import ArcboxError, GuestFileNotFound, InvalidArgument, SandboxNotFound

QUEUE_ITEMS = 16
GZIP_STEP = 1 << 20  # bytes inflated at a time
MAX_PARTS = 1000
MAX_PART_HEADERS = 16 << 10


def err(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


class FilesApi:
    def __init__(self, manager: Any, users: GuestUsers, default_user: str) -> None:
        self.mgr = manager
        self.users = users
        self.default_user = default_user

    async def __call__(self, request: Request) -> Response:
        try:
            who = caller(request.headers, self.default_user, request.query_params.get("username"))
            if request.method == "GET":
                return await self.download(request, who)
            if request.method == "POST":
                return await self.upload(request, who)
            return err(405, "GET or POST /files")
        except GuestFileNotFound as exc:
            return err(404, str(exc))
        except SandboxNotFound:
            return err(502, not_found_message(request.headers.get("e2b-sandbox-id", "")))
        except ArcboxError as exc:
            return err(http_status(exc), str(exc))

    async def _target(self, who: Caller, path: str | None) -> tuple[str, int, int]:
        account = await self.users.account(who.sandbox_id, who.user)
        if not path:
            raise InvalidArgument("path is required")
        return guest_path(path, account.home), account.uid, account.gid

    async def download(self, request: Request, who: Caller) -> Response:
        path, _, _ = await self._target(who, request.query_params.get("path"))
        reader = await self.mgr.read_file(who.sandbox_id, path)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in reader:
                    yield chunk
            finally:
                await reader.aclose()

        name = posixpath.basename(path).replace('"', "")
        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"content-length": str(reader.size),
                                          "content-disposition": f'inline; filename="{name}"'})

    async def _write(self, who: Caller, path: str | None, data: AsyncIterator[bytes]) -> dict[str, str]:
        target, uid, gid = await self._target(who, path)
        await self.mgr.write_file(who.sandbox_id, target, data, uid=uid, gid=gid, make_parents=True)
        return {"name": posixpath.basename(target), "type": "file", "path": target}

    async def upload(self, request: Request, who: Caller) -> Response:
        ctype, options = parse_options_header(request.headers.get("content-type", ""))
        if ctype == b"multipart/form-data":
            boundary = options.get(b"boundary")
            if not boundary:
                raise InvalidArgument("multipart/form-data without a boundary")
            return JSONResponse(await self._multipart(request, who, boundary))
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", "gzip"):
            return err(415, f"Content-Encoding {encoding} is not supported (gzip or none)")
        data = _gunzip(request.stream()) if encoding == "gzip" else _nonempty(request.stream())
        return JSONResponse([await self._write(who, request.query_params.get("path"), data)])

    async def _multipart(self, request: Request, who: Caller, boundary: bytes) -> list[dict[str, str]]:
        queue: asyncio.Queue = asyncio.Queue(QUEUE_ITEMS)
        feeder = asyncio.create_task(_feed(request, boundary, queue))
        written: list[dict[str, str]] = []
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                kind, value = item
                if kind == "error":
                    raise InvalidArgument(value)
                if kind != "begin":
                    continue
                name, filename = value
                if name != "file":
                    async for _ in _part(queue):  # not a file field: skip it
                        pass
                    continue
                path = filename or request.query_params.get("path")
                written.append(await self._write(who, path, _part(queue)))
        finally:
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder
        return written


async def _part(queue: asyncio.Queue) -> AsyncIterator[bytes]:
    while True:
        item = await queue.get()
        if item is None or item[0] == "end":
            return
        if item[0] == "error":
            raise InvalidArgument(item[1])
        yield item[1]


async def _feed(request: Request, boundary: bytes, queue: asyncio.Queue) -> None:
    """Parse the multipart body as it arrives; queue ("begin", (name, filename)),
    ("data", bytes), ("end", None) per part, then None."""
    pending: list[tuple[str, Any]] = []
    headers: dict[bytes, bytes] = {}
    state = {"field": b"", "value": b"", "size": 0, "parts": 0}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]
        state["size"] += end - start

    def on_header_end() -> None:
        headers[bytes(state["field"]).lower()] = bytes(state["value"])
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(headers.get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode(errors="replace")
        filename = opts.get(b"filename", b"").decode(errors="replace")
        pending.append(("begin", (name, filename)))
        headers.clear()
        state["parts"] += 1

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if end > start:
            pending.append(("data", bytes(data[start:end])))

    def on_part_end() -> None:
        pending.append(("end", None))

    parser = MultipartParser(boundary, callbacks={  # type: ignore[arg-type]
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if state["parts"] > MAX_PARTS or state["size"] > MAX_PART_HEADERS:
                pending.append(("error", "too many parts or part headers too long"))
            for item in pending:
                await queue.put(item)
                if item[0] == "error":
                    return
            pending.clear()
        parser.finalize()
        for item in pending:
            await queue.put(item)
    except Exception as exc:  # noqa: BLE001 - a malformed body
        await queue.put(("error", f"malformed multipart body: {exc}"))
    await queue.put(None)


async def _nonempty(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if chunk:
            yield chunk


async def _gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Inflate a gzip body a bounded piece at a time (a small body may inflate hugely;
    the file size limit stops that)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        async for chunk in chunks:
            data = chunk
            while data:
                out = d.decompress(data, GZIP_STEP)
                if out:
                    yield out
                data = d.unconsumed_tail
        tail = d.flush()
        if tail:
            yield tail
    except zlib.error as exc:
        raise InvalidArgument(f"the body is not valid gzip: {exc}") from None
