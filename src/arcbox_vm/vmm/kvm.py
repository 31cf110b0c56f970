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


def probe_kvm(dev: str = "/dev/kvm", sys_module: Path = Path("/sys/module")) -> KvmProbe:
    """Report whether KVM can run a stock (non-PVM) guest kernel here, and why not."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmProbe(False, f"{dev} cannot be opened read-write: {exc.strerror}")
    try:
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as exc:
            return KvmProbe(False, f"{dev} does not answer the KVM API: {exc.strerror}")
        if version != KVM_API_VERSION:
            return KvmProbe(False, f"{dev} speaks KVM API {version}, expected {KVM_API_VERSION}")
        try:
            vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as exc:
            return KvmProbe(False, f"KVM_CREATE_VM failed: {exc.strerror}")
        os.close(vm_fd)
    finally:
        os.close(fd)
    vendors = [m for m in ("kvm_intel", "kvm_amd") if (sys_module / m).exists()]
    if (sys_module / "kvm_pvm").exists() and not vendors:
        return KvmProbe(False, "KVM here is provided by kvm_pvm, which only runs PVM-enabled guest kernels")
    if not vendors:
        return KvmProbe(False, "no hardware KVM module (kvm_intel/kvm_amd) is loaded")
    return KvmProbe(True, f"KVM via {vendors[0]}")
