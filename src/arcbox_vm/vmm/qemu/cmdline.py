"""Build QEMU's argument vector and the guest kernel command line (pure functions).

The `tsc_early_khz=… tsc=reliable` pair is what makes a TCG guest boot at all: without a
calibrated TSC the kernel hangs after "Marking TSC unstable". `reboot=t panic=-1` with
QEMU's `-no-reboot` turns every guest reboot or panic into a QEMU exit.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from arcbox_vm.agent.protocol import SERIAL_PORT_NAME
from arcbox_vm.ports import AgentEndpoint, MachineSpec
from arcbox_vm.config.qemu import QemuConfig


FALLBACK_TSC_KHZ = 2_000_000  # when the config leaves it to the driver (which knows the host's) and it did not


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


class MemoryFile(NamedTuple):
    """Guest RAM in a file: `shared` maps it MAP_SHARED (the file *is* the VM's memory, so a
    checkpoint copies it instead of streaming it), else MAP_PRIVATE (copy-on-write over a
    snapshot's memory: clones of one checkpoint share its unchanged pages)."""

    path: Path
    shared: bool


def qemu_argv(spec: MachineSpec, endpoint: AgentEndpoint, accel: str, cfg: QemuConfig,
              console_log: Path, *, qmp_socket: Path | None = None, memory: MemoryFile | None = None,
              incoming: bool = False) -> list[str]:
    """The full command line for one VM. The agent chardev is a *client* of our socket.

    `qmp_socket`: the monitor (QMP) listens there; `memory`: guest RAM in that file;
    `incoming`: start stopped, waiting for `migrate-incoming` (a restore)."""
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
        # append: the manager caps the log by truncating it (see manager/console.py); with
        # O_APPEND QEMU's next write lands at the new end instead of leaving a hole
        "-chardev", f"file,id=console,path={_opt(console_log)},append=on",
        "-serial", "chardev:console",
        "-kernel", str(spec.kernel),
        "-append", kernel_cmdline(spec, endpoint, accel, cfg),
        "-drive", f"id=root,file={spec.rootfs},format=raw,if=none,cache=unsafe,discard=unmap",
        "-device", f"{dev('blk')},drive=root",
        "-device", f"{dev('serial')},max_ports=2",
        "-chardev", f"socket,id=agent,path={_opt(endpoint.listen_path)},reconnect=1",
        "-device", f"virtserialport,chardev=agent,name={SERIAL_PORT_NAME}",
    ]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    if spec.tap_name:
        mac = f",mac={spec.guest_mac}" if spec.guest_mac else ""
        argv += ["-netdev", f"tap,id=net0,ifname={spec.tap_name},script=no,downscript=no",
                 "-device", f"{dev('net')},netdev=net0{mac}"]
    if memory is not None:
        share = "on" if memory.shared else "off"
        argv += ["-object", f"memory-backend-file,id=ram,size={spec.memory_mib}M,mem-path={_opt(memory.path)},"
                            f"share={share},prealloc=off"]
    if qmp_socket is not None:
        argv += ["-qmp", f"unix:{_opt(qmp_socket)},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    argv += cfg.extra_args
    return argv


def memory_from_argv(argv: list[str]) -> MemoryFile | None:
    """The guest RAM file of a QEMU command line `qemu_argv` made (None: anonymous RAM)."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-object" and argv[i + 1].startswith("memory-backend-file,"):
            opts = dict(o.split("=", 1) for o in argv[i + 1].replace(",,", "\0").split(",") if "=" in o)
            path = opts.get("mem-path", "").replace("\0", ",")
            return MemoryFile(Path(path), opts.get("share") == "on") if path else None
    return None
