"""The composition root: the one module that builds concrete adapters from a `VmmConfig`.

Everything else depends on the ports (`arcbox_vm.ports`); only this module imports the
adapters — the VMM drivers, the TAP network, the SQLite store, the image builder, the
cgroup tree, the disk cloner, the resource-usage reader — and wires them together:

- `build_adapters(config)` for a `SandboxManager` (the library and the daemon);
- `build_adapters(config, one_shot=True)` for `arcbox-vm run`: VMMs die with the CLI
  (PR_SET_PDEATHSIG; under the Firecracker jailer only until it drops privileges), and get no cgroup (a daemon on the same data
  dir removes sandbox cgroups it does not own at start; a one-shot VM must not be one).

"auto" picks Firecracker when its binary exists and KVM can run the guest, else QEMU.
"""

from __future__ import annotations

from arcbox_vm.config import VmmConfig
from arcbox_vm.errors import ConfigError
from arcbox_vm.images.store import BuiltImageStore
from arcbox_vm.images.oci_rootfs import build_rootfs_from_oci
from arcbox_vm.network.backend import TapNetwork
from arcbox_vm.paths import manager_tag
from arcbox_vm.ports import Adapters, VmmDriver
from arcbox_vm.storage.disks import clone_disk, grow_disk
from arcbox_vm.storage.state import StateStore
from arcbox_vm.vmm.cgroup import SandboxCgroups
from arcbox_vm.vmm.usage import VmmUsageReader


def select_driver(config: VmmConfig, *, die_with_parent: bool = False,
                  cgroups: SandboxCgroups | None = None) -> VmmDriver:
    """The driver for `config.backend`; raises ConfigError when it cannot run here."""
    backend = config.backend
    cgroups = cgroups or SandboxCgroups.off()
    if backend not in ("auto", "qemu", "firecracker"):
        raise ConfigError(f"unknown VMM backend {backend!r}; use auto, qemu or firecracker")
    if backend in ("auto", "firecracker"):
        from arcbox_vm.vmm.firecracker.driver import FirecrackerDriver
        from arcbox_vm.vmm.firecracker.probe import firecracker_usable

        ok, why = firecracker_usable(config.firecracker.binary)
        if not ok and backend == "firecracker":
            raise ConfigError(f"the firecracker backend cannot run here: {why}")
        if ok:
            return FirecrackerDriver(config.firecracker, die_with_parent=die_with_parent, cgroups=cgroups)
    from arcbox_vm.vmm.qemu.driver import QemuDriver

    return QemuDriver(config.qemu, die_with_parent=die_with_parent, cgroups=cgroups)


def build_adapters(config: VmmConfig, *, driver: VmmDriver | None = None, one_shot: bool = False) -> Adapters:
    """The adapters one manager (or one `arcbox-vm run`) works with. Cheap: the VMM driver
    is chosen on first use. `driver` replaces the configured one (tests, tools)."""
    data_dir = config.data_dir
    if one_shot:
        cgroups = SandboxCgroups.off()
    else:
        cgroups = SandboxCgroups.open(config.daemon.cgroup_parent, manager_tag(data_dir),
                                      vmm_overhead_mib=config.limits.vmm_overhead_mib,
                                      pids_max=config.limits.pids_max)
    if driver is not None and getattr(driver, "cgroups", None) is not None and not one_shot:
        current = driver.cgroups  # type: ignore[attr-defined]
        if not current.enabled:
            driver.cgroups = cgroups  # type: ignore[attr-defined]
        else:
            cgroups = current  # the driver already places VMMs: reconcile that tree
    return Adapters(
        select_driver=lambda: driver if driver is not None else select_driver(
            config, die_with_parent=one_shot, cgroups=cgroups),
        network=TapNetwork(config.network, data_dir),
        store=StateStore(data_dir),
        images=BuiltImageStore(data_dir),
        cgroups=cgroups,
        clone_disk=clone_disk,
        grow_disk=grow_disk,
        import_oci=build_rootfs_from_oci,
        usage=VmmUsageReader(cgroups),
    )
