"""A VMM process this daemon did not start (it survived a daemon restart).

Processes are identified by pid *and* start time (clock ticks since boot, from
/proc/<pid>/stat), so a pid recycled by an unrelated process is never mistaken for our
VM. Exit is observed through a pidfd, since the process is no longer our child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from arcbox_vm.vmm.cgroup import SandboxCgroup


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks after boot, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and ')' — split after the last ')'
    fields = data[data.rindex(b")") + 2:].split()
    state = fields[0]
    if state in (b"Z", b"X"):
        return None
    return int(fields[19])  # field 22 overall


def is_same_process(pid: int | None, start_time: int | None) -> bool:
    return bool(pid) and start_time is not None and process_start_time(pid) == start_time  # type: ignore[arg-type]


class AdoptedProcess:
    """Implements `arcbox_vm.ports.VmmProcess` for a pid we re-adopted."""

    def __init__(self, pid: int | None, start_time: int | None, console_log: Path, name: str = "the VMM",
                 cgroup: SandboxCgroup | None = None, remove_files: Callable[[], None] | None = None) -> None:
        self._pid = pid or 0
        self._start = start_time
        self._console_log = console_log
        self._name = name
        self.cgroup = cgroup  # the sandbox's cgroup (where the daemon that started it put it)
        self._remove_files = remove_files  # what the driver made for this VM (sockets, jail)
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self._returncode: int | None = None
        self._pidfd: int | None = None
        if not is_same_process(pid, start_time):
            self._set_exited()
            return
        try:
            self._pidfd = os.pidfd_open(self._pid)
        except OSError:
            self._pidfd = None
            self._set_exited()
            return
        if not is_same_process(pid, start_time):  # raced with its exit between check and open
            self._set_exited()
            return
        loop.add_reader(self._pidfd, self._set_exited)

    def _set_exited(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._returncode = -1  # not our child: its status is not ours to read
        if not self.exited.done():
            self.exited.set_result(-1)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def start_time(self) -> int | None:
        return self._start

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def console_log(self) -> Path:
        return self._console_log

    def describe_exit(self) -> str:
        return f"{self._name} (pid {self._pid}) exited"

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    async def request_stop(self) -> None:
        """No VMM handle survives a restart; the agent's SHUTDOWN does the graceful part."""

    async def kill(self) -> None:
        if self._returncode is None and self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wait(), 10)

    async def cleanup(self) -> None:
        """Remove the sandbox's cgroup (killing what is left in it); the sandbox's
        directories are removed by their owner (the manager)."""
        if self._returncode is None:
            await self.kill()
        if self._remove_files is not None:
            self._remove_files()
        if self.cgroup is not None:
            await self.cgroup.remove()
