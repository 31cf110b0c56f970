"""Failed RPCs → the library's exception classes.

The daemon maps its exceptions to status codes (api/status.py) and names the exception
class in trailing metadata `arcbox-error` (plus `arcbox-exec-error`, the ExecError code,
for commands that cannot start). The client rebuilds that class when it is one of
`arcbox_vm.errors`, so code catches `SandboxNotFound`, `GuestFileNotFound`, `BootFailed`
... exactly as with an in-process `SandboxManager`; otherwise (another server, a proxy,
a transport failure) the status code decides. The server's message is kept verbatim: it
already says what to do.

Without metadata NOT_FOUND is ambiguous on file and exec RPCs (the sandbox, or the path /
command?): the daemon words an unknown sandbox as `SandboxNotFound` does ("no sandbox
with id ..."), so that prefix picks the sandbox reading.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, TypeVar

import grpc

from arcbox_vm import errors as lib
from arcbox_vm.errors import (
    AgentError,
    ArcboxError,
    ExecError,
    GuestFileNotFound,
    GuestPermissionDenied,
    InvalidArgument,
    InvalidState,
    ResourceExhausted,
    SandboxAlreadyExists,
    SandboxNotFound,
)

__all__ = [
    "AuthError",
    "CommandError",
    "DaemonUnavailable",
    "DeadlineExceeded",
    "PermissionDenied",
    "ReadyTimeout",
    "RpcKind",
    "Unimplemented",
    "from_rpc_error",
    "map_status",
]

RpcKind = Literal["sandbox", "file", "exec"]

META_ERROR = "arcbox-error"
META_EXEC_ERROR = "arcbox-exec-error"


class AuthError(ArcboxError):
    """The daemon refused the credentials (UNAUTHENTICATED): missing or wrong token."""


class PermissionDenied(ArcboxError):
    """The daemon refused the request (PERMISSION_DENIED) for a reason other than a guest file."""


class DeadlineExceeded(ArcboxError, TimeoutError):
    """A deadline passed (DEADLINE_EXCEEDED). Also a TimeoutError."""


class ReadyTimeout(DeadlineExceeded):
    """The sandbox did not become ready within the client's timeout."""


class DaemonUnavailable(ArcboxError):
    """The daemon cannot be reached (UNAVAILABLE from the transport): not running, wrong
    socket or host, or the connection broke."""


class Unimplemented(ArcboxError):
    """The daemon does not implement this RPC (UNIMPLEMENTED): an older daemon or guest agent."""


class CommandError(AgentError):
    """A command ended without an exit status (stream "error": the VM stopped, the agent's
    channel broke, ...). The output received before that is kept on the exception."""

    def __init__(self, message: str, stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(message, code="error")
        self.stdout = stdout
        self.stderr = stderr


E = TypeVar("E", bound=BaseException)


def _with_message(cls: type[E], message: str, **attrs: object) -> E:
    """Build `cls` carrying the server's message verbatim.

    SandboxNotFound and friends compose their own message in `__init__` from an id; here
    the daemon already composed it, so __init__ is bypassed and the attributes set
    directly (isinstance checks and `.sandbox_id` / `.path` / `.code` keep working)."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    for name, value in attrs.items():
        setattr(exc, name, value)
    return exc


def _library_class(name: str | None) -> type[ArcboxError] | None:
    """The arcbox_vm.errors class called `name`, if there is one (never anything else)."""
    if not name:
        return None
    cls = getattr(lib, name, None)
    if isinstance(cls, type) and issubclass(cls, ArcboxError):
        return cls
    return None


def _rebuild(cls: type[ArcboxError], msg: str, *, sandbox_id: str, path: str, exec_code: str | None) -> ArcboxError:
    attrs: dict[str, Any] = {}
    if issubclass(cls, lib.SandboxError):
        attrs["sandbox_id"] = sandbox_id
    if issubclass(cls, InvalidState):
        attrs["state"] = ""
    if issubclass(cls, lib.GuestFileError):
        attrs["path"] = path
    if issubclass(cls, AgentError):
        attrs["code"] = exec_code or ("disconnected" if issubclass(cls, lib.AgentDisconnected) else "internal")
    return _with_message(cls, msg, **attrs)


def _about_sandbox(details: str) -> bool:
    return details.lower().startswith("no sandbox")


def map_status(code: grpc.StatusCode, details: str, *, kind: RpcKind = "sandbox", sandbox_id: str = "",
               path: str = "", target: str = "", error_class: str | None = None,
               exec_code: str | None = None) -> ArcboxError:
    """The exception for a failed RPC.

    error_class / exec_code: the daemon's `arcbox-error` / `arcbox-exec-error` metadata.
    kind: what the RPC works on, for servers that send no metadata — "file" turns
    NOT_FOUND / PERMISSION_DENIED about a path into GuestFileNotFound /
    GuestPermissionDenied, "exec" into ExecError (codes "not_found" / "permission").
    target: the daemon's address, named when it cannot be reached.
    """
    msg = details or f"the daemon answered {code.name} without a message"
    S = grpc.StatusCode
    if exec_code:
        return ExecError(msg, code=exec_code)
    cls = _library_class(error_class)
    if cls is not None:
        return _rebuild(cls, msg, sandbox_id=sandbox_id, path=path, exec_code=exec_code)
    if code == S.NOT_FOUND:
        if kind == "file" and not _about_sandbox(msg):
            return GuestFileNotFound(msg, path)
        if kind == "exec" and not _about_sandbox(msg):
            return ExecError(msg, code="not_found")
        return _with_message(SandboxNotFound, msg, sandbox_id=sandbox_id)
    if code == S.ALREADY_EXISTS:
        return _with_message(SandboxAlreadyExists, msg, sandbox_id=sandbox_id)
    if code == S.FAILED_PRECONDITION:
        return _with_message(InvalidState, msg, sandbox_id=sandbox_id, state="")
    if code == S.INVALID_ARGUMENT:
        return InvalidArgument(msg)
    if code == S.RESOURCE_EXHAUSTED:
        return ResourceExhausted(msg)
    if code == S.PERMISSION_DENIED:
        if kind == "file":
            return GuestPermissionDenied(msg, path)
        if kind == "exec":
            return ExecError(msg, code="permission")
        return PermissionDenied(msg)
    if code == S.UNAUTHENTICATED:
        return AuthError(msg)
    if code == S.DEADLINE_EXCEEDED:
        return DeadlineExceeded(msg)
    if code == S.UNAVAILABLE:
        if error_class:  # the daemon answered: something behind it (the guest agent) is unavailable
            return AgentError(msg, code="unavailable")
        where = f" at {target}" if target else ""
        return DaemonUnavailable(f"cannot reach the arcbox-vm daemon{where} ({msg}); is `arcbox-vm serve` "
                                 "running, and are --socket/--host right?")
    if code == S.UNIMPLEMENTED:
        return Unimplemented(f"the daemon does not support this request ({msg}); upgrade the daemon "
                             "(and the guest image)")
    return ArcboxError(f"{msg} ({code.name})" if details else msg)


def _metadata_value(metadata: Iterable[Any] | None, key: str) -> str | None:
    for item in metadata or ():
        k, v = item
        if k == key:
            return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return None


def from_rpc_error(exc: grpc.RpcError, *, kind: RpcKind = "sandbox", sandbox_id: str = "", path: str = "",
                   target: str = "") -> ArcboxError:
    """`map_status` for a raised grpc.RpcError (sync or aio), reading its trailing metadata."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    try:
        trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    except Exception:  # noqa: BLE001 - metadata is a hint; never fail the mapping over it
        trailing = None
    return map_status(code or grpc.StatusCode.UNKNOWN, details, kind=kind, sandbox_id=sandbox_id, path=path,
                      target=target, error_class=_metadata_value(trailing, META_ERROR),
                      exec_code=_metadata_value(trailing, META_EXEC_ERROR))
