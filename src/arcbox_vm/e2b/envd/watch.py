"""Directory watching by polling (the guest agent has no file-watch operation).

A watcher lists its directory (recursively: down to `max_depth`, over at most
`max_entries` entries) every `interval` seconds and turns the differences into
envd events: CREATE (new path), REMOVE (gone), WRITE (size or mtime changed), CHMOD
(mode or owner changed). A rename shows as REMOVE + CREATE. Events of a watcher made
with CreateWatcher wait for GetWatcherEvents in a bounded queue (the oldest go first);
WatchDir streams them. At most `max_watchers` per sandbox.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import posixpath
from typing import Any

from arcbox_vm.e2b.envd.entries import entry, walk
from arcbox_vm.e2b.envd.users import GuestUsers
from arcbox_vm.e2b.proto import filesystem_pb
from arcbox_vm.errors import ArcboxError, ResourceExhausted
from arcbox_vm.models import FileStat

ET = filesystem_pb.EventType
MAX_QUEUED = 4096  # events a CreateWatcher watcher keeps until they are fetched
IDLE_S = 600.0  # a CreateWatcher watcher nobody fetched from for this long is removed

Snapshot = dict[str, FileStat]


def diff(old: Snapshot, new: Snapshot) -> list[tuple[str, Any]]:
    """(relative name, event type) for every difference between two snapshots."""
    out: list[tuple[str, Any]] = []
    for name, st in new.items():
        before = old.get(name)
        if before is None:
            out.append((name, ET.CREATE))
        elif (before.size, before.mtime, before.type) != (st.size, st.mtime, st.type):
            out.append((name, ET.WRITE))
        elif (before.mode, before.uid, before.gid) != (st.mode, st.uid, st.gid):
            out.append((name, ET.CHMOD))
    out += [(name, ET.REMOVE) for name in old if name not in new]
    return out


class Watcher:
    def __init__(self, owner: "Watchers", sandbox_id: str, path: str, recursive: bool, include_entry: bool) -> None:
        self.owner = owner
        self.id = f"w{next(owner.ids)}"
        self.sandbox_id = sandbox_id
        self.path = path
        self.recursive = recursive
        self.include_entry = include_entry
        self.queue: collections.deque = collections.deque(maxlen=MAX_QUEUED)
        self.more = asyncio.Event()
        self.last_fetch = asyncio.get_running_loop().time()
        self.snapshot: Snapshot = {}
        self.task: asyncio.Task | None = None

    async def scan(self) -> Snapshot:
        cfg = self.owner
        listing = await walk(cfg.manager, self.sandbox_id, self.path, cfg.max_depth if self.recursive else 1,
                             cfg.max_entries)
        return {posixpath.relpath(st.path, self.path): st for st in listing}

    async def start(self) -> None:
        """Take the first snapshot (errors here reach the caller), then poll."""
        self.snapshot = await self.scan()
        self.task = asyncio.create_task(self._run(), name=f"e2b-watch-{self.sandbox_id}-{self.id}")

    async def _run(self) -> None:
        owners = (await self.owner.users.names(self.sandbox_id)) if self.include_entry else ({}, {})
        while True:
            await asyncio.sleep(self.owner.interval)
            try:
                new = await self.scan()
            except ArcboxError:
                new = {}  # the directory is gone (or the sandbox): everything was removed
            for name, kind in diff(self.snapshot, new):
                ev = filesystem_pb.FilesystemEvent(name=name, type=kind)
                st = new.get(name)
                if self.include_entry and st is not None:
                    ev.entry = entry(st, posixpath.join(self.path, name), owners)
                self.queue.append(ev)
            self.snapshot = new
            if self.queue:
                self.more.set()

    def take(self) -> list[Any]:
        self.last_fetch = asyncio.get_running_loop().time()
        out = list(self.queue)
        self.queue.clear()
        self.more.clear()
        return out

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


class Watchers:
    """Every sandbox's watchers."""

    def __init__(self, manager: Any, users: GuestUsers, *, interval: float, max_entries: int, max_depth: int,
                 max_watchers: int) -> None:
        self.manager = manager
        self.users = users
        self.interval = interval
        self.max_entries = max_entries
        self.max_depth = max_depth
        self.max_watchers = max_watchers
        self.ids = itertools.count(1)
        self._by_id: dict[str, Watcher] = {}

    def _count(self, sandbox_id: str) -> int:
        return sum(1 for w in self._by_id.values() if w.sandbox_id == sandbox_id)

    async def _expire(self) -> None:
        now = asyncio.get_running_loop().time()
        for w in [w for w in self._by_id.values() if now - w.last_fetch > IDLE_S]:
            await self.remove(w.id)

    async def add(self, sandbox_id: str, path: str, recursive: bool, include_entry: bool) -> Watcher:
        await self._expire()
        if self._count(sandbox_id) >= self.max_watchers:
            raise ResourceExhausted(f"the sandbox already has {self.max_watchers} directory watchers "
                                    "(e2b.max_watchers); stop some first")
        w = Watcher(self, sandbox_id, path, recursive, include_entry)
        await w.start()
        self._by_id[w.id] = w
        return w

    def get(self, sandbox_id: str, watcher_id: str) -> Watcher | None:
        w = self._by_id.get(watcher_id)
        return w if w is not None and w.sandbox_id == sandbox_id else None

    async def remove(self, watcher_id: str) -> None:
        w = self._by_id.pop(watcher_id, None)
        if w is not None:
            await w.stop()

    async def close(self) -> None:
        for wid in list(self._by_id):
            await self.remove(wid)
