"""What /proc says about processes and mounts (plain file reads, no other dependency).

A process is identified by pid *and* start time (clock ticks after boot, field 22 of
/proc/<pid>/stat), so a pid recycled by an unrelated process is never taken for ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and ')': split after the last ')'
    return data[data.rindex(b")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks after boot; None if it is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])  # field 22 overall


def pid_alive(pid: int) -> bool:
    """Whether `pid` exists and has not exited (a zombie has)."""
    return process_start_time(pid) is not None


def is_same_process(pid: int | None, start_time: int | None) -> bool:
    """Whether `pid` still runs and is the process that started at `start_time`."""
    return bool(pid) and start_time is not None and process_start_time(pid) == start_time  # type: ignore[arg-type]


@dataclass(frozen=True)
class Mount:
    """One line of /proc/<pid>/mountinfo (the fields we use)."""

    root: str  # the mounted sub-tree of the filesystem ("/" = all of it)
    path: Path  # the mount point
    options: tuple[str, ...]  # per-mount options (ro/rw, ...)
    fstype: str
    super_options: tuple[str, ...]  # per-superblock options (cgroup v1: its controllers)

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """The mounts listed in `mountinfo` ([] if it cannot be read)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    found: list[Mount] = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or not tail:
            continue
        found.append(Mount(
            root=_unescape(fields[3]), path=Path(_unescape(fields[4])), options=tuple(fields[5].split(",")),
            fstype=tail[0], super_options=tuple(tail[2].split(",")) if len(tail) > 2 else (),
        ))
    return found
