"""Plain data the client hands back (no protobuf objects leak out of the client).

Sandbox info, summaries, events, file stats and port mappings reuse `arcbox_vm.models`
(FileStat and PortMapping are re-exported here), so code written against the in-process `SandboxManager` reads the same
fields; the types defined here exist only remotely.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Union

from arcbox_vm.models import FileStat, PortMapping

__all__ = ["Created", "FileStat", "Output", "OutputCallback", "PortMapping", "RunResult"]

Stream = Literal["stdout", "stderr", "exit", "error"]

# A callback gets each output chunk as it arrives; async callbacks are awaited (async API).
OutputCallback = Callable[[bytes], Union[None, Awaitable[None]]]


@dataclass(frozen=True, slots=True)
class Output:
    """One message of a command's output stream, as the daemon sent it.

    "stdout"/"stderr" carry `data`; the last one is "exit" (`exit_code`, `timed_out`) or
    "error" (`data` is the UTF-8 reason the command ended without an exit status)."""

    stream: Stream
    data: bytes = b""
    exit_code: int = 0
    timed_out: bool = False
    done: bool = False


@dataclass(frozen=True, slots=True)
class RunResult:
    """A finished command. exit_code is 128+N when killed by signal N; timed_out means the
    `timeout` killed it (exit_code is then the signal's)."""

    stdout: bytes
    stderr: bytes
    exit_code: int
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Exited 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True, slots=True)
class Created:
    """What Create answers: the id (the daemon's if none was given), the IP ("" without
    network) and the state, "starting" — boot goes on in the background."""

    id: str
    ip_address: str
    state: str
