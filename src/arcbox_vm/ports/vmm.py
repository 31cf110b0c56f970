"""The VMM port: what the manager needs of a VMM driver and of the process it starts.

A driver turns a `MachineSpec` into a running VMM process. It does not know about
sandboxes, IP pools or the agent protocol: it only says where the host must listen for the
agent's connection (`AgentEndpoint`) and which kernel argument tells the agent how to dial.
It can also take back a VMM a previous daemon started (`adopt`), so that whoever removes
a sandbox later cleans up exactly what that driver made (sockets, jail, cgroup).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class AgentEndpoint:
    """Where the host listens for the guest agent, and how the guest is told to dial it.

    listen_path: a Unix socket the host binds *before* the VMM starts; the VMM connects to it
      when the guest agent dials (QEMU: virtio-serial chardev; Firecracker: `<uds_path>_<port>`).
    boot_arg: kernel command-line fragment for the agent, e.g. `arcbox.channel=vsock:52`.
    """

    listen_path: Path
    boot_arg: str


@dataclass(frozen=True)
class MachineSpec:
    """Everything a driver needs to start one VM. Paths are host paths."""

    sandbox_id: str
    workdir: Path  # per-VM directory the driver may write sockets and logs into
    kernel: Path
    rootfs: Path  # this VM's own writable disk
    boot_args: str  # user/default arguments; the driver appends what it needs
    vcpus: int
    memory_mib: int
    initrd: Path | None = None
    tap_name: str | None = None
    guest_mac: str | None = None
    extra_boot_args: tuple[str, ...] = field(default_factory=tuple)  # e.g. ip=..., hostname
    netns: str = ""  # named network namespace the VMM process must run in ("" = ours)
    sockdir: Path | None = None  # where Unix sockets go (short path); None = workdir

    @property
    def socket_dir(self) -> Path:
        return self.sockdir if self.sockdir is not None else self.workdir


@dataclass(frozen=True)
class AdoptSpec:
    """A VMM that a previous daemon started, as the state database remembers it.

    The process is identified by pid *and* start time (clock ticks after boot), so a
    recycled pid is never taken for ours."""

    sandbox_id: str
    workdir: Path
    sockdir: Path
    pid: int | None
    start_time: int | None


@runtime_checkable
class VmmProcess(Protocol):
    """A running VMM. Owned by whoever launched or adopted it, who must `kill()` + `cleanup()` it."""

    @property
    def pid(self) -> int: ...

    @property
    def start_time(self) -> int | None:
        """Start time of the process (clock ticks after boot), recorded to re-adopt it."""

    @property
    def returncode(self) -> int | None: ...

    @property
    def console_log(self) -> Path: ...

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the exit status when the VMM ends (for racing against waits)."""

    def describe_exit(self) -> str:
        """A sentence for error messages: how the VMM ended, and the end of its own log."""

    async def wait(self) -> int:
        """Wait for the VMM process to exit; returns its exit status."""

    async def request_stop(self) -> None:
        """Ask the guest to shut down through the VMM (e.g. Ctrl-Alt-Del); best effort,
        may do nothing (the agent's SHUTDOWN is the graceful path)."""

    async def kill(self) -> None:
        """SIGKILL the VMM (if still running) and reap it."""

    async def cleanup(self) -> None:
        """Remove what the driver made for this VM (sockets, jail, cgroup); kills it first
        if it still runs. The sandbox's workdir belongs to the manager."""


@runtime_checkable
class VmmDriver(Protocol):
    """Adapter for one VMM (QEMU, Firecracker, or a test double)."""

    name: str

    def agent_endpoint(self, workdir: Path) -> AgentEndpoint:
        """Where the host must listen for this VM's agent (call before `launch`)."""

    def kernel_for(self, bzimage: Path, vmlinux: Path) -> Path:
        """Pick the kernel format this VMM boots from a built guest image."""

    async def launch(self, spec: MachineSpec, endpoint: AgentEndpoint) -> VmmProcess:
        """Start the VM. Returns once the VMM runs the guest (not once the guest is up).

        On failure nothing is left behind (process killed, sockets removed) and a
        `VmmError` / `BootFailed` is raised.
        """

    async def adopt(self, spec: AdoptSpec) -> VmmProcess:
        """Take back a VMM this driver started under an earlier daemon.

        Always returns a process object: when the recorded process is gone (or the pid
        now belongs to another process) it is already exited (`returncode` set), and its
        `cleanup()` still removes what the driver made for that VM."""
