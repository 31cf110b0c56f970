"""The VMM port: what the manager needs of a VMM driver and of the process it starts.

A driver turns a `MachineSpec` into a running VMM process. It does not know about
sandboxes, IP pools or the agent protocol: it only says where the host must listen for the
agent's connection (`AgentEndpoint`) and which kernel argument tells the agent how to dial.
It can also take back a VMM a previous daemon started (`adopt`), so that whoever removes
a sandbox later cleans up exactly what that driver made (sockets, jail, cgroup).

Snapshots are a capability (`SnapshotProcess`, `SnapshotDriver`): a process that can
pause, resume and save its VM's state, and a driver that can start a VMM from a saved
state (`restore`). Drivers without them make the manager refuse snapshot operations.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable


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
    # a directory on a memory-backed filesystem the VMM may keep guest RAM in (a file there
    # makes a live checkpoint a copy instead of a stream); None = anonymous memory
    memdir: Path | None = None

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


@dataclass(frozen=True)
class VmSnapshot:
    """A VM's saved state, as `SnapshotProcess.save_state` wrote it.

    state: the device state (and the guest memory too when `memory` is None).
    memory: the guest memory image; a restore maps it copy-on-write, so it must stay
      unchanged while a VM restored from it runs.
    vmm: the driver that wrote it; only that driver restores it.
    details: what that driver needs to know again at restore (JSON-serialisable).
    """

    state: Path
    memory: Path | None
    vmm: str
    details: dict[str, Any] = field(default_factory=dict)

    def files(self) -> list[Path]:
        return [self.state] + ([self.memory] if self.memory is not None else [])


# How a restore uses the snapshot's memory file: "cow" maps it copy-on-write (it must stay
# unchanged while the VM runs; clones of one checkpoint share its pages); "own" makes it
# the VM's own memory (the file is the VM's from now on, e.g. resuming a suspended VM).
MemoryUse = Literal["cow", "own"]


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


@runtime_checkable
class SnapshotProcess(Protocol):
    """A `VmmProcess` whose VM can be paused, resumed and saved."""

    async def pause(self) -> None:
        """Stop running the guest (its vCPUs use no CPU); idempotent."""

    async def resume(self) -> None:
        """Run the guest again after `pause` or `save_state`; idempotent."""

    async def save_state(self, dest: Path) -> VmSnapshot:
        """Write the paused VM's device state and memory into the directory `dest` (which
        exists, inside the sandbox's own directories). The VM stays paused; `resume()`
        continues it. The disk is not included: copy it while the VM is paused."""


@runtime_checkable
class SnapshotDriver(Protocol):
    """A `VmmDriver` that can start a VMM from a `VmSnapshot`."""

    def snapshot_support(self) -> str | None:
        """None when this driver can pause, save and restore VMs here; else why not."""

    async def restore(self, spec: MachineSpec, endpoint: AgentEndpoint, snapshot: VmSnapshot,
                      memory: MemoryUse = "cow") -> VmmProcess:
        """Start a VMM that continues the saved VM (it runs when this returns). `spec` must
        describe the same machine (vCPUs, memory, devices) as the saved one, with this
        VM's own disk, TAP, MAC and directories. The guest agent dials the new endpoint
        again by itself. Nothing is left behind on failure."""
