"""Our errors as envd answers them: Connect codes (RPCs) and HTTP statuses (/files)."""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from arcbox_vm.errors import (
    AgentDisconnected,
    ArcboxError,
    ExecError,
    GuestFileError,
    GuestFileNotFound,
    GuestPermissionDenied,
    InvalidArgument,
    InvalidState,
    ResourceExhausted,
    SandboxNotFound,
)

_HTTP = {Code.NOT_FOUND: 404, Code.INVALID_ARGUMENT: 400, Code.PERMISSION_DENIED: 403, Code.ALREADY_EXISTS: 409,
         Code.RESOURCE_EXHAUSTED: 507, Code.UNAVAILABLE: 502, Code.FAILED_PRECONDITION: 400, Code.INTERNAL: 500,
         Code.UNAUTHENTICATED: 401}


def not_found_message(sandbox_id: str) -> str:
    """The proxy's 'sandbox gone' answer, as the SDK recognises it ("... was not found")."""
    return f"The sandbox {sandbox_id} was not found"


def paused_message(sandbox_id: str) -> str:
    """The answer for a paused sandbox: the SDK takes it as not running (SandboxNotRunningException)."""
    return f"The sandbox {sandbox_id} was not found running: it is paused (connecting to it resumes it)"


def code_of(exc: ArcboxError) -> Code:
    if isinstance(exc, (SandboxNotFound, AgentDisconnected, InvalidState)):
        return Code.UNAVAILABLE
    if isinstance(exc, GuestFileNotFound):
        return Code.NOT_FOUND
    if isinstance(exc, GuestPermissionDenied):
        return Code.PERMISSION_DENIED
    if isinstance(exc, ResourceExhausted):
        return Code.RESOURCE_EXHAUSTED
    if isinstance(exc, GuestFileError):
        return Code.ALREADY_EXISTS if getattr(exc, "code", "") == "exists" else Code.INVALID_ARGUMENT
    if isinstance(exc, ExecError):
        return Code.INTERNAL if exc.code == "internal" else Code.INVALID_ARGUMENT
    if isinstance(exc, InvalidArgument):
        return Code.INVALID_ARGUMENT
    return Code.INTERNAL


def connect_error(exc: ArcboxError, sandbox_id: str = "") -> ConnectError:
    if isinstance(exc, SandboxNotFound):
        return ConnectError(Code.UNAVAILABLE, not_found_message(sandbox_id or str(exc)))
    return ConnectError(code_of(exc), str(exc))


def http_status(exc: ArcboxError) -> int:
    return _HTTP.get(code_of(exc), 500)
