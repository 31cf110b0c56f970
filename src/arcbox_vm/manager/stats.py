"""Resource use of sandboxes, read from their VMMs (the `UsageReader` port) when asked.

Meant to be callable from any thread (the metrics endpoint scrapes from its own): it
takes one snapshot of the records — `list()` of a dict is a single step under the GIL —
and reads only plain attributes of each; the reads of /proc and cgroup files then happen
without touching the manager.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from arcbox_vm.errors import SandboxNotFound
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.models import SandboxStats


def _vmm_pid(sb) -> int | None:  # noqa: ANN001 - a SandboxRecord
    vm = sb.vm
    if vm is None:
        return None
    process = vm.process
    return process.pid if process.returncode is None else None


def read_stats(ctx: ManagerContext, ids: Iterable[str] | None = None) -> list[SandboxStats]:
    """Stats of `ids` (SandboxNotFound for an unknown one), or of every sandbox whose VMM
    runs (ids None or empty), in the order the manager keeps them (creation order)."""
    records = [sb for sb in list(ctx.sandboxes.values()) if not sb.removed]
    wanted = list(dict.fromkeys(ids or ()))
    if wanted:
        by_id = {sb.id: sb for sb in records}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise SandboxNotFound(missing[0])
        records = [by_id[i] for i in wanted]
    pids = {sb.id: _vmm_pid(sb) for sb in records}
    reader = ctx.adapters.usage
    usage = reader.read([(sid, pid) for sid, pid in pids.items() if pid is not None]) if reader else {}
    now = time.time_ns()
    out = []
    for sb in records:
        u = usage.get(sb.id)
        if u is None:
            if not wanted:
                continue  # "every sandbox" means every sandbox with a running VMM
            out.append(SandboxStats(sb.id, sb.state, 0.0, 0, 0, 0, 0, now))
        else:
            out.append(SandboxStats(sb.id, sb.state, u.cpu_seconds, u.memory_bytes, u.io_read_bytes,
                                    u.io_write_bytes, u.processes, now, u.source))
    return out
