"""Python client of the arcbox-vm daemon (gRPC, sandbox.v1), blocking and asyncio.

    from arcbox_vm.client import Sandbox
    with Sandbox.create(memory_mib=512, labels={"job": "x"}) as sb:   # waits until ready
        r = sb.run(["python3", "-c", "print(1)"], timeout=30)         # RunResult
        sb.files.write("/tmp/a.txt", b"data")
    # the sandbox is removed on leaving the block

    from arcbox_vm.client import AsyncSandbox
    async with await AsyncSandbox.create() as sb:
        r = await sb.run(["uname", "-r"])

Where the daemon is: arguments (socket=, host=), then ARCBOX_VM_SOCKET / ARCBOX_VM_HOST,
then the config file's [grpc] unix_socket (see connection.py). Failures raise the
classes of `arcbox_vm.errors` (SandboxNotFound, InvalidState, BootFailed, ...) plus the
client-only ones in `arcbox_vm.client.errors`.

Modules: connection (target, channel options), errors (status → exception), types,
convert (protobuf ↔ types), options (Command, ConnectArgs, the exec options → one
ExecSpec), collect (output → RunResult), sources (upload chunks), ready (wait until
ready), aio_exec / aio_client / aio_sandbox (asyncio API; `aio` re-exports it), loop +
sync (blocking API). Imports among them go one way: no cycles
(tests/unit/test_import_hygiene.py checks).
"""

from arcbox_vm.client.aio import AsyncClient, AsyncExecSession, AsyncFiles, AsyncSandbox
from arcbox_vm.client.connection import Target, resolve_target
from arcbox_vm.client.errors import (
    AuthError,
    CommandError,
    DaemonUnavailable,
    DeadlineExceeded,
    PermissionDenied,
    ReadyTimeout,
    Unimplemented,
)
from arcbox_vm.client.sync import Client, ExecSession, Files, Sandbox
from arcbox_vm.client.types import Created, FileStat, Output, PortMapping, RunResult
from arcbox_vm.errors import (  # re-exported for convenience
    GuestFileNotFound,
    GuestPermissionDenied,
)

__all__ = [
    "AsyncClient", "AsyncExecSession", "AsyncFiles", "AsyncSandbox", "AuthError", "Client", "CommandError",
    "Created", "DaemonUnavailable", "DeadlineExceeded", "ExecSession", "FileStat", "Files", "GuestFileNotFound",
    "GuestPermissionDenied", "Output", "PermissionDenied", "PortMapping", "ReadyTimeout", "RunResult", "Sandbox",
    "Target", "Unimplemented", "resolve_target",
]
