"""Can KVM run an ordinary guest kernel on this host? Probe it, don't assume.

`/dev/kvm` existing is not enough: on hosts where KVM comes from the out-of-tree
`kvm_pvm` module (PVM, used to nest VMs without VT-x/AMD-V) only PVM-enabled guest
kernels run; a stock kernel crawls and then dies with an emulation failure. So KVM is
"usable" only when the device answers the KVM API *and* a hardware vendor module
(kvm_intel / kvm_amd) backs it.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str


def kvm_device_usable(kvm_device: Path | str = "/dev/kvm") -> tuple[bool, str]:
    """Open the KVM device read-write, check the API version and create (then drop) a VM."""
    kvm_device = str(kvm_device)
    if not os.path.exists(kvm_device):
        return False, (
            f"{kvm_device} does not exist: KVM is not available (enable hardware virtualization / "
            "nested virtualization and load kvm_intel or kvm_amd), or use QEMU"
        )
    try:
        fd = os.open(kvm_device, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return False, (
            f"{kvm_device} is not accessible read-write by uid {os.getuid()}: add the user to the "
            "'kvm' group or adjust the device permissions"
        )
    except OSError as exc:
        return False, f"{kvm_device} cannot be opened: {exc.strerror or exc}"
    try:
        try:
            api = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        except OSError as exc:
            return False, f"KVM_GET_API_VERSION on {kvm_device} failed: {exc.strerror or exc}"
        if api != KVM_API_VERSION:
            return False, f"{kvm_device} reports KVM API version {api}, expected {KVM_API_VERSION}"
        try:
            vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as exc:
            return False, f"KVM_CREATE_VM on {kvm_device} failed: {exc.strerror or exc} (KVM cannot run guests here)"
        os.close(vm_fd)
    finally:
        os.close(fd)
    return True, f"{kvm_device} usable"


def probe_kvm(dev: str = "/dev/kvm", sys_module: Path = Path("/sys/module")) -> KvmProbe:
    """Report whether KVM can run a stock (non-PVM) guest kernel here, and why not."""
    ok, reason = kvm_device_usable(dev)
    if not ok:
        return KvmProbe(False, reason)
    vendors = [m for m in ("kvm_intel", "kvm_amd") if (sys_module / m).exists()]
    if (sys_module / "kvm_pvm").exists() and not vendors:
        return KvmProbe(False, "KVM here is provided by kvm_pvm, which only runs PVM-enabled guest kernels")
    if not vendors:
        return KvmProbe(False, "no hardware KVM module (kvm_intel/kvm_amd) is loaded")
    return KvmProbe(True, f"KVM via {vendors[0]}")
