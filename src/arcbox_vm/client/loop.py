"""The private event loop thread behind the sync API.

The sync client is the async client driven from a background loop, so there is one
implementation of every RPC, stream and error mapping. One loop serves every sync client
in the process (threads are not free, and grpc.aio channels stay on the loop that made
them). Coroutines are submitted with run_coroutine_threadsafe; a Ctrl-C in the waiting
thread cancels the coroutine, which cancels its RPC.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


async def _anext(it: AsyncIterator[T]) -> T:
    # run_coroutine_threadsafe wants a coroutine; __anext__ may return any awaitable.
    return await it.__anext__()


class LoopThread:
    _shared: "LoopThread | None" = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="arcbox-vm-client", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> "LoopThread":
        """The process-wide loop thread, started on first use (and again after a fork)."""
        with cls._shared_lock:
            if cls._shared is None or not cls._shared._thread.is_alive():
                cls._shared = cls()
                atexit.register(cls._shared.stop)
            return cls._shared

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (its exception is raised here)."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("the sync arcbox-vm client was called from its own loop thread (from a callback "
                               "running there?); use the async client inside coroutines")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()  # KeyboardInterrupt / timeout: stop the coroutine and its RPC
            raise

    def stream(self, factory: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """A blocking iterator over the async iterator `factory()` makes — made on the loop,
        because grpc.aio starts a call where it is created (and only inside its loop)."""

        async def make() -> AsyncIterator[T]:
            return factory()

        return self.iterate(self.run(make()))

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """A blocking iterator over an async iterator; closing it (or dropping it) closes
        the async one, which cancels its RPC."""
        try:
            while True:
                try:
                    item = self.run(_anext(agen))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self.loop.is_closed():
                if self.in_loop_thread():  # garbage-collected on the loop thread: cannot block
                    self.loop.create_task(aclose())
                else:
                    try:
                        self.run(aclose())
                    except RuntimeError:
                        pass

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
