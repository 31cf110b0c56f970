"""Event fan-out: every subscriber has its own bounded queue.

Publishing never waits: when a subscriber's queue is full its oldest events are dropped
and it is told, with a "lagged" event carrying the count, the next time it reads. A slow
subscriber therefore never slows the manager or the other subscribers.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import AsyncIterator

from arcbox_vm.models import SandboxEvent

DEFAULT_CAPACITY = 256


class EventSubscription:
    """Async iterator of SandboxEvent. `close()` (or `async with`) unsubscribes."""

    def __init__(self, bus: "EventBus", capacity: int) -> None:
        self._bus = bus
        self._buf: collections.deque[SandboxEvent] = collections.deque()
        self._capacity = capacity
        self._missed = 0
        self._wakeup = asyncio.Event()
        self._closed = False

    def _push(self, event: SandboxEvent) -> None:
        if len(self._buf) >= self._capacity:
            self._buf.popleft()
            self._missed += 1
        self._buf.append(event)
        self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[SandboxEvent]:
        return self

    async def __anext__(self) -> SandboxEvent:
        while True:
            if self._missed:
                missed, self._missed = self._missed, 0
                return SandboxEvent("", "lagged", time.time_ns(), {"missed": str(missed)})
            if self._buf:
                return self._buf.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def recv(self, timeout: float | None = None) -> SandboxEvent:
        """Next event, or asyncio.TimeoutError."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._bus._subs.discard(self)

    async def __aenter__(self) -> "EventSubscription":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._subs: set[EventSubscription] = set()

    def subscribe(self) -> EventSubscription:
        sub = EventSubscription(self, self.capacity)
        self._subs.add(sub)
        return sub

    def publish(self, sandbox_id: str, action: str, **attributes: str) -> SandboxEvent:
        event = SandboxEvent(sandbox_id, action, time.time_ns(), {k: str(v) for k, v in attributes.items()})
        for sub in list(self._subs):
            sub._push(event)
        return event

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()
