"""The manager's sandbox cgroups: handed to its VMM driver, and reconciled at start.

The driver moves every VMM it spawns into `<root>/<sandbox-id>` (see
`arcbox_vm.vmm.cgroup`); the VMM process removes it again when it is cleaned up. What a
crash leaves behind is settled here, at start-up, after the records were recovered: a
re-adopted VM keeps its cgroup; every other sandbox cgroup under our root — a FAILED
sandbox's, a finished removal's, one no record knows — is killed (every process in it,
whatever it forked) and removed. The path comes from the data dir's tag and the sandbox
id, so nothing about cgroups is stored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from arcbox_vm.errors import ArcboxError
from arcbox_vm.network.backend import manager_tag
from arcbox_vm.vmm.cgroup import SandboxCgroups

if TYPE_CHECKING:
    from arcbox_vm.manager.sandbox_manager import SandboxManager

log = logging.getLogger(__name__)


def sandbox_cgroups(mgr: "SandboxManager") -> SandboxCgroups:
    """The manager's SandboxCgroups (`daemon.cgroup_parent` + the data dir's tag).

    Opened once and given to the manager's driver, which places the VMMs it spawns. A
    driver without a `cgroups` attribute (a custom one) just does not place them; a
    driver already placing VMMs of another data dir is left to that manager.
    """
    origin = (mgr.config.daemon.cgroup_parent, manager_tag(mgr.data_dir))
    try:
        driver = mgr.driver
    except ArcboxError:  # no usable VMM: boots fail on their own; our leftovers are still ours
        driver = None
    current = getattr(driver, "cgroups", None)
    if isinstance(current, SandboxCgroups) and current.origin == origin:
        return current
    cgroups = SandboxCgroups.open(*origin)
    if isinstance(current, SandboxCgroups):
        if current.enabled and current.root != cgroups.root:
            log.warning("this VMM driver already places VMMs in %s (another data dir's manager); "
                        "sandboxes of %s get no cgroup of their own", current.root, mgr.data_dir)
        else:
            driver.cgroups = cgroups  # type: ignore[union-attr]
    return cgroups


async def remove_orphan_cgroups(mgr: "SandboxManager") -> None:
    """Kill and remove every sandbox cgroup under our root that no live sandbox owns.

    Call after the records were recovered: live means the VM is attached (`sb.vm`), i.e.
    re-adopted; FAILED and removed sandboxes own nothing."""
    cgroups = sandbox_cgroups(mgr)
    live = {sid for sid, sb in mgr._sandboxes.items() if sb.vm is not None}
    for sid in cgroups.list():
        if sid in live:
            continue
        pids = cgroups.pids(sid)
        if await cgroups.kill(sid):
            log.warning("removed cgroup of sandbox %s that no live sandbox owns%s", sid,
                        f" (killed processes {pids})" if pids else "")
