"""Restore and fork: new sandboxes continued from a checkpoint.

A restore is a new sandbox — its own id, IP, TAP, MAC, copy of the disk and directories
— booted by the restore plan (`restore_plan.py`) instead of the cold one: READY once its
agent said HELLO again and took its new identity (REINIT). Its commands default to the
checkpointed sandbox's env, user and working directory; the commands that were running
at the checkpoint run on in it, detached (attachable by exec id) when its agent still
holds them. Any number of restores of one checkpoint may run at once: each maps the
checkpoint's memory copy-on-write.

A fork is a hidden checkpoint of a running sandbox and `count` restores of it, READY
together; the checkpoint is deleted once they are up (they keep the files they use).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path

from arcbox_vm.errors import ArcboxError, BootFailed, InvalidArgument, SandboxAlreadyExists
from arcbox_vm.manager import checkpoints as ckpts
from arcbox_vm.manager import execs as _execs
from arcbox_vm.manager import lifecycle, limits, network_policy
from arcbox_vm.manager.boot import BootPlan
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.record import SandboxRecord
from arcbox_vm.manager.restore_plan import SNAPSHOT_DIR, RestorePlan, RestoreRequest
from arcbox_vm.manager.steps import Step
from arcbox_vm.models import RestoreSandboxSpec, SandboxState
from arcbox_vm.ports import EgressPolicy

log = logging.getLogger(__name__)

S = SandboxState
MAX_FORK = 64


def _record(ctx: ManagerContext, ck: ckpts.Checkpoint, spec: RestoreSandboxSpec, sid: str,
            workdir_name: str) -> SandboxRecord:
    machine, defaults = ck.meta["machine"], ck.meta["defaults"]
    mode = spec.network.mode if spec.network is not None else machine["network_mode"]
    if mode != machine["network_mode"]:
        raise InvalidArgument(f"checkpoint {ck.id} was taken of a sandbox with network {machine['network_mode']!r}; "
                              f"a restore has the same network device (asked for {mode!r})")
    workdir = ctx.data_dir / "sandboxes" / workdir_name
    snapdir = workdir / SNAPSHOT_DIR
    sb = SandboxRecord(
        id=sid, labels=dict(spec.labels), vcpus=machine["vcpus"], memory_mib=machine["memory_mib"],
        kernel=str(snapdir / "kernel"), rootfs=str(ck.file("disk")),
        initrd=str(snapdir / "initrd") if ck.file("initrd") else "", boot_args=machine["boot_args"],
        env={**defaults["env"], **spec.env}, working_dir=defaults["working_dir"], user=defaults["user"],
        ttl_seconds=spec.ttl_seconds, network_mode=mode, workdir=workdir)
    sb.restored_from = ck.id
    sb.booted_kernel, sb.booted_initrd = sb.kernel, sb.initrd
    sb.vm_name = workdir_name if workdir_name != sid else ""
    return sb


async def restore(ctx: ManagerContext, spec: RestoreSandboxSpec, *, hidden_ok: bool = False,
                  pool: bool = False) -> tuple[str, str]:
    """Register the restored sandbox and start its restore; returns (id, ip) at once."""
    requested = time.monotonic()
    ck = ckpts.load(ctx, spec.snapshot_id, hidden_ok=hidden_ok)
    ckpts.snapshot_driver(ctx)
    sid = spec.id or str(uuid.uuid4())
    if sid in ctx.sandboxes:
        raise SandboxAlreadyExists(sid)
    sb = _record(ctx, ck, spec, sid, sid)
    sb.pool = pool
    sb.source = "pool" if pool else "restore"
    if sb.workdir.exists():
        raise SandboxAlreadyExists(sid)
    limits.check_sizes(ctx.config.limits, sb)
    limits.check_room(ctx.config.limits, sb, ctx.sandboxes.values())
    ctx.sandboxes[sid] = sb
    try:
        if sb.network_mode == "tap":
            sb.egress = _egress(ctx, ck, spec)
            sb.lease = await ctx.network.allocate(sid, sb.egress)
        _record_execs(ctx, sb, ck)
        ctx.emit(sb, "created", durations={"create": time.monotonic() - requested}, snapshot_id=ck.id,
                 reason="restore")
    except BaseException:
        ctx.sandboxes.pop(sid, None)
        await ctx.release_network(sb)
        with contextlib.suppress(ArcboxError):
            ctx.store.delete_sandbox(sid)
        raise
    sb.tasks["boot"] = asyncio.create_task(lifecycle.boot(ctx, sb, requested, make_plan=_plan_for(ck)),
                                           name=f"restore-{sid}")
    return sid, sb.lease.ip if sb.lease else ""


def _egress(ctx: ManagerContext, ck: ckpts.Checkpoint, spec: RestoreSandboxSpec) -> EgressPolicy | None:
    """The restore's egress policy: the spec's when it gives a network, else the
    checkpointed sandbox's (else the configured default)."""
    if spec.network is not None:
        return network_policy.resolve(spec.network, ctx.config.network.default_egress)
    saved = ck.meta["defaults"].get("egress")
    return EgressPolicy.from_json(saved) if saved else None


def _record_execs(ctx: ManagerContext, sb: SandboxRecord, ck: ckpts.Checkpoint) -> None:
    """The commands running at the checkpoint, as this sandbox's: reconciled with what its
    agent reports once it is up (detached if it still holds them, else lost)."""
    for ex in ck.meta.get("execs") or []:
        ctx.store.put_exec(sb.id, int(ex["channel"]), list(ex["argv"]))


def _plan_for(ck: ckpts.Checkpoint):  # noqa: ANN202
    async def make(ctx: ManagerContext, sb: SandboxRecord) -> BootPlan:
        lease = sb.lease
        req = RestoreRequest(
            sandbox_id=sb.launch_name, workdir=sb.workdir, kernel=Path(sb.kernel), rootfs=ck.file("disk"),  # type: ignore[arg-type]
            initrd=Path(sb.initrd) if sb.initrd else None, vcpus=sb.vcpus, memory_mib=sb.memory_mib,
            boot_args=sb.boot_args, extra_boot_args=lease.boot_args if lease else (),
            tap_name=lease.tap_name if lease else None, guest_mac=lease.mac if lease else None,
            netns=ctx.network.netns if lease else "", hello_timeout=ctx.config.agent.hello_timeout_s,
            snapshot=ck.snapshot(), memory_use="cow", reinit=identity(sb),
            boot_files={k: f for k in ("kernel", "initrd") if (f := ck.file(k)) is not None})
        plan = RestorePlan(ctx.driver, req, clone_disk=ctx.adapters.clone_disk)
        plan.steps.insert_after("reinit", Step("execs", lambda: _reconcile_execs(ctx, sb, plan)))
        for hook in ctx.boot_plan_hooks:
            hook(plan, sb)
        return plan

    return make


async def _reconcile_execs(ctx: ManagerContext, sb: SandboxRecord, plan: RestorePlan) -> None:
    _execs.reconcile(ctx.store, sb, plan.state["agent"])


def identity(sb: SandboxRecord) -> dict[str, str]:
    """What REINIT tells the guest about itself: hostname, and its address and MAC."""
    body = {"hostname": sb.id[:63]}
    if sb.lease is not None:
        ip_arg = next((a for a in sb.lease.boot_args if a.startswith("ip=")), "")
        body.update(ip=ip_arg[3:], mac=sb.lease.mac)
    return body


async def fork(ctx: ManagerContext, sb: SandboxRecord, count: int, timeout: float) -> list[tuple[str, str]]:
    """`count` running clones of a running sandbox; all READY, or none left behind."""
    if not 1 <= count <= MAX_FORK:
        raise InvalidArgument(f"fork count must be 1..{MAX_FORK}, got {count}")
    ck = await ckpts.create(ctx, sb, f"fork of {sb.id}", hidden=True)
    made: list[tuple[str, str]] = []
    try:
        spec = RestoreSandboxSpec(snapshot_id=ck.id, labels=dict(sb.labels), ttl_seconds=sb.ttl_seconds)
        for _ in range(count):
            made.append(await restore(ctx, spec, hidden_ok=True))
        await wait_ready(ctx, [sid for sid, _ in made], timeout)
    except BaseException:
        for sid, _ in made:
            clone = ctx.sandboxes.get(sid)
            if clone is not None:
                with contextlib.suppress(Exception):
                    await lifecycle.remove(ctx, clone, reason="fork_failed")
        raise
    finally:
        with contextlib.suppress(ArcboxError):
            ckpts.delete(ctx, ck.id, hidden_ok=True)
    return made


async def wait_ready(ctx: ManagerContext, ids: list[str], timeout: float) -> None:
    """Wait for the boot (restore) tasks of `ids`; BootFailed names those that failed."""
    tasks = [t for sid in ids if (t := ctx.sandboxes[sid].tasks.get("boot")) is not None]
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout)  # never cancels them
        if pending:
            raise asyncio.TimeoutError(f"restoring took more than {timeout:.0f} s")
    failed = [f"{sid}: {ctx.sandboxes[sid].error}" for sid in ids
              if sid in ctx.sandboxes and ctx.sandboxes[sid].state == S.FAILED]
    if failed:
        raise BootFailed("restoring failed: " + "; ".join(failed))

