"""Resource usage of sandbox VMMs (the `UsageReader` port): from the sandbox's cgroup,
else from the VMM's process tree.

From the cgroup `<root>/<sandbox id>` (cgroup.py), when the VMM runs in it:
- CPU: `cpu.stat` usage_usec, which every cgroup v2 has, with or without controllers
  enabled, and which keeps counting processes that have exited;
- memory: `memory.current` when the memory controller is enabled for our sub-tree, else
  the sum of the resident set sizes of the cgroup's processes;
- I/O: `io.stat` (rbytes and wbytes over all devices) when the io controller is enabled,
  else the sum of read_bytes / write_bytes in /proc/<pid>/io of the cgroup's processes.

From the process tree (cgroups off, or the VMM could not be moved into its cgroup): the
VMM process and every process below it. CPU is each one's utime + stime plus the times of
the children it reaped (cutime + cstime), so finished commands still count; memory the
sum of resident set sizes; I/O from /proc/<pid>/io.

Only small file reads, no subprocess; a process that exits while it is read is skipped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from arcbox_vm.ports.usage import ResourceUsage
from arcbox_vm.vmm.cgroup import SandboxCgroups

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    """What one /proc/<pid>/stat says that we need."""

    ppid: int
    cpu_ticks: int  # utime + stime + cutime + cstime
    rss_pages: int


def read_stat(pid: int, proc: Path = PROC) -> ProcStat | None:
    try:
        data = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # state, ppid, ... (the name may hold anything)
    try:
        return ProcStat(int(fields[1]), sum(int(f) for f in fields[11:15]), max(0, int(fields[21])))
    except (IndexError, ValueError):
        return None


def read_io(pid: int, proc: Path = PROC) -> tuple[int, int]:
    """(read_bytes, write_bytes) of /proc/<pid>/io: bytes the process made the block layer
    read / write; (0, 0) if unreadable (gone, or not ours to read)."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in (proc / str(pid) / "io").read_text().splitlines():
            key, _, value = line.partition(":")
            values[key] = int(value)
    return values.get("read_bytes", 0), values.get("write_bytes", 0)


def process_table(proc: Path = PROC) -> dict[int, ProcStat]:
    """Every process of the host (one pass over /proc)."""
    table: dict[int, ProcStat] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(proc):
            if name.isdigit():
                stat = read_stat(int(name), proc)
                if stat is not None:
                    table[int(name)] = stat
    return table


def tree(table: dict[int, ProcStat], root: int) -> list[int]:
    """`root` and every process below it, if `root` is alive."""
    if root not in table:
        return []
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.ppid, []).append(pid)
    out, todo = [root], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def _cgroup_cpu_seconds(path: Path) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in (path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
    return None


def _cgroup_memory(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((path / "memory.current").read_text())
    return None


def _cgroup_io(path: Path) -> tuple[int, int] | None:
    """Sum of rbytes / wbytes over the devices of io.stat; None without the io controller."""
    try:
        text = (path / "io.stat").read_text()
    except OSError:
        return None
    read = write = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if value.isdigit():
                if key == "rbytes":
                    read += int(value)
                elif key == "wbytes":
                    write += int(value)
    return read, write


def _rss_bytes(pids: Iterable[int], proc: Path, table: dict[int, ProcStat] | None = None) -> int:
    total = 0
    for pid in pids:
        stat = table.get(pid) if table is not None else read_stat(pid, proc)
        if stat is not None:
            total += stat.rss_pages * PAGE_SIZE
    return total


def _io_bytes(pids: Iterable[int], proc: Path) -> tuple[int, int]:
    read = write = 0
    for pid in pids:
        r, w = read_io(pid, proc)
        read, write = read + r, write + w
    return read, write


class VmmUsageReader:
    """Reads the usage of sandbox VMMs from their cgroups (`cgroups`), else their process trees."""

    def __init__(self, cgroups: SandboxCgroups, proc: Path = PROC) -> None:
        self.cgroups = cgroups
        self.proc = proc

    def read(self, vmms: Iterable[tuple[str, int | None]]) -> dict[str, ResourceUsage]:
        out: dict[str, ResourceUsage] = {}
        by_tree: list[tuple[str, int]] = []
        for sandbox_id, pid in vmms:
            usage = self.from_cgroup(sandbox_id)
            if usage is not None:
                out[sandbox_id] = usage
            elif pid:
                by_tree.append((sandbox_id, pid))
        if by_tree:
            table = process_table(self.proc)  # one pass over /proc for all of them
            for sandbox_id, pid in by_tree:
                usage = self.from_tree(table, pid)
                if usage is not None:
                    out[sandbox_id] = usage
        return out

    def from_cgroup(self, sandbox_id: str) -> ResourceUsage | None:
        """None when cgroups are off or nothing runs in the sandbox's cgroup."""
        try:
            path = self.cgroups.path(sandbox_id)
        except ValueError:
            return None
        if path is None:
            return None
        pids = self.cgroups.pids(sandbox_id)
        cpu = _cgroup_cpu_seconds(path) if pids else None
        if cpu is None:
            return None
        memory = _cgroup_memory(path)
        if memory is None:  # no memory controller for our sub-tree
            memory = _rss_bytes(pids, self.proc)
        io = _cgroup_io(path)
        if io is None:  # no io controller
            io = _io_bytes(pids, self.proc)
        return ResourceUsage(cpu_seconds=cpu, memory_bytes=memory, io_read_bytes=io[0], io_write_bytes=io[1],
                             processes=len(pids), source="cgroup")

    def from_tree(self, table: dict[int, ProcStat], root: int) -> ResourceUsage | None:
        """None when `root` is not running."""
        pids = tree(table, root)
        if not pids:
            return None
        ticks = sum(table[pid].cpu_ticks for pid in pids)
        read, write = _io_bytes(pids, self.proc)
        return ResourceUsage(ticks / CLOCK_TICKS, _rss_bytes(pids, self.proc, table), read, write, len(pids),
                             "processes")
