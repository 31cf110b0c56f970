"""Build QEMU's argument vector and the guest kernel command line (pure functions).

The `tsc_early_khz=… tsc=reliable` pair is what makes a TCG guest boot at all: without a
calibrated TSC the kernel hangs after "Marking TSC unstable". `reboot=t panic=-1` with
QEMU's `-no-reboot` turns every guest reboot or panic into a QEMU exit.

QEMU opens no file of ours by path but its agent socket (a client that reconnects after a
daemon restart): the kernel, initrd and guest-RAM file are reached through
`/proc/self/fd/N`, the disk and the console are fd sets (`-add-fd`, `/dev/fdset/N`; their
`opaque` names the file, so the workdir still shows on the command line), the TAP is
`-netdev tap,fd=N`, the monitor (QMP) listens on a socket we bound (`fd=N`). A confined
QEMU (`[qemu] sandbox`) therefore needs no permission on the data dir at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from arcbox_vm.agent.protocol import SERIAL_PORT_NAME
from arcbox_vm.config.qemu import SANDBOX_OPTIONS, QemuConfig
from arcbox_vm.ports import AgentEndpoint, MachineSpec

DISK_FDSET = 1
CONSOLE_FDSET = 2
FALLBACK_TSC_KHZ = 2_000_000  # when the config leaves it to the driver (which knows the host's) and it did not
_FD_PATH = "/proc/self/fd/"


class MemoryFile(NamedTuple):
    """Guest RAM in a file: `shared` maps it MAP_SHARED (the file *is* the VM's memory, so a
    checkpoint copies it instead of streaming it), else MAP_PRIVATE (copy-on-write over a
    snapshot's memory: clones of one checkpoint share its unchanged pages). `fd`: the file
    is already open (a snapshot's sealed memory, see sealed_memory.py) and handed over as
    is; `path` then only names where it came from."""

    path: Path
    shared: bool
    fd: int | None = None


@dataclass(frozen=True)
class PassedFiles:
    """The descriptors QEMU inherits, by their numbers in it. The disk is in its fd set
    twice, read-write and read-only: QEMU's block layer opens an image read-only first.
    `memory` is the guest-RAM file, `qmp` the monitor's listening socket."""

    kernel: int
    disk_rw: int
    disk_ro: int
    console: int
    initrd: int | None = None
    tap: int | None = None
    memory: int | None = None
    qmp: int | None = None

    def all(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.kernel, self.disk_rw, self.disk_ro, self.console, self.initrd, self.tap,
                                   self.memory, self.qmp) if fd is not None)


def kernel_cmdline(spec: MachineSpec, endpoint: AgentEndpoint, accel: str, cfg: QemuConfig) -> str:
    parts = [spec.boot_args.strip()] if spec.boot_args.strip() else []
    parts += list(spec.extra_boot_args)
    if accel == "tcg":
        parts.append(f"tsc_early_khz={cfg.tsc_khz or FALLBACK_TSC_KHZ} tsc=reliable")
    parts += ["reboot=t", "panic=-1", "root=/dev/vda rw", endpoint.boot_arg]
    return " ".join(p for p in parts if p)


def _opt(path: Path) -> str:
    """A path inside a QEMU option list (a ',' is written ',,')."""
    return str(path).replace(",", ",,")


def qemu_argv(spec: MachineSpec, endpoint: AgentEndpoint, accel: str, cfg: QemuConfig,
              console_log: Path, files: PassedFiles, *, memory: MemoryFile | None = None,
              incoming: bool = False) -> list[str]:
    """The full command line for one VM. The agent chardev is a *client* of our socket.

    `memory`: guest RAM in that file (its descriptor is `files.memory`); `files.qmp`: the
    monitor (QMP) serves on that listening socket; `incoming`: start stopped, waiting for
    `migrate-incoming` (a restore)."""
    mmio = cfg.machine == "microvm"
    dev = (lambda kind: f"virtio-{kind}-device") if mmio else (lambda kind: f"virtio-{kind}-pci")
    accel_opt = f"tcg,tb-size={cfg.tcg_tb_size_mib}" if accel == "tcg" else "kvm"
    argv = [
        cfg.binary,
        "-name", f"arcbox-{spec.sandbox_id}",
        "-machine", cfg.machine + (",memory-backend=ram" if memory is not None else ""),
        "-accel", accel_opt,
        "-cpu", "host" if accel == "kvm" else "max",
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
    ]
    if cfg.sandbox:
        argv += ["-sandbox", SANDBOX_OPTIONS]
    argv += [
        "-add-fd", f"fd={files.disk_rw},set={DISK_FDSET},opaque={_opt(spec.rootfs)}",
        "-add-fd", f"fd={files.disk_ro},set={DISK_FDSET},opaque={_opt(spec.rootfs)}",
        "-add-fd", f"fd={files.console},set={CONSOLE_FDSET},opaque={_opt(console_log)}",
        # append: the manager caps the log by truncating it (see manager/console.py); with
        # O_APPEND QEMU's next write lands at the new end instead of leaving a hole
        "-chardev", f"file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on",
        "-serial", "chardev:console",
        "-kernel", f"{_FD_PATH}{files.kernel}",
        "-append", kernel_cmdline(spec, endpoint, accel, cfg),
        # no image locking: the disk is this VM's own copy, and the fd set's read-only
        # descriptor would keep a lock from QEMU's first (read-only) open alive — a VM
        # migrated to a file could then not take its disk back ("Failed to get write lock")
        "-drive", (f"id=root,file=/dev/fdset/{DISK_FDSET},format=raw,if=none,cache=unsafe,discard=unmap,"
                   "file.locking=off"),
        "-device", f"{dev('blk')},drive=root",
        "-device", f"{dev('serial')},max_ports=2",
        "-chardev", f"socket,id=agent,path={_opt(endpoint.listen_path)},reconnect=1",
        "-device", f"virtserialport,chardev=agent,name={SERIAL_PORT_NAME}",
    ]
    if files.initrd is not None:
        argv += ["-initrd", f"{_FD_PATH}{files.initrd}"]
    if files.tap is not None:
        mac = f",mac={spec.guest_mac}" if spec.guest_mac else ""
        argv += ["-netdev", f"tap,id=net0,fd={files.tap}",
                 "-device", f"{dev('net')},netdev=net0{mac}"]
    if memory is not None:
        assert files.memory is not None
        share = "on" if memory.shared else "off"
        argv += ["-object", (f"memory-backend-file,id=ram,size={spec.memory_mib}M,"
                             f"mem-path={_FD_PATH}{files.memory},share={share},prealloc=off")]
    if files.qmp is not None:
        argv += ["-chardev", f"socket,id=qmp,fd={files.qmp},server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
    if incoming:
        argv += ["-incoming", "defer"]
    argv += cfg.extra_args
    return argv


def memory_from_argv(argv: list[str]) -> MemoryFile | None:
    """The guest RAM file of a QEMU command line `qemu_argv` made (None: anonymous RAM); its
    path as QEMU was given it (`/proc/self/fd/N`: see `fd_of`)."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-object" and argv[i + 1].startswith("memory-backend-file,"):
            opts = dict(o.split("=", 1) for o in argv[i + 1].replace(",,", "\0").split(",") if "=" in o)
            path = opts.get("mem-path", "").replace("\0", ",")
            return MemoryFile(Path(path), opts.get("share") == "on") if path else None
    return None


def fd_of(path: Path) -> int | None:
    """N for a `/proc/self/fd/N` path QEMU was given, else None."""
    text = str(path)
    return int(text[len(_FD_PATH):]) if text.startswith(_FD_PATH) and text[len(_FD_PATH):].isdigit() else None
