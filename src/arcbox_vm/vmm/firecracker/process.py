"""`FirecrackerProcess`: one Firecracker VM as the manager sees it (`arcbox_vm.ports.VmmProcess`).

The process itself is a `TrackedProcess`: our child in direct mode and under the jailer
(which execs Firecracker in place), a watched pid under `--new-pid-ns` (the jailer hands
it over through a pid file) or after a daemon restart (adopted). When Firecracker is not
our child its exit status comes from its own log (`exit_code=N`). The API client stays
usable for post-boot calls, also on an adopted VM (the API socket outlives the daemon).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

from arcbox_vm.config.firecracker import FirecrackerConfig
from arcbox_vm.errors import VmmError
from arcbox_vm.ports import VmSnapshot
from arcbox_vm.vmm.cgroup import SandboxCgroup
from arcbox_vm.vmm.process import TrackedProcess, open_log, tail
from arcbox_vm.vmm.users import VmmUsers

from . import bodies, snapshots
from .api import FirecrackerApi
from .bodies import ApiRequest
from .layout import Layout
from .staging import discard

log = logging.getLogger(__name__)

_EXIT_CODE_RE = re.compile(rb"exit_code=(\d+)")


def exit_code_from_log(path: Path) -> int | None:
    """Firecracker logs `exit_code=N` when it ends; how we learn it when it is not our child."""
    try:
        with open(open_log(path), "rb") as f:  # in the jail, which the jailed user owns
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            matches = _EXIT_CODE_RE.findall(f.read())
    except OSError:
        return None
    return int(matches[-1]) if matches else None


def diagnostics(log_path: Path | None, console: Path | None) -> str:
    """The end of Firecracker's log and of its stdout/stderr, for error messages ("" if empty)."""
    parts = []
    log_tail = tail(log_path)
    if log_tail:
        parts.append(f"last lines of the Firecracker log ({log_path}):\n{log_tail}")
    console_tail = tail(console)
    if console_tail:
        parts.append(f"last lines of its stdout/stderr ({console}):\n{console_tail}")
    return ("\n" + "\n".join(parts)) if parts else ""


class FirecrackerProcess:
    """A Firecracker VM, launched or adopted (implements `arcbox_vm.ports.VmmProcess`)."""

    def __init__(
        self,
        handle: TrackedProcess,
        api: FirecrackerApi,
        layout: Layout,
        config: FirecrackerConfig,
        cgroup: SandboxCgroup | None = None,
        *,
        users: VmmUsers | None = None,
        owner: Path | None = None,
    ) -> None:
        self._handle = handle
        self._users = users  # the uid claimed for the jailed VM (owned by `owner`) is given back
        self._owner = owner
        self._api = api
        self.layout = layout
        self._config = config
        self.cgroup = cgroup
        self._cleaned = False

    @property
    def pid(self) -> int:
        return self._handle.pid

    @property
    def returncode(self) -> int | None:
        return self._handle.returncode

    @property
    def start_time(self) -> int | None:
        return self._handle.start_time

    @property
    def console_log(self) -> Path:
        return self.layout.console_log

    @property
    def api(self) -> FirecrackerApi:
        """The API client, for post-boot calls (pause/resume, snapshots, rate limiters)."""
        return self._api

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the exit status when the VMM ends (for racing against boot waits)."""
        return self._handle.exited

    def describe_exit(self) -> str:
        """ "Firecracker (pid N) exited with ..." plus the end of its log and console."""
        return self._handle.describe_exit() + diagnostics(self.layout.log, self.layout.console_log)

    async def send(self, request: ApiRequest) -> object:
        return await self._api.send(request)

    async def wait(self) -> int:
        return await self._handle.wait()

    async def request_stop(self) -> None:
        """Send Ctrl+Alt+Del; the guest reboots and (with reboot=k) Firecracker exits. Best effort."""
        if self.returncode is not None:
            return
        try:
            await self._api.send(bodies.send_ctrl_alt_del())
        except VmmError as exc:
            log.info("SendCtrlAltDel to Firecracker pid %s failed (ignored): %s", self.pid, exc)

    # -- snapshots (arcbox_vm.ports.SnapshotProcess; see snapshots.py) ----------------

    async def pause(self) -> None:
        await self._api.send(bodies.pause_vm())

    async def resume(self) -> None:
        await self._api.send(bodies.resume_vm())

    async def save_state(self, dest: Path) -> VmSnapshot:
        """A Full snapshot of the paused VM into `dest` (state + memory)."""
        await self._api.send(snapshots.create_request(self.layout, dest))
        return snapshots.collect(self.layout, dest, {"snapshot_type": "Full"})

    async def kill(self) -> None:
        """SIGKILL Firecracker and wait until it is gone (VmmError if it does not go)."""
        timeout = 10.0
        if not await self._handle.kill(timeout):
            raise VmmError(f"Firecracker process {self.pid} did not exit within {timeout:g}s of SIGKILL")

    async def cleanup(self) -> None:
        """Remove sockets, log/metrics/console files, the jail and the sandbox's cgroup, and
        give its uid back; kills the VMM if still running."""
        if self._cleaned:
            return
        if self.returncode is None:
            await self.kill()
        await self._api.aclose()
        discard(self.layout, self._config)
        if self.cgroup is not None:
            await self.cgroup.remove()
        if self._users is not None and self._owner is not None:
            await asyncio.to_thread(self._users.release, self._owner)
        self._cleaned = True
