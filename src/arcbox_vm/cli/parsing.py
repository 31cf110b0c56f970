"""Parsing of command-line values: KEY=VALUE lists, `-p` port mappings and `ID:/path` copy operands.

Pure functions raising InvalidArgument (so they are unit-testable and the CLI reports
them like any other error).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from arcbox_vm.errors import InvalidArgument
from arcbox_vm.models import PortMapping

__all__ = ["RemotePath", "parse_cp_operands", "parse_env", "parse_labels", "parse_ports", "parse_remote",
           "parse_signal"]

# A sandbox id (see models.SANDBOX_ID_RE), a colon, then a guest path. The path must be
# absolute: "a:b" stays a local file name, and "ID:relative" is refused as a likely typo.
_REMOTE_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]{0,62}):(.*)$")


def parse_env(items: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """-e KEY=VALUE (repeatable); `-e KEY` copies KEY from this environment (as docker does)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise InvalidArgument(f"-e {item!r}: expected KEY=VALUE or KEY")
        out[key] = value if sep else env.get(key, "")
    return out


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """--label KEY=VALUE (repeatable; VALUE may be empty, the '=' is required)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise InvalidArgument(f"--label {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def parse_ports(items: Iterable[str]) -> list[PortMapping]:
    """-p [ADDR:][HOSTPORT:]GUESTPORT[/tcp] (repeatable; Docker's syntax, see PortMapping.parse)."""
    out = []
    for item in items:
        try:
            out.append(PortMapping.parse(item))
        except ValueError as exc:
            raise InvalidArgument(f"-p {item!r}: {exc}") from None
    return out


@dataclass(frozen=True)
class RemotePath:
    sandbox_id: str
    path: str

    def __str__(self) -> str:
        return f"{self.sandbox_id}:{self.path}"


def parse_remote(operand: str) -> RemotePath | None:
    """`ID:/abs/path` → RemotePath; anything else (a local path, `-`) → None.

    Raises InvalidArgument for `ID:` followed by a relative path, which is almost
    certainly a mistake rather than a local file name."""
    if operand.startswith(("/", ".", "~")):
        return None
    m = _REMOTE_RE.match(operand)
    if m is None:
        return None
    sandbox_id, path = m.groups()
    if not path.startswith("/"):
        raise InvalidArgument(f"{operand!r}: the guest path must be absolute, e.g. {sandbox_id}:/tmp/file "
                              f"(for a local file with ':' in its name, write ./{operand})")
    return RemotePath(sandbox_id, path)


def parse_cp_operands(src: str, dst: str) -> tuple[str | RemotePath, str | RemotePath]:
    """(src, dst) with exactly one side remote; the other is a local path or `-`."""
    s, d = parse_remote(src), parse_remote(dst)
    if (s is None) == (d is None):
        raise InvalidArgument("cp: exactly one of SRC and DST must be ID:/path (the other a local path or '-')")
    return (s or src, d or dst)


def parse_signal(text: str) -> int:
    """"TERM", "SIGTERM", "term" or "15" -> 15."""
    import signal

    value = text.strip()
    if value.isdigit():
        num = int(value)
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = signal.Signals.__members__.get(name)
        if sig is None:
            raise InvalidArgument(f"unknown signal {text!r}; use a name such as TERM, INT, KILL or a number")
        num = int(sig)
    if not 1 <= num <= 64:
        raise InvalidArgument(f"signal numbers are 1..64, got {num}")
    return num
