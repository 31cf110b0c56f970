"""The node service: one Ray actor per member node, pinned to it, that serves the fleet's
requests for the node's sandboxes by calling the node's daemon over its Unix socket with
the ordinary async client, and keeps the node's capacity and inventory current
(node_state.py).

It is made (detached, named `arcbox-vm-node:<name>`, max_restarts=0) by the daemon's
member process (member.py), so it lives as long as the Ray node. It watches the daemon:
every lifecycle event, and every `refresh_s` (every second while the daemon is away),
it re-reads the daemon's sandboxes; a daemon that does not answer makes the node's
capacity 0 and its sandboxes "lost" for the fleet until it answers again.

Errors cross Ray as RemoteError (errors.py). Streams (command output, downloads, console
logs) are Ray streaming generators; an interactive command or a chunked upload is a
session kept here, keyed by a random id, fed by further calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from arcbox_vm.client.aio_client import AsyncClient
from arcbox_vm.client.aio_exec import AsyncExecSession
from arcbox_vm.client.types import Created, Output, RunResult
from arcbox_vm.cluster import kv
from arcbox_vm.cluster.errors import encode
from arcbox_vm.cluster.names import inventory_key
from arcbox_vm.cluster.node_state import MemberConf, NodeState
from arcbox_vm.errors import ArcboxError, InvalidArgument, SandboxNotFound
from arcbox_vm.models import ExecSpec, SandboxSummary

log = logging.getLogger("arcbox_vm.cluster")

__all__ = ["NodeService"]

# Unary client methods the fleet may call by name (with the sandbox id first).
UNARY = frozenset({"inspect", "wait_ready", "stop", "remove", "update_network", "list_execs", "signal", "_start",
                   "stat", "list_dir", "stats"})
CHANGES = frozenset({"stop", "remove"})
SESSION_IDLE_S = 300.0  # an exec session nobody reads from or writes to for this long is killed


def _remote(fn: Callable[..., Any]) -> Callable[..., Any]:
    """ArcboxError → RemoteError, for coroutine and async generator methods alike (Ray
    tells streaming methods by their being async generator functions)."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def gen(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            try:
                async for item in fn(*args, **kwargs):
                    yield item
            except ArcboxError as exc:
                raise encode(exc) from None
        return gen

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except ArcboxError as exc:
            raise encode(exc) from None
    return call


class _Session:
    def __init__(self, session: AsyncExecSession) -> None:
        self.session = session
        self.used = time.monotonic()
        self.reading = False


class _Upload:
    def __init__(self, client: AsyncClient, sandbox_id: str, path: str, opts: dict[str, Any]) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
        self.task = asyncio.ensure_future(client.upload(sandbox_id, path, self._source(), **opts))

    async def _source(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk


class NodeService:
    """The actor class (member.py applies ray.remote). Every public method is a Ray call."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self.state: NodeState | None = None
        self.client: AsyncClient | None = None
        self._memory: dict[str, int] = {}
        self._dirty = asyncio.Event()
        self._refresh_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._sessions: dict[str, _Session] = {}
        self._uploads: dict[str, _Upload] = {}

    # -- membership ---------------------------------------------------------------------

    async def configure(self, conf: dict[str, Any]) -> dict[str, Any]:
        """(Re)configure from the daemon's member process; starts the watchers once."""
        new = MemberConf.from_dict(conf)
        if self.state is None or new != self.state.conf:
            old = self.state
            self.state = NodeState(new)
            if old is not None:
                self.state.inventory = old.inventory
            self.state._published = ("", kv.get_text(inventory_key(new.name), new.namespace) or "")
            await self._new_client()
        if not self._tasks:
            self._tasks = [asyncio.ensure_future(self._watch()), asyncio.ensure_future(self._follow_events()),
                           asyncio.ensure_future(self._reap_sessions())]
        await self._refresh()
        return await self.status()

    async def status(self) -> dict[str, Any]:
        import ray  # the actor runs inside Ray

        where = {"actor_node_id": ray.get_runtime_context().get_node_id()}
        return {**self.state.registration(), **where} if self.state is not None else where

    async def daemon_leaving(self) -> None:
        """The daemon is shutting down: take the node out of placement now."""
        if self.state is not None:
            async with self._refresh_lock:
                self.state.update(None, self._memory)

    async def _new_client(self) -> None:
        old, self.client = self.client, AsyncClient(socket=self.state.conf.socket) if self.state else None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()

    def _cli(self) -> AsyncClient:
        if self.client is None:
            raise ArcboxError(f"the node service of {self.name} is not configured yet")
        return self.client

    async def _refresh(self) -> None:
        """Re-read the daemon's sandboxes; update capacity, registration and inventory."""
        assert self.state is not None
        async with self._refresh_lock:
            try:
                rows: list[SandboxSummary] | None = await asyncio.wait_for(self._cli().list(), 10)
                for row in rows or ():
                    if row.id not in self._memory:
                        with contextlib.suppress(SandboxNotFound):
                            self._memory[row.id] = (await self._cli().inspect(row.id)).memory_mib
                ids = {r.id for r in rows or ()}
                self._memory = {k: v for k, v in self._memory.items() if k in ids}
            except (ArcboxError, asyncio.TimeoutError) as exc:
                if self.state.daemon_up:
                    log.warning("node %s: its daemon does not answer (%s)", self.name, exc)
                rows = None
                await self._new_client()  # a fresh channel: no reconnect backoff once it is back
            self.state.update(rows, self._memory)

    async def _watch(self) -> None:
        while True:
            assert self.state is not None
            wait = 0.3 if self.state.clamped else (self.state.conf.refresh_s if self.state.daemon_up else 1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), wait)
            self._dirty.clear()
            try:
                await self._refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive a GCS hiccup
                log.exception("node %s: refreshing capacity and inventory failed", self.name)

    async def _follow_events(self) -> None:
        while True:
            client = self.client
            if client is not None and self.state is not None and self.state.daemon_up:
                with contextlib.suppress(Exception):
                    async for _ in client.events():
                        self._dirty.set()
                self._dirty.set()  # the stream broke: is the daemon still there?
            await asyncio.sleep(1.0)

    async def _reap_sessions(self) -> None:
        while True:
            await asyncio.sleep(30)
            now = time.monotonic()
            for key, s in list(self._sessions.items()):
                if not s.reading and now - s.used > SESSION_IDLE_S:
                    self._sessions.pop(key, None)
                    with contextlib.suppress(Exception):
                        await s.session.kill()

    # -- sandboxes ----------------------------------------------------------------------

    @_remote
    async def create(self, fields: dict[str, Any]) -> Created:
        created = await self._cli().create(**fields)
        self._memory.pop(created.id, None)
        await self._refresh()  # before the placement task ends: Ray must see the slot taken
        return created

    @_remote
    async def list(self, state: str | None = None, labels: dict[str, str] | None = None) -> list[SandboxSummary]:
        return await self._cli().list(state, labels)

    @_remote
    async def call(self, method: str, sandbox_id: str, *args: Any, **kwargs: Any) -> Any:
        if method not in UNARY:
            raise InvalidArgument(f"the node service does not proxy {method!r}")
        result = await getattr(self._cli(), method)(sandbox_id, *args, **kwargs)
        if method in CHANGES:
            self._dirty.set()
        return result

    @_remote
    async def run(self, sandbox_id: str, spec: ExecSpec) -> RunResult:
        return await self._cli()._run(sandbox_id, spec)

    @_remote
    async def run_stream(self, sandbox_id: str, spec: ExecSpec) -> AsyncIterator[Output]:
        async for out in self._cli()._run_stream(sandbox_id, spec):
            yield out

    @_remote
    async def logs(self, sandbox_id: str, follow: bool = False) -> AsyncIterator[bytes]:
        async for chunk in self._cli().logs(sandbox_id, follow):
            yield chunk

    # -- files ----------------------------------------------------------------------------

    @_remote
    async def download(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        async for chunk in self._cli().download(sandbox_id, path):
            yield chunk

    @_remote
    async def upload(self, sandbox_id: str, path: str, data: bytes, opts: dict[str, Any]) -> int:
        return await self._cli().upload(sandbox_id, path, data, **opts)

    @_remote
    async def upload_open(self, sandbox_id: str, path: str, opts: dict[str, Any]) -> str:
        key = secrets.token_hex(8)
        self._uploads[key] = _Upload(self._cli(), sandbox_id, path, opts)
        return key

    @_remote
    async def upload_chunk(self, key: str, data: bytes) -> None:
        up = self._upload(key)
        if up.task.done():
            await self._finish_upload(key)  # raises what ended it
        await up.queue.put(data)

    @_remote
    async def upload_close(self, key: str, abort: bool = False) -> int:
        up = self._upload(key)
        if abort:
            up.task.cancel()
        else:
            await up.queue.put(None)
        return await self._finish_upload(key)

    def _upload(self, key: str) -> _Upload:
        up = self._uploads.get(key)
        if up is None:
            raise InvalidArgument(f"no upload {key!r} on node {self.name} (ended, or the node restarted)")
        return up

    async def _finish_upload(self, key: str) -> int:
        up = self._uploads.pop(key)
        try:
            return await up.task
        except asyncio.CancelledError:
            return -1

    # -- interactive commands -------------------------------------------------------------

    @_remote
    async def exec_open(self, sandbox_id: str, spec: ExecSpec | None = None, attach: str = "") -> str:
        cli = self._cli()
        session = await (cli.attach(sandbox_id, attach) if attach else cli._exec(sandbox_id, spec))
        key = secrets.token_hex(8)
        self._sessions[key] = _Session(session)
        return key

    def _session(self, key: str) -> _Session:
        s = self._sessions.get(key)
        if s is None:
            raise InvalidArgument(f"no exec session {key!r} on node {self.name} (ended, or the node restarted)")
        s.used = time.monotonic()
        return s

    @_remote
    async def exec_read(self, key: str) -> AsyncIterator[Output]:
        s = self._session(key)
        s.reading = True
        try:
            async for out in s.session:
                yield out
            if s.session.final is not None:
                yield s.session.final
        finally:
            s.reading = False
            s.used = time.monotonic()
            if s.session.finished:
                self._sessions.pop(key, None)

    @_remote
    async def exec_op(self, key: str, op: str, *args: Any) -> Any:
        s = self._session(key)
        if op == "exec_id":
            return await s.session.exec_id()
        if op == "kill":
            self._sessions.pop(key, None)
            return await s.session.kill()
        if op not in ("write", "resize", "close_stdin"):
            raise InvalidArgument(f"unknown exec session operation {op!r}")
        return await getattr(s.session, op)(*args)
