"""Start-up reconciliation: make the running world match the state database.

For every recorded sandbox:
- READY/RUNNING whose VMM still runs (same pid *and* start time): re-adopt it — listen on
  its agent endpoint again; the guest agent dials back and re-announces itself. Commands
  it still holds are marked detached (`attach_exec` takes them over), others lost.
- READY/RUNNING/STOPPING whose VMM is gone: FAILED, reason "lost".
- STARTING: the boot was interrupted; its VMM (if any) is killed: FAILED, reason
  "interrupted".
- removal half done: finished.
Then whatever no record owns is removed: sandbox cgroups (a re-adopted VM keeps its own),
VMM processes and directories under `sandboxes/`, socket directories, TAPs with our tag,
a stale NAT table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from typing import TYPE_CHECKING

from arcbox_vm import logctx
from arcbox_vm.agent.host import AgentListener
from arcbox_vm.manager import execs as _execs
from arcbox_vm.manager.boot import BootedVm, BootRequest
from arcbox_vm.manager.cgroup_reconcile import remove_orphan_cgroups, sandbox_cgroups
from arcbox_vm.manager.leftovers import processes_using
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.models import SandboxState as S
from arcbox_vm.paths import socket_dir
from arcbox_vm.vmm.adopted import AdoptedProcess, is_same_process

if TYPE_CHECKING:
    from arcbox_vm.manager.sandbox_manager import SandboxManager

log = logging.getLogger(__name__)

ADOPT_TIMEOUT_S = 30.0  # how long a surviving guest agent gets to dial back


async def _kill_pid(pid: int | None, start: int | None) -> None:
    if is_same_process(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
        for _ in range(100):
            if not is_same_process(pid, start):
                return
            await asyncio.sleep(0.05)


async def _kill_users_of(path: os.PathLike, keep: set[int]) -> None:
    for pid in processes_using(path):  # type: ignore[arg-type]
        if pid not in keep:
            log.warning("killing process %d left behind in %s", pid, path)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for _ in range(60):
        if not [p for p in processes_using(path) if p not in keep]:  # type: ignore[arg-type]
            return
        await asyncio.sleep(0.05)


def _remove_dirs(sb: SandboxRecord) -> None:
    shutil.rmtree(sb.workdir, ignore_errors=True)
    shutil.rmtree(socket_dir(sb.workdir), ignore_errors=True)


async def _adopt(mgr: "SandboxManager", sb: SandboxRecord) -> bool:
    """Reconnect to a surviving VM; True when its agent said HELLO again."""
    driver = mgr.driver
    endpoint = driver.agent_endpoint(socket_dir(sb.workdir))
    proc = AdoptedProcess(sb.pid, sb.pid_start, sb.workdir / "console.log", driver.name,  # type: ignore[arg-type]
                          cgroup=sandbox_cgroups(mgr).sandbox(sb.id))
    listener = AgentListener(endpoint.listen_path)
    await listener.start()
    try:
        agent = await listener.accept(ADOPT_TIMEOUT_S, vmm_exit=proc.exited, describe_exit=proc.describe_exit)
    except Exception as exc:  # noqa: BLE001 - any failure means: not adoptable
        log.warning("sandbox %s could not be re-adopted: %s", sb.id, exc)
        await listener.close()
        await proc.kill()
        return False
    req = BootRequest(sandbox_id=sb.id, workdir=sb.workdir, kernel=sb.workdir, rootfs=sb.workdir)
    sb.vm = BootedVm(req, proc, agent, listener)
    return True


async def recover(mgr: "SandboxManager") -> None:
    store = mgr._store
    network = mgr._network
    adopted_pids: set[int] = set()
    for row in store.sandboxes():
        sb = SandboxRecord.from_row(row)
        token = logctx.sandbox_id.set(sb.id)
        try:
            await _recover_one(mgr, sb, adopted_pids)
        finally:
            logctx.sandbox_id.reset(token)
    # nothing else may hold our resources
    await remove_orphan_cgroups(mgr)
    keep = {sb.workdir.name for sb in mgr._sandboxes.values()}
    root = mgr.data_dir / "sandboxes"
    if root.is_dir():
        for workdir in sorted(root.iterdir()):
            if workdir.name in keep:
                continue
            await _kill_users_of(workdir, adopted_pids)
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(socket_dir(workdir), ignore_errors=True)
            log.warning("removed sandbox directory %s that no record owns", workdir.name)
    if os.geteuid() == 0:
        owned = {sb.lease.tap_name for sb in mgr._sandboxes.values() if sb.lease is not None}
        await network.start(keep_taps=owned)


async def _recover_one(mgr: "SandboxManager", sb: SandboxRecord, adopted_pids: set[int]) -> None:
    network = mgr._network

    async def release_everything() -> None:
        await _kill_pid(sb.pid, sb.pid_start)
        await _kill_users_of(sb.workdir, adopted_pids)
        if sb.lease is not None:
            if os.geteuid() == 0:
                with contextlib.suppress(Exception):
                    await network.release_orphan(sb.lease)
            sb.lease = None
        sb.pid = sb.pid_start = None

    if sb.removing:
        await release_everything()
        _remove_dirs(sb)
        sb.removed = True
        mgr._emit(sb, "removed", reason="recovered")
        log.info("finished removing sandbox %s", sb.id)
        return

    mgr._sandboxes[sb.id] = sb
    if sb.state in (S.READY, S.RUNNING) and is_same_process(sb.pid, sb.pid_start):
        if sb.lease is not None:
            network.pool.reserve(sb.lease.ip, sb.id)
        if await _adopt(mgr, sb):
            adopted_pids.add(sb.pid)  # type: ignore[arg-type]
            detached, lost = _execs.reconcile(mgr._store, sb, sb.vm.agent if sb.vm else None)
            sb.state = S.READY
            mgr._emit(sb, "ready", reason="adopted", lost_execs=lost, detached_execs=detached)
            mgr._start_watchers(sb)
            log.info("re-adopted sandbox %s (pid %s)", sb.id, sb.pid)
            return
        if sb.lease is not None:
            network.pool.release(sb.lease.ip)
        reason, error = "lost", "the VM survived a daemon restart but its agent did not reconnect"
    elif sb.state == S.STARTING:
        reason, error = "interrupted", "the daemon stopped while the sandbox was booting"
    elif sb.state in (S.READY, S.RUNNING, S.STOPPING):
        reason, error = "lost", "the VMM was gone when the daemon restarted"
    else:  # STOPPED / FAILED: resources were released already; make sure
        await release_everything()
        with contextlib.suppress(FileNotFoundError):
            (sb.workdir / "rootfs.ext4").unlink()
        shutil.rmtree(socket_dir(sb.workdir), ignore_errors=True)
        return
    await release_everything()
    with contextlib.suppress(FileNotFoundError):
        (sb.workdir / "rootfs.ext4").unlink()
    shutil.rmtree(socket_dir(sb.workdir), ignore_errors=True)
    _execs.reconcile(mgr._store, sb, None)
    sb.state = S.FAILED
    sb.error = error
    mgr._emit(sb, "failed", error=error, reason=reason)
    log.warning("sandbox %s is FAILED (%s): %s", sb.id, reason, error)
