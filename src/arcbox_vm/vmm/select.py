"""Choosing a VMM driver: "auto" means Firecracker when it can run here, else QEMU."""

from __future__ import annotations

from typing import Literal

from arcbox_vm.errors import ConfigError
from arcbox_vm.ports import VmmDriver
from arcbox_vm.vmm.qemu.config import QemuConfig
from arcbox_vm.vmm.qemu.driver import QemuDriver

Backend = Literal["auto", "qemu", "firecracker"]


def select_driver(backend: Backend = "auto", *, qemu: QemuConfig | None = None, firecracker=None,
                  die_with_parent: bool = False) -> VmmDriver:
    """Build the driver for `backend`; `firecracker` is a FirecrackerConfig or None (defaults)."""
    if backend not in ("auto", "qemu", "firecracker"):
        raise ConfigError(f"unknown VMM backend {backend!r}; use auto, qemu or firecracker")
    if backend in ("auto", "firecracker"):
        from arcbox_vm.vmm.firecracker.config import FirecrackerConfig
        from arcbox_vm.vmm.firecracker.driver import FirecrackerDriver

        from arcbox_vm.vmm.firecracker.probe import firecracker_usable

        fc_cfg = firecracker or FirecrackerConfig()
        ok, why = firecracker_usable(fc_cfg.binary)
        if ok or backend == "firecracker":
            if not ok and backend == "firecracker":
                raise ConfigError(f"the firecracker backend cannot run here: {why}")
            return FirecrackerDriver(fc_cfg)
    return QemuDriver(qemu, die_with_parent=die_with_parent)
