"""Fixtures that boot real microVMs.

QEMU always (software emulation here); Firecracker too when FC_BINARY, FC_KERNEL and
FC_ROOTFS are set, as in the original's e2e tests. The guest image is built (or taken
from the cache) — never skipped: a machine that cannot build it fails the suite.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import pytest_asyncio

from arcbox_vm.images import GuestImage, build_image
from arcbox_vm.storage.disks import clone_disk
from arcbox_vm.manager.boot import BootedVm, boot_vm
from arcbox_vm.paths import data_dir, runtime_dir

from .manager_helpers import netns_list, sandbox_cgroups
from .vm_helpers import backends, boot_request, make_driver


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_image(data_dir())


@pytest.fixture(scope="session")
def vm_data_dir() -> Path:
    d = data_dir()
    (d / "test-vms").mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session", params=backends())
def backend(request) -> str:  # noqa: ANN001
    return request.param


@pytest_asyncio.fixture(scope="session")
async def shared_vm(backend: str, guest_image: GuestImage, vm_data_dir: Path) -> BootedVm:
    """One VM per backend shared by the exec tests (booting takes seconds under TCG)."""
    vm = await boot_vm(make_driver(backend), boot_request(backend, guest_image, vm_data_dir, memory_mib=512), clone_disk=clone_disk)
    yield vm
    await vm.destroy()


def _our_vmm_processes() -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and os.path.basename(args[0]).startswith((b"qemu-system", b"firecracker")) and \
                any(a.startswith(b"arcbox-") for a in args):
            found.append(f"{pid}: {b' '.join(args)[:120].decode(errors='replace')}")
    return found


@pytest.fixture(scope="session", autouse=True)
def no_leftovers_after_the_suite(vm_data_dir: Path):
    """After every test: no VMM process, sandbox directory or sandbox cgroup may remain."""
    cgroups_before = sandbox_cgroups()  # a daemon outside the suite may own some
    yield
    leftovers = _our_vmm_processes()
    sandboxes = sorted(p.name for sub in ("sandboxes", "runs", "test-vms") if (vm_data_dir / sub).exists()
                       for p in (vm_data_dir / sub).iterdir())
    assert not leftovers, f"VMM processes left behind: {leftovers}"
    taps = [n for n in os.listdir("/sys/class/net") if re.match(r"^ab[0-9a-f]{4}-", n)]
    assert not taps, f"TAP devices left behind in the host namespace: {taps}"
    namespaces = [n for n in netns_list() if n.startswith("arcbox-t-")]
    assert not namespaces, f"test network namespaces left behind: {namespaces}"
    sockdirs = os.listdir(runtime_dir()) if runtime_dir().exists() else []
    assert not sockdirs, f"socket directories left behind in {runtime_dir()}: {sockdirs}"
    assert not sandboxes, f"sandbox directories left behind: {sandboxes}"
    cgroups = sorted(sandbox_cgroups() - cgroups_before)
    assert not cgroups, f"sandbox cgroups left behind: {cgroups}"


# The real-Firecracker driver tests exist only where a firecracker is configured; elsewhere
# they are not collected (and the report header says so) rather than reported as skipped.
collect_ignore = [] if "firecracker" in backends() else ["test_firecracker_real.py"]
