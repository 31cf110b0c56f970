"""The event log and its subscribers.

Every event is appended to the state database first (monotonic id), then subscribers are
woken. A subscription reads the log from its own position in bounded batches, so:
- a slow subscriber holds no memory and never slows the manager or anyone else;
- a client that reconnects with `since=<last id it saw>` misses nothing (at-least-once;
  ids let it drop duplicates);
- only a subscriber that falls behind the retained window (`retain` newest events) is
  told it lagged, with the number of events it missed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import AsyncIterator

from arcbox_vm.models import SandboxEvent
from arcbox_vm.ports.storage import StateStore, StoredEvent

DEFAULT_RETAIN = 100_000
_BATCH = 256


def _to_event(ev: StoredEvent) -> SandboxEvent:
    return SandboxEvent(ev.sandbox_id, ev.action, ev.timestamp_ns, ev.attributes, ev.id)


class EventSubscription:
    """Async iterator of SandboxEvent. `close()` (or `async with`) unsubscribes."""

    def __init__(self, log: "EventLog", after_id: int, sandbox_id: str = "", action: str = "") -> None:
        self._log = log
        self.position = after_id  # id of the last event handed out
        self._sandbox_id = sandbox_id  # "" = every sandbox
        self._action = action  # "" = every action; "lagged" always passes
        self._buf: deque[SandboxEvent] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False

    def __aiter__(self) -> AsyncIterator[SandboxEvent]:
        return self

    def _fill(self) -> SandboxEvent | None:
        oldest = self._log.oldest_id()
        if oldest and self.position < oldest - 1:
            missed = oldest - 1 - self.position
            self.position = oldest - 1
            return SandboxEvent("", "lagged", time.time_ns(), {"missed": str(missed)}, self.position)
        while not self._buf:
            batch = self._log.store.events_since(self.position, _BATCH)
            if not batch:
                break
            for ev in batch:
                if self._wanted(ev):
                    self._buf.append(_to_event(ev))
            if not self._buf:
                self.position = batch[-1].id  # all filtered out: read on
        return None

    def _wanted(self, ev: StoredEvent) -> bool:
        return (not self._sandbox_id or ev.sandbox_id == self._sandbox_id) and (
            not self._action or ev.action == self._action)

    async def __anext__(self) -> SandboxEvent:
        while True:
            if not self._buf:
                self._wakeup.clear()
                lagged = self._fill()
                if lagged is not None:
                    return lagged
            if self._buf:
                ev = self._buf.popleft()
                self.position = ev.id
                return ev
            if self._closed:
                raise StopAsyncIteration
            await self._wakeup.wait()

    async def recv(self, timeout: float | None = None) -> SandboxEvent:
        """Next event, or asyncio.TimeoutError."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._log._subs.discard(self)

    async def __aenter__(self) -> "EventSubscription":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventLog:
    def __init__(self, store: StateStore, retain: int = DEFAULT_RETAIN) -> None:
        self.store = store
        self.retain = retain
        self._subs: set[EventSubscription] = set()
        self._oldest: int | None = None
        self._appended = 0

    def oldest_id(self) -> int:
        if self._oldest is None:
            self._oldest = self.store.first_event_id()
        return self._oldest

    def subscribe(self, since: int | None = None, sandbox_id: str = "", action: str = "") -> EventSubscription:
        """From now on (since=None), or every event after id `since` (0 = the whole log);
        only those of `sandbox_id` and of `action` when given ("lagged" always)."""
        start = self.store.last_event_id() if since is None else max(0, int(since))
        sub = EventSubscription(self, start, sandbox_id, action)
        self._subs.add(sub)
        return sub

    def append(self, sandbox_id: str, action: str, **attributes: object) -> SandboxEvent:
        """Record the event (raises StateError if it cannot be written), then wake subscribers."""
        stored = self.store.append_event(sandbox_id, action, {k: str(v) for k, v in attributes.items()})
        self._appended += 1
        if self._appended % 1000 == 0:
            self._prune(stored.id)
        for sub in list(self._subs):
            sub._wakeup.set()
        return _to_event(stored)

    def _prune(self, last_id: int) -> None:
        cutoff = last_id - self.retain
        if cutoff > 0:
            self.store.trim_events(cutoff)
            self._oldest = None

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()
