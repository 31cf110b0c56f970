"""What callers pass in: where the daemon is (`ConnectArgs`) and a command (`Command`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypedDict

from arcbox_vm.errors import InvalidArgument

__all__ = ["Command", "ConnectArgs", "as_argv"]

# A command: an argv list, or a string run by the guest's /bin/sh -c.
Command = str | Sequence[str]


class ConnectArgs(TypedDict, total=False):
    """Where the daemon is; every key optional (see `resolve_target`)."""

    socket: str | os.PathLike[str] | None
    host: str | None
    token: str | None
    tls_ca: str | os.PathLike[str] | None
    insecure: bool
    config: str | os.PathLike[str] | None


def as_argv(cmd: Command) -> list[str]:
    """A string is a shell command line (`sh -c`), a sequence is the argv itself."""
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidArgument(f"cmd must be a non-empty list of strings, got {cmd!r}")
    return argv
