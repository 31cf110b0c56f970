"""Errors of the fleet, and arcbox-vm errors crossing Ray.

A node service raises `RemoteError` (plain data, so it always pickles) for any
`ArcboxError`; the fleet rebuilds the original class — SandboxNotFound, ExecError,
GuestFileNotFound, ... — with the node's message, so code catches the same exceptions as
with a daemon's client."""

from __future__ import annotations

from typing import Any

from arcbox_vm import errors as lib
from arcbox_vm.client import errors as client_errors
from arcbox_vm.client.errors import DaemonUnavailable
from arcbox_vm.errors import ArcboxError

__all__ = ["NodeUnavailable", "RemoteError", "decode", "encode", "unwrap"]


class NodeUnavailable(DaemonUnavailable):
    """A node of the fleet cannot be reached: its Ray node or its daemon is down (its
    sandboxes show as "lost" until it comes back)."""


class RemoteError(Exception):
    """An ArcboxError raised on a node, as plain data."""

    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(payload)
        self.payload = payload

    def __str__(self) -> str:
        return f"{self.payload.get('cls')}: {self.payload.get('message')}"


_SIMPLE = (str, int, float, bool, bytes, type(None))


def encode(exc: ArcboxError) -> RemoteError:
    attrs = {k: v for k, v in vars(exc).items() if isinstance(v, _SIMPLE)}
    return RemoteError({"cls": type(exc).__name__, "message": str(exc), "attrs": attrs})


def _class(name: str) -> type[ArcboxError]:
    for module in (lib, client_errors):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, ArcboxError):
            return cls
    if name == NodeUnavailable.__name__:
        return NodeUnavailable
    return ArcboxError


def decode(payload: dict[str, Any]) -> ArcboxError:
    """The library exception the payload describes, carrying the node's message verbatim."""
    cls = _class(str(payload.get("cls", "")))
    exc = cls.__new__(cls)
    Exception.__init__(exc, str(payload.get("message", "")))
    for name, value in dict(payload.get("attrs") or {}).items():
        setattr(exc, name, value)
    return exc


def unwrap(exc: BaseException) -> BaseException:
    """A Ray task error carrying a RemoteError → the rebuilt ArcboxError; else `exc`."""
    cause = getattr(exc, "cause", None)
    for candidate in (cause, exc):
        if isinstance(candidate, RemoteError):
            return decode(candidate.payload)
    return exc
