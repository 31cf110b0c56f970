"""What callers pass in: where the daemon is (`ConnectArgs`), a command (`Command`), and the
exec options, turned into one `ExecSpec` — the model every exec path of arcbox-vm shares.

Every public run / run_stream / exec / start method (async and sync, client and sandbox)
takes the options as keywords and calls `exec_spec` once; below that only the ExecSpec
travels, and `convert.exec_request_to_pb` makes the protobuf request from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TypedDict

from arcbox_vm.client.convert import str_map
from arcbox_vm.errors import InvalidArgument
from arcbox_vm.models import ExecSpec

__all__ = ["DEFAULT_TTY_SIZE", "Command", "ConnectArgs", "as_argv", "exec_spec"]

# A command: an argv list, or a string run by the guest's /bin/sh -c.
Command = str | Sequence[str]

# What a 0 in tty_size stands for (the daemon's default, sandbox.proto: "default 80x24").
DEFAULT_TTY_SIZE = (80, 24)


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


def exec_spec(cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
              tty: bool = False, tty_size: tuple[int, int] | None = None, timeout: float | None = None,
              stdin: bool = False) -> ExecSpec:
    """The caller's keywords as one ExecSpec; InvalidArgument names what is wrong.

    timeout (s): None or <= 0 is none. tty_size is (cols, rows); a dimension <= 0 takes
    the daemon's default (80 columns, 24 rows), as a 0 on the wire always did."""
    argv, environ, size = as_argv(cmd), str_map(env), _tty_size(tty_size)
    try:
        return ExecSpec(cmd=tuple(argv), env=environ, working_dir=working_dir, user=user, tty=bool(tty),
                        tty_size=size, timeout_seconds=0.0 if timeout is None or timeout <= 0 else timeout,
                        stdin=bool(stdin))
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _tty_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        cols, rows = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidArgument(f"tty_size must be (cols, rows), got {size!r}") from None
    return (cols if cols > 0 else DEFAULT_TTY_SIZE[0], rows if rows > 0 else DEFAULT_TTY_SIZE[1])
