"""Build QEMU's argument vector and the guest kernel command line (pure functions).

The `tsc_early_khz=… tsc=reliable` pair is what makes a TCG guest boot at all: without a
calibrated TSC the kernel hangs after "Marking TSC unstable". `reboot=t panic=-1` with
QEMU's `-no-reboot` turns every guest reboot or panic into a QEMU exit.
"""

from __future__ import annotations

from pathlib import Path

from arcbox_vm.agent.protocol import SERIAL_PORT_NAME
from arcbox_vm.ports import AgentEndpoint, MachineSpec
from arcbox_vm.config.qemu import QemuConfig


def kernel_cmdline(spec: MachineSpec, endpoint: AgentEndpoint, accel: str, cfg: QemuConfig) -> str:
    parts = [spec.boot_args.strip()] if spec.boot_args.strip() else []
    parts += list(spec.extra_boot_args)
    if accel == "tcg":
        parts.append(f"tsc_early_khz={cfg.tsc_khz} tsc=reliable")
    parts += ["reboot=t", "panic=-1", "root=/dev/vda rw", endpoint.boot_arg]
    return " ".join(p for p in parts if p)


def _opt(path: Path) -> str:
    """A path inside a QEMU option list (a ',' is written ',,')."""
    return str(path).replace(",", ",,")


def qemu_argv(spec: MachineSpec, endpoint: AgentEndpoint, accel: str, cfg: QemuConfig,
              console_log: Path) -> list[str]:
    """The full command line for one VM. The agent chardev is a *client* of our socket."""
    mmio = cfg.machine == "microvm"
    dev = (lambda kind: f"virtio-{kind}-device") if mmio else (lambda kind: f"virtio-{kind}-pci")
    accel_opt = f"tcg,tb-size={cfg.tcg_tb_size_mib}" if accel == "tcg" else "kvm"
    argv = [
        cfg.binary,
        "-name", f"arcbox-{spec.sandbox_id}",
        "-machine", cfg.machine,
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
    argv += cfg.extra_args
    return argv
