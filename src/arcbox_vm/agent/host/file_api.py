"""The file-transfer half of `AgentConnection`'s API: upload, download, stat, list.

A mixin so the connection module keeps to its own job (the read loop, dispatch, control
frames); these methods only open a handler on a new channel (see `file_ops`), register
it in the connection's table and run it. Every guest answer is validated there.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from typing import Any

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host.channels import ChannelTable
from arcbox_vm.agent.host.file_ops import (
    DirListing,
    FileReader,
    _check_request,
    _dir_listing,
    _file_stat,
    _FileRequest,
    _FileWrite,
)
from arcbox_vm.errors import GuestFileError
from arcbox_vm.models import FileStat


class FileTransfers:
    """Needs from the class it is mixed into: `hello`, `_table`, `_new_channel()`, and to be
    the `ChannelHost` its handlers send through."""

    hello: dict[str, Any]
    _table: ChannelTable

    def _new_channel(self) -> int:  # pragma: no cover - provided by AgentConnection
        raise NotImplementedError

    @property
    def supports_files(self) -> bool:
        return p.FEATURE_FILES in (self.hello.get("features") or [])

    def _require_files(self) -> None:
        if not self.supports_files:
            raise GuestFileError("the guest agent is too old for file transfer; rebuild the image "
                                 "(`arcbox-vm image build`) or re-inject the agent")

    async def write_file(self, path: str, chunks: AsyncIterable[bytes], *, mode: int = 0o644, uid: int = 0,
                         gid: int = 0, make_parents: bool = False, size: int | None = None,
                         max_bytes: int = 0) -> int:
        """Stream `chunks` into the guest file `path` (atomically replaced); returns bytes written.

        The guest writes to a temporary file next to `path` and renames it into place after
        fsync; any failure (guest error, an exception from `chunks`, cancellation, a lost
        channel) removes the temporary file. `max_bytes` > 0 aborts with FileTooLarge once
        more than that many bytes came from `chunks`. Memory: one 64 KiB frame at a time.
        """
        self._require_files()
        body = p.file_write_request(path, mode, uid, gid, make_parents, size)
        _check_request(p.MsgType.FILE_WRITE, body)
        op = _FileWrite(self, self._new_channel(), path)
        self._table.add(op)
        try:
            return await op.run(body, chunks, size=size, max_bytes=max_bytes)
        finally:
            self._table.remove(op)

    async def read_file(self, path: str, *, max_bytes: int = 0) -> FileReader:
        """Open the guest file `path` for streaming: returns once the guest opened it.

        Iterate the reader for bytes chunks; `aclose()` (or `async with`) aborts early.
        `max_bytes` > 0 refuses (FileTooLarge) a file announced or found to be larger.
        """
        self._require_files()
        body = {"path": path}
        _check_request(p.MsgType.FILE_READ, body)
        reader = FileReader(self, self._new_channel(), path, max_bytes)
        self._table.add(reader)
        await reader._open(body)
        return reader

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileStat:
        """What the guest says about `path` (lstat when follow_symlinks is false)."""
        stat: FileStat = await self._file_request(
            p.MsgType.FILE_STAT, {"path": path, "follow_symlinks": follow_symlinks}, p.MsgType.FILE_STAT_RESULT,
            path, _file_stat)
        return stat

    async def list_dir(self, path: str, *, limit: int = 0) -> DirListing:
        """The entries of the guest directory `path`, sorted by name (not following symlinks).

        At most `limit` (0 = the protocol's maximum) entries; `.truncated` says some were left out.
        """
        req: dict[str, Any] = {"path": path}
        if limit:
            req["limit"] = limit
        listing: DirListing = await self._file_request(p.MsgType.FILE_LIST, req, p.MsgType.FILE_LIST_RESULT,
                                                       path, _dir_listing)
        return listing

    async def _file_request(self, type: int, body: dict[str, Any], reply: int, path: str,
                            parse: Callable[[dict[str, Any], str], Any]) -> Any:
        self._require_files()
        _check_request(type, body)
        op = _FileRequest(self, self._new_channel(), path, reply, parse)
        self._table.add(op)
        try:
            return await op.run(type, body)
        finally:
            self._table.remove(op)
