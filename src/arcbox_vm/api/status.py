"""Map arcbox-vm errors to gRPC status codes — a user's mistake is never INTERNAL.

Every error also carries trailing metadata `arcbox-error` (the exception class) and, for
command errors, `arcbox-exec-error` (not_found, permission, no_such_user, ...), so clients
can tell "no such sandbox" from "no such command" without parsing text.
"""

from __future__ import annotations

import asyncio

import grpc
from pydantic import ValidationError

from arcbox_vm import errors as e

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (e.SandboxNotFound, grpc.StatusCode.NOT_FOUND),
    (e.GuestFileNotFound, grpc.StatusCode.NOT_FOUND),
    (e.ExecNotFound, grpc.StatusCode.NOT_FOUND),
    (e.CheckpointNotFound, grpc.StatusCode.NOT_FOUND),
    (e.TemplateNotFound, grpc.StatusCode.NOT_FOUND),
    (e.ExecNotAttachable, grpc.StatusCode.FAILED_PRECONDITION),
    (e.GuestNoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.SandboxAlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (e.InvalidState, grpc.StatusCode.FAILED_PRECONDITION),
    (e.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (e.ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.GuestPermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (e.GuestFileError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.AgentDisconnected, grpc.StatusCode.UNAVAILABLE),
    (e.BootFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (asyncio.TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
]

_EXEC_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "permission": grpc.StatusCode.PERMISSION_DENIED,
    "no_such_user": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    "too_many": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, message, trailing metadata) for an exception."""
    meta: list[tuple[str, str]] = [("arcbox-error", type(exc).__name__)]
    if isinstance(exc, ValidationError):
        parts = [f"{'.'.join(str(x) for x in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()]
        return grpc.StatusCode.INVALID_ARGUMENT, "; ".join(parts), tuple(meta)
    if isinstance(exc, e.ExecError):
        meta.append(("arcbox-exec-error", exc.code))
        return _EXEC_CODES.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION), str(exc), tuple(meta)
    for cls, code in _CODES:
        if isinstance(exc, cls):
            msg = str(exc) or "the operation timed out"
            return code, msg, tuple(meta)
    if isinstance(exc, e.AgentError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), tuple(meta)
    if isinstance(exc, e.ArcboxError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), tuple(meta)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); see the daemon's log", tuple(meta)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message, meta = status_for(exc)
    context.set_trailing_metadata(meta)
    await context.abort(code, message)
