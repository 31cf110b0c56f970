"""The real daemon (`serve()`) over the local VMM test double (local_vmm.py) — no VM, no image.

`Serving`: `serve()` as a task of the test's own event loop (in-process daemons of the
daemon, metrics and E2B tests). `free_port()`: a loopback TCP port nobody listens on.
`python -m tests.support.local_daemon CONFIG`: the daemon as its own process, for tests
that need one they can SIGKILL and start again, e.g. the fleet's (it re-adopts its
sandboxes' agent processes, which run in sessions of their own)."""

from __future__ import annotations

import asyncio
import socket
import sys

from arcbox_vm import SandboxManager, VmmConfig
from arcbox_vm.daemon.serve import serve
from arcbox_vm.logctx import setup_logging
from tests.support.local_vmm import LocalDriver, NoImageBuild


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serving:
    """`serve(config, manager=...)` running as a task of the current loop until `stop()`
    (what SIGTERM does: no new calls, a grace period, then the shutdown policy)."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.stop_event = asyncio.Event()

    async def start(self, config: VmmConfig, manager: SandboxManager, timeout: float = 20) -> None:
        """Serve; return once it listens (its error, or AssertionError after `timeout`)."""
        self.stop_event = asyncio.Event()
        ready = asyncio.Event()
        self.task = asyncio.create_task(serve(config, ready=ready, manager=manager, stop=self.stop_event))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({waiter, self.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiter.cancel()
            if self.task.done():
                self.task.result()  # raises what went wrong
            raise AssertionError("the daemon did not come up")

    async def stop(self, timeout: float = 30) -> None:
        if self.task is not None:
            self.stop_event.set()
            await asyncio.wait_for(self.task, timeout)
            self.task = None


async def main(config: str) -> None:
    cfg = VmmConfig.from_file(config)
    manager = SandboxManager(cfg, driver=LocalDriver())
    manager.adapters.images = NoImageBuild()
    await serve(cfg, manager=manager)


if __name__ == "__main__":
    setup_logging("info", "logfmt")
    asyncio.run(main(sys.argv[1]))
