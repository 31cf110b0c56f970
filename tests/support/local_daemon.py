"""`python -m tests.support.local_daemon CONFIG`: the real daemon (`serve()`) as its own
process over the local VMM test double (local_vmm.py) — no VM, no image. For tests that
need a daemon they can SIGKILL and start again, e.g. the fleet's (it re-adopts its
sandboxes' agent processes, which run in sessions of their own)."""

from __future__ import annotations

import asyncio
import sys

from arcbox_vm import SandboxManager, VmmConfig
from arcbox_vm.daemon.serve import serve
from arcbox_vm.logctx import setup_logging
from tests.support.local_vmm import LocalDriver, NoImageBuild


async def main(config: str) -> None:
    cfg = VmmConfig.from_file(config)
    manager = SandboxManager(cfg, driver=LocalDriver())
    manager.adapters.images = NoImageBuild()
    await serve(cfg, manager=manager)


if __name__ == "__main__":
    setup_logging("info", "logfmt")
    asyncio.run(main(sys.argv[1]))
