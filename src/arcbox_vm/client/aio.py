"""The asyncio API in one import: `AsyncClient`, `AsyncSandbox`, `AsyncFiles`, `AsyncExecSession`.

    from arcbox_vm.client.aio import AsyncClient, AsyncSandbox

    async with AsyncClient() as client:                       # target: see connection.py
        created = await client.create(memory_mib=512)
        await client.wait_ready(created.id)
        result = await client.run(created.id, ["uname", "-r"])

Where they live, in import order (each imports only those above it): aio_exec.py (one
interactive command), ready.py (waiting until ready), aio_client.py (AsyncClient: every
RPC), aio_sandbox.py (AsyncSandbox / AsyncFiles: one sandbox's view of a client).
"""

from __future__ import annotations

from arcbox_vm.client.aio_client import AsyncClient
from arcbox_vm.client.aio_exec import AsyncExecSession
from arcbox_vm.client.aio_sandbox import AsyncFiles, AsyncSandbox
from arcbox_vm.client.options import Command, ConnectArgs, as_argv

__all__ = ["AsyncClient", "AsyncExecSession", "AsyncFiles", "AsyncSandbox", "Command", "ConnectArgs", "as_argv"]
