"""Ports: the small interfaces the use-case layer (`manager/`) depends on.

Adapters implement them (`vmm/qemu`, `vmm/firecracker`, `network/`, `storage/`,
`images/`, `vmm/cgroup.py`); `arcbox_vm.composition` is the one module that builds the
concrete adapters from a `VmmConfig` and hands them over as an `Adapters` bundle.
"""

from arcbox_vm.ports.adapters import Adapters
from arcbox_vm.ports.cgroups import SandboxCgroupSet
from arcbox_vm.ports.images import BootImage, ImageStore
from arcbox_vm.ports.network import EgressPolicy, Network, NetworkLease
from arcbox_vm.ports.storage import DiskCloner, StateStore, StoredEvent
from arcbox_vm.ports.usage import ResourceUsage, UsageReader
from arcbox_vm.ports.vmm import (
    AdoptSpec,
    AgentEndpoint,
    MachineSpec,
    MemoryUse,
    SnapshotDriver,
    SnapshotProcess,
    VmmDriver,
    VmmProcess,
    VmSnapshot,
)

__all__ = [
    "Adapters",
    "AdoptSpec",
    "AgentEndpoint",
    "BootImage",
    "DiskCloner",
    "EgressPolicy",
    "ImageStore",
    "MachineSpec",
    "MemoryUse",
    "Network",
    "NetworkLease",
    "ResourceUsage",
    "SandboxCgroupSet",
    "SnapshotDriver",
    "SnapshotProcess",
    "StateStore",
    "StoredEvent",
    "UsageReader",
    "VmmDriver",
    "VmmProcess",
    "VmSnapshot",
]
