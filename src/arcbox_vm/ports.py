"""Small interfaces the use-case layer depends on; adapters implement them.

A VMM driver turns a `MachineSpec` into a running VMM process. It does not know about
sandboxes, IP pools or the agent protocol: it only says where the host must listen for the
agent's connection (`AgentEndpoint`) and which kernel argument tells the agent how to dial.
"""

from __future__ import annotations

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
    vcpus: int = 1
    memory_mib: int = 256
    initrd: Path | None = None
    tap_name: str | None = None
    guest_mac: str | None = None
    extra_boot_args: tuple[str, ...] = field(default_factory=tuple)  # e.g. ip=..., hostname
    netns: str = ""  # named network namespace the VMM process must run in ("" = ours)
    sockdir: Path | None = None  # where Unix sockets go (short path); None = workdir

    @property
    def socket_dir(self) -> Path:
        return self.sockdir if self.sockdir is not None else self.workdir


@runtime_checkable
class VmmProcess(Protocol):
    """A running VMM. Owned by whoever launched it, who must `kill()` + `cleanup()` it."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def console_log(self) -> Path: ...

    async def wait(self) -> int:
        """Wait for the VMM process to exit; returns its exit status."""

    async def request_stop(self) -> None:
        """Ask the guest to shut down through the VMM (e.g. Ctrl-Alt-Del); best effort."""

    async def kill(self) -> None:
        """SIGKILL the VMM (if still running) and reap it."""

    async def cleanup(self) -> None:
        """Remove the sockets and files the driver made; the process must be gone."""


@runtime_checkable
class VmmDriver(Protocol):
    """Adapter for one VMM (QEMU, Firecracker)."""

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
