"""filesystem.Filesystem: Stat, ListDir, MakeDir, Remove, Move and the watchers.

Stat and ListDir use the agent's file operations; MakeDir, Remove and Move (which the
agent has no operation for) run `mkdir`, `rm`, `mv` in the guest as the calling user,
with fixed argument lists (paths are arguments, never shell text).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from arcbox_vm.e2b.envd.caller import Caller, caller, guest_path
from arcbox_vm.e2b.envd.entries import entry, walk
from arcbox_vm.e2b.envd.errors import connect_error
from arcbox_vm.e2b.envd.process_service import keepalive_s
from arcbox_vm.e2b.envd.users import GuestUsers
from arcbox_vm.e2b.envd.watch import Watchers
from arcbox_vm.e2b.proto import Oneof, filesystem_pb
from arcbox_vm.errors import ArcboxError, GuestFileNotFound
from arcbox_vm.models import ExecSpec, FileStat

FS_COMMAND_TIMEOUT_S = 120.0
MAX_LIST_DEPTH = 32
_MOVE = 'mkdir -p -- "$(dirname -- "$2")" && exec mv -T -- "$1" "$2"'


def _command_error(stderr: bytes, what: str) -> ConnectError:
    text = stderr.decode(errors="replace").strip()[-500:] or f"{what} failed"
    low = text.lower()
    if "no such file" in low:
        return ConnectError(Code.NOT_FOUND, text)
    if "permission denied" in low or "operation not permitted" in low:
        return ConnectError(Code.PERMISSION_DENIED, text)
    if "exists" in low:
        return ConnectError(Code.ALREADY_EXISTS, text)
    return ConnectError(Code.INVALID_ARGUMENT, text)


class FilesystemService:
    def __init__(self, manager: Any, users: GuestUsers, watchers: Watchers, default_user: str,
                 max_entries: int) -> None:
        self.mgr = manager
        self.users = users
        self.watchers = watchers
        self.default_user = default_user
        self.max_entries = max_entries

    async def _who(self, ctx: Any, path: str) -> tuple[Caller, str]:
        """The caller and `path` made absolute (relative = under the user's home)."""
        try:
            who = caller(ctx.request_headers, self.default_user)
            if path.startswith("/"):
                return who, guest_path(path, "/")
            return who, guest_path(path, (await self.users.account(who.sandbox_id, who.user)).home)
        except ArcboxError as exc:
            raise connect_error(exc) from None

    async def _entry(self, who: Caller, st: FileStat, path: str) -> Any:
        return entry(st, path, await self.users.names(who.sandbox_id))

    async def _stat(self, who: Caller, path: str) -> FileStat:
        try:
            return await self.mgr.stat_path(who.sandbox_id, path)
        except GuestFileNotFound:
            raise ConnectError(Code.NOT_FOUND, f"path {path} does not exist") from None
        except ArcboxError as exc:
            raise connect_error(exc, who.sandbox_id) from None

    async def _run(self, who: Caller, argv: list[str], what: str) -> None:
        spec = ExecSpec(cmd=tuple(argv), user=who.user, working_dir="/", timeout_seconds=FS_COMMAND_TIMEOUT_S)
        try:
            _out, err, code = await (await self.mgr.run_in_sandbox(who.sandbox_id, spec)).collect()
        except ArcboxError as exc:
            raise connect_error(exc, who.sandbox_id) from None
        if code != 0:
            raise _command_error(err, what)

    # -- RPCs ----------------------------------------------------------------------

    async def stat(self, request: Any, ctx: Any) -> Any:
        who, path = await self._who(ctx, request.path)
        return filesystem_pb.StatResponse(entry=await self._entry(who, await self._stat(who, path), path))

    async def list_dir(self, request: Any, ctx: Any) -> Any:
        who, path = await self._who(ctx, request.path)
        depth = min(int(request.depth or 1), MAX_LIST_DEPTH)
        st = await self._stat(who, path)
        if st.type != "dir":
            raise ConnectError(Code.INVALID_ARGUMENT, f"path {path} is not a directory")
        try:
            listing = await walk(self.mgr, who.sandbox_id, path, depth, self.max_entries)
        except ArcboxError as exc:
            raise connect_error(exc, who.sandbox_id) from None
        owners = await self.users.names(who.sandbox_id)
        return filesystem_pb.ListDirResponse(entries=[entry(e, e.path, owners) for e in listing])

    async def make_dir(self, request: Any, ctx: Any) -> Any:
        who, path = await self._who(ctx, request.path)
        try:
            st = await self.mgr.stat_path(who.sandbox_id, path)
        except GuestFileNotFound:
            st = None
        except ArcboxError as exc:
            raise connect_error(exc, who.sandbox_id) from None
        if st is not None:
            raise ConnectError(Code.ALREADY_EXISTS, f"path {path} already exists")
        await self._run(who, ["mkdir", "-p", "--", path], "mkdir")
        return filesystem_pb.MakeDirResponse(entry=await self._entry(who, await self._stat(who, path), path))

    async def remove(self, request: Any, ctx: Any) -> Any:
        who, path = await self._who(ctx, request.path)
        if path == "/":
            raise ConnectError(Code.INVALID_ARGUMENT, "refusing to remove /")
        await self._stat(who, path)
        await self._run(who, ["rm", "-rf", "--", path], "rm")
        return filesystem_pb.RemoveResponse()

    async def move(self, request: Any, ctx: Any) -> Any:
        who, source = await self._who(ctx, request.source)
        _, dest = await self._who(ctx, request.destination)
        await self._stat(who, source)
        await self._run(who, ["sh", "-c", _MOVE, "sh", source, dest], "mv")
        return filesystem_pb.MoveResponse(entry=await self._entry(who, await self._stat(who, dest), dest))

    # -- watchers ------------------------------------------------------------------

    async def _watch(self, request: Any, ctx: Any) -> Any:
        who, path = await self._who(ctx, request.path)
        st = await self._stat(who, path)
        if st.type != "dir":
            raise ConnectError(Code.INVALID_ARGUMENT, f"path {path} is not a directory")
        try:
            return await self.watchers.add(who.sandbox_id, path, request.recursive, request.include_entry)
        except ArcboxError as exc:
            raise connect_error(exc, who.sandbox_id) from None

    async def create_watcher(self, request: Any, ctx: Any) -> Any:
        w = await self._watch(request, ctx)
        return filesystem_pb.CreateWatcherResponse(watcher_id=w.id)

    def _watcher(self, ctx: Any, watcher_id: str) -> Any:
        w = self.watchers.get(ctx.request_headers.get("e2b-sandbox-id", ""), watcher_id)
        if w is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher {watcher_id} not found")
        return w

    async def get_watcher_events(self, request: Any, ctx: Any) -> Any:
        return filesystem_pb.GetWatcherEventsResponse(events=self._watcher(ctx, request.watcher_id).take())

    async def remove_watcher(self, request: Any, ctx: Any) -> Any:
        await self.watchers.remove(self._watcher(ctx, request.watcher_id).id)
        return filesystem_pb.RemoveWatcherResponse()

    async def watch_dir(self, request: Any, ctx: Any) -> AsyncIterator[Any]:
        w = await self._watch(request, ctx)
        wr = filesystem_pb.WatchDirResponse
        interval = keepalive_s(ctx)
        try:
            yield wr(event=Oneof("start", wr.StartEvent()))
            while True:
                if not w.queue:
                    try:
                        await asyncio.wait_for(w.more.wait(), interval)
                    except asyncio.TimeoutError:
                        yield wr(event=Oneof("keepalive", wr.KeepAlive()))
                        continue
                for ev in w.take():
                    yield wr(event=Oneof("filesystem", ev))
        finally:
            await self.watchers.remove(w.id)
