"""Settling the manager's sandbox cgroups at start.

The driver moves every VMM it spawns into `<root>/<sandbox-id>` (see
`arcbox_vm.vmm.cgroup`; the composition root gives driver and manager the same cgroup
set); the VMM process removes it again when it is cleaned up. What a crash leaves behind
is settled here, after the records were recovered: a re-adopted VM keeps its cgroup;
every other sandbox cgroup under our root — a FAILED sandbox's, a finished removal's, one
no record knows — is killed (every process in it, whatever it forked) and removed.
"""

from __future__ import annotations

import logging

from arcbox_vm.manager.context import ManagerContext

log = logging.getLogger(__name__)


async def remove_orphan_cgroups(ctx: ManagerContext) -> None:
    """Kill and remove every sandbox cgroup under our root that no live sandbox owns.

    Call after the records were recovered: live means the VM is attached (`sb.vm`), i.e.
    re-adopted; FAILED and removed sandboxes own nothing."""
    cgroups = ctx.adapters.cgroups
    if not cgroups.enabled:
        return
    live = {sb.launch_name for sb in ctx.sandboxes.values() if sb.vm is not None or sb.paused_process is not None}
    for sid in cgroups.list():
        if sid in live:
            continue
        pids = cgroups.pids(sid)
        if await cgroups.kill(sid):
            log.warning("removed cgroup of sandbox %s that no live sandbox owns%s", sid,
                        f" (killed processes {pids})" if pids else "")
