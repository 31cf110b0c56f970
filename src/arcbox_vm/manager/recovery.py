"""Start-up reconciliation: make the running world match the state database.

For every recorded sandbox the driver adopts the VMM it recorded (pid *and* start time,
so a recycled pid is never taken for ours), then:
- READY/RUNNING whose VMM still runs: re-adopt it — listen on its agent endpoint again;
  the guest agent dials back and re-announces itself. Commands it still holds are marked
  detached (`attach_exec` takes them over), others lost.
- READY/RUNNING/STOPPING whose VMM is gone: FAILED, reason "lost".
- STARTING: the boot was interrupted; its VMM (if any) is killed: FAILED, reason
  "interrupted".
- removal half done: finished.
Whatever is not re-adopted is cleaned up by the driver that made it (`cleanup()`: sockets,
jail, cgroup). Then whatever no record owns is removed: sandbox cgroups, VMM processes and
directories under `sandboxes/`, socket directories, TAPs with our tag; our firewall table
is replaced, with the re-adopted sandboxes' rules (their egress policies as recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal

from arcbox_vm import logctx
from arcbox_vm.agent.host import AgentListener
from arcbox_vm.manager import checkpoints
from arcbox_vm.manager import execs as _execs
from arcbox_vm.manager.boot import BootedVm
from arcbox_vm.manager.cgroup_reconcile import remove_orphan_cgroups
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.leftovers import processes_using
from arcbox_vm.manager.lifecycle import start_watchers
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.models import SandboxState as S
from arcbox_vm.paths import memory_dir, socket_dir
from arcbox_vm.ports import AdoptSpec, SnapshotProcess, VmmProcess

log = logging.getLogger(__name__)

ADOPT_TIMEOUT_S = 30.0  # how long a surviving guest agent gets to dial back
ADOPT_PARALLEL = 16  # records settled at once at start-up


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


async def _adopt_process(ctx: ManagerContext, sb: SandboxRecord) -> VmmProcess | None:
    """The driver's handle on the recorded VMM (exited if it is gone); None when no driver
    can run here (then nothing of ours can be running either)."""
    driver = ctx.driver_or_none()
    if driver is None:
        return None
    return await driver.adopt(AdoptSpec(sandbox_id=sb.launch_name, workdir=sb.workdir,
                                        sockdir=socket_dir(sb.workdir), pid=sb.pid, start_time=sb.pid_start))


async def _reconnect(ctx: ManagerContext, sb: SandboxRecord, proc: VmmProcess) -> bool:
    """Listen again on a surviving VM's agent endpoint; True when its agent said HELLO again."""
    endpoint = ctx.driver.agent_endpoint(socket_dir(sb.workdir))
    listener = AgentListener(endpoint.listen_path)
    await listener.start()
    try:
        agent = await listener.accept(ADOPT_TIMEOUT_S, vmm_exit=proc.exited, describe_exit=proc.describe_exit)
    except Exception as exc:  # noqa: BLE001 - any failure means: not adoptable
        log.warning("sandbox %s could not be re-adopted: %s", sb.id, exc)
        ctx.observers.agent_error(sb.id, "reconnect")
        await listener.close()
        return False
    sb.vm = BootedVm(sb.id, sb.workdir, proc, agent, listener)
    return True


async def recover(ctx: ManagerContext) -> None:
    """Settle every record (at most ADOPT_PARALLEL at once: a VM whose agent does not dial
    back costs ADOPT_TIMEOUT_S, and must not hold up the others), then remove orphans."""
    adopted_pids: set[int] = set()
    gate = asyncio.Semaphore(ADOPT_PARALLEL)

    async def one(sb: SandboxRecord) -> None:
        async with gate:
            logctx.sandbox_id.set(sb.id)  # this task's own context
            await _recover_one(ctx, sb, adopted_pids)

    records = [SandboxRecord.from_row(row) for row in ctx.store.sandboxes()]
    for sb in records:  # in creation order, before any await: list order stays stable
        if not sb.removing:
            ctx.sandboxes[sb.id] = sb
    await asyncio.gather(*(one(sb) for sb in records))
    checkpoints.reconcile(ctx)
    # nothing else may hold our resources
    await remove_orphan_cgroups(ctx)
    keep = {sb.workdir.name for sb in ctx.sandboxes.values()}
    root = ctx.data_dir / "sandboxes"
    if root.is_dir():
        for workdir in sorted(root.iterdir()):
            if workdir.name in keep:
                continue
            await _kill_users_of(workdir, adopted_pids)
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(socket_dir(workdir), ignore_errors=True)
            shutil.rmtree(memory_dir(workdir), ignore_errors=True)
            log.warning("removed sandbox directory %s that no record owns", workdir.name)
    if os.geteuid() == 0:
        owned = [(sb.lease, sb.egress) for sb in ctx.sandboxes.values() if sb.lease is not None]
        await ctx.network.start(keep_taps={lease.tap_name for lease, _ in owned}, adopted=owned)


async def _release_everything(ctx: ManagerContext, sb: SandboxRecord, proc: VmmProcess | None,
                              adopted_pids: set[int]) -> None:
    """Kill the recorded VMM and remove what its driver made, anything else using the
    sandbox's directory, its TAP and its socket directory; the disk copy goes too."""
    if proc is not None:
        await proc.kill()
        await proc.cleanup()
    await _kill_users_of(sb.workdir, adopted_pids)
    if sb.lease is not None:
        if os.geteuid() == 0:
            with contextlib.suppress(Exception):
                await ctx.network.release_orphan(sb.lease)
        sb.lease = None
    sb.pid = sb.pid_start = None
    with contextlib.suppress(FileNotFoundError):
        (sb.workdir / "rootfs.ext4").unlink()
    shutil.rmtree(socket_dir(sb.workdir), ignore_errors=True)
    shutil.rmtree(memory_dir(sb.workdir), ignore_errors=True)


async def _recover_one(ctx: ManagerContext, sb: SandboxRecord, adopted_pids: set[int]) -> None:
    proc = await _adopt_process(ctx, sb)
    if sb.removing:
        await _release_everything(ctx, sb, proc, adopted_pids)
        shutil.rmtree(sb.workdir, ignore_errors=True)
        sb.removed = True
        ctx.emit(sb, "removed", reason="recovered")
        log.info("finished removing sandbox %s", sb.id)
        return

    if sb.pool:  # a warm-pool VM never outlives its daemon: the next one fills its own pool
        await _release_everything(ctx, sb, proc, adopted_pids)
        shutil.rmtree(sb.workdir, ignore_errors=True)
        sb.removed = True
        ctx.sandboxes.pop(sb.id, None)
        ctx.store.delete_sandbox(sb.id)
        return

    ctx.sandboxes[sb.id] = sb
    alive = proc is not None and proc.returncode is None
    if sb.state == S.PAUSED and (sb.suspended or alive):
        if sb.lease is not None:
            ctx.network.pool.reserve(sb.lease.ip, sb.id)
        if not sb.suspended:  # paused in memory: stays paused; resume re-attaches its agent
            assert proc is not None
            sb.paused_process = proc
            adopted_pids.add(proc.pid)
        log.info("sandbox %s stays paused%s", sb.id, " (to disk)" if sb.suspended else "")
        return
    if sb.state in (S.READY, S.RUNNING) and alive:
        assert proc is not None
        if isinstance(proc, SnapshotProcess):  # a checkpoint interrupted by the crash left it paused
            with contextlib.suppress(Exception):
                await proc.resume()
        if sb.lease is not None:
            ctx.network.pool.reserve(sb.lease.ip, sb.id)
        if await _reconnect(ctx, sb, proc):
            adopted_pids.add(proc.pid)
            detached, lost = _execs.reconcile(ctx.store, sb, sb.vm.agent if sb.vm else None)
            sb.state = S.READY
            ctx.emit(sb, "ready", reason="adopted", lost_execs=lost, detached_execs=detached)
            start_watchers(ctx, sb)
            log.info("re-adopted sandbox %s (pid %s)", sb.id, sb.pid)
            return
        if sb.lease is not None:
            ctx.network.pool.release(sb.lease.ip)
        reason, error = "lost", "the VM survived a daemon restart but its agent did not reconnect"
    elif sb.state == S.STARTING:
        reason, error = "interrupted", "the daemon stopped while the sandbox was booting"
    elif sb.state in (S.READY, S.RUNNING, S.STOPPING, S.PAUSED):
        reason, error = "lost", "the VMM was gone when the daemon restarted"
    else:  # STOPPED / FAILED: resources were released already; make sure
        await _release_everything(ctx, sb, proc, adopted_pids)
        return
    await _release_everything(ctx, sb, proc, adopted_pids)
    _execs.reconcile(ctx.store, sb, None)
    sb.state = S.FAILED
    sb.error = error
    ctx.emit(sb, "failed", error=error, reason=reason)
    log.warning("sandbox %s is FAILED (%s): %s", sb.id, reason, error)
