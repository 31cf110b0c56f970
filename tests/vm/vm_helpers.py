"""Helpers shared by the real-VM tests: which backends to run, drivers, boot requests."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from arcbox_vm.config import DEFAULT_MEMORY_MIB, DEFAULT_VCPUS
from arcbox_vm.images import GuestImage
from arcbox_vm.manager.boot import BootRequest


def backends() -> list[str]:
    names = ["qemu"]
    if all(os.environ.get(v) for v in ("FC_BINARY", "FC_KERNEL", "FC_ROOTFS")):
        names.append("firecracker")
    return names


def make_driver(backend: str):
    if backend == "firecracker":
        from arcbox_vm.config.firecracker import FirecrackerConfig
        from arcbox_vm.vmm.firecracker.driver import FirecrackerDriver

        return FirecrackerDriver(FirecrackerConfig(binary=os.environ["FC_BINARY"], no_seccomp=True,
                                                   log_level="Error", socket_timeout_secs=15))
    from arcbox_vm.vmm.qemu.driver import QemuDriver

    return QemuDriver()


def boot_request(backend: str, image: GuestImage, ddir: Path, **kw) -> BootRequest:
    sid = kw.pop("sandbox_id", None) or f"test-{secrets.token_hex(4)}"
    if backend == "firecracker":
        kernel, rootfs, initrd = Path(os.environ["FC_KERNEL"]), Path(os.environ["FC_ROOTFS"]), None
    else:
        kernel, rootfs, initrd = image.kernel, image.rootfs, image.initrd
    kw.setdefault("vcpus", DEFAULT_VCPUS)
    kw.setdefault("memory_mib", DEFAULT_MEMORY_MIB)
    return BootRequest(sandbox_id=sid, workdir=ddir / "test-vms" / sid, kernel=kernel, rootfs=rootfs,
                       initrd=initrd, **kw)


