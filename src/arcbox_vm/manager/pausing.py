"""Pause and resume: PAUSED sandboxes use no CPU; paused to disk, no memory either.

- In memory: the VMM stops running the guest (its vCPUs idle). The keepalive and the
  TTL stop with it (time spent paused does not count against the TTL); commands and
  file transfers are refused until `resume` ("resume it first").
- To disk: the paused VM's state and memory are saved in `<workdir>/suspend/` and its
  VMM stopped; the sandbox keeps its id, IP, TAP, disk and directory. Resume restores it
  (the restore plan without `workdir` and `disk`, the memory its own again) and gives it
  the host's clock and fresh entropy. Commands that ran in it run on after the resume,
  detached (attachable by exec id); streams attached at the pause end.

Both survive a daemon restart: a sandbox paused in memory is adopted paused (its agent
is re-attached at resume), one paused to disk is just a record and its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

from arcbox_vm.agent.host import AgentListener
from arcbox_vm.agent.host.reinit import reinit, supports_reinit
from arcbox_vm.errors import AgentError, ArcboxError, InvalidState
from arcbox_vm.manager import checkpoints as ckpts
from arcbox_vm.manager import execs as _execs
from arcbox_vm.manager import lifecycle
from arcbox_vm.manager.boot import BootedVm
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.manager.restore_plan import RestorePlan, RestoreRequest
from arcbox_vm.models import SandboxState
from arcbox_vm.paths import memory_dir, socket_dir
from arcbox_vm.ports import VmSnapshot

log = logging.getLogger(__name__)

S = SandboxState
SUSPEND_DIR = "suspend"
REATTACH_TIMEOUT_S = 30.0


def paused_refusal(sb: SandboxRecord, what: str) -> InvalidState:
    """The error for using a PAUSED sandbox."""
    return InvalidState(sb.id, sb.state.value, f"{what}; resume it first (resume_sandbox / `arcbox-vm resume`)")


def require_live(sb: SandboxRecord, wanted: str) -> None:
    """Refuse (InvalidState, saying `wanted`) unless the sandbox is READY or RUNNING."""
    if sb.state == S.PAUSED:
        raise paused_refusal(sb, wanted)
    if sb.state not in lifecycle.LIVE or sb.vm is None:
        raise InvalidState(sb.id, sb.state.value, wanted)


async def pause(ctx: ManagerContext, sb: SandboxRecord, to_disk: bool = False) -> None:
    async with sb.lock:
        if sb.state == S.PAUSED and (sb.suspended or not to_disk):
            return  # already as asked
        if sb.state not in (*lifecycle.LIVE, S.PAUSED) or sb.vm is None:
            raise InvalidState(sb.id, sb.state.value, "only a ready or running sandbox can be paused")
        vm = sb.vm
        proc = ckpts.snapshot_process(ctx, sb, restorable=to_disk)
        if sb.state != S.PAUSED:
            vm.agent.stop_keepalive()
            lifecycle.cancel_tasks(sb, "ttl")
            try:
                await proc.pause()
            except BaseException:  # failed or cancelled half-way: running it is
                with contextlib.suppress(Exception):
                    await proc.resume()
                vm.agent.start_keepalive(ctx.config.agent.keepalive_interval_s, ctx.config.agent.keepalive_timeout_s)
                _restart_timers(ctx, sb)
                raise
            sb.state, sb.paused_at = S.PAUSED, time.time()
        if to_disk:
            await _suspend(ctx, sb, vm)
        ctx.emit(sb, "paused", to_disk=str(to_disk).lower())


async def _suspend(ctx: ManagerContext, sb: SandboxRecord, vm: BootedVm) -> None:
    """Save the paused VM into <workdir>/suspend, then stop its VMM (TAP, IP, disk stay)."""
    part = sb.workdir / (SUSPEND_DIR + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    try:
        snap = await vm.process.save_state(part)  # type: ignore[attr-defined]
        (part / "meta.json").write_text(json.dumps({
            "vmm": snap.vmm, "details": snap.details, "state": snap.state.name,
            "memory": snap.memory.name if snap.memory else None}))
        part.rename(sb.workdir / SUSPEND_DIR)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise  # still paused in memory
    lifecycle.cancel_tasks(sb, "watch", "console")
    sb.detaching = True  # streams end; their commands run on in the guest after the resume
    try:
        ctx.execs.forget_all(sb, save=True)
        sb.vm = None
        await vm.agent.close()
        await vm.process.kill()
        await vm.process.cleanup()
        await vm.listener.close()
    finally:
        sb.detaching = False
    shutil.rmtree(socket_dir(sb.workdir), ignore_errors=True)
    shutil.rmtree(memory_dir(sb.workdir), ignore_errors=True)  # the memory is freed
    sb.suspended = True
    sb.restored_from = None  # no checkpoint's memory is mapped any more


def _saved(sb: SandboxRecord) -> VmSnapshot:
    d = sb.workdir / SUSPEND_DIR
    meta = json.loads((d / "meta.json").read_text())
    return VmSnapshot(state=d / meta["state"], memory=d / meta["memory"] if meta.get("memory") else None,
                      vmm=meta["vmm"], details=meta.get("details") or {})


async def resume(ctx: ManagerContext, sb: SandboxRecord) -> None:
    async with sb.lock:
        if sb.state != S.PAUSED:
            raise InvalidState(sb.id, sb.state.value, "only a paused sandbox can be resumed")
        if sb.suspended:
            await _resume_from_disk(ctx, sb)
        elif sb.vm is None:
            await _reattach(ctx, sb)
        else:
            await ckpts.snapshot_process(ctx, sb, restorable=False).resume()
            sb.vm.agent.start_keepalive(ctx.config.agent.keepalive_interval_s, ctx.config.agent.keepalive_timeout_s)
            _restart_timers(ctx, sb)
            await _set_clock(sb)
        if sb.paused_at is not None:
            sb.paused_total += max(0.0, time.time() - sb.paused_at)
        sb.paused_at = None
        sb.state = S.RUNNING if sb.active_execs else S.READY
        ctx.emit(sb, "resumed")


def _restart_timers(ctx: ManagerContext, sb: SandboxRecord) -> None:
    if sb.ttl_seconds > 0 and "ttl" not in sb.tasks:
        sb.tasks["ttl"] = asyncio.create_task(lifecycle.ttl(ctx, sb), name=f"ttl-{sb.id}")


async def _set_clock(sb: SandboxRecord) -> None:
    """The guest's clock stood still while it was paused: give it the host's (best effort)."""
    if sb.vm is None or not supports_reinit(sb.vm.agent):
        return
    with contextlib.suppress(AgentError, asyncio.TimeoutError):
        errors = await reinit(sb.vm.agent, {"time": time.time()}, timeout=10.0)
        if errors:
            log.warning("sandbox %s: setting the clock after resume failed: %s", sb.id, "; ".join(errors))


async def _resume_from_disk(ctx: ManagerContext, sb: SandboxRecord) -> None:
    lease = sb.lease
    req = RestoreRequest(
        sandbox_id=sb.launch_name, workdir=sb.workdir, kernel=Path(sb.booted_kernel or sb.kernel),
        rootfs=sb.workdir / "rootfs.ext4", initrd=Path(sb.booted_initrd) if sb.booted_initrd else None,
        vcpus=sb.vcpus, memory_mib=sb.memory_mib, boot_args=sb.boot_args,
        extra_boot_args=lease.boot_args if lease else (), tap_name=lease.tap_name if lease else None,
        guest_mac=lease.mac if lease else None, netns=ctx.network.netns if lease else "",
        hello_timeout=ctx.config.agent.hello_timeout_s, snapshot=_saved(sb), memory_use="own",
        link_files=False, reinit={"hostname": sb.id[:63]})
    plan = RestorePlan(ckpts.snapshot_driver(ctx), req, clone_disk=ctx.adapters.clone_disk)  # type: ignore[arg-type]
    plan.steps.remove("workdir")  # its undo would remove the sandbox's directory
    plan.steps.remove("disk")
    sb.vm = await plan.run()
    shutil.rmtree(sb.workdir / SUSPEND_DIR, ignore_errors=True)
    sb.suspended = False
    _execs.reconcile(ctx.store, sb, sb.vm.agent)
    lifecycle.start_watchers(ctx, sb)


async def _reattach(ctx: ManagerContext, sb: SandboxRecord) -> None:
    """Resume a VM this daemon adopted paused: listen for its agent, run it, re-attach."""
    proc = sb.paused_process
    if proc is None or proc.returncode is not None:
        raise InvalidState(sb.id, sb.state.value, "its VMM is gone; remove it")
    endpoint = ctx.driver.agent_endpoint(socket_dir(sb.workdir))
    listener = AgentListener(endpoint.listen_path)
    await listener.start()
    try:
        await proc.resume()
        agent = await listener.accept(REATTACH_TIMEOUT_S, vmm_exit=proc.exited, describe_exit=proc.describe_exit,
                                      hello_again=True)
    except BaseException:
        await listener.close()
        with contextlib.suppress(Exception):
            await proc.pause()
        raise
    sb.paused_process = None
    sb.vm = BootedVm(sb.id, sb.workdir, proc, agent, listener)
    _execs.reconcile(ctx.store, sb, agent)
    lifecycle.start_watchers(ctx, sb)
    await _set_clock(sb)


async def stop_paused(ctx: ManagerContext, sb: SandboxRecord) -> None:
    """Stop a PAUSED sandbox: resumed first when in memory (a graceful stop needs its
    agent); paused to disk, its saved state is dropped."""
    if sb.suspended:
        with contextlib.suppress(ArcboxError):
            shutil.rmtree(sb.workdir / SUSPEND_DIR, ignore_errors=True)
        return
    await resume(ctx, sb)
