"""Waiting until a sandbox is ready: events for speed, Inspect polling for certainty.

An event stream alone can hang forever: the "ready" event may be emitted before the
subscription reaches the daemon, or the stream may break. Polling alone is slow or
chatty. So: subscribe to the sandbox's events, and re-Inspect whenever an event arrives
and at least every second — a missed event costs at most one poll interval.

The waiter needs two calls of the client, named by `SandboxWatch` (AsyncClient has them),
so this module does not import the client that uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from arcbox_vm.client.errors import ReadyTimeout
from arcbox_vm.errors import ArcboxError, BootFailed
from arcbox_vm.models import SandboxEvent, SandboxInfo, SandboxState

__all__ = ["ReadyWaiter", "SandboxWatch"]

_READY = (SandboxState.READY, SandboxState.RUNNING)
_GONE = (SandboxState.STOPPING, SandboxState.STOPPED)
MAX_POLL_INTERVAL = 1.0


class SandboxWatch(Protocol):
    """What the waiter uses of the client: one sandbox's state and its event stream."""

    async def inspect(self, sandbox_id: str) -> SandboxInfo: ...

    def events(self, id: str | None = None, action: str | None = None,
               since: int | None = None) -> AsyncIterator[SandboxEvent]: ...


class ReadyWaiter:
    """`subscribe()` early (before Create when the id is known), then `await wait(timeout)`."""

    def __init__(self, client: SandboxWatch, sandbox_id: str) -> None:
        self._client = client
        self._id = sandbox_id
        self._wake = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def subscribe(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name=f"arcbox-ready-{self._id}")

    async def _watch(self) -> None:
        # Any event about the sandbox is a reason to look again; errors are not fatal
        # here (an older daemon, a broken stream): polling still finishes the job.
        with contextlib.suppress(ArcboxError):
            async for _ in self._client.events(id=self._id):
                self._wake.set()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def wait(self, timeout: float | None = 120.0) -> SandboxInfo:
        """The sandbox's info once it is ready (or running). Raises BootFailed if it failed
        or stopped first (with the daemon's error text), ReadyTimeout after `timeout` s."""
        self.subscribe()
        try:
            async with asyncio.timeout(timeout) as deadline:
                return await self._poll()
        except TimeoutError:
            if deadline.expired():
                raise ReadyTimeout(f"sandbox {self._id!r} was not ready after {timeout:g} s; see its console "
                                   f"with `arcbox-vm logs {self._id}`") from None
            raise
        finally:
            self.close()

    async def _poll(self) -> SandboxInfo:
        delay = 0.1
        while True:
            self._wake.clear()
            info = await self._client.inspect(self._id)
            if info.state in _READY:
                return info
            if info.state == SandboxState.FAILED:
                raise BootFailed(f"sandbox {self._id!r} failed to boot: {info.error or 'no reason given'}; "
                                 f"see `arcbox-vm logs {self._id}`")
            if info.state in _GONE:
                raise BootFailed(f"sandbox {self._id!r} is {info.state} and will not become ready")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = min(delay * 2, MAX_POLL_INTERVAL)
