"""Sandbox lifecycle use cases: create → boot → (watch, TTL) → stop → remove.

- Ready means the agent's HELLO arrived; TTL counts from ready.
- A watcher turns an unexpected VMM exit (`vmm_exited`) or an agent that stopped answering
  its keepalive (`agent_unresponsive`; `agent_protocol_violation` when it was cut off) into FAILED.
- Stop really waits: agent shutdown, then the VMM's own stop request, then kill; it
  releases the VM, TAP and IP and keeps the record (STOPPED).
- Remove and boot failure release everything: process, TAP, IP lease, sockets, disk copy,
  directory. A removal is recorded first, so a restart finishes a half-done one.
- Every event is logged as one structured line with the durations of its step (see
  `ManagerContext.emit` and `observers.py`): create, ready (from the create request),
  boot, launch, hello, stop, remove.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable

from arcbox_vm.errors import AgentUnresponsive, ArcboxError, InvalidState, SandboxAlreadyExists
from arcbox_vm.manager.boot import BootPlan, BootRequest, remove_dirs
from arcbox_vm.manager.console import keep_capped
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager import limits, network_policy, ports
from arcbox_vm.manager.images import image_run_defaults, resolve_images
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.models import SandboxSpec, SandboxState

log = logging.getLogger(__name__)

S = SandboxState
LIVE = (S.READY, S.RUNNING)
WATCHED = (*LIVE, S.PAUSED)  # states in which the VMM's exit is a failure


async def create(ctx: ManagerContext, spec: SandboxSpec, *, pool: bool = False) -> tuple[str, str]:
    """Register a sandbox and start its boot task; returns (id, ip) before boot.
    `pool`: the warm pool's (hidden, no events; see pool.py)."""
    requested = time.monotonic()
    sb = new_record(ctx, spec)
    sb.pool = pool
    sid = sb.id
    limits.check_room(ctx.config.limits, sb, ctx.sandboxes.values())
    ports.reserve(sb, ctx.config.limits)  # a host port in use fails here, before anything is made
    ctx.sandboxes[sid] = sb  # reserve the id (and its share of the limits) before the first await
    try:
        if sb.network_mode == "tap":
            sb.egress = network_policy.resolve(spec.network, ctx.config.network.default_egress)
            sb.lease = await ctx.network.allocate(sid, sb.egress)
        ctx.emit(sb, "created", durations={"create": time.monotonic() - requested})  # recorded before anything else
    except BaseException:
        del ctx.sandboxes[sid]
        await ctx.release_network(sb)
        raise
    sb.tasks["boot"] = asyncio.create_task(boot(ctx, sb, requested), name=f"boot-{sid}")
    return sid, sb.lease.ip if sb.lease else ""


def new_record(ctx: ManagerContext, spec: SandboxSpec) -> SandboxRecord:
    """The record `spec` asks for (defaults filled in), its id free, its sizes checked."""
    sid = spec.id or str(uuid.uuid4())
    if sid in ctx.sandboxes:
        raise SandboxAlreadyExists(sid)
    d = ctx.config.defaults
    rootfs = spec.rootfs or d.rootfs
    image = image_run_defaults(rootfs)
    sb = SandboxRecord(
        id=sid, labels=dict(spec.labels), vcpus=spec.vcpus or d.vcpus,
        memory_mib=spec.memory_mib or d.memory_mib, kernel=spec.kernel or d.kernel,
        rootfs=rootfs, initrd=spec.initrd or d.initrd,
        boot_args=spec.boot_args or d.boot_args, env={**image.env, **spec.env},
        working_dir=spec.working_dir or image.working_dir,
        user=spec.user or image.user, ttl_seconds=spec.ttl_seconds, network_mode=spec.network.mode,
        workdir=ctx.data_dir / "sandboxes" / sid, ports=list(spec.ports), on_ttl=spec.on_ttl,
    )
    if sb.workdir.exists():
        raise SandboxAlreadyExists(sid)
    limits.check_sizes(ctx.config.limits, sb)
    return sb


def boot_plan(ctx: ManagerContext, sb: SandboxRecord, kernel, initrd, rootfs) -> BootPlan:  # noqa: ANN001
    """The cold boot plan of `sb`, edited by the manager's boot-plan hooks."""
    lease = sb.lease
    req = BootRequest(
        sandbox_id=sb.id, workdir=sb.workdir, kernel=kernel, rootfs=rootfs, initrd=initrd,
        vcpus=sb.vcpus, memory_mib=sb.memory_mib, boot_args=sb.boot_args,
        extra_boot_args=lease.boot_args if lease else (),
        tap_name=lease.tap_name if lease else None, guest_mac=lease.mac if lease else None,
        netns=ctx.network.netns if lease else "", hello_timeout=ctx.config.agent.hello_timeout_s,
    )
    plan = BootPlan(ctx.driver, req, clone_disk=ctx.adapters.clone_disk)
    ports.add_boot_check(plan, sb)
    for hook in ctx.boot_plan_hooks:
        hook(plan, sb)
    return plan


async def cold_plan(ctx: ManagerContext, sb: SandboxRecord) -> BootPlan:
    kernel, initrd, rootfs = await resolve_images(ctx.adapters.images, ctx.driver, sb.kernel, sb.initrd, sb.rootfs)
    sb.booted_kernel, sb.booted_initrd = str(kernel), str(initrd or "")
    return boot_plan(ctx, sb, kernel, initrd, rootfs)


async def boot(ctx: ManagerContext, sb: SandboxRecord, requested: float | None = None,
               make_plan: Callable[[ManagerContext, SandboxRecord], Awaitable[BootPlan]] = cold_plan) -> None:
    """Run `sb`'s plan — the cold boot unless `make_plan` says otherwise (a restore) —
    (created at `requested`, time.monotonic(), for the ready duration); READY when it is
    done, FAILED with what went wrong otherwise."""
    requested = time.monotonic() if requested is None else requested
    plan: BootPlan | None = None
    t0 = time.monotonic()
    try:
        driver = ctx.driver
        sb.vmm = driver.name
        plan = await make_plan(ctx, sb)
        t0 = time.monotonic()
        vm = await plan.run()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await ctx.release_network(sb)
        sb.state = S.FAILED
        sb.error = str(exc)
        log.warning("sandbox %s failed to boot: %s", sb.id, exc)
        if plan is not None and plan.step == "wait-hello":
            ctx.observers.agent_error(sb.id, "no_hello")
        ctx.emit(sb, "failed", durations={"boot": time.monotonic() - t0}, error=str(exc), reason="boot_error")
        return
    sb.vm = vm
    sb.state = S.READY
    sb.ready_at = time.time()
    durations = {"ready": time.monotonic() - requested, "boot": time.monotonic() - t0,
                 **{"launch" if k == "launched" else k: v for k, v in vm.timings.items()}}
    try:
        ctx.emit(sb, "ready", durations=durations)
    except ArcboxError as exc:  # could not record it: do not run an unrecorded VM
        sb.vm = None
        await vm.destroy()
        await ctx.release_network(sb)
        sb.state = S.FAILED
        sb.error = str(exc)
        return
    start_watchers(ctx, sb)


def start_watchers(ctx: ManagerContext, sb: SandboxRecord) -> None:
    """VMM-exit watcher, the TTL timer (counted from ready) when one is set, forwarded ports."""
    sb.tasks["watch"] = asyncio.create_task(watch_vmm(ctx, sb), name=f"watch-{sb.id}")
    if sb.vm is not None:
        sb.tasks["console"] = asyncio.create_task(
            keep_capped(sb.vm.process.console_log, ctx.config.limits.console_log_max_bytes), name=f"console-{sb.id}")
    if sb.ttl_seconds > 0:
        sb.tasks["ttl"] = asyncio.create_task(ttl(ctx, sb), name=f"ttl-{sb.id}")
    ports.start(sb, ctx.config.limits)


async def watch_vmm(ctx: ManagerContext, sb: SandboxRecord) -> None:
    """An unexpected VMM exit (reason vmm_exited) or an agent that stopped answering
    its keepalive or its channel (reason agent_unresponsive), or one the host cut off for
    breaking the protocol (reason agent_protocol_violation) fails the sandbox; the VMM is then killed."""
    vm = sb.vm
    assert vm is not None
    a = ctx.config.agent
    vm.agent.start_keepalive(a.keepalive_interval_s, a.keepalive_timeout_s)
    exited = asyncio.ensure_future(vm.process.wait())
    try:
        await asyncio.wait({exited, vm.agent.closed}, return_when=asyncio.FIRST_COMPLETED)
        frozen = vm.agent.closed.done() and isinstance(vm.agent.closed.result(), AgentUnresponsive)
        cut_off = vm.agent.closed.done() and getattr(vm.agent.closed.result(), "code", "") == "protocol_violation"
        if not exited.done() and not frozen and not cut_off:  # a guest that powers off closes the channel just before
            await asyncio.wait({exited}, timeout=5.0)
    finally:
        if not exited.done():
            exited.cancel()
    if sb.state not in WATCHED or sb.removed or sb.vm is not vm:
        return  # stop/remove in progress: they own the outcome
    if exited.done() and not exited.cancelled():
        reason, sb.error = "vmm_exited", f"the VMM exited unexpectedly (status {exited.result()})"
    elif cut_off:  # flooded, garbled: the host cut it off
        reason, sb.error = "agent_protocol_violation", str(vm.agent.closed.result())  # says what it did
        ctx.observers.agent_error(sb.id, "disconnected")
    else:
        reason, sb.error = "agent_unresponsive", f"the guest agent stopped answering: {vm.agent.closed.result()}"
        ctx.observers.agent_error(sb.id, "unresponsive" if frozen else "disconnected")
    sb.state = S.FAILED
    sb.vm = None
    cancel_tasks(sb, "console", "ttl")
    await vm.destroy()
    await ctx.release_network(sb)
    ctx.emit(sb, "failed", error=sb.error, reason=reason)


async def ttl(ctx: ManagerContext, sb: SandboxRecord) -> None:
    """Remove the sandbox at its deadline (pausing cancels this task, resuming restarts it);
    with on_ttl "pause", pause it to disk instead and spend its TTL (removed if that fails)."""
    await asyncio.sleep(max(0.0, (sb.ttl_deadline() or time.time()) - time.time()))
    if sb.removed:
        return
    sb.tasks.pop("ttl", None)  # do not cancel ourselves
    if sb.on_ttl == "pause" and ctx.pause_to_disk is not None:
        try:
            await ctx.pause_to_disk(sb)
        except ArcboxError as exc:
            log.warning("sandbox %s: pausing it at its TTL failed (%s); removing it", sb.id, exc)
        else:
            sb.ttl_seconds = 0  # spent: resuming does not pause it again at once
            ctx.save(sb)
            return
    await remove(ctx, sb, reason="ttl")


def set_ttl(ctx: ManagerContext, sb: SandboxRecord, seconds: float) -> None:
    """Remove the sandbox `seconds` from now (0 = never): its TTL, counted from ready, is
    moved; before ready, `seconds` becomes the TTL. Persisted (a restart keeps it)."""
    if sb.removed:
        raise InvalidState(sb.id, sb.state.value, "it is being removed")
    cancel_tasks(sb, "ttl")
    if seconds <= 0:
        sb.ttl_seconds = 0
    elif sb.ready_at is None:
        sb.ttl_seconds = math.ceil(seconds)
    else:
        sb.ttl_seconds = max(1, math.ceil(time.time() - sb.ready_at - sb.paused_total + seconds))
    ctx.save(sb)
    if sb.ttl_seconds and sb.state in LIVE:
        sb.tasks["ttl"] = asyncio.create_task(ttl(ctx, sb), name=f"ttl-{sb.id}")


def cancel_tasks(sb: SandboxRecord, *names: str) -> None:
    current = asyncio.current_task()
    for name in names:
        task = sb.tasks.pop(name, None)
        if task is not None and task is not current:
            task.cancel()


async def stop(ctx: ManagerContext, sb: SandboxRecord, timeout: float) -> None:
    async with sb.lock:
        suspended = sb.state == S.PAUSED and sb.suspended
        if sb.state not in LIVE and not suspended:
            raise InvalidState(sb.id, sb.state.value, "only a ready, running or paused sandbox can be stopped")
        t0 = time.monotonic()
        sb.state = S.STOPPING
        ctx.emit(sb, "stopping", reason="user")
        cancel_tasks(sb, "watch", "ttl", "console")
        vm, sb.vm = sb.vm, None
        graceful = False
        if vm is not None:
            graceful = await vm.shutdown(timeout)
            await vm.destroy()
        ctx.execs.forget_all(sb)
        await ctx.release_network(sb)
        if suspended:  # no VMM: its saved state and disk go
            remove_dirs(sb.workdir)
            sb.suspended, sb.paused_at = False, None
        sb.state = S.STOPPED
        ctx.emit(sb, "stopped", durations={"stop": time.monotonic() - t0}, reason="user",
                 graceful=str(graceful).lower())


async def remove(ctx: ManagerContext, sb: SandboxRecord, reason: str) -> None:
    if sb.removed:
        return
    t0 = time.monotonic()
    sb.removed = True
    sb.removing = True
    with contextlib.suppress(ArcboxError):
        ctx.save(sb)  # a restart finishes what this starts
    cancel_tasks(sb, "watch", "ttl", "console")
    task = sb.tasks.pop("boot", None)
    if task is not None and not task.done():
        task.cancel()
    if task is not None:
        with contextlib.suppress(BaseException):
            await task  # its start-up steps undo themselves
    async with sb.lock:
        vm, sb.vm = sb.vm, None
        if vm is not None:
            await vm.destroy()
        adopted, sb.paused_process = sb.paused_process, None
        if adopted is not None:  # a paused VMM adopted after a restart
            await adopted.kill()
            await adopted.cleanup()
        ctx.execs.forget_all(sb)
        await ctx.release_network(sb)
        remove_dirs(sb.workdir)
        ctx.sandboxes.pop(sb.id, None)
        ctx.emit(sb, "removed", durations={"remove": time.monotonic() - t0}, reason=reason)


async def detach_all(ctx: ManagerContext) -> None:
    """Let go of every VM without stopping it (booting ones cannot be adopted: removed)."""
    for sb in list(ctx.sandboxes.values()):
        if sb.state == S.STARTING:
            with contextlib.suppress(Exception):
                await remove(ctx, sb, reason="manager_closed")
            continue
        cancel_tasks(sb, "watch", "ttl", "console", "boot")
        # first: commands keep running in the guest (keep_commands_running), their unread output saved
        ctx.execs.forget_all(sb, save=True)
        await ports.release(sb)  # the next manager listens again
        vm, sb.vm = sb.vm, None
        if vm is not None:
            await vm.detach()
