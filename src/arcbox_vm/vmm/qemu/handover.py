"""What a QEMU is handed: the descriptors of everything it uses (see cmdline.py).

The daemon opens them — as root, where the files and the TAP are — and QEMU inherits
them (`pass_fds`); the caller closes its copies once QEMU runs (`Handover.close`). The
monitor's socket is bound and listening before QEMU starts, so QEMU needs no write
permission in the socket directory and the daemon connects to a socket it made itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from arcbox_vm.ports import MachineSpec
from arcbox_vm.vmm.qemu.cmdline import MemoryFile, PassedFiles
from arcbox_vm.vmm.tun import open_tap


@dataclass
class Handover:
    """Descriptors opened for one QEMU; `files` names them as QEMU sees them."""

    files: PassedFiles | None = None
    opened: list[int] = field(default_factory=list)
    qmp_path: Path | None = None

    def _keep(self, fd: int) -> int:
        self.opened.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.opened:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.opened.clear()

    def discard(self) -> None:
        """Close everything and unbind the monitor socket (QEMU never started)."""
        self.close()
        if self.qmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.qmp_path.unlink()


def _monitor_socket(path: Path) -> int:
    """A Unix socket bound at `path` (0600) and listening; its descriptor (close-on-exec)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock.detach()


async def open_for(spec: MachineSpec, console_log: Path, memory: MemoryFile | None, qmp: Path | None,
                   owner: int | None) -> Handover:
    """Open what QEMU gets. `owner`: the confined QEMU's uid, given its own RAM file (a file
    it maps shared is its own memory; a snapshot's is never given away)."""
    h = Handover()
    try:
        def ro(path: Path) -> int:
            return h._keep(os.open(path, os.O_RDONLY | os.O_CLOEXEC))

        kernel = ro(spec.kernel)
        initrd = ro(spec.initrd) if spec.initrd is not None else None
        disk_rw = h._keep(os.open(spec.rootfs, os.O_RDWR | os.O_CLOEXEC))
        os.fchmod(disk_rw, 0o600)  # the VM's own disk: nobody else's to read
        disk_ro = ro(spec.rootfs)
        console = h._keep(os.open(console_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
        ram = None
        if memory is not None:
            if memory.fd is not None:  # a sealed snapshot memory: nobody can write it, so anyone may map it
                ram = h._keep(os.dup(memory.fd))
            elif memory.shared:
                ram = h._keep(os.open(memory.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
                if owner is not None:
                    os.fchown(ram, owner, owner)
            else:
                raise ValueError("a private guest-RAM mapping is handed over as a sealed memfd (MemoryFile.fd)")
        tap = h._keep(await open_tap(spec.netns, spec.tap_name)) if spec.tap_name else None
        monitor = None
        if qmp is not None:
            monitor = h._keep(_monitor_socket(qmp))
            h.qmp_path = qmp
        h.files = PassedFiles(kernel=kernel, disk_rw=disk_rw, disk_ro=disk_ro, console=console, initrd=initrd,
                              tap=tap, memory=ram, qmp=monitor)
    except BaseException:
        h.discard()
        raise
    return h
