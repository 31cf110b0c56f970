"""The bundle of adapters one manager works with, built by `arcbox_vm.composition`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from arcbox_vm.ports.cgroups import SandboxCgroupSet
from arcbox_vm.ports.images import ImageStore, OciImporter
from arcbox_vm.ports.network import Network
from arcbox_vm.ports.storage import DiskCloner, DiskGrower, StateStore
from arcbox_vm.ports.usage import UsageReader
from arcbox_vm.ports.vmm import VmmDriver


@dataclass
class Adapters:
    """What a `SandboxManager` (or the one-shot runner) talks to.

    The driver is chosen on first use (`driver`), not when the bundle is made: choosing
    may probe KVM or look for a binary, and a manager's constructor touches nothing slow."""

    select_driver: Callable[[], VmmDriver]
    network: Network
    store: StateStore
    images: ImageStore
    cgroups: SandboxCgroupSet
    clone_disk: DiskCloner
    usage: UsageReader | None = None  # None: no resource usage is read (stats are empty)
    grow_disk: DiskGrower | None = None  # None: templates cannot grow their disk (--disk-size)
    import_oci: OciImporter | None = None  # None: templates cannot start FROM oci-archive:
    _driver: VmmDriver | None = field(default=None, repr=False)

    @property
    def driver(self) -> VmmDriver:
        if self._driver is None:
            self._driver = self.select_driver()
        return self._driver
